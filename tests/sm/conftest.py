"""SM framework fixtures: a small XenAPI server and the installed DummySR (tests/lib/sm.py)."""
import pytest

from lib import sm


@pytest.fixture
def xapi(smtap_root):
    """A XenAPI server on settings.xapi_socket() knowing one SR (a lib.sm.FakeXapi)."""
    with sm.fake_xapi_server() as fake:
        yield fake


@pytest.fixture
def dummy(xapi):
    return sm.dummy_driver(xapi)
