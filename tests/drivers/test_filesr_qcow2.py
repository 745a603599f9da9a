"""The file SR with qcow2 VDIs (issue 13) through the local toolstack: the format chosen
by size, device-config:preferred-image-formats and sm-config:image-format, advertised
in the SM record; a 16 TiB VDI plugged and written at its last GiB; snapshot, clone,
reset on boot, resize, scan and the GC on qcow2 chains, next to VHD ones in the same
SR; qemu-img check clean on every qcow2 file the SR leaves."""
import os
import xmlrpc.client

import pytest

from lib.engine import nbd_size
from lib.filesr import (all_valid, chain_sha, leftovers, park_and_kill, sr_location, vhd_tree,
                        vhd_write, wait_gc)
from lib.qcow2 import qcow2_check
from lib.sizes import GiB, MiB, TiB
from lib.toolstack import failure
from lib.vdis import holds, nbd_uri, qemu_io, vdi_call, write

FILE_SR_INFO = "Local Path VHD"


@pytest.fixture
def file_sr(dhost, tmp_path):
    return dhost.sr_create("file", {"location": str(tmp_path / "vdis")})


def path_of(x, vdi):
    """The VDI's image file, whatever its format."""
    directory = sr_location(x, x.VDI.get_SR(vdi))
    location = x.VDI.get_location(vdi)
    (name,) = [n for n in os.listdir(directory) if n.rsplit(".", 1)[0] == location]
    return os.path.join(directory, name)


def qemu_clean(directory):
    """qemu-img check (and qcow2-util check) clean on every qcow2 file of the SR."""
    names = [n for n in os.listdir(directory) if n.endswith(".qcow2")]
    for name in names:
        qcow2_check(os.path.join(directory, name))
    return names


def test_the_format_by_size_preference_and_sm_config(dhost, file_sr, tmp_path):
    x = dhost.x
    sm = x.SM.get_by_name_label(FILE_SR_INFO)[0]
    assert set(x.SM.get_supported_image_formats(sm)) == {"vhd", "qcow2", "raw"}
    small = dhost.vdi_create(file_sr, 10 * MiB)
    assert path_of(x, small).endswith(".vhd")
    assert x.VDI.get_sm_config(small)["image-format"] == "vhd"
    big = dhost.vdi_create(file_sr, 2041 * GiB)                  # past VHD's 2040 GiB
    assert path_of(x, big).endswith(".qcow2")
    assert x.VDI.get_sm_config(big)["image-format"] == "qcow2"
    assert x.VDI.get_virtual_size(big) == str(2041 * GiB)
    assert int(x.VDI.get_physical_utilisation(big)) < MiB        # thin
    asked = dhost.vdi_create(file_sr, 5 * MiB + 1, {"image-format": "qcow2"})
    assert path_of(x, asked).endswith(".qcow2")
    assert x.VDI.get_virtual_size(asked) == str(6 * MiB)         # whole MiB
    assert path_of(x, dhost.vdi_create(file_sr, MiB, {"type": "qcow2"})).endswith(".qcow2")
    for sm_config, code in (({"image-format": "vhd"}, "79"),     # VDISize: VHD's limit
                            ({"image-format": "raw"}, "66"),     # VDIType
                            ({"image-format": "qcow9"}, "66"),
                            ({"image-format": "qcow2", "type": "vhd"}, "66")):
        err = failure(dhost.vdi_create, file_sr, 2041 * GiB, sm_config)
        assert err[0] == "SR_BACKEND_FAILURE_" + code, (sm_config, err)
    err = failure(dhost.vdi_create, file_sr, 16382 * GiB)        # past qcow2's 16381 GiB
    assert err[0] == "SR_BACKEND_FAILURE_79" and "16774144 MB" in err[2], err
    # grow: qcow2 past 2 TiB; a VHD stops at 2040 GiB (convert it by migrating)
    x.VDI.resize(asked, str(3 * TiB))
    assert x.VDI.get_virtual_size(asked) == str(3 * TiB)
    err = failure(x.VDI.resize, small, str(2041 * GiB))
    assert err[0] == "SR_BACKEND_FAILURE_79" and "qcow2" in err[2], err
    assert qemu_clean(sr_location(x, file_sr))

    # qcow2 first: even a small VDI is qcow2; a bad list is refused at sr-create
    only = dhost.sr_create("file", {"location": str(tmp_path / "q"),
                                    "preferred-image-formats": "qcow2,vhd"})
    assert path_of(x, dhost.vdi_create(only, MiB)).endswith(".qcow2")
    err = failure(dhost.sr_create, "file", {"location": str(tmp_path / "b"),
                                            "preferred-image-formats": "vhdx"})
    assert err[0] == "SR_BACKEND_FAILURE_1" and "preferred-image-formats" in err[2], err  # InvalidArg
    vhd_only = dhost.sr_create("file", {"location": str(tmp_path / "v"),
                                        "preferred-image-formats": "vhd"})
    err = failure(dhost.vdi_create, vhd_only, 2041 * GiB)
    assert err[0] == "SR_BACKEND_FAILURE_79", err


def test_a_16_tib_vdi_plugged_written_at_its_last_gib(dhost, file_sr):
    """The largest VDI (16381 GiB, qcow2), plugged in dom0, written over NBD at its last
    GiB and read back; unplugged, qemu-img check finds nothing wrong."""
    x = dhost.x
    vdi = dhost.vdi_create(file_sr, 16381 * GiB)
    path = path_of(x, vdi)
    assert path.endswith(".qcow2")
    vbd = dhost.plug(vdi)
    try:
        last = 16381 * GiB - GiB
        qemu_io(x, vdi, "write -P 0x6b %d 1G" % last, "write -P 0x6c %d 64k" % (last + GiB - 65536),
                "flush")
        assert holds(x, vdi, 0x6b, last, GiB - 65536)
        assert holds(x, vdi, 0x6c, last + GiB - 65536, 65536)
        assert holds(x, vdi, 0, 0, MiB) and holds(x, vdi, 0, last - MiB, MiB)
    finally:
        dhost.unplug(vbd)
    qcow2_check(path)
    x.SR.scan(file_sr)
    assert GiB < int(x.VDI.get_physical_utilisation(vdi)) < GiB + 64 * MiB
    x.VDI.destroy(vdi)


def test_qcow2_and_vhd_side_by_side_snapshot_clone_gc(dhost, file_sr):
    """The file SR issue's snapshot/clone/GC flow on a qcow2 VDI and a VHD one in the
    same SR: hidden bases of their own format (the "vate" flag for qcow2), the data of
    each kept, the GC merging both chains back into one file each."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdis = {"qcow2": dhost.vdi_create(file_sr, 16 * MiB, {"image-format": "qcow2"}),
            "vhd": dhost.vdi_create(file_sr, 16 * MiB)}
    shas, snaps, clones = {}, {}, {}
    for fmt, vdi in sorted(vdis.items()):
        leaf = path_of(x, vdi)
        assert leaf.endswith("." + fmt)
        vhd_write(leaf, 0x11, 0, 3 * MiB)
        before = chain_sha(leaf)
        snaps[fmt] = x.VDI.snapshot(vdi, {})
        base_uuid = x.VDI.get_sm_config(vdi)["vhd-parent"]
        assert x.VDI.get_sm_config(snaps[fmt])["vhd-parent"] == base_uuid
        assert os.path.exists(os.path.join(directory, base_uuid + "." + fmt))
        base = x.VDI.get_by_uuid(base_uuid)
        assert x.VDI.get_managed(base) is False and x.VDI.get_read_only(base) is True
        assert vhd_tree(directory)[base_uuid] == (None, True)
        assert chain_sha(path_of(x, snaps[fmt])) == before == chain_sha(leaf)
        vhd_write(leaf, 0x22, MiB, MiB)                          # the VDI moves on
        clones[fmt] = x.VDI.clone(snaps[fmt], {})
        assert path_of(x, clones[fmt]).endswith("." + fmt)
        vhd_write(path_of(x, clones[fmt]), 0x33, 0, 512)
        assert chain_sha(path_of(x, snaps[fmt])) == before
        shas[fmt] = before
    assert all_valid(directory) == [] and len(qemu_clean(directory)) == 4
    wait_gc(x, file_sr)
    keep = {}
    for fmt in sorted(vdis):
        keep[fmt] = chain_sha(path_of(x, vdis[fmt]))
        x.VDI.destroy(snaps[fmt])
        x.VDI.destroy(clones[fmt])
    assert wait_gc(x, file_sr)["state"] == "idle"
    tree = vhd_tree(directory)
    assert tree == {x.VDI.get_uuid(v): (None, False) for v in vdis.values()}, tree
    for fmt, vdi in vdis.items():
        assert chain_sha(path_of(x, vdi)) == keep[fmt]
        assert x.VDI.get_sm_config(vdi).get("vhd-parent") is None
    assert leftovers(directory) == [] and all_valid(directory) == []
    assert qemu_clean(directory) == [os.path.basename(path_of(x, vdis["qcow2"]))]


def test_qcow2_reset_on_boot_scan_and_a_snapshot_while_plugged(dhost, file_sr):
    """on-boot=reset empties a qcow2 leaf back to its snapshot; forget + scan rebuilds the
    qcow2 tree's records; a snapshot and a resize of a plugged qcow2 VDI keep the guest
    writing."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdi = dhost.vdi_create(file_sr, 8 * MiB, {"image-format": "qcow2"})
    leaf = path_of(x, vdi)
    vhd_write(leaf, 0x91, 0, 3 * MiB)
    x.VDI.set_on_boot(vdi, "reset")
    with pytest.raises(xmlrpc.client.Fault) as e:                # no snapshot to go back to
        vdi_call(dhost, vdi, "vdi_epoch_begin")
    assert e.value.faultCode == 66, e.value
    snap = x.VDI.snapshot(vdi, {})
    at_snapshot = chain_sha(leaf)
    vhd_write(leaf, 0x92, MiB, 4 * MiB)
    vdi_call(dhost, vdi, "vdi_epoch_begin")
    assert chain_sha(leaf) == at_snapshot == chain_sha(path_of(x, snap))
    qcow2_check(leaf)
    x.VDI.set_on_boot(vdi, "persist")

    want = dict((r["uuid"], (r["sm_config"].get("vhd-parent"), r["managed"]))
                for r in x.VDI.get_all_records().values() if r["SR"] == file_sr)
    uuid, snap_uuid = x.VDI.get_uuid(vdi), x.VDI.get_uuid(snap)
    for ref in x.SR.get_VDIs(file_sr):
        x.VDI.forget(ref)
    x.SR.scan(file_sr)
    got = dict((r["uuid"], (r["sm_config"].get("vhd-parent"), r["managed"]))
               for r in x.VDI.get_all_records().values() if r["SR"] == file_sr)
    assert got == want and len(got) == 3
    vdi = x.VDI.get_by_uuid(uuid)

    vbd = dhost.plug(vdi)
    try:
        write(x, vdi, 0xa1, 2 * MiB, MiB)
        live = x.VDI.snapshot(vdi, {})                          # paused, snapshotted, unpaused
        write(x, vdi, 0xa2, 2 * MiB, 4096)                      # the guest goes on
        assert holds(x, vdi, 0xa2, 2 * MiB, 4096) and holds(x, vdi, 0xa1, 2 * MiB + 4096, 4096)
        x.VDI.resize(vdi, str(16 * MiB))                        # online: paused, grown
        assert nbd_size(nbd_uri(x, vdi)) == 16 * MiB
        write(x, vdi, 0xa3, 15 * MiB, MiB)
        assert holds(x, vdi, 0xa3, 15 * MiB, MiB) and holds(x, vdi, 0xa2, 2 * MiB, 4096)
    finally:
        dhost.unplug(vbd)
    assert chain_sha(path_of(x, live)) != chain_sha(path_of(x, vdi))
    assert all_valid(directory) == [] and qemu_clean(directory)
    for v in (x.VDI.get_by_uuid(snap_uuid), live):
        x.VDI.destroy(v)
    wait_gc(x, file_sr)
    assert vhd_tree(directory) == {x.VDI.get_uuid(vdi): (None, False)}
    assert qemu_clean(directory)


@pytest.mark.parametrize("phase", ["coalesce", "leaf-renamed"])
def test_gc_killed_mid_qcow2_coalesce_then_finishes(dhost, file_sr, phase):
    """kill -9 of the GC half way through a qcow2 commit (coalesce) or between the renames
    of a leaf-coalesce: the next GC replays its journal and finishes, the data intact,
    qemu-img check clean, no leak."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdi = dhost.vdi_create(file_sr, 12 * MiB, {"image-format": "qcow2"})
    vhd_write(path_of(x, vdi), 0x61, 0, 4 * MiB)
    snap1 = x.VDI.snapshot(vdi, {})
    for blk in range(3):
        vhd_write(path_of(x, vdi), 0x62 + blk, blk * 2 * MiB + 4096, 8192)
    if phase == "coalesce":                  # P <- X <- {vdi, snap2}: X merges into P
        snap2 = x.VDI.snapshot(vdi, {})
        vhd_write(path_of(x, vdi), 0x7f, 8 * MiB, 4096)
        keep = [vdi, snap2]
    else:
        keep = [vdi]
    wait_gc(x, file_sr)
    shas = {v: chain_sha(path_of(x, v)) for v in keep}
    sr_uuid = x.SR.get_uuid(file_sr)
    park_and_kill(sr_uuid, phase, lambda: x.VDI.destroy(snap1))
    assert [n for n in os.listdir(directory) if n.split("_")[0] in ("coalesce", "leaf")]
    x.SR.scan(file_sr)                                           # replays, restarts the GC
    assert wait_gc(x, file_sr)["state"] == "idle"
    for v in keep:
        assert chain_sha(path_of(x, v)) == shas[v], phase
    bases = [x.VDI.get_sm_config(vdi)["vhd-parent"]] if len(keep) > 1 else []
    assert leftovers(directory) == bases and all_valid(directory) == []   # no X, no OLD_
    assert qemu_clean(directory)
