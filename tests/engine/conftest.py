"""Engine fixtures. Every tapdisk a test starts dies with the test, even on failure:
smtap_root's teardown kills every process of the root."""
import subprocess

import pytest

from lib.engine import Served, Tap


@pytest.fixture(autouse=True)
def own_root(smtap_root):
    """Every engine test runs under its own root, whose teardown kills what it left."""
    return smtap_root


@pytest.fixture
def make_tap(smtap_root):
    """make_tap("aio:/path", **create_kwargs) -> Tap; destroyed after the test."""
    from smtap.tapdisk import tapctl
    taps = []

    def make(params, **kwargs):
        pid, minor, device = tapctl.create(params, **kwargs)
        tap = Tap(pid, minor, device, params)
        taps.append(tap)
        return tap

    yield make
    for tap in taps:
        try:
            tap.destroy()
        except OSError:
            pass    # the test destroyed or killed it; reap_tapdisks does the rest


@pytest.fixture
def serve(smtap_root):
    """serve("type:/path", "-R", ...) -> Served; stopped after the test."""
    import sys
    served = []

    def start(params, *args, minor=None):
        minor = len(served) if minor is None else minor
        cmd = [sys.executable, "-m", "smtap.tapdisk.vbd", "-m", str(minor)] + list(args) + [params]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline().split()
        if not line:
            err = proc.stderr.read()
            proc.wait()
            raise AssertionError("serving %s failed: %s" % (params, err.strip()))
        s = Served(proc, line[0], line[1] if len(line) > 1 else None)
        served.append(s)
        return s

    yield start
    for s in served:
        s.stop()
