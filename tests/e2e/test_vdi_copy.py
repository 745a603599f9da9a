"""xe vdi-copy with real data: both VDIs attached on the host for an nbdcopy between their
NBD exports (a plugged source read through its own attachment), the copy's bytes the
source's; nothing left attached after. And xe's warning before a ram PBD unplug."""
import hashlib
import os

from lib.sizes import MiB

SIZE = 8 * MiB


def digest(dev):
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


def test_vdi_copy_between_ram_vdis(e2e):
    sr = e2e.sr_create("ram")
    src = e2e.vdi_create(sr, "8MiB", "source")
    vbd, dev = e2e.plug(src)
    with open(dev, "r+b") as f:
        f.write(os.urandom(SIZE))
        f.flush()
        os.fsync(f.fileno())
    expected = digest(dev)
    # while plugged (read through the VBD's attachment), then unplugged (attached for it)
    hot = e2e.xe_ok("vdi-copy", "uuid=" + src, "sr-uuid=" + sr)
    e2e.unplug(vbd)
    cold = e2e.xe_ok("vdi-copy", "uuid=" + src, "sr-uuid=" + sr)
    for copy in (hot, cold):
        assert copy != src and e2e.xe_ok(
            "vdi-param-get", "uuid=" + copy, "param-name=name-label") == "source"
        assert e2e.xe_ok("vdi-param-get", "uuid=" + copy, "param-name=virtual-size") == \
            str(SIZE)
        vbd, dev = e2e.plug(copy, "RO")
        assert digest(dev) == expected
        e2e.unplug(vbd)
    # into an existing VDI too small: refused, the target kept
    small = e2e.vdi_create(sr, "4MiB", "small")
    code, _ = e2e.xe_fails("vdi-copy", "uuid=" + src, "into-vdi-uuid=" + small)
    assert code == "VDI_TOO_SMALL"
    assert len(e2e.tapdisks()) == 0 and not e2e.nbdfuse_mounts()
    for v in (src, hot, cold, small):
        e2e.xe_ok("vdi-destroy", "uuid=" + v)
    # pbd-unplug of a ram SR drops the contents: xe says so before it does it
    pbd = e2e.xe_ok("pbd-list", "sr-uuid=" + sr, "--minimal")
    res = e2e.xe("pbd-unplug", "uuid=" + pbd)
    assert res.returncode == 0
    assert res.stderr == ("Warning: SR %s is of type ram: unplugging its PBD drops every "
                          "VDI's contents.\n" % sr)
    e2e.xe_ok("sr-destroy", "uuid=" + sr)
