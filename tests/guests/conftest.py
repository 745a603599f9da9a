"""Guest fixtures: a started host that boots real guests (lib.guests.GuestHost: qemu,
the tiny guest of `make build`); skipped, with the reason, where qemu or the guest image
is missing. Whatever a test leaves (qemu, tapdisks, mounts) is removed afterwards, even
on failure."""
import pytest

from lib import hosts
from lib.guests import GuestHost, why_not


@pytest.fixture
def smtap_root(monkeypatch):
    with hosts.host_root(monkeypatch, "/tmp/g") as root:
        yield root


@pytest.fixture
def can_boot():
    """Skips the test, with the reason, where no guest can boot."""
    reason = why_not()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def guests(can_boot, smtap_root):
    h = GuestHost(smtap_root)
    try:
        h.install()
        yield h.start_all()
    finally:
        h.cleanup()
