"""Guests on a simulated host: the e2e host (installed tree + smtap-xapi, driven with
the installed `xe`) with VMs of the built-in template, their serial consoles read back
(one boot at a time, the smtap-result: KEY=VALUE lines of the guest's scripts), and what
guests can leave behind."""
import os
import re
import time

from lib.checkout import TOP
from lib.toolstack import E2EHost
from smtap.sm import gcctl
from smtap.toolstack import hostroot, qemu, templates

GUEST_IMAGE = os.path.join(TOP, "build", "guest", "manifest.json")
BOOT_TIMEOUT = 180          # under TCG on a loaded 2-core machine a boot takes 5-20 s
BOOT_MARK = "--- smtap: start"
GC_WAIT = 60


class GuestHost(E2EHost):
    """The e2e host, with VMs: made from the built-in template, their disks VDIs."""

    def new_vm(self, name, disks=(), script=None):
        """A VM of the template with these VDIs as xvda, xvdb...: [(vdi, mode)]."""
        vm = self.xe_ok("vm-install", "template=" + templates.NAME, "new-name-label=" + name)
        for n, disk in enumerate(disks):
            vdi, mode = disk if isinstance(disk, tuple) else (disk, "RW")
            self.xe_ok("vbd-create", "vm-uuid=" + vm, "vdi-uuid=" + vdi, "device=%d" % n,
                       "mode=" + mode)
        if script is not None:
            self.set_script(vm, script)
        return vm

    def set_script(self, vm, script):
        self.xe_ok("vm-param-set", "uuid=" + vm, "xenstore-data:vm-data/script=" + script)

    def console_path(self, vm):
        return os.path.join(self.root, "var", "log", "smtap", "vm", vm + ".console.log")

    def console(self, vm, boot=-1):
        """The serial console of one boot (the last by default)."""
        try:
            with open(self.console_path(vm), errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return ""
        boots = text.split(BOOT_MARK)
        return boots[boot] if len(boots) > 1 else ""

    def boots(self, vm):
        try:
            with open(self.console_path(vm), errors="replace") as f:
                return f.read().count(BOOT_MARK)
        except FileNotFoundError:
            return 0

    def results(self, vm, boot=-1):
        """The smtap-result: KEY=VALUE lines of a boot."""
        return dict(m.groups() for m in re.finditer(r"^smtap-result: ([^=\s]+)=(.*?)\r?$",
                                                    self.console(vm, boot), re.M))

    def wait_console(self, vm, pattern, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.console(vm), re.M)
            if m:
                return m
            time.sleep(0.2)
        raise AssertionError("no %r on the console of %s within %d s:\n%s"
                             % (pattern, vm, timeout, self.console(vm)[-3000:]))

    def power_state(self, vm):
        return self.xe_ok("vm-param-get", "uuid=" + vm, "param-name=power-state")

    def wait_state(self, vm, state, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.power_state(vm) == state:
                return
            time.sleep(0.3)
        raise AssertionError("VM %s still %s after %d s:\n%s" % (
            vm, self.power_state(vm), timeout, self.console(vm)[-3000:]))

    def wait_agent(self, vm, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.xe_ok("vm-param-get", "uuid=" + vm, "param-name=PV-drivers-detected") \
                    == "true":
                return
            time.sleep(0.3)
        raise AssertionError("the agent of %s never reported:\n%s" % (
            vm, self.console(vm)[-3000:]))

    def run_to_halt(self, vm, timeout=BOOT_TIMEOUT):
        """Start the VM, let its script run until it powers off; its results."""
        self.xe_ok("vm-start", "uuid=" + vm)
        self.wait_state(vm, "halted", timeout)
        return self.results(vm)

    def sm_commands(self, mark, failed=False):
        """The SR driver commands the toolstack ran since a mark (an offset) in its log,
        in order: (driver, command), those that failed too if asked."""
        with open(self.log) as f:
            text = f.read()[mark:]
        return re.findall(r"INFO (\w+)SR (\w+): exit %s" % (r"\d+" if failed else "0"), text)

    def qemus(self):
        return [p for p in hostroot.processes_under(self.root) if qemu.QEMU in p[1]]

    def leftovers(self):
        """What guests and their disks left: processes but the toolstack, runtime
        sockets and links, the VMs' runtime files. A file SR's garbage collector (its
        SR's, started by attach, snapshot, delete) is waited for first."""
        for sr in self.xe_ok("sr-list", "type=file", "--minimal").split(","):
            if sr:
                gcctl.wait_idle(sr, GC_WAIT)
        xapi = self.proc.pid if self.proc else None
        found = ["process %d: %s" % p for p in hostroot.processes_under(self.root)
                 if p[0] != xapi]
        found += ["runtime %s" % e for e in hostroot.runtime_entries(self.root)]
        vms = os.path.join(self.root, "run", "smtap", "vm")
        if os.path.isdir(vms):
            found += ["vm runtime %s" % d for d in os.listdir(vms)]
        return found


def why_not():
    """Why no guest can boot here (the fixture skips with it), or None."""
    return qemu.available() or (None if os.path.exists(GUEST_IMAGE) else
                                "no guest image (%s): run make build" % GUEST_IMAGE)


