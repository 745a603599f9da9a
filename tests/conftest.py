"""Shared fixtures: every test runs under its own SMTAP_ROOT."""
import os
import pathlib
import shutil

import pytest

from smtap.toolstack.hostroot import cleanup, short_root

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(TOP, ".venv", "bin")


@pytest.fixture
def smtap_root(monkeypatch):
    """A fresh host root (a pathlib.Path) for this test; subprocesses inherit it through the environment.
    Whatever the test left (mounts, loop devices, processes) goes, then the root."""
    root = short_root()
    monkeypatch.setenv("SMTAP_ROOT", root)
    monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    yield pathlib.Path(root)
    cleanup(root)   # mounts, loop devices, then processes of the root
    shutil.rmtree(root, ignore_errors=True)
