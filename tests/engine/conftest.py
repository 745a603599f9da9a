"""Engine fixtures. Every tapdisk a test starts dies with the test, even on failure:
smtap_root's teardown kills every process of the root."""
import pytest

from lib.engine import IO_BACKENDS, NBD_LOOPS, Served, Tap, have_io_uring, nbd_loop_env


@pytest.fixture(autouse=True)
def own_root(smtap_root):
    """Every engine test runs under its own root, whose teardown kills what it left."""
    return smtap_root


@pytest.fixture(params=IO_BACKENDS)
def io_backend(request, monkeypatch):
    """The test runs once on each I/O back end (io_uring, libaio): SMTAP_IO for the
    tapdisks it starts. Check with stats()["io"] that one did use it."""
    if request.param == "io_uring" and not have_io_uring():
        pytest.skip("this kernel has no io_uring for this process")
    monkeypatch.setenv("SMTAP_IO", request.param)
    return request.param


@pytest.fixture(params=NBD_LOOPS)
def nbd_loop(request, monkeypatch):
    """The test runs with the NBD loop's C part (tapdisk/smtap_nbd.c) on and off
    (SMTAP_NBD_C=0) for the tapdisks it starts: Python's loop is the reference."""
    monkeypatch.setenv(*nbd_loop_env(request.param))
    return request.param


@pytest.fixture
def make_tap(smtap_root):
    """make_tap("aio:/path", **create_kwargs) -> Tap; destroyed after the test."""
    taps = []

    def make(params, **kwargs):
        taps.append(Tap.create(params, **kwargs))
        return taps[-1]

    yield make
    for tap in taps:
        try:
            tap.destroy()
        except OSError:
            pass    # the test destroyed or killed it; reap_tapdisks does the rest


@pytest.fixture
def serve(smtap_root):
    """serve("type:/path", "-R", ..., minor=None) -> Served; stopped after the test."""
    served = []

    def start(params, *args, minor=None):
        served.append(Served.start(params, *args,
                                   minor=len(served) if minor is None else minor))
        return served[-1]

    yield start
    for s in served:
        s.stop()
