"""A guest's lifecycle as XAPI runs it: the template, power states and the operations
each allows, hot plug and unplug through qemu's monitor (refused as XAPI refuses them),
a toolstack restart finding its guests again, clean reboot (the guest's agent), kill -9
of a tapdisk under a running guest and vm-shutdown --force, qemu dying (with the
toolstack up or down), concurrent starts, and starts that fail. Guests boot only where a
test needs one: each boot costs 5-10 s under TCG."""
import concurrent.futures
import glob
import os
import signal

import pytest

from lib.runlock import GUEST_BOOTS
from smtap.toolstack import hostroot, templates

pytestmark = [pytest.mark.timeout(600),   # each boot may take 20 s on a loaded machine
              GUEST_BOOTS]

# Waits for a second disk, writes to it, waits until it is unplugged, then idles.
HOTPLUG = r"""
d=$(disk xvdb 1800) || exit 1
dd if=/dev/zero of=$d bs=64k count=16 oflag=direct 2>/dev/null && result wrote-xvdb yes
gone xvdb 1800 && result unplugged yes
sleep 3600
"""

# The boot after the reboot: writes to its second disk until the writes fail.
WRITER = r"""
d=$(disk xvdb) || exit 1
result booted-with xvdb
i=0
while :; do
    if dd if=/dev/urandom of=$d bs=4k count=1 seek=$((i % 512)) oflag=direct conv=notrunc 2>/dev/null
    then
        [ $i -eq 20 ] && result writing yes
    else
        result io-error "write $i"
        break
    fi
    i=$((i + 1))
done
sleep 3600
"""


def test_template_and_what_a_halted_vm_refuses(guests):
    (tpl,) = guests.xe_ok("template-list", "name-label=" + templates.NAME,
                          "--minimal").split(",")
    assert guests.xe_ok("template-param-get", "uuid=" + tpl, "param-name=is-a-template") == "true"
    kernel = guests.xe_ok("template-param-get", "uuid=" + tpl, "param-name=PV-kernel")
    assert os.path.exists(kernel)
    assert tpl not in guests.xe_ok("vm-list", "--minimal")     # vm-list shows VMs only
    code, _ = guests.xe_fails("vm-start", "uuid=" + tpl)
    assert code == "VM_IS_TEMPLATE"
    code, _ = guests.xe_fails("vm-destroy", "uuid=" + tpl)       # a default template stays
    assert code == "VM_IS_TEMPLATE"

    vm = guests.xe_ok("vm-install", "template=" + templates.NAME, "new-name-label=vm1")
    assert guests.xe_ok("vm-list", "name-label=vm1", "--minimal") == vm
    assert guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=is-a-template") == "false"
    ops = guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=allowed-operations")
    assert "start" in ops and "clean_shutdown" not in ops
    code, err = guests.xe_fails("vm-shutdown", "uuid=" + vm)
    assert code == "VM_BAD_POWER_STATE" and "expected: Running" in err, err
    sr = guests.sr_create("ram", size="64MiB")
    vdi = guests.vdi_create(sr, "16MiB")
    vbd = guests.xe_ok("vbd-create", "vm-uuid=" + vm, "vdi-uuid=" + vdi, "device=0")
    code, err = guests.xe_fails("vbd-plug", "uuid=" + vbd)           # not running
    assert code == "VM_BAD_POWER_STATE", err

    pattern = os.urandom(1 << 20)                   # what the copies must hold
    dom0_vbd, dev = guests.plug(vdi)
    with open(dev, "r+b") as f:
        f.write(pattern)
    guests.unplug(dom0_vbd)
    clone = guests.xe_ok("vm-clone", "uuid=" + vm, "new-name-label=vm-clone")
    copy = guests.xe_ok("vm-copy", "uuid=" + vm, "new-name-label=vm-copy", "sr-uuid=" + sr)
    for new in (clone, copy):
        assert guests.power_state(new) == "halted"
        assert guests.xe_ok("vm-param-get", "uuid=" + new, "param-name=is-a-template") \
            == "false"
        new_vdi = guests.xe_ok("vbd-list", "vm-uuid=" + new, "params=vdi-uuid", "--minimal")
        assert new_vdi and new_vdi != vdi
        dom0_vbd, dev = guests.plug(new_vdi, mode="RO")
        with open(dev, "rb") as f:
            assert f.read(len(pattern)) == pattern
        guests.unplug(dom0_vbd)
        guests.xe_ok("vm-uninstall", "uuid=" + new, "--force")
    guests.xe_ok("vm-destroy", "uuid=" + vm)
    assert guests.xe_ok("vbd-list", "uuid=" + vbd, "--minimal") == ""
    assert guests.xe_ok("vdi-list", "uuid=" + vdi, "--minimal") == vdi   # VDIs stay


def test_hotplug_a_toolstack_restart_reboot_and_a_tapdisk_killed(guests):
    """One guest through it all: hot plug (refused while it boots), a toolstack killed
    and restarted finding it again (same qemu, same tapdisks, its monitor and agent
    heard), hot unplug, a reboot through the agent that plugs every VBD as a start does,
    kill -9 of the tapdisk under a disk the guest writes to, vm-shutdown --force. (The
    clean shutdown is test_guest_data's.)"""
    sr = guests.sr_create("ram", size="128MiB")
    root_disk = guests.vdi_create(sr, "16MiB", name="root")
    extra = guests.vdi_create(sr, "16MiB", name="extra")
    vm = guests.new_vm("hot", [root_disk], HOTPLUG)
    guests.xe_ok("vm-start", "uuid=" + vm)
    code, _ = guests.xe_fails("vm-start", "uuid=" + vm)
    assert code == "VM_BAD_POWER_STATE"
    code, _ = guests.xe_fails("vm-destroy", "uuid=" + vm)
    assert code == "VM_BAD_POWER_STATE"
    vbd = guests.xe_ok("vbd-create", "vm-uuid=" + vm, "vdi-uuid=" + extra, "device=1")
    code, _ = guests.xe_fails("vbd-plug", "uuid=" + vbd)     # the guest is still booting
    assert code == "VM_MISSING_PV_DRIVERS"

    guests.wait_agent(vm)
    guests.xe_ok("vbd-plug", "uuid=" + vbd)                  # hot, through qemu's monitor
    assert guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=device") == "xvdb"
    code, _ = guests.xe_fails("vbd-plug", "uuid=" + vbd)
    assert code == "DEVICE_ALREADY_ATTACHED"
    guests.wait_console(vm, r"^smtap-result: wrote-xvdb=yes")

    ((pid, _),) = guests.qemus()
    tapdisks = guests.tapdisks()
    assert len(tapdisks) == 2
    guests.stop(signal.SIGKILL)                              # the toolstack dies, not qemu
    guests.start()
    assert guests.power_state(vm) == "running"
    assert [p for p, _ in guests.qemus()] == [pid] and guests.tapdisks() == tapdisks

    root_vbd = guests.xe_ok("vbd-list", "vdi-uuid=" + root_disk, "--minimal")
    guests.xe_ok("vbd-param-set", "uuid=" + root_vbd, "unpluggable=false")
    code, _ = guests.xe_fails("vbd-unplug", "uuid=" + root_vbd)
    assert code == "VBD_NOT_UNPLUGGABLE"
    guests.xe_ok("vbd-unplug", "uuid=" + vbd)                # the guest lets it go
    guests.wait_console(vm, r"^smtap-result: unplugged=yes")
    assert guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") \
        == "false"
    assert len(guests.tapdisks()) == 1                       # the extra VDI is detached
    code, _ = guests.xe_fails("vbd-unplug", "uuid=" + vbd)
    assert code == "DEVICE_ALREADY_DETACHED"

    domid = guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=dom-id")
    guests.set_script(vm, WRITER)                            # the next boot's
    guests.xe_ok("vm-reboot", "uuid=" + vm)                  # asked through the agent
    assert guests.power_state(vm) == "running" and guests.boots(vm) == 2
    assert guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=dom-id") == domid
    assert "smtap-guest: reboot" in guests.console(vm, -2)
    # a reboot plugs every VBD, as a start does: the second disk is there at boot
    assert guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=currently-attached",
                        "--minimal") == "true,true"
    guests.wait_console(vm, r"^smtap-result: booted-with=xvdb")

    # kill -9 of the tapdisk under the running guest: I/O errors in the guest (not a
    # hang), the VBD says what happened, the guest goes on; a forced shutdown cleans up
    guests.wait_console(vm, r"^smtap-result: writing=yes")
    pid = guests.tapdisk_pid(sr, extra)
    os.kill(pid, signal.SIGKILL)
    assert hostroot.wait_dead(pid)
    guests.wait_console(vm, r"^smtap-result: io-error=write \d+", timeout=60)
    assert "I/O error" in guests.console(vm)               # the guest kernel's own words
    detail = guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=status-detail")
    assert "tapdisk %d serving VDI %s is gone" % (pid, extra) in detail, detail
    assert guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=status-code") == "5"
    assert guests.xe_ok("vbd-param-get", "uuid=" + root_vbd, "param-name=status-code") == "0"
    assert guests.power_state(vm) == "running"

    guests.xe_ok("vm-shutdown", "uuid=" + vm, "--force")
    assert guests.power_state(vm) == "halted"
    assert guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=dom-id") == "-1"
    assert guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=currently-attached",
                        "--minimal") == "false,false"
    assert guests.leftovers() == []                          # no qemu, tapdisk, socket, link
    dom0_vbd, dev = guests.plug(extra)                       # the VDI is usable again
    guests.unplug(dom0_vbd)
    assert guests.leftovers() == []


def test_qemu_deaths_and_concurrent_starts(guests):
    """qemu killed: the VM Halted, its disks unplugged; killed while the toolstack is
    down: the start-up resync does the same. Two VMs started at once get two domids.
    (No boot is waited for: qemu's death is what is tried.)"""
    sr = guests.sr_create("ram", size="64MiB")
    vms = [guests.new_vm("victim%d" % n, [guests.vdi_create(sr, "16MiB")]) for n in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:   # no script: they idle
        for started in [pool.submit(guests.xe_ok, "vm-start", "uuid=" + vm) for vm in vms]:
            started.result()
    domids = [guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=dom-id") for vm in vms]
    assert sorted(domids) == ["1", "2"], domids
    assert len(guests.qemus()) == 2 and len(guests.tapdisks()) == 2

    vm, other = vms
    pid = [p for p, cmd in guests.qemus() if vm in cmd][0]
    os.kill(pid, signal.SIGKILL)
    guests.wait_state(vm, "halted", timeout=60)
    assert "qemu exited (killed)" in guests.console(vm)
    assert guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=currently-attached",
                        "--minimal") == "false"
    assert len(guests.qemus()) == 1 and len(guests.tapdisks()) == 1  # its tapdisk went

    ((pid, _),) = guests.qemus()
    guests.stop(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)                             # qemu dies while it is down
    assert hostroot.wait_dead(pid)
    guests.start()
    guests.wait_state(other, "halted", timeout=60)           # the start-up resync
    assert guests.leftovers() == []
    assert guests.xe_ok("vbd-list", "vm-uuid=" + other, "params=currently-attached",
                        "--minimal") == "false"


def test_a_start_that_fails_undoes_everything(guests):
    """Two starts that fail, each undone whole (the VM Halted with no domid, no VBD
    attached, every epoch begun ended, no process left): a disk whose file is gone (its
    vdi_attach fails once the ram disk is plugged), a disk whose driver serves no data
    (DummySR's params_nbd names no socket: qemu refuses it)."""
    ram = guests.sr_create("ram", size="64MiB")
    files = guests.sr_create("file")
    good = guests.vdi_create(ram, "16MiB")
    lost = guests.vdi_create(files, "16MiB")
    (image,) = glob.glob(os.path.join(guests.root, "srv", "files", lost + ".*"))
    os.unlink(image)
    vm = guests.new_vm("doomed", [good, lost])

    def undone():
        assert guests.power_state(vm) == "halted"
        assert guests.xe_ok("vm-param-get", "uuid=" + vm, "param-name=dom-id") == "-1"
        assert guests.xe_ok("vbd-list", "vm-uuid=" + vm, "params=currently-attached",
                            "--minimal") == "false,false"
        assert guests.leftovers() == []                            # the ram VDI's tapdisk too

    mark = os.path.getsize(guests.log)
    code, err = guests.xe_fails("vm-start", "uuid=" + vm)
    assert code == "VDI_MISSING" and lost in err, (code, err)
    undone()
    calls = guests.sm_commands(mark, failed=True)
    ram_calls = [c for d, c in calls if d == "ram" and c.startswith("vdi_")]
    file_calls = [c for d, c in calls if d == "File" and c.startswith("vdi_")]
    assert ram_calls == ["vdi_epoch_begin", "vdi_attach", "vdi_activate",
                         "vdi_deactivate", "vdi_detach", "vdi_epoch_end"], calls
    assert file_calls[0] == "vdi_epoch_begin" and file_calls[-1] == "vdi_epoch_end", calls
    assert "vdi_activate" not in file_calls, calls

    dummy = guests.xe_ok("sr-create", "type=dummy", "name-label=nothing", "physical-size=1GiB")
    bad = guests.vdi_create(dummy, "16MiB")
    guests.xe_ok("vbd-destroy", "uuid=" + guests.xe_ok(
        "vbd-list", "vm-uuid=" + vm, "vdi-uuid=" + lost, "--minimal"))
    guests.xe_ok("vbd-create", "vm-uuid=" + vm, "vdi-uuid=" + bad, "device=1")
    code, err = guests.xe_fails("vm-start", "uuid=" + vm)
    assert code == "FAILED_TO_START_EMULATOR", err
    assert "xvdb" in err or "nbd" in err.lower(), err              # qemu's own words
    undone()
