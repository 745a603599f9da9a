"""Driver fixtures: a simulated host (installed tree + smtap-xapi) per test, driven with
the real XenAPI client (lib.toolstack.DriverHost); whatever a test leaves (tapdisks,
tmpfs mounts) goes with it."""
import pytest

from lib.toolstack import DriverHost


@pytest.fixture
def dhost(smtap_root):
    h = DriverHost(smtap_root)
    try:
        h.install()
        yield h.start_session()
    finally:
        h.cleanup()


@pytest.fixture
def ram_sr(dhost):
    """A 64 MiB ram SR, plugged."""
    return dhost.sr_create("ram", {"size": "64MiB"})
