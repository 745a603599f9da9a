"""vm-snapshot of a running guest while it writes and verifies with fio: the SR driver
snapshots each VDI with its tapdisk paused, fio sees no error, and a clone of the
snapshot boots and finds only whole fio blocks on its disks. The guest's disks: a ram
VDI, and a file-SR VHD VDI (snapshotted by a new leaf, its tapdisk paused meanwhile)."""
import os
import time

import pytest

from lib.runlock import GUEST_BOOTS

pytestmark = [pytest.mark.timeout(600),   # each boot may take 20 s on a loaded machine
              GUEST_BOOTS]

# One fio per step over every disk (/dev/xvd*), a job each.
FIO = r"""
jobs=""
for d in /dev/xvd*; do jobs="$jobs --name=${d##*/} --filename=$d"; done
fio_all() {
    fio --bs=4k --size=8M --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c \
        --output-format=terse "$@" $jobs
}
"""

LIVE = FIO + r"""
set -e
fio_all --rw=write --do_verify=0 >/dev/null
result phase randwrite
fio_all --rw=randwrite --verify_backlog=256 --verify_fatal=1 --time_based --runtime=8 \
    >/run/fio.out 2>/run/fio.err || { cat /run/fio.err; result fio failed; exit 1; }
result fio-jobs "$(wc -l </run/fio.out)"
result fio-errors "$(cut -d';' -f5 /run/fio.out | sort -u | tr '\n' ' ')"
result fio-verified-kib "$(cut -d';' -f6 /run/fio.out | sort -n | head -1)"
"""

CHECK = FIO + r"""
set -e
fio_all --rw=read --verify_only=1 --verify_fatal=1 >/run/v.out 2>/run/v.err \
    || { cat /run/v.err; result verify failed; exit 1; }
result verify "$(wc -l </run/v.out) disks of whole blocks"
"""


def test_snapshot_under_fio_verify_then_a_clone_boots_and_verifies(guests):
    ram = guests.sr_create("ram", size="128MiB")
    files = guests.sr_create("file")
    disks = [guests.vdi_create(ram, "16MiB", name="ram-disk"),
             guests.vdi_create(files, "16MiB", name="file-disk")]
    assert os.path.exists(os.path.join(guests.root, "srv", "files", disks[1] + ".vhd"))
    vm = guests.new_vm("busy", disks, LIVE)
    guests.xe_ok("vm-start", "uuid=" + vm)
    guests.wait_console(vm, r"^smtap-result: phase=randwrite")
    time.sleep(1)
    snaps = []
    for n in range(2):
        snaps.append(guests.xe_ok("vm-snapshot", "uuid=" + vm, "new-name-label=snap%d" % n))
        assert guests.power_state(vm) == "running"
        time.sleep(2)
    guests.wait_state(vm, "halted")
    done = guests.results(vm)
    assert done.get("fio-jobs") == str(len(disks)), guests.console(vm)
    assert done.get("fio-errors") == "0 ", guests.console(vm)
    assert int(done["fio-verified-kib"]) > 0, done

    assert sorted(guests.xe_ok("snapshot-list", "snapshot-of=" + vm, "--minimal").split(",")) \
        == sorted(snaps)
    snap = snaps[0]
    assert guests.xe_ok("snapshot-param-get", "uuid=" + snap, "param-name=is-a-snapshot") \
        == "true"
    code, _ = guests.xe_fails("vm-start", "uuid=" + snap)
    assert code == "VM_IS_SNAPSHOT"
    snap_vdis = guests.xe_ok("vbd-list", "vm-uuid=" + snap, "params=vdi-uuid",
                             "--minimal").split(",")
    assert sorted(guests.xe_ok("vdi-param-get", "uuid=" + v, "param-name=snapshot-of")
                  for v in snap_vdis) == sorted(disks)

    template = guests.xe_ok("snapshot-clone", "uuid=" + snap, "new-name-label=from-snap")
    assert guests.xe_ok("template-list", "uuid=" + template, "--minimal") == template
    guests.xe_ok("template-param-set", "uuid=" + template, "is-a-template=false")
    guests.set_script(template, CHECK)
    checked = guests.run_to_halt(template)
    assert checked.get("verify") == "%d disks of whole blocks" % len(disks), \
        guests.console(template)
    assert guests.leftovers() == []

    for s in snaps:
        guests.xe_ok("snapshot-uninstall", "uuid=" + s, "--force")
    guests.xe_ok("vm-uninstall", "uuid=" + template, "--force")
    guests.xe_ok("vm-uninstall", "uuid=" + vm, "--force")
    assert guests.xe_ok("vdi-list", "sr-uuid=" + ram, "--minimal") == ""
