"""The file SR on VHD through the local toolstack, VDIs unplugged: create, snapshot and
clone (base copies, vhd-parent), the chain limit, forget + introduce + scan, and the
garbage collector, killed -9 at each of its phases then restarted."""
import os
import time
import xmlrpc.client

import pytest

from smtap.formats import vhd as V
from smtap.sm import gcctl, lock, testhooks, vhdchain

from lib.filesr import (all_valid, chain_sha, leftovers, park, park_and_kill, sr_location,
                        vhd_tree, vhd_write, wait_gc)
from lib.procs import run
from lib.sizes import MiB
from lib.sm import log_lines
from lib.toolstack import failure
from lib.vdis import vdi_call
from lib.vhd import vhd_util


@pytest.fixture
def file_sr(dhost, tmp_path):
    return dhost.sr_create("file", {"location": str(tmp_path / "vdis")})


def path_of(x, vdi):
    return os.path.join(sr_location(x, x.VDI.get_SR(vdi)), x.VDI.get_location(vdi) + ".vhd")


def records(x, sr):
    """{uuid: (vhd-parent, managed, virtual size)} of the SR's VDI records."""
    return dict((r["uuid"], (r["sm_config"].get("vhd-parent"), r["managed"],
                             r["virtual_size"]))
                for r in x.VDI.get_all_records().values() if r["SR"] == sr)


def test_vhd_vdis_sizes_and_records(dhost, file_sr):
    x = dhost.x
    vdi = dhost.vdi_create(file_sr, 10 * MiB + 1)
    uuid = x.VDI.get_uuid(vdi)
    path = path_of(x, vdi)
    assert path.endswith("/%s.vhd" % uuid)
    assert vhd_util("check", "-n", path).returncode == 0
    assert x.VDI.get_virtual_size(vdi) == str(12 * MiB)          # 2 MiB blocks
    assert vhd_util("query", "-n", path, "-v").text == "12\n"
    assert int(x.VDI.get_physical_utilisation(vdi)) < MiB       # thin
    small = dhost.vdi_create(file_sr, 1)
    assert x.VDI.get_virtual_size(small) == str(2 * MiB)         # at least 2 MiB
    err = failure(dhost.vdi_create, file_sr, 2041 << 30, {"image-format": "vhd"})
    assert err[0] == "SR_BACKEND_FAILURE_79", err                # VDISize (qcow2's)
    err = failure(dhost.vdi_create, file_sr, MiB, {"type": "qcow9"})
    assert err[0] == "SR_BACKEND_FAILURE_66", err                # VDIType
    raw = dhost.vdi_create(file_sr, 3 * MiB + 1, {"type": "raw"})
    assert x.VDI.get_sm_config(raw)["type"] == "raw"
    assert os.path.getsize(os.path.join(sr_location(x, file_sr),
                                        x.VDI.get_uuid(raw) + ".raw")) == 3 * MiB + 512
    assert failure(x.VDI.snapshot, raw, {})[0] == "SR_OPERATION_NOT_SUPPORTED"
    assert x.SR.get_virtual_allocation(file_sr) == str(14 * MiB + 3 * MiB + 512)
    features = x.SM.get_features(x.SM.get_by_name_label("Local Path VHD")[0])
    for cap in ("VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE", "VDI_RESET_ON_BOOT",
                "VDI_INTRODUCE", "VDI_UPDATE", "SR_SCAN", "SR_UPDATE", "THIN_PROVISIONING"):
        assert cap in features, (cap, features)
    assert features["VDI_RESET_ON_BOOT"] == "2"

    x.VDI.resize(vdi, str(40 * MiB))                             # grows, journalled
    assert x.VDI.get_virtual_size(vdi) == str(40 * MiB)
    assert vhd_util("check", "-n", path).returncode == 0
    assert failure(x.VDI.resize, vdi, str(20 * MiB))[0] == "SR_BACKEND_FAILURE_79"
    for v in (vdi, small, raw):
        x.VDI.destroy(v)
    wait_gc(x, file_sr)
    assert os.listdir(sr_location(x, file_sr)) == []


def test_snapshot_and_clone_offline_then_gc(dhost, file_sr):
    """Snapshot and clone keep the VDI's uuid and file; the data goes to a hidden base
    (a base copy record); deleting the snapshot lets the GC merge everything back into
    one file with the same data."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdi = dhost.vdi_create(file_sr, 16 * MiB)
    uuid = x.VDI.get_uuid(vdi)
    leaf = path_of(x, vdi)
    vhd_write(leaf, 0x11, 0, 3 * MiB)
    before = chain_sha(leaf)
    ino = os.stat(leaf).st_ino

    snap = x.VDI.snapshot(vdi, {})
    snap_uuid = x.VDI.get_uuid(snap)
    assert os.stat(leaf).st_ino != ino                           # a new leaf, same path
    base_uuid = x.VDI.get_sm_config(vdi)["vhd-parent"]
    assert vhd_tree(directory) == {uuid: (base_uuid, False), snap_uuid: (base_uuid, False),
                               base_uuid: (None, True)}
    base = x.VDI.get_by_uuid(base_uuid)
    assert x.VDI.get_managed(base) is False and x.VDI.get_read_only(base) is True
    assert x.VDI.get_name_label(base) == "base copy"
    assert x.VDI.get_sm_config(snap)["vhd-parent"] == base_uuid
    assert x.VDI.get_is_a_snapshot(snap) is True and x.VDI.get_snapshot_of(snap) == vdi
    assert chain_sha(leaf) == chain_sha(path_of(x, snap)) == before
    assert vhd_util("query", "-n", leaf, "-d").text == "chain depth: 2\n"

    vhd_write(leaf, 0x22, MiB, MiB)                              # the VDI moves on
    clone = x.VDI.clone(snap, {})
    assert x.VDI.get_is_a_snapshot(clone) is False
    vhd_write(path_of(x, clone), 0x33, 0, 512)
    assert chain_sha(path_of(x, snap)) == before                 # the snapshot did not
    assert chain_sha(leaf) != before
    assert all_valid(directory) == []
    # The snapshot held nothing of its own: the clone hangs from the same base.
    assert x.VDI.get_sm_config(clone)["vhd-parent"] == base_uuid
    wait_gc(x, file_sr)                                          # nothing to merge yet
    assert [u for u, (_, h) in vhd_tree(directory).items() if h] == [base_uuid]

    # A base copy other VDIs hang from is not the user's to delete.
    assert failure(x.VDI.destroy, base)[0] == "SR_BACKEND_FAILURE_80"
    shas = {v: chain_sha(path_of(x, v)) for v in (vdi, clone)}
    x.VDI.destroy(snap)
    wait_gc(x, file_sr)
    x.VDI.destroy(clone)
    state = wait_gc(x, file_sr)
    assert state["state"] == "idle"
    assert vhd_tree(directory) == {uuid: (None, False)}              # one file, no base left
    assert chain_sha(leaf) == shas[vdi]
    assert records(x, file_sr) == {uuid: (None, True, str(16 * MiB))}
    assert leftovers(directory) == [] and all_valid(directory) == []
    assert x.SR.get_other_config(file_sr)["gc-status"] == "idle"
    x.VDI.destroy(vdi)


def test_reset_on_boot_drops_what_the_leaf_wrote(dhost, file_sr):
    """on-boot=reset (VDI_RESET_ON_BOOT/2): vdi_epoch_begin empties the leaf (modify -z),
    the snapshot's data stays; a VDI without a parent is refused, readably; persist: no-op."""
    x = dhost.x
    vdi = dhost.vdi_create(file_sr, 8 * MiB)
    leaf = path_of(x, vdi)
    vhd_write(leaf, 0x91, 0, 3 * MiB)
    x.VDI.set_on_boot(vdi, "reset")
    with pytest.raises(xmlrpc.client.Fault) as e:                # no snapshot to go back to
        vdi_call(dhost, vdi, "vdi_epoch_begin")
    assert e.value.faultCode == 66 and "parent" in e.value.faultString, e.value
    before = chain_sha(leaf)
    snap = x.VDI.snapshot(vdi, {})
    at_snapshot = chain_sha(leaf)
    assert at_snapshot == before
    vhd_write(leaf, 0x92, MiB, 4 * MiB)                         # the "boot" writes
    x.VDI.set_on_boot(vdi, "persist")
    vdi_call(dhost, vdi, "vdi_epoch_begin")
    assert chain_sha(leaf) != at_snapshot                       # persist keeps them
    x.VDI.set_on_boot(vdi, "reset")
    vdi_call(dhost, vdi, "vdi_epoch_begin")
    assert chain_sha(leaf) == at_snapshot == chain_sha(path_of(x, snap))
    assert vhd_util("check", "-n", leaf).returncode == 0
    for v in (snap, vdi):
        x.VDI.destroy(v)
    wait_gc(x, file_sr)
    assert os.listdir(sr_location(x, file_sr)) == []


def test_an_empty_leaf_leaves_no_base(dhost, file_sr):
    """Snapshots of a leaf with nothing written since hang from its parent directly
    (vhd-util snapshot skips empty parents): no chain grows for nothing."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdi = dhost.vdi_create(file_sr, 8 * MiB)
    vhd_write(path_of(x, vdi), 0x44, 0, MiB)
    first = x.VDI.snapshot(vdi, {})
    base = x.VDI.get_sm_config(vdi)["vhd-parent"]
    second = x.VDI.snapshot(vdi, {})                             # nothing written between
    assert x.VDI.get_sm_config(vdi)["vhd-parent"] == base
    assert x.VDI.get_sm_config(second)["vhd-parent"] == base
    assert len([h for _, h in vhd_tree(directory).values() if h]) == 1
    for v in (first, second, vdi):
        x.VDI.destroy(v)
    wait_gc(x, file_sr)
    assert os.listdir(directory) == []


def test_chain_depth_30_refused(dhost, file_sr):
    """Failed before GC could run: depth 30 is the limit (SnapshotChainTooLong, 109)."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    # Off before the chain exists: the GC kicked by attach lingers and would merge it.
    x.SR.add_to_other_config(file_sr, "gc", "false")
    wait_gc(x, file_sr)
    top = os.path.join(directory, "c00.vhd")
    V.create(top, 4 * MiB)
    for i in range(1, 30):                       # a chain of 30 made by hand, data in each
        vhd_write(top, i, 0, 512)
        vhdchain.set_hidden(top)
        child = os.path.join(directory, "c%02d.vhd" % i)
        V.snapshot(child, top)
        top = child
    x.SR.scan(file_sr)
    (leaf,) = [v for v in x.SR.get_VDIs(file_sr) if x.VDI.get_location(v) == "c29"]
    assert x.VDI.get_sm_config(leaf)["vhd-parent"] == "c28"
    err = failure(x.VDI.snapshot, leaf, {})
    assert err[0] == "SR_BACKEND_FAILURE_109", err
    assert "chain depth 30" in err[2]
    assert len(os.listdir(directory)) == 30                      # nothing made


def test_forget_introduce_scan_rebuilds_the_tree(dhost, file_sr):
    x = dhost.x
    directory = sr_location(x, file_sr)
    vdi = dhost.vdi_create(file_sr, 8 * MiB, name="os")
    vhd_write(path_of(x, vdi), 0x55, 0, 2 * MiB)
    snap = x.VDI.snapshot(vdi, {})
    vhd_write(path_of(x, vdi), 0x56, 2 * MiB, MiB)
    clone = x.VDI.clone(vdi, {})
    vhd_write(path_of(x, clone), 0x57, 0, MiB)
    x.SR.scan(file_sr)                              # the writes above: sizes up to date
    wait_gc(x, file_sr)
    want = records(x, file_sr)
    assert len(want) == 5 and sum(1 for p, m, s in want.values() if not m) == 2
    sizes = dict((r["uuid"], r["physical_utilisation"]) for r in x.VDI.get_all_records().values())
    sr_uuid, pbd, clone_uuid = x.SR.get_uuid(file_sr), dhost.pbd(file_sr), x.VDI.get_uuid(clone)
    config = x.PBD.get_device_config(pbd)
    x.PBD.unplug(pbd)
    x.SR.forget(file_sr)
    assert x.VDI.get_all() == []
    sr = x.SR.introduce(sr_uuid, "again", "", "file", "user", False, {})
    x.PBD.plug(x.PBD.create({"host": dhost.host_ref, "SR": sr, "device_config": config}))
    x.SR.scan(sr)
    assert records(x, sr) == want
    got = dict((r["uuid"], r["physical_utilisation"]) for r in x.VDI.get_all_records().values())
    assert got == dict((u, sizes[u]) for u in want)
    assert x.SR.get_virtual_allocation(sr) == str(3 * 8 * MiB)  # the visible VDIs
    # the 4 MiB written sit in 3 blocks of 2 MiB (what query -s counts), plus metadata
    assert 6 * MiB < int(x.SR.get_physical_utilisation(sr)) < 7 * MiB
    os.unlink(os.path.join(directory, clone_uuid + ".vhd"))     # a file goes away
    x.SR.scan(sr)
    assert clone_uuid not in records(x, sr)
    wait_gc(x, sr)                         # its base has one child left: merged into it
    assert set(records(x, sr)) == set(vhd_tree(directory)) and len(records(x, sr)) == 3


# -- the GC killed -9 at each phase ------------------------------------------------------------
def snapshotted(dhost, sr, pattern):
    """A VDI with data, snapshotted, then written in 3 blocks of its own: (vdi, snap)."""
    x = dhost.x
    vdi = dhost.vdi_create(sr, 12 * MiB)
    vhd_write(path_of(x, vdi), pattern, 0, 4 * MiB)
    snap = x.VDI.snapshot(vdi, {})
    for blk in range(3):
        vhd_write(path_of(x, vdi), pattern + 1 + blk, blk * 2 * MiB + 4096, 8192)
    return vdi, snap


def coalesce_case(dhost, sr):
    """P <- X <- {vdi, snap2} with X's data over 3 blocks; destroying snap1 makes X
    coalesceable into P. Returns (start, VDIs to check)."""
    x = dhost.x
    vdi, snap1 = snapshotted(dhost, sr, 0x61)
    snap2 = x.VDI.snapshot(vdi, {})
    vhd_write(path_of(x, vdi), 0x7f, 8 * MiB, 4096)
    wait_gc(x, sr)
    return (lambda: x.VDI.destroy(snap1)), [vdi, snap2]


def leaf_case(dhost, sr):
    """P <- vdi, vdi holding 3 blocks of its own: destroying the snapshot makes vdi
    leaf-coalesceable into P."""
    vdi, snap = snapshotted(dhost, sr, 0x81)
    wait_gc(dhost.x, sr)
    return (lambda: dhost.x.VDI.destroy(snap)), [vdi]


@pytest.mark.parametrize("phase,case", [
    ("coalesce", coalesce_case), ("coalesced", coalesce_case), ("relink", coalesce_case),
    ("leaf-coalesce", leaf_case), ("leaf-renamed", leaf_case)])
def test_gc_killed_at_each_phase(dhost, file_sr, phase, case):
    x = dhost.x
    directory = sr_location(x, file_sr)
    sr_uuid = x.SR.get_uuid(file_sr)
    start, vdis = case(dhost, file_sr)
    shas = dict((v, chain_sha(path_of(x, v))) for v in vdis)
    park_and_kill(sr_uuid, phase, start)
    assert gcctl.status(sr_uuid)["state"] == "dead"
    journals = [n for n in os.listdir(directory) if n.split("_")[0] in
                ("coalesce", "relink", "leaf")]
    assert journals or phase == "coalesced", os.listdir(directory)
    x.SR.scan(file_sr)                                   # restarts the GC: replay, then work
    wait_gc(x, file_sr)
    assert all_valid(directory) == []
    for v, sha in shas.items():
        assert chain_sha(path_of(x, v)) == sha, (phase, x.VDI.get_uuid(v))
    visible = set(x.VDI.get_uuid(v) for v in vdis)
    bases = [] if case is leaf_case else [x.VDI.get_sm_config(vdis[0])["vhd-parent"]]
    assert leftovers(directory) == bases, (phase, os.listdir(directory))   # no X, no OLD_
    assert set(vhd_tree(directory)) == visible | set(bases)
    assert dict((u, m) for u, (_, m, _) in records(x, file_sr).items()) == \
        dict((u, u in visible) for u in vhd_tree(directory))


def test_pbd_unplug_and_sr_destroy_stop_the_gc_within_seconds(dhost, file_sr):
    """Reported pain: SR destroy blocked minutes by GC. Mid-coalesce, pbd-unplug stops it
    in seconds (its journal makes the next run redo it); sr-destroy stops the one its
    own attach starts and removes what is left (hidden bases, journals)."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    sr_uuid = x.SR.get_uuid(file_sr)
    start, vdis = coalesce_case(dhost, file_sr)
    shas = dict((v, chain_sha(path_of(x, v))) for v in vdis)
    try:
        pid = park(sr_uuid, "coalesce", start)
        t0 = time.monotonic()
        x.PBD.unplug(dhost.pbd(file_sr))
        assert time.monotonic() - t0 < 10
    finally:
        testhooks.clear_hook("gc-park")
    assert gcctl.wait_idle(sr_uuid, timeout=10)["state"] == "idle"   # stopped
    assert gcctl.gone(pid) and not gcctl.running(sr_uuid)
    x.PBD.plug(dhost.pbd(file_sr))
    x.SR.scan(file_sr)
    wait_gc(x, file_sr)
    for v, sha in shas.items():
        assert chain_sha(path_of(x, v)) == sha
    assert all_valid(directory) == [] and len(vhd_tree(directory)) == 3     # P <- {vdi, snap2}
    for v in vdis:
        x.VDI.destroy(v)
    x.PBD.unplug(dhost.pbd(file_sr))
    t0 = time.monotonic()
    x.SR.destroy(file_sr)
    assert time.monotonic() - t0 < 10
    assert os.listdir(directory) == [] and not gcctl.running(sr_uuid)


def smtap_gc(dhost, *args, **env):
    return run(os.path.join(dhost.root, "opt", "smtap", "bin", "smtap-gc"), *args,
               env=dict(os.environ, **env), timeout=60)


def test_gc_one_per_sr_yields_to_sr_operations_and_says_what_it_does(dhost, file_sr):
    """One GC per SR: a second one leaves at once, the first untouched. Mid-copy it waits
    while an SR operation holds the SR lock, then finishes. smtap-gc -s / -q, the SR's
    other-config and the log say what it does and what is left."""
    x = dhost.x
    directory = sr_location(x, file_sr)
    sr_uuid = x.SR.get_uuid(file_sr)
    start, vdis = coalesce_case(dhost, file_sr)
    shas = dict((v, chain_sha(path_of(x, v))) for v in vdis)
    merged = x.VDI.get_sm_config(vdis[0])["vhd-parent"]            # X, into P
    sr_lock = lock.Lock("sr", sr_uuid)
    try:
        pid = park(sr_uuid, "coalesce", start)
        assert gcctl.status(sr_uuid)["pending"] == {"garbage": 0, "coalesce": 1,
                                                    "leaf-coalesce": 0}
        assert smtap_gc(dhost, "-u", sr_uuid, "-s").stdout == (
            "running: parked at coalesce\nleft: 0 garbage, 1 coalesce, 0 leaf-coalesce\n")
        assert smtap_gc(dhost, "-u", sr_uuid, "-q").stdout == "Currently running: True\n"
        assert x.SR.get_other_config(file_sr)["gc-status"] == \
            "parked at coalesce; left: 0 garbage, 1 coalesce, 0 leaf-coalesce"
        # a second collector on the SR's session: it finds gc_active held and leaves
        second = smtap_gc(dhost, "-u", sr_uuid, "-g",
                          **{gcctl.SESSION_ENV: dhost.session_obj._session})
        assert second.returncode == 0 and second.stdout == "" and second.stderr == ""
        assert not gcctl.gone(pid) and gcctl.status(sr_uuid)["pid"] == pid
        assert "GC: another instance holds SR %s" % sr_uuid in "\n".join(log_lines())

        sr_lock.acquire()                                         # an SR operation runs
        testhooks.clear_hook("gc-park")
        deadline = time.time() + 30
        while gcctl.status(sr_uuid).get("doing") != "waiting for an SR operation":
            assert time.time() < deadline, gcctl.status(sr_uuid)
            time.sleep(0.05)
        assert "1 of 3 blocks" in gcctl.status(sr_uuid)["progress"]
        time.sleep(1)                                             # mid-copy, it stays put
        assert os.path.exists(os.path.join(directory, "coalesce_" + merged))
        assert not os.path.exists(os.path.join(directory, "relink_" + merged))
    finally:
        testhooks.clear_hook("gc-park")
        if sr_lock.held():
            sr_lock.release()
    assert wait_gc(x, file_sr)["state"] == "idle"
    assert merged not in vhd_tree(directory) and leftovers(directory) == [
        x.VDI.get_sm_config(vdis[0])["vhd-parent"]]
    for v, sha in shas.items():
        assert chain_sha(path_of(x, v)) == sha
    said = [l.split("GC: ", 1)[1] for l in log_lines() if "GC: " in l]
    for line in ("coalescing %s into" % merged, "relinked", "deleted %s" % merged,
                 "waiting for an SR operation"):
        assert any(s.startswith(line) for s in said), (line, said)
    assert smtap_gc(dhost, "-u", sr_uuid, "-s").stdout == "idle\n"
    assert x.SR.get_other_config(file_sr)["gc-status"] == "idle"
