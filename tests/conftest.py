"""Shared fixtures: every test runs under its own SMTAP_ROOT."""
import os
import pathlib
import shutil
import subprocess

import pytest

from testlib import mounts_under, short_root

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(TOP, ".venv", "bin")


@pytest.fixture
def smtap_root(monkeypatch):
    """A fresh host root (a pathlib.Path) for this test; subprocesses inherit it through the environment.
    Whatever the test mounted under it is unmounted, and the root removed, afterwards."""
    root = short_root()
    monkeypatch.setenv("SMTAP_ROOT", root)
    monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    yield pathlib.Path(root)
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", point])
    shutil.rmtree(root, ignore_errors=True)
