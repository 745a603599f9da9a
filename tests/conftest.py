"""Shared fixtures: smtap_root (a test's own SMTAP_ROOT), work (a test's own working
directory); before the first test, what killed runs left behind goes."""
import os
import pathlib

import pytest

from lib import hosts


@pytest.fixture(scope="session", autouse=True)
def stale_roots_swept():
    """Host roots of earlier runs killed midway (their fixtures never ran) are removed
    first: their loop devices and mounts would otherwise stay on the machine."""
    if hosts.hostroot is not None and os.geteuid() == 0:
        hosts.sweep_stale_roots()


@pytest.fixture
def smtap_root(monkeypatch):
    """A fresh host root (a pathlib.Path) for this test; subprocesses inherit it through
    the environment. Whatever the test left (mounts, loop devices, processes) goes, then
    the root."""
    with hosts.host_root(monkeypatch) as root:
        yield pathlib.Path(root)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The test runs in its own temporary directory (images, journals, raw dumps)."""
    monkeypatch.chdir(str(tmp_path))
    return tmp_path
