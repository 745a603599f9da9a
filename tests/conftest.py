"""Shared fixtures: smtap_root (a test's own SMTAP_ROOT), work (a test's own working
directory); before the first test, what killed runs left behind goes; every test takes the
run's lock, an `alone` one exclusively (lib.runlock)."""
import os
import pathlib

import pytest

from lib import hosts, runlock


@pytest.fixture(autouse=True)
def run_lock(request, tmp_path_factory):
    """First in, last out of the test's fixtures (autouse, at the top): a test marked
    `alone` runs with no test of another worker beside it, its set-up and teardown
    included."""
    path = runlock.lock_path(request.config, tmp_path_factory.getbasetemp())
    with runlock.held(path, exclusive=request.node.get_closest_marker("alone") is not None):
        yield


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
