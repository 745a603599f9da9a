"""Toolstack fixtures: a simulated host (installed tree + smtap-xapi) per test
(lib.toolstack.Host)."""
import pytest

from lib.toolstack import Host


@pytest.fixture
def host(smtap_root):
    """An installed, not yet started host; stopped (and leftovers removed) afterwards."""
    h = Host(smtap_root)
    try:
        h.install()
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def test_host(host):
    """A started host with the test driver (type "test") whitelisted by a drop-in."""
    host.add_driver()
    host.conf("zz-tests.conf", "sm-plugins = dummy test\n")
    return host.start()


@pytest.fixture
def xapi(host):
    """A XenAPI session (the real client) to a started host running DummySR."""
    return host.start_session().x
