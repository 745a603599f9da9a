"""The demo's flow as tests: an SR, a VDI plugged into dom0 as a loop device, a file
system on it, files written and read back, a snapshot, everything unplugged and
destroyed with nothing left; and `make demo`'s module run as a user runs it."""
import os
import re

import pytest

from lib import guests
from lib.demo import STEP, run_demo, steps
from lib.fs import check_fs, make_fs, read_files, write_files
from lib.procs import run, sh
from lib.runlock import GUEST_BOOTS
from lib.sizes import MiB
from lib.toolstack import traces
from smtap.sm import gcctl
from smtap.toolstack import hostroot


@pytest.mark.parametrize("sr_type", ["ram", "file"])
def test_flow(e2e, mnt, sr_type):
    x = e2e.x
    sr = e2e.sr_create(sr_type)
    assert e2e.xe_ok("sr-param-get", "uuid=" + sr, "param-name=type") == sr_type
    vdi = e2e.vdi_create(sr, "64MiB")
    vbd, dev = e2e.plug(vdi)

    # The VBD's device names a loop device on nbdfuse over the VDI's tapdisk.
    assert re.fullmatch(r"/dev/loop\d+", dev), dev
    vbd_ref = x.VBD.get_by_uuid(vbd)
    assert x.VBD.get_currently_attached(vbd_ref) is True
    assert x.VBD.get_device(vbd_ref) == os.path.basename(dev)
    backing = dict(hostroot.loops_under(e2e.root))[dev]
    assert [m for m in e2e.nbdfuse_mounts() if backing.startswith(m[0] + "/")], backing
    assert int(sh("blockdev", "--getsize64", dev)) == 64 * MiB
    assert len(e2e.tapdisks()) == 1
    assert os.path.islink(e2e.link(sr, vdi))
    assert e2e.host_tags(vdi) == ["host_" + x.host.get_by_uuid(e2e.host_uuid)]

    make_fs(dev, mnt)
    files = write_files(mnt)
    sh("umount", mnt)
    sh("mount", dev, mnt)
    read_files(mnt, files)
    sh("umount", mnt)

    # While plugged: the tapdisk is paused for it (file: the VHD's new leaf, same path).
    snap = e2e.xe_ok("vdi-snapshot", "uuid=" + vdi)
    assert e2e.xe_ok("vdi-param-get", "uuid=" + snap, "param-name=is-a-snapshot") == "true"
    assert e2e.xe_ok("vdi-param-get", "uuid=" + snap, "param-name=snapshot-of") == vdi
    assert "paused" not in x.VDI.get_sm_config(x.VDI.get_by_uuid(vdi))
    sh("mount", dev, mnt)                      # the VDI still works after the snapshot
    read_files(mnt, files)
    sh("umount", mnt)

    e2e.unplug(vbd)
    assert traces(e2e, sr, vdi) == []
    assert e2e.xe_ok("vbd-list", "--minimal") == ""

    svbd, sdev = e2e.plug(snap, mode="RO")
    check_fs(sdev, files)
    sh("mount", "-o", "ro,noload", sdev, mnt)
    read_files(mnt, files)
    sh("umount", mnt)
    with pytest.raises(OSError):              # a read-only plug refuses writes
        fd = os.open(sdev, os.O_WRONLY)
        try:
            os.write(fd, b"x" * 4096)
        finally:
            os.close(fd)
    e2e.unplug(svbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + snap)
    if sr_type == "file":                      # the collector merges what the snapshot left
        gcctl.wait_idle(sr)
        assert os.listdir(os.path.join(e2e.root, "srv", "files")) == [vdi + ".vhd"]
    assert traces(e2e, sr, snap) == []

    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)
    for cls in ("vbd", "vdi", "pbd", "sr"):
        assert e2e.xe_ok(cls + "-list", "--minimal") == "", cls
    assert traces(e2e, sr, vdi) == []
    assert hostroot.mounts_under(e2e.root) == []            # the ram SR's tmpfs too
    e2e.stop()
    assert hostroot.leftovers(e2e.root) == []


@GUEST_BOOTS                  # with --guest where a guest boots
def test_make_demo_module(tmp_path):
    """The demo as `make demo` runs it; with --guest where a guest can boot (the guest
    steps are checked then; one demo run serves both)."""
    guest = guests.why_not() is None
    proc, root = run_demo(*(["--guest"] if guest else []), timeout=500 if guest else 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""                                    # quiet but for its steps
    done = steps(proc.stdout)
    assert done and all(status == "ok" for _, status in done), proc.stdout
    names = [what for what, _ in done]
    for expected in ("xe sr-create host-uuid=$HOST type=ram", "xe vdi-create sr-uuid=$SR",
                     "xe vbd-plug uuid=$VBD", "mkfs.ext4", "SNAP=$(xe vdi-snapshot uuid=$VDI)",
                     "e2fsck -f -n", "read the snapshot's files", "xe vdi-destroy uuid=$SNAP",
                     "xe sr-destroy uuid=$SR", "type=file", "fsfreeze -f",
                     "CLONE=$(xe vdi-clone uuid=$SNAP)", "read the clone's files",
                     "smtap-gc -u $SR -g", "one VHD, no base copy left", "nothing left behind"):
        assert any(expected in n for n in names), (expected, proc.stdout)
    if guest:
        for expected in ("VM=$(xe vm-install template=smtap-guest", "xe vm-start uuid=$VM",
                         "the guest boots, writes, reads back and powers off",
                         "xe vm-uninstall uuid=$VM --force"):
            assert any(expected in n for n in names), (expected, proc.stdout)
        assert "-> sha256 " in proc.stdout and " match" in proc.stdout
    others = [l for l in proc.stdout.splitlines()[1:] if not STEP.match(l)]
    assert len(others) == 1 and re.match(r"smtap demo: ok: \d+ steps in [\d.]+ s$", others[0])
    assert not os.path.exists(root)
    assert hostroot.leftovers(root) == []


def test_make_demo_fails_cleanly():
    """A step that fails (a VDI past the ram SR's budget): exit 1, the failing step and its
    error printed, and still nothing left behind."""
    proc, root = run_demo("--sr-size", "16MiB", "--vdi-size", "64MiB")
    assert proc.returncode == 1, proc.stdout
    done = steps(proc.stdout)
    assert [s for s in done if s[1] == "FAILED"] == [(
        [w for w, _ in done if w.startswith("VDI=$(xe vdi-create")][0], "FAILED")]
    assert "SR_BACKEND_FAILURE_44" in proc.stdout
    assert "nothing left behind" in done[-1][0] and done[-1][1] == "ok", proc.stdout
    assert "smtap demo: FAILED" in proc.stdout
    assert not os.path.exists(root)
    assert hostroot.leftovers(root) == []
