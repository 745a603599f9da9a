"""dom0 devices under faults, through `xe`: a device in use is never torn down by a
plain unplug (DEVICE_DETACH_REJECTED, the VBD keeps working, a retry after umount
works), force=true unplugs anyway, a reused loop number is never mistaken for ours, and
a kill -9 of the toolstack at any step of a plug or unplug is undone at restart."""
import os
import time

import pytest

from lib.fs import check_fs, make_fs, read_files, write_files
from lib.procs import run, sh
from lib.toolstack import traces
from smtap.toolstack import faults, hostroot


def attached(e2e, vbd):
    return e2e.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached")


def restart(e2e, crash_at=None, monkeypatch=None):
    """Restart the toolstack, with a crash point set (or none)."""
    e2e.stop()
    if crash_at:
        monkeypatch.setenv(faults.ENV, crash_at)
    else:
        monkeypatch.delenv(faults.ENV, raising=False)
    e2e.start()
    e2e.session_obj = e2e.session()
    e2e.x = e2e.session_obj.xenapi


def test_unplug_of_a_mounted_device_is_refused_then_a_retry_works(e2e, mnt):
    """Failed before: a 30 s hang, INTERNAL_ERROR after `losetup -d`, failing retries."""
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd, dev = e2e.plug(vdi)
    make_fs(dev, mnt)
    files = write_files(mnt)
    start = time.monotonic()
    code, err = e2e.xe_fails("vbd-unplug", "uuid=" + vbd)
    assert code == "DEVICE_DETACH_REJECTED", err
    assert time.monotonic() - start < 10
    assert "VBD" in err and "mounted on %s" % mnt in err, err
    assert attached(e2e, vbd) == "true"
    assert len(e2e.tapdisks()) == 1 and len(e2e.nbdfuse_mounts()) == 1
    read_files(mnt, files)                          # still working: read and write
    more = write_files(os.path.join(mnt), seed=2)
    sh("umount", mnt)
    check_fs(dev, more)
    e2e.xe_ok("vbd-unplug", "uuid=" + vbd)          # a plain retry once unmounted
    assert attached(e2e, vbd) == "false"
    assert traces(e2e, sr, vdi) == []
    e2e.xe_ok("vbd-destroy", "uuid=" + vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)


def test_unplug_force_of_a_mounted_device(e2e, mnt):
    """Failed before: force=true was ignored (and refused as an unknown xe parameter)."""
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd, dev = e2e.plug(vdi)
    make_fs(dev, mnt)
    write_files(mnt)
    e2e.xe_ok("vbd-unplug", "uuid=" + vbd, "force=true")
    assert attached(e2e, vbd) == "false"
    assert e2e.tapdisks() == [] and e2e.nbdfuse_mounts() == []
    if run("umount", mnt, check=False).returncode:
        sh("umount", "-l", mnt)               # the file system lost its disk
    deadline = time.monotonic() + 10                # the loop device goes at its last close
    while hostroot.loops_under(e2e.root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert traces(e2e, sr, vdi) == []
    vbd2, dev2 = e2e.plug(vdi)                      # the VDI plugs again
    e2e.unplug(vbd2)
    e2e.xe_ok("vbd-destroy", "uuid=" + vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)


@pytest.mark.alone          # the freed loop number must come back to it
def test_unplug_never_touches_a_reused_loop_number(e2e):
    """Failed before: A's unplug detached B's loop device and nbdfuse (A's remembered
    /dev/loopN had been given to B) and answered success."""
    sr = e2e.sr_create("ram", size="64MiB")
    vdi_a, vdi_b = e2e.vdi_create(sr, "16MiB", "a"), e2e.vdi_create(sr, "16MiB", "b")
    vbd_a, dev_a = e2e.plug(vdi_a)
    sh("losetup", "-d", dev_a)                      # A's loop device goes behind its back
    deadline = time.monotonic() + 10
    while hostroot.loops_under(e2e.root) and time.monotonic() < deadline:
        time.sleep(0.05)
    vbd_b, dev_b = e2e.plug(vdi_b)
    assert dev_b == dev_a                           # the number was reused
    with open(dev_b, "r+b") as f:
        f.write(b"B" * 4096)
    e2e.xe_ok("vbd-unplug", "uuid=" + vbd_a)
    assert attached(e2e, vbd_b) == "true"
    assert [d for d, _ in hostroot.loops_under(e2e.root)] == [dev_b]
    assert len(e2e.nbdfuse_mounts()) == 1 and len(e2e.tapdisks()) == 1
    with open(dev_b, "rb") as f:
        assert f.read(4096) == b"B" * 4096
    e2e.unplug(vbd_b)
    e2e.xe_ok("vbd-destroy", "uuid=" + vbd_a)
    for vdi in (vdi_a, vdi_b):
        e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    assert traces(e2e, sr, vdi_a) == [] and traces(e2e, sr, vdi_b) == []
    e2e.destroy_sr(sr)


PLUG_POINTS = [p for p in faults.POINTS if p.startswith("plug-")]
UNPLUG_POINTS = [p for p in faults.POINTS if p.startswith("unplug-")]


@pytest.mark.parametrize("point", PLUG_POINTS + UNPLUG_POINTS)
def test_kill_9_of_the_toolstack_during_plug_or_unplug(e2e, mnt, monkeypatch, point):
    """Failed before (plug points): after restart every vbd-plug failed ("... is already
    a mount point"), nbdfuse stayed forever and vdi-destroy answered VDI_IN_USE."""
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd = e2e.xe_ok("vbd-create", "vm-uuid=" + e2e.dom0, "vdi-uuid=" + vdi,
                    "device=autodetect", "mode=RW")
    if point in UNPLUG_POINTS:
        e2e.xe_ok("vbd-plug", "uuid=" + vbd)
        dev = "/dev/" + e2e.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=device")
        make_fs(dev, mnt)
        files = write_files(mnt)
        sh("umount", mnt)
    restart(e2e, point, monkeypatch)
    pid = e2e.proc.pid
    res = e2e.xe("vbd-unplug" if point in UNPLUG_POINTS else "vbd-plug", "uuid=" + vbd)
    assert res.returncode != 0
    assert hostroot.wait_dead(pid)                  # it died at that point
    e2e.proc.wait()

    restart(e2e, None, monkeypatch)                 # resync: undone, nothing left
    assert attached(e2e, vbd) == "false"
    assert traces(e2e, sr, vdi) == []
    vbd2, dev = e2e.plug(vdi)                       # and everything works again
    if point in UNPLUG_POINTS:
        check_fs(dev, files)
    else:
        make_fs(dev, mnt)
        files = write_files(mnt)
        sh("umount", mnt)
    e2e.unplug(vbd2)
    e2e.xe_ok("vbd-plug", "uuid=" + vbd)
    e2e.unplug(vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    assert traces(e2e, sr, vdi) == []
    e2e.destroy_sr(sr)


def test_kill_9_during_plug_then_destroy_without_restart_resync(e2e, monkeypatch):
    """vdi-destroy after a crashed plug: the journal is undone first (no VDI_IN_USE)."""
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd = e2e.xe_ok("vbd-create", "vm-uuid=" + e2e.dom0, "vdi-uuid=" + vdi,
                    "device=autodetect", "mode=RW")
    restart(e2e, "plug-device", monkeypatch)
    assert e2e.xe("vbd-plug", "uuid=" + vbd).returncode != 0
    e2e.proc.wait()
    restart(e2e, None, monkeypatch)
    e2e.xe_ok("vbd-destroy", "uuid=" + vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    assert traces(e2e, sr, vdi) == []
    e2e.destroy_sr(sr)
