"""Guests writing and reading their disks: a VM with a ram VDI and a file-SR VHD VDI makes
file systems and writes data, powers off, starts again and verifies it; dom0 reads what
the guest wrote; the SR driver saw XAPI's sequence for every VBD."""
import os

import pytest

from lib.procs import sh
from lib.runlock import GUEST_BOOTS
from smtap.toolstack import qemu

pytestmark = [pytest.mark.timeout(600),   # each boot may take 20 s on a loaded machine
              GUEST_BOOTS]

WRITE = r"""
set -e
for m in a b; do
    d=$(disk xvd$m)
    mkfs.ext4 -q -F -L guest-$m $d
    mkdir -p /mnt/$m && mount $d /mnt/$m
    dd if=/dev/urandom of=/mnt/$m/data bs=1M count=4 2>/dev/null
    echo "hello from the guest, disk $m" >/mnt/$m/hello
    (cd /mnt/$m && sha256sum data hello >sums)
    result sums-$m "$(sha256sum </mnt/$m/sums | cut -d' ' -f1)"
    umount /mnt/$m
done
result written yes
"""

VERIFY = r"""
set -e
for m in a b; do
    d=$(disk xvd$m)
    e2fsck -f -n $d >/dev/null
    mkdir -p /mnt/$m && mount -o ro $d /mnt/$m
    (cd /mnt/$m && sha256sum -c sums >/dev/null)
    result sums-$m "$(sha256sum </mnt/$m/sums | cut -d' ' -f1)"
    umount /mnt/$m
done
result verified yes
sleep 3600                                # until the toolstack shuts it down
"""


def test_a_guest_writes_powers_off_starts_again_and_verifies(guests, tmp_path):
    """Its first boot powers off by itself; the second is shut down cleanly by xe."""
    ram = guests.sr_create("ram", size="64MiB")
    files = guests.sr_create("file")
    disk_a = guests.vdi_create(ram, "32MiB", name="ram-disk")
    disk_b = guests.vdi_create(files, "32MiB", name="file-disk")
    assert os.path.exists(os.path.join(guests.root, "srv", "files", disk_b + ".vhd"))
    vm = guests.new_vm("writer", [disk_a, disk_b], WRITE)
    assert guests.power_state(vm) == "halted"

    mark = os.path.getsize(guests.log)
    guests.xe_ok("vm-start", "uuid=" + vm)
    assert guests.power_state(vm) == "running"
    assert guests.xe_ok("vm-list", "uuid=" + vm, "params=power-state", "--minimal") \
        == "running"
    assert guests.xe_ok("vm-list", "uuid=" + vm, "params=dom-id", "--minimal") != "-1"
    ((_, cmdline),) = guests.qemus()
    assert len(guests.tapdisks()) == 2
    # each disk virtio-blk on its VDI's NBD export, cache=none; KVM where it runs a stock
    # kernel (on a kvm_pvm host, as here, TCG: qemu.accelerator)
    assert cmdline.count("virtio-blk-pci") == 2 and cmdline.count('"driver": "nbd"') == 2
    assert cmdline.count('"cache": {"direct": true, "no-flush": false}') == 4, cmdline
    assert "accel=%s" % qemu.accelerator() in cmdline
    devices = sorted(guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=device",
                                  "--minimal").split(","))
    assert devices == ["xvda", "xvdb"]
    guests.wait_state(vm, "halted")
    written = guests.results(vm)
    assert written.get("written") == "yes", guests.console(vm)
    assert "smtap-guest: script exit 0" in guests.console(vm)
    # XAPI's sequence per VBD: epoch begin, attach, activate ... deactivate, detach, end
    calls = guests.sm_commands(mark)
    for driver in ("ram", "File"):
        mine = [c for d, c in calls if d == driver and c.startswith("vdi_")]
        assert mine == ["vdi_epoch_begin", "vdi_attach", "vdi_activate",
                        "vdi_deactivate", "vdi_detach", "vdi_epoch_end"], (driver, calls)
    assert guests.leftovers() == []                   # qemu and both tapdisks gone
    assert guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=currently-attached",
                        "--minimal") == "false,false"

    guests.set_script(vm, VERIFY)                     # a second boot reads it all back
    guests.xe_ok("vm-start", "uuid=" + vm)
    guests.wait_console(vm, r"^smtap-result: verified=yes")
    guests.wait_agent(vm)
    guests.xe_ok("vm-shutdown", "uuid=" + vm)         # a clean one: the ACPI power button
    assert guests.power_state(vm) == "halted"
    assert "Power down" in guests.console(vm)
    verified = guests.results(vm)
    assert verified["sums-a"] == written["sums-a"] and verified["sums-b"] == written["sums-b"]
    assert guests.boots(vm) == 2 and guests.leftovers() == []

    vbd, dev = guests.plug(disk_a, mode="RO")         # dom0 sees what the guest wrote
    point = str(tmp_path / "a")
    os.mkdir(point)
    sh("mount", "-o", "ro", dev, point)
    try:
        assert sh("cat", os.path.join(point, "hello")) == "hello from the guest, disk a\n"
        sh("sha256sum", "-c", "sums", cwd=point)
    finally:
        sh("umount", point)
    guests.unplug(vbd)
    guests.xe_ok("vm-uninstall", "uuid=" + vm, "--force")
    assert guests.xe_ok("vdi-list", "sr-uuid=" + ram, "--minimal") == ""
    assert guests.leftovers() == []
