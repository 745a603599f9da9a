"""Shared fixtures: every test runs under its own SMTAP_ROOT."""
import os
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(TOP, ".venv", "bin")


@pytest.fixture
def smtap_root(tmp_path, monkeypatch):
    """A fresh host root for this test; subprocesses inherit it through the environment."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("SMTAP_ROOT", str(root))
    monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    return root
