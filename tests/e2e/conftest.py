"""End-to-end fixtures: a simulated host (installed tree + smtap-xapi) per test, driven
through the installed `xe` like a person would, checked with the real XenAPI client and
the machine's own state (lib.toolstack.E2EHost). Whatever a test leaves behind is
removed afterwards, even on failure; tests assert that nothing was left."""
import os

import pytest

from lib import hosts
from lib.procs import run
from lib.toolstack import E2EHost
from smtap.toolstack import hostroot


@pytest.fixture
def smtap_root(monkeypatch):
    """A short root under /tmp/e (a str), removed afterwards with anything that still runs
    or is mounted under it."""
    with hosts.host_root(monkeypatch, "/tmp/e") as root:
        yield root


@pytest.fixture
def e2e(smtap_root):
    h = E2EHost(smtap_root)
    try:
        h.install()
        yield h.start_all()
    finally:
        h.cleanup()


@pytest.fixture
def mnt(smtap_root):
    """A mount point under the root; unmounted afterwards if a test left it mounted."""
    point = os.path.join(smtap_root, "mnt", "fs")
    os.makedirs(point)
    yield point
    if any(m[0] == point for m in hostroot.mounts_under(smtap_root)):
        if run("umount", point, check=False).returncode:
            run("umount", "-l", point, check=False)
