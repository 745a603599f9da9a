"""Which plugs of one VDI XAPI allows (xapi_vbd_helpers): a VDI that is not sharable
takes one RW VBD or any number of RO ones; a sharable one takes several RW VBDs.
Failed before: a second RW plug, and RW after RO, were accepted (two VBDs on one loop
device; an RW VBD on a read-only device)."""
from lib.toolstack import dom0_vbd, failure, new_sr, new_vdi


def test_one_writer_or_many_readers(xapi):
    x = xapi
    vdi = new_vdi(x, new_sr(x))
    rw1, rw2, ro1, ro2 = [dom0_vbd(x, vdi, mode) for mode in ("RW", "RW", "RO", "RO")]
    x.VBD.plug(rw1)
    assert failure(x.VBD.plug, rw2) == ["VDI_IN_USE", vdi, "plug"]
    assert failure(x.VBD.plug, ro1) == ["VDI_IN_USE", vdi, "plug"]
    assert [x.VBD.get_currently_attached(v) for v in (rw1, rw2, ro1)] == [True, False, False]
    x.VBD.unplug(rw1)
    x.VBD.plug(ro1)
    x.VBD.plug(ro2)                                  # readers share it
    assert failure(x.VBD.plug, rw1) == ["VDI_IN_USE", vdi, "plug"]
    x.VBD.unplug(ro1)
    x.VBD.unplug(ro2)
    x.VBD.plug(rw1)                                  # all gone: a writer again
    x.VBD.unplug(rw1)


def test_sharable_vdi_takes_several_writers(xapi):
    x = xapi
    vdi = new_vdi(x, new_sr(x))
    x.VDI.set_sharable(vdi, True)
    rw1, rw2, ro = [dom0_vbd(x, vdi, mode) for mode in ("RW", "RW", "RO")]
    x.VBD.plug(rw1)
    x.VBD.plug(rw2)
    x.VBD.plug(ro)
    for v in (rw1, rw2, ro):
        x.VBD.unplug(v)
    # attached read-only first, the host's one attachment cannot become writable
    x.VBD.plug(ro)
    assert failure(x.VBD.plug, rw1)[0] == "VDI_IN_USE"
    x.VBD.unplug(ro)

