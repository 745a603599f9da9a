"""Host roots: a fresh, short SMTAP_ROOT per test, and whatever the test left under it
(mounts, loop devices, processes) removed with it, even when the test failed midway
(over smtap.toolstack.hostroot, which `make demo` uses too)."""
import contextlib
import os
import shutil

from lib.checkout import VENV_BIN

try:
    from smtap.toolstack import hostroot
except ImportError:     # the RPM's library (tests/unit in %check) has no toolstack
    hostroot = None


@contextlib.contextmanager
def host_root(monkeypatch, prefix="/tmp/s"):
    """A new root (a str) in SMTAP_ROOT, the checkout's commands first on PATH; the
    environment is what subprocesses inherit. Afterwards: everything of the root goes,
    then the root itself (not while something is still mounted in it)."""
    root = hostroot.short_root(prefix)
    monkeypatch.setenv("SMTAP_ROOT", root)
    monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    try:
        yield root
    finally:
        remove_root(root)


def remove_root(root):
    """Everything of the root (mounts, loop devices, then its processes), then the root
    itself unless something is still mounted in it. True if the directory went."""
    hostroot.cleanup(root)
    if hostroot.mounts_under(root):
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


PREFIXES = ("/tmp/s", "/tmp/e")      # host_root's: the tests' and the e2e tests'


def sweep_stale_roots(prefixes=PREFIXES):
    """Remove the roots of runs that died without cleaning up (a pytest killed with -9:
    no fixture ran): their mounts, loop devices, processes, then the directory. Roots
    of live runs (other worktrees' suites) are left alone. Returns the roots removed."""
    removed = []
    for prefix in prefixes:
        removed += [root for root in hostroot.stale_roots(prefix) if remove_root(root)]
    return removed


def tapdisks_under(root):
    """[(pid, command line)] of the live tapdisk daemons of this root."""
    return [p for p in hostroot.processes_under(str(root)) if "smtap.tapdisk.daemon" in p[1]]


def nbdfuse_mounts(root):
    """[(mount point, fs type, source)] of the FUSE mounts (nbdfuse) under root."""
    return [m for m in hostroot.mounts_under(str(root)) if m[1].startswith("fuse")]
