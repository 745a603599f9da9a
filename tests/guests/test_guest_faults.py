"""Faults under a running guest: kill -9 of the tapdisk serving its disk gives the guest
I/O errors (not a hang) and the toolstack a clear state (the VM still runs, the VBD
says what happened); vm-shutdown --force then cleans everything up, and the VDI plugs
again."""
import os
import signal

import pytest

from smtap.toolstack import hostroot

pytestmark = pytest.mark.timeout(600)     # each boot may take 20 s on a loaded machine

WRITER = r"""
d=$(disk xvda)
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


def test_kill_9_of_a_tapdisk_under_a_running_guest(guests):
    sr = guests.sr_create("ram", size="64MiB")
    vdi = guests.vdi_create(sr, "16MiB")
    vm = guests.new_vm("writer", [vdi], WRITER)
    guests.xe_ok("vm-start", "uuid=" + vm)
    guests.wait_console(vm, r"^smtap-result: writing=yes")
    pid = guests.tapdisk_pid(sr, vdi)
    os.kill(pid, signal.SIGKILL)
    assert hostroot.wait_dead(pid)

    guests.wait_console(vm, r"^smtap-result: io-error=write \d+", timeout=60)
    assert "I/O error" in guests.console(vm)               # the guest kernel's own words
    vbd = guests.xe_ok("vbd-list", "vm-uuid=" + vm, "--minimal")
    detail = guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=status-detail")
    assert "tapdisk %d serving VDI %s is gone" % (pid, vdi) in detail, detail
    assert guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=status-code") == "5"
    assert guests.power_state(vm) == "running"              # the guest itself goes on

    guests.xe_ok("vm-shutdown", "uuid=" + vm, "--force")
    assert guests.power_state(vm) == "halted"
    assert guests.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") \
        == "false"
    assert guests.leftovers() == []                         # no qemu, tapdisk, socket, link
    dom0_vbd, dev = guests.plug(vdi)                        # the VDI is usable again
    guests.unplug(dom0_vbd)
    assert guests.leftovers() == []
