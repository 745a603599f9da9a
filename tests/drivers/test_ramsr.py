"""ramSR driven as XAPI would: the local toolstack, the real XenAPI client, real tapdisks,
real tmpfs mounts, NBD clients on the VDI's link."""
import os
import signal
import subprocess
import time

from smtap import names, settings
from smtap.toolstack import hostroot
from lib.engine import tap_list
from lib.fs import used
from lib.procs import memory_of, run, wait_for
from lib.sizes import MiB
from lib.toolstack import failure
from lib.vdis import (holds, host_tags, link_path, minor_allocated, nbd_uri, qemu_io,
                      tapdisk_of, vdi_call, write)


def mount_point(x, sr):
    return os.path.join(settings.sr_mount_dir(), x.SR.get_uuid(sr))


def is_mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def test_sm_record_lists_only_what_works(dhost):
    (ref,) = dhost.x.SM.get_by_name_label("RAM")
    sm = dhost.x.SM.get_record(ref)
    assert sm["type"] == "ram"
    assert sm["features"]["VDI_RESET_ON_BOOT"] == "2"
    assert {"VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE", "SR_PROBE", "VDI_ACTIVATE"} <= set(
        sm["capabilities"])
    assert "VDI_RESIZE_ONLINE" not in sm["capabilities"]
    assert "VDI_GENERATE_CONFIG" not in sm["capabilities"]


def test_contents_survive_unplug_and_are_dropped_by_sr_detach(dhost, ram_sr):
    x = dhost.x
    mnt = mount_point(x, ram_sr)
    assert is_mounted(mnt)
    vdi = dhost.vdi_create(ram_sr, 16 * MiB)
    uuid = x.VDI.get_uuid(vdi)
    assert os.path.getsize(os.path.join(mnt, uuid + ".ram")) == 16 * MiB

    vbd = dhost.plug(vdi)
    link = link_path(x, vdi)
    pid, minor = tapdisk_of(x, vdi)
    assert os.readlink(link) == names.nbd_path(pid, minor)
    assert host_tags(x, vdi) == ["host_" + dhost.host_ref]
    assert x.VDI.get_sm_config(vdi)["host_" + dhost.host_ref] == "RW"
    assert any(e.get("pid") == str(pid) and e.get("args", "").startswith("ram:")
               for e in tap_list())
    write(x, vdi, 0xab, 0, MiB)
    write(x, vdi, 0xcd, 15 * MiB, MiB)
    dhost.unplug(vbd)
    assert not os.path.lexists(link) and host_tags(x, vdi) == []
    assert not minor_allocated(minor)
    assert not any(e.get("pid") == str(pid) for e in tap_list())

    vbd = dhost.plug(vdi)     # deactivate/activate: the data is still there
    assert holds(x, vdi, 0xab, 0, MiB) and holds(x, vdi, 0xcd, 15 * MiB, MiB)
    assert holds(x, vdi, 0, MiB, 14 * MiB)
    dhost.unplug(vbd)

    x.SR.scan(ram_sr)
    rec = x.SR.get_record(ram_sr)
    assert rec["physical_size"] == str(64 * MiB)
    assert rec["virtual_allocation"] == str(16 * MiB)
    assert int(rec["physical_utilisation"]) >= 2 * MiB      # real tmpfs usage
    assert int(rec["physical_utilisation"]) < 4 * MiB       # sparse
    probe = x.SR.probe(dhost.host_ref, {}, "ram", {})
    assert "<UUID>%s</UUID><Size>%d</Size>" % (x.SR.get_uuid(ram_sr), 64 * MiB) in probe

    pbd = dhost.pbd(ram_sr)
    x.PBD.unplug(pbd)          # sr_detach: the tmpfs is gone, and the data with it
    assert not is_mounted(mnt) and not os.path.exists(mnt)
    assert "<SR>" not in x.SR.probe(dhost.host_ref, {}, "ram", {})
    x.PBD.plug(pbd)            # sr_attach: the VDI is back, zeroed
    assert is_mounted(mnt)
    assert x.VDI.get_uuid(vdi) == uuid and x.VDI.get_virtual_size(vdi) == str(16 * MiB)
    vbd = dhost.plug(vdi)
    assert holds(x, vdi, 0, 0, 16 * MiB)
    dhost.unplug(vbd)

    x.VDI.destroy(vdi)
    assert os.listdir(mnt) == [".sr.json"]
    x.PBD.unplug(pbd)
    x.SR.destroy(ram_sr)
    assert not is_mounted(mnt)


def test_budget_is_enforced(dhost):
    x = dhost.x
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    too_big = avail // (1 << 30) + 1
    err = failure(dhost.sr_create, "ram", {"size": "%dGiB" % too_big})
    assert err[0] == "SR_BACKEND_FAILURE_44"
    assert "insufficient space" in err[2] and str(too_big << 30) in err[2]
    assert "available" in err[2]
    err = failure(dhost.sr_create, "ram", {"size": "12 parsecs"})
    assert err[0] == "SR_BACKEND_FAILURE_1" and "12 parsecs" in err[2]
    err = failure(dhost.sr_create, "ram", {})
    assert err[0] == "SR_BACKEND_FAILURE_115"
    assert x.SR.get_all_records_where('field "type" = "ram"') == {}   # nothing left behind
    assert not os.path.isdir(settings.sr_mount_dir()) or not os.listdir(settings.sr_mount_dir())

    sr = dhost.sr_create("ram", {"size": "32M"})
    a = dhost.vdi_create(sr, 20 * MiB)
    err = failure(dhost.vdi_create, sr, 20 * MiB)
    assert err[0] == "SR_BACKEND_FAILURE_44" and "12582912 free" in err[2]
    err = failure(x.VDI.resize, a, str(40 * MiB))
    assert err[0] == "SR_BACKEND_FAILURE_44"
    err = failure(x.VDI.snapshot, a, {})                          # a copy needs 20 MiB more
    assert err[0] == "SR_BACKEND_FAILURE_44"
    b = dhost.vdi_create(sr, 12 * MiB)                            # exactly the rest fits
    x.SR.scan(sr)
    assert x.SR.get_virtual_allocation(sr) == str(32 * MiB)
    x.VDI.destroy(b)
    x.VDI.resize(a, str(30 * MiB))
    assert x.VDI.get_virtual_size(a) == str(30 * MiB)
    err = failure(x.VDI.resize, a, str(10 * MiB))
    assert err[0] == "SR_BACKEND_FAILURE_79"                      # no shrinking


def test_seed_resize_clone_and_reset_on_boot(dhost, ram_sr, tmp_path):
    x = dhost.x
    seed = tmp_path / "seed.img"
    with open(seed, "wb") as f:                 # 1 MiB of 0x5e, a hole, 1 MiB of 0x77
        f.write(b"\x5e" * MiB)
        f.seek(3 * MiB)
        f.write(b"\x77" * MiB)
    err = failure(dhost.vdi_create, ram_sr, 8 * MiB, {"seed": str(tmp_path / "nope")})
    assert err[0] == "SR_BACKEND_FAILURE_1" and "nope" in err[2]
    err = failure(dhost.vdi_create, ram_sr, 2 * MiB, {"seed": str(seed)})
    assert err[0] == "SR_BACKEND_FAILURE_79"

    vdi = dhost.vdi_create(ram_sr, 8 * MiB, {"seed": str(seed)})
    assert x.VDI.get_sm_config(vdi)["seed"] == str(seed)
    path = os.path.join(mount_point(x, ram_sr), x.VDI.get_uuid(vdi) + ".ram")
    assert os.stat(path).st_blocks * 512 <= 2 * MiB + 64 * 1024      # the hole stayed one

    x.VDI.resize(vdi, str(12 * MiB))
    assert x.VDI.get_virtual_size(vdi) == str(12 * MiB)
    vbd = dhost.plug(vdi)
    assert holds(x, vdi, 0x5e, 0, MiB) and holds(x, vdi, 0, MiB, 2 * MiB)
    assert holds(x, vdi, 0x77, 3 * MiB, MiB) and holds(x, vdi, 0, 4 * MiB, 8 * MiB)
    err = failure(x.VDI.resize, vdi, str(16 * MiB))               # not while active
    assert err[0] == "VDI_IN_USE"
    write(x, vdi, 0x11, 0, 4 * MiB)
    dhost.unplug(vbd)

    clone = x.VDI.clone(vdi, {})                                  # a copy, then independent
    assert x.VDI.get_virtual_size(clone) == str(12 * MiB)
    assert x.VDI.get_sm_config(clone)["seed"] == str(seed)
    assert not x.VDI.get_is_a_snapshot(clone)
    vbd = dhost.plug(clone)
    assert holds(x, clone, 0x11, 0, 4 * MiB)
    write(x, clone, 0x22, 0, MiB)
    dhost.unplug(vbd)

    x.VDI.set_on_boot(vdi, "reset")                                # a VM start: epoch_begin
    vdi_call(dhost, vdi, "vdi_epoch_begin")
    vbd = dhost.plug(vdi)
    assert holds(x, vdi, 0x5e, 0, MiB) and holds(x, vdi, 0x77, 3 * MiB, MiB)
    assert holds(x, vdi, 0, 4 * MiB, 8 * MiB)
    fault = None
    try:
        vdi_call(dhost, vdi, "vdi_epoch_begin")                     # not while active
    except Exception as e:
        fault = e
    assert getattr(fault, "faultCode", None) == 24
    dhost.unplug(vbd)

    vbd = dhost.plug(clone)                                        # the clone kept its data
    assert holds(x, clone, 0x22, 0, MiB) and holds(x, clone, 0x11, MiB, 3 * MiB)
    dhost.unplug(vbd)
    vdi_call(dhost, clone, "vdi_epoch_begin")                       # persist: untouched
    vbd = dhost.plug(clone)
    assert holds(x, clone, 0x22, 0, MiB)
    dhost.unplug(vbd)


def test_kill_9_then_unplug_cleans_up(dhost, ram_sr):
    x = dhost.x
    vdi = dhost.vdi_create(ram_sr, 8 * MiB)
    vbd = dhost.plug(vdi)
    write(x, vdi, 0x3c, 0, MiB)
    pid, minor = tapdisk_of(x, vdi)
    os.kill(pid, signal.SIGKILL)
    assert hostroot.wait_dead(pid)
    dhost.unplug(vbd)                                  # deactivate + detach of a dead tapdisk
    assert not os.path.lexists(link_path(x, vdi))
    assert host_tags(x, vdi) == []
    assert not minor_allocated(minor)
    rundir = settings.runtime_dir()
    assert not [n for n in os.listdir(rundir) if n == names.ctl_name(pid)
                or n.startswith(names.nbd_prefix(pid))]
    assert not os.path.exists(os.path.dirname(link_path(x, vdi)))
    vbd = dhost.plug(vdi)                              # and the VDI works again
    write(x, vdi, 0x3d, 0, MiB)
    assert holds(x, vdi, 0x3d, 0, MiB)
    dhost.unplug(vbd)


def test_unplug_without_the_link_finds_the_tapdisk_by_its_params(dhost, ram_sr):
    """`tap-ctl list` shows the image without its options (ram:<file>, not
    ram:<file>?shared=1), yet deactivate, its link gone, still finds the tapdisk by the
    VDI's full params and stops it."""
    x = dhost.x
    vdi = dhost.vdi_create(ram_sr, 8 * MiB)
    vbd = dhost.plug(vdi)
    pid, minor = tapdisk_of(x, vdi)
    image = os.path.join(mount_point(x, ram_sr), x.VDI.get_uuid(vdi) + ".ram")
    assert [e["args"] for e in tap_list() if e.get("pid") == str(pid)] == ["ram:" + image]
    os.unlink(link_path(x, vdi))
    dhost.unplug(vbd)
    assert hostroot.wait_dead(pid)
    assert not minor_allocated(minor) and tap_list() == []
    assert host_tags(x, vdi) == []


def test_snapshot_while_fio_verifies(dhost, ram_sr):
    x = dhost.x
    vdi = dhost.vdi_create(ram_sr, 8 * MiB)     # + 4 snapshots: within the 64 MiB budget
    vbd = dhost.plug(vdi)
    fio = subprocess.Popen(
        ["fio", "--name=verify", "--ioengine=nbd", "--uri=" + nbd_uri(x, vdi),
         "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=8", "--verify=crc32c", "--verify_state_save=0",
         "--verify_backlog=128", "--verify_fatal=1", "--time_based", "--runtime=12",
         "--output-format=terse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snaps = []
    try:
        time.sleep(2)
        while fio.poll() is None and len(snaps) < 4:
            snaps.append(x.VDI.snapshot(vdi, {}))
            assert "paused" not in x.VDI.get_sm_config(vdi)
            time.sleep(1.5)
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    assert "verify" not in err.lower(), err
    fields = out.strip().splitlines()[-1].split(";")   # terse: ...;error;read_kb;...
    assert fields[4] == "0" and int(fields[5]) > 1024, out   # no error; verify reads ran
    assert len(snaps) >= 3
    for snap in snaps:
        rec = x.VDI.get_record(snap)
        assert rec["is_a_snapshot"] and rec["snapshot_of"] == vdi
        assert int(rec["physical_utilisation"]) > 0      # a real copy of written data
    assert len(x.VDI.get_snapshots(vdi)) == len(snaps)
    dhost.unplug(vbd)


def test_an_active_vdi_is_held_once(dhost):
    """The tapdisk serves the tmpfs file's own pages: written data costs its size once
    (in the SR's tmpfs), not again in the tapdisk; reading holes costs nothing."""
    x = dhost.x
    sr = dhost.sr_create("ram", {"size": "256MiB"})     # the VDI and its snapshot
    vdi = dhost.vdi_create(sr, 128 * MiB)
    vbd = dhost.plug(vdi)
    pid, _ = tapdisk_of(x, vdi)
    mnt = mount_point(x, sr)
    anon0, tmpfs0 = memory_of(pid)["RssAnon"], used(mnt)
    qemu_io(x, vdi, "write -P 0x5c 0 64M", "flush")
    # A 32 MiB NBD write is received whole into its own buffer, which the client's thread
    # gives back once idle (nbd.IDLE_RELEASE): measure what stays, not what is in transit.
    wait_for(lambda: memory_of(pid)["RssAnon"] - anon0 < 8 * MiB, timeout=15, interval=0.5)
    anon1, tmpfs1 = memory_of(pid)["RssAnon"], used(mnt)
    run("nbdcopy", nbd_uri(x, vdi), "null:", timeout=60)
    anon2, tmpfs2 = memory_of(pid)["RssAnon"], used(mnt)
    print("RssAnon + tmpfs used: before %d MiB, after a 64 MiB write %d MiB, after reading "
          "all 128 MiB %d MiB" % ((anon0 + tmpfs0) >> 20, (anon1 + tmpfs1) >> 20,
                                  (anon2 + tmpfs2) >> 20))
    assert tmpfs1 - tmpfs0 >= 64 * MiB                 # the data is in the SR's tmpfs ...
    assert anon1 - anon0 < 8 * MiB                     # ... and only there
    assert tmpfs2 - tmpfs1 < MiB and anon2 - anon1 < 8 * MiB     # holes stay holes
    snap = x.VDI.snapshot(vdi, {})                     # taken paused, from the file
    dhost.unplug(vbd)
    vbd = dhost.plug(snap, "RO")
    assert holds(x, snap, 0x5c, 0, 64 * MiB) and holds(x, snap, 0, 64 * MiB, 64 * MiB)
    dhost.unplug(vbd)


def test_the_budget_may_use_all_available_memory(dhost):
    """One copy of the data: a budget up to MemAvailable is accepted (no longer half)."""
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    sr = dhost.sr_create("ram", {"size": str(avail * 3 // 4 // MiB * MiB)})
    assert dhost.x.SR.get_physical_size(sr) == str(avail * 3 // 4 // MiB * MiB)
    dhost.x.PBD.unplug(dhost.pbd(sr))
    dhost.x.SR.destroy(sr)
