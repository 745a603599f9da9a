"""Shared fixtures: every test that asks for smtap_root runs under its own SMTAP_ROOT."""
import pathlib

import pytest

from lib import hosts


@pytest.fixture
def smtap_root(monkeypatch):
    """A fresh host root (a pathlib.Path) for this test; subprocesses inherit it through
    the environment. Whatever the test left (mounts, loop devices, processes) goes, then
    the root."""
    with hosts.host_root(monkeypatch) as root:
        yield pathlib.Path(root)
