"""A guest's device model: qemu-system-x86_64 for one VM, and its monitors.

Each running VM has a directory of its own (settings.vm_runtime_dir): two QMP monitors,
`events` (held by the toolstack's watcher for the life of the process) and `qmp` (one
short connection per command), the agent's serial port, the pid file and the fw_cfg
files. qemu runs daemonized, so it outlives a toolstack restart, which finds it again by
its pid file and its -uuid.

Each disk is a virtio-blk device on the VDI's NBD export (params_nbd), with cache=none
semantics: no host cache (cache.direct) and a write cache the guest flushes. The serial
number of a disk is its XAPI device name (xvda for userdevice 0): the guest's init
names its disks by it.
"""
import json
import os
import signal
import socket
import subprocess
import time

from smtap import settings

QEMU = "qemu-system-x86_64"
QBOOT = "/usr/share/qemu/qboot.rom"     # qemu-system-data's minimal firmware: boots faster
ACCEL_ENV = "SMTAP_GUEST_ACCEL"
CMDLINE = "console=ttyS0 quiet panic=-1 cryptomgr.notests 8250.nr_uarts=2"
UNIX_PATH_MAX = 107


class QemuError(Exception):
    """qemu failed to start, or a monitor command failed."""


def available():
    """Why guests cannot run here, or None."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if os.access(os.path.join(d, QEMU), os.X_OK):
            return None
    return "%s is not installed (Debian package qemu-system-x86)" % QEMU


def accelerator():
    """kvm where the host's KVM runs a stock guest kernel (kvm_intel, kvm_amd), tcg
    otherwise: a /dev/kvm of another kind (kvm_pvm, which runs only PVM-built kernels
    at speed) would emulate a stock kernel's boot for minutes. SMTAP_GUEST_ACCEL=kvm|tcg
    decides instead."""
    forced = os.environ.get(ACCEL_ENV, "")
    if forced in ("kvm", "tcg"):
        return forced
    if os.path.exists("/dev/kvm") and any(os.path.isdir("/sys/module/" + m)
                                          for m in ("kvm_intel", "kvm_amd")):
        return "kvm"
    return "tcg"


class Paths(object):
    """Where one VM's device model keeps its sockets and files."""

    def __init__(self, vm_uuid):
        self.dir = settings.vm_runtime_dir(vm_uuid)
        self.events = os.path.join(self.dir, "events")
        self.qmp = os.path.join(self.dir, "qmp")
        self.agent = os.path.join(self.dir, "agent")
        self.pidfile = os.path.join(self.dir, "pid")
        self.fw_cfg = os.path.join(self.dir, "fw_cfg")
        self.console = os.path.join(settings.vm_log_dir(), vm_uuid + ".console.log")
        self.log = os.path.join(settings.vm_log_dir(), vm_uuid + ".qemu.log")

    def check(self):
        for path in (self.events, self.qmp, self.agent):
            if len(path) > UNIX_PATH_MAX:
                raise QemuError("socket path too long for a unix socket (%d bytes, at most "
                                "%d): %s; use a shorter SMTAP_ROOT" % (len(path), UNIX_PATH_MAX,
                                                                       path))

    def pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def _opt(value):
    """A value inside a qemu -option a=b,c=d list: commas doubled."""
    return str(value).replace(",", ",,")


def blockdev(disk):
    """A disk's node (QMP blockdev-add arguments, or -blockdev's JSON): raw over NBD
    (socket, export), or over a host file with qemu's own I/O (filename: aio=native;
    what bench/guest.py compares the engine with)."""
    ro = bool(disk["read_only"])
    if disk.get("filename"):
        proto = {"driver": "file", "filename": disk["filename"], "aio": "native"}
    else:
        proto = {"driver": "nbd", "server": {"type": "unix", "path": disk["socket"]},
                 "export": disk["export"]}
    proto.update({"node-name": disk["id"] + "-proto", "read-only": ro,
                  "cache": {"direct": True, "no-flush": False}})
    return {"driver": "raw", "node-name": disk["id"], "read-only": ro,
            "cache": {"direct": True, "no-flush": False}, "file": proto}


def device(disk):
    """The guest's virtio-blk device of a disk (QMP device_add arguments)."""
    return {"driver": "virtio-blk-pci", "id": disk["id"], "drive": disk["id"],
            "serial": disk["id"], "write-cache": "on"}


def device_option(disk):
    props = device(disk)
    return ",".join([props.pop("driver")] + ["%s=%s" % (k, _opt(v)) for k, v in props.items()])


def command_line(vm, paths, disks, fw_cfg, accel):
    """argv of the VM's qemu. vm: the VM record; disks: [{id, socket, export,
    read_only}]; fw_cfg: {name: file}. Started paused (-S): the watcher connects first."""
    mib = max(64, int(vm["memory_static_max"]) >> 20)
    vcpus = max(1, int(vm["VCPUs_at_startup"] or 1))
    label = vm["name_label"] or vm["uuid"]
    argv = [QEMU, "-name", "guest=%s,debug-threads=on" % _opt(label), "-uuid", vm["uuid"],
            # under TCG a plain x86-64 CPU: its guest boots faster than with -cpu max
            "-machine", "pc,accel=%s" % accel, "-cpu", "host" if accel == "kvm" else "qemu64",
            "-m", str(mib), "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot", "-S"]
    if os.path.exists(QBOOT):
        argv += ["-bios", QBOOT]
    argv += ["-kernel", vm["PV_kernel"], "-append", (CMDLINE + " " + vm["PV_args"]).strip()]
    if vm.get("PV_ramdisk"):
        argv += ["-initrd", vm["PV_ramdisk"]]
    argv += ["-chardev", "file,id=console,append=on,path=%s" % _opt(paths.console),
             "-serial", "chardev:console",
             "-chardev", "socket,id=agent,server=on,wait=off,path=%s" % _opt(paths.agent),
             "-serial", "chardev:agent",
             "-qmp", "unix:%s,server=on,wait=off" % _opt(paths.events),
             "-qmp", "unix:%s,server=on,wait=off" % _opt(paths.qmp),
             "-device", "pvpanic-pci"]
    for name, path in sorted(fw_cfg.items()):
        argv += ["-fw_cfg", "name=%s,file=%s" % (_opt(name), _opt(path))]
    for disk in disks:
        argv += ["-blockdev", json.dumps(blockdev(disk)), "-device", device_option(disk)]
    return argv


def launch(argv, paths):
    """Start qemu daemonized; its pid once it has initialised (its monitors listen).
    QemuError with qemu's own words if it refuses to start."""
    os.makedirs(os.path.dirname(paths.log), exist_ok=True)
    with open(paths.log, "ab") as log:
        log.write(("--- %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"),
                                    " ".join(argv))).encode())
        log.flush()
        try:
            proc = subprocess.run(argv + ["-daemonize", "-pidfile", paths.pidfile],
                                  stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.PIPE, timeout=120)
        except subprocess.TimeoutExpired:
            kill(paths.pid())
            raise QemuError("qemu did not initialise within 120 s")
        log.write(proc.stderr)
    if proc.returncode != 0:
        raise QemuError(proc.stderr.decode("utf-8", "replace").strip()
                        or "exit status %d" % proc.returncode)
    pid = paths.pid()
    if not pid:
        raise QemuError("qemu started but wrote no pid file")
    return pid


def running(pid, vm_uuid):
    """True if pid is a live qemu of this VM (not a zombie, not a reused pid)."""
    if not pid:
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]).startswith(QEMU.encode()) and \
        vm_uuid.encode() in argv


def wait_gone(pid, vm_uuid, timeout):
    deadline = time.time() + timeout
    while running(pid, vm_uuid):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill(pid, vm_uuid=None):
    if pid and (vm_uuid is None or running(pid, vm_uuid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Line(object):
    """A line-oriented unix socket client (QMP speaks one JSON object a line)."""

    def __init__(self, path, timeout):
        deadline = time.time() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                if time.time() > deadline:
                    raise QemuError("cannot connect to %s: %s" % (path, e))
                time.sleep(0.05)
        self.buf = b""
        self.eof = False

    def fileno(self):
        return self.sock.fileno()

    def send(self, text):
        self.sock.sendall(text.encode() + b"\n")

    def lines(self):
        """Complete lines already received."""
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(line.decode("utf-8", "replace").rstrip("\r"))
        return out

    def fill(self, timeout):
        """Read what arrives within timeout; False at end of file."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return True
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Monitor(Line):
    """A QMP monitor: commands and their replies; events are kept in `events`."""

    def __init__(self, path, timeout=10):
        Line.__init__(self, path, timeout)
        self.events = []
        self.pending = []
        self.next_id = 0
        greeting = self._message(timeout)
        if "QMP" not in greeting:
            raise QemuError("not a QMP monitor: %s" % greeting)
        self.execute("qmp_capabilities")

    def _message(self, timeout):
        deadline = time.time() + timeout
        while not self.pending:
            self.pending.extend(json.loads(line) for line in self.lines() if line.strip())
            if self.pending:
                break
            left = deadline - time.time()
            if left <= 0:
                raise QemuError("QMP: no answer within %d s" % timeout)
            if not self.fill(min(left, 1.0)):
                raise QemuError("QMP: the monitor closed")
        return self.pending.pop(0)

    def execute(self, command, arguments=None, timeout=30):
        self.next_id += 1
        request = {"execute": command, "id": self.next_id}
        if arguments:
            request["arguments"] = arguments
        self.send(json.dumps(request))
        while True:
            msg = self._message(timeout)
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == self.next_id:
                if "error" in msg:
                    raise QemuError("%s: %s" % (command, msg["error"].get("desc", msg["error"])))
                return msg.get("return")

    def take_events(self):
        """The events received so far (after fill(): nothing blocks here)."""
        self.pending.extend(json.loads(line) for line in self.lines() if line.strip())
        self.events.extend(m for m in self.pending if "event" in m)
        self.pending = [m for m in self.pending if "event" not in m]
        out, self.events = self.events, []
        return out

    def wait_event(self, name, match, timeout):
        """The first event `name` whose data has every item of `match`, or None."""
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                data = ev.get("data", {})
                if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    del self.events[i]
                    return ev
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                msg = self._message(left)
            except QemuError:
                if self.eof:
                    raise
                return None
            if "event" in msg:
                self.events.append(msg)


def command(paths, name, arguments=None, timeout=30):
    """One command on the VM's command monitor."""
    mon = Monitor(paths.qmp, timeout=5)
    try:
        return mon.execute(name, arguments, timeout)
    finally:
        mon.close()
