"""Failure paths through `xe` on a started host: each refusal names the right error,
changes nothing, and a crash (kill -9 of a tapdisk) still unplugs cleanly."""
import os
import signal
import subprocess
import time

import pytest
import XenAPI

from smtap.toolstack import hostroot

from lib.fs import check_fio_blocks, check_fs, make_fs, read_files, write_files
from lib.procs import sh
from lib.sizes import MiB
from lib.toolstack import traces


def test_budget_exceeded(e2e):
    x = e2e.x
    sr = e2e.sr_create("ram", size="64MiB")
    tmpfs = os.path.join(e2e.root, "run", "sr-mount", sr)
    first = e2e.vdi_create(sr, "48MiB")
    before = sorted(os.listdir(tmpfs))
    code, err = e2e.xe_fails("vdi-create", "sr-uuid=" + sr, "name-label=big",
                             "virtual-size=17MiB")
    assert code == "SR_BACKEND_FAILURE_44", err                 # SRNoSpace
    assert "insufficient space" in err and "16777216 free" in err, err
    with pytest.raises(XenAPI.Failure) as e:                     # the same through XenAPI
        x.VDI.create({"SR": x.SR.get_by_uuid(sr), "virtual_size": str(17 * MiB),
                      "name_label": "big", "type": "user", "sharable": False,
                      "read_only": False, "other_config": {}, "sm_config": {}})
    assert e.value.details[0] == "SR_BACKEND_FAILURE_44"
    assert e2e.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal") == first   # nothing made
    assert sorted(os.listdir(tmpfs)) == before
    last = e2e.vdi_create(sr, "16MiB")                           # exactly the rest fits
    code, _ = e2e.xe_fails("vdi-snapshot", "uuid=" + last)       # a copy needs 16 MiB more
    assert code == "SR_BACKEND_FAILURE_44"
    for vdi in (first, last):
        e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)


def test_vdi_destroy_while_plugged(e2e, mnt):
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd, dev = e2e.plug(vdi)
    make_fs(dev, mnt)
    files = write_files(mnt)
    code, err = e2e.xe_fails("vdi-destroy", "uuid=" + vdi)
    assert code == "VDI_IN_USE", err
    with pytest.raises(XenAPI.Failure) as e:
        e2e.x.VDI.destroy(e2e.x.VDI.get_by_uuid(vdi))
    assert e.value.details[0] == "VDI_IN_USE"
    read_files(mnt, files)                          # the mounted file system is untouched
    sh("umount", mnt)
    assert e2e.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") == "true"
    check_fs(dev, files)
    e2e.unplug(vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)         # unplugged: now it goes
    assert e2e.xe_ok("vdi-list", "--minimal") == ""
    e2e.destroy_sr(sr)


@pytest.mark.parametrize("sr_type", ["ram", "file"])
def test_kill_9_of_tapdisk_then_unplug_cleans_up(e2e, mnt, sr_type):
    sr = e2e.sr_create(sr_type, size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd, dev = e2e.plug(vdi)
    make_fs(dev, mnt)
    files = write_files(mnt)
    sh("umount", mnt)                               # flushed down to the engine's storage
    pid = e2e.tapdisk_pid(sr, vdi)
    assert [p for p, _ in e2e.tapdisks()] == [pid]
    os.kill(pid, signal.SIGKILL)
    assert hostroot.wait_dead(pid)

    e2e.xe_ok("vbd-unplug", "uuid=" + vbd)          # with its tapdisk dead
    assert traces(e2e, sr, vdi) == []               # no loop, nbdfuse, tapdisk, link, tag
    assert not os.path.exists(os.path.dirname(e2e.link(sr, vdi)))
    assert e2e.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") == "false"
    assert e2e.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=device") == ""
    e2e.xe_ok("vbd-destroy", "uuid=" + vbd)

    vbd, dev = e2e.plug(vdi)                        # plugs again, with what was flushed
    assert e2e.tapdisk_pid(sr, vdi) != pid
    check_fs(dev, files)
    e2e.unplug(vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)
    assert traces(e2e, sr, vdi) == []


def test_sr_destroy_with_vdis_attached_refused(e2e, mnt):
    sr = e2e.sr_create("ram", size="64MiB")
    vdi = e2e.vdi_create(sr, "32MiB")
    vbd, dev = e2e.plug(vdi)
    make_fs(dev, mnt)
    files = write_files(mnt)

    code, err = e2e.xe_fails("sr-destroy", "uuid=" + sr)      # its PBD is plugged
    assert code == "SR_HAS_PBD", err
    read_files(mnt, files)                                    # nothing was touched
    sh("umount", mnt)
    check_fs(dev, files)
    assert e2e.xe_ok("sr-list", "uuid=" + sr, "--minimal") == sr
    assert e2e.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal") == vdi
    e2e.unplug(vbd)

    pbd = e2e.xe_ok("pbd-list", "sr-uuid=" + sr, "--minimal")
    e2e.xe_ok("pbd-unplug", "uuid=" + pbd)
    code, err = e2e.xe_fails("sr-destroy", "uuid=" + sr)      # a VDI is still in it
    assert code == "SR_NOT_EMPTY", err
    assert e2e.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal") == vdi
    assert e2e.xe_ok("pbd-param-get", "uuid=" + pbd, "param-name=currently-attached") == "false"
    assert [m for m in os.listdir(os.path.join(e2e.root, "run", "sr-mount"))] == []
    e2e.xe_ok("pbd-plug", "uuid=" + pbd)                      # the refused SR still works
    vbd, dev = e2e.plug(vdi)
    assert int(sh("blockdev", "--getsize64", dev)) == 32 * MiB
    e2e.unplug(vbd)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)
    assert e2e.xe_ok("sr-list", "--minimal") == ""


def test_snapshot_while_fio_verifies_over_nbd(e2e, tmp_path):
    """fio writes and verifies (crc32c) on the VDI's NBD export while `xe vdi-snapshot`
    pauses it: no verify error, and each snapshot holds only whole fio blocks."""
    sr = e2e.sr_create("ram", size="96MiB")
    vdi = e2e.vdi_create(sr, "16MiB")
    vbd, dev = e2e.plug(vdi)                        # dom0's block device is on it too
    work = tmp_path / "fio"
    work.mkdir()                                    # fio's verify state files go here
    fio = subprocess.Popen(
        ["fio", "--name=verify", "--ioengine=nbd", "--uri=" + e2e.nbd_uri(sr, vdi),
         "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=8", "--verify=crc32c", "--verify_state_save=0",
         "--verify_backlog=256", "--verify_fatal=1", "--time_based", "--runtime=12",
         "--output-format=terse"],
        cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snaps = []
    try:
        time.sleep(2)
        while fio.poll() is None and len(snaps) < 4:
            t0 = time.monotonic()
            snaps.append(e2e.xe_ok("vdi-snapshot", "uuid=" + vdi))
            time.sleep(max(0, 2 - (time.monotonic() - t0)))
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    assert "verify" not in err.lower() and "crc" not in err.lower(), err
    fields = out.strip().splitlines()[-1].split(";")           # terse v3: field 5 = error
    assert fields[4] == "0", out
    assert int(fields[5]) > 1024, out                          # verify reads did run
    assert len(snaps) >= 3, "only %d snapshots during fio" % len(snaps)

    image = str(tmp_path / "image")
    written = []
    for snap in snaps:
        svbd, sdev = e2e.plug(snap, mode="RO")
        sh("dd", "if=" + sdev, "of=" + image, "bs=1M", "iflag=direct", "status=none")
        e2e.unplug(svbd)
        good, zero = check_fio_blocks(image)                   # consistent: no torn block
        assert good + zero == 4096
        written.append(good)
    assert written[0] > 0 and written == sorted(written), written   # later: more written
    sh("dd", "if=" + dev, "of=" + image, "bs=1M", "iflag=direct", "status=none")
    good, zero = check_fio_blocks(image)            # the live VDI after fio: the checker
    assert good + zero == 4096 and good >= written[-1]          # agrees with fio's verify
    e2e.unplug(vbd)
    for snap in snaps:
        e2e.xe_ok("vdi-destroy", "uuid=" + snap)
    e2e.xe_ok("vdi-destroy", "uuid=" + vdi)
    e2e.destroy_sr(sr)
