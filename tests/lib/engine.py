"""Engine test helpers: tap-ctl, VBDs created or served, NBD clients."""
import os
import struct
import subprocess
import time

from smtap.toolstack import hostroot


def tapdisks_under(root):
    """Pids of the live tapdisk daemons of this root."""
    return [pid for pid, cmdline in hostroot.processes_under(str(root))
            if "smtap.tapdisk.daemon" in cmdline]


def tap_ctl(*args, check=True, timeout=60):
    """Run tap-ctl; returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.run(["tap-ctl"] + [str(a) for a in args], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout)
    if check and proc.returncode:
        raise AssertionError("tap-ctl %s failed (%d): %s" % (
            " ".join(map(str, args)), proc.returncode, proc.stderr.strip()))
    return proc


def image_file(path, size, pattern=None):
    """A raw image of `size` bytes; `pattern` (bytes) repeated as its content."""
    with open(path, "wb") as f:
        if pattern:
            f.write((pattern * (size // len(pattern) + 1))[:size])
        else:
            f.truncate(size)
    return str(path)


class Tap(object):
    """A created VBD: pid, minor, device, params, and its NBD socket."""

    def __init__(self, pid, minor, device, params):
        self.pid, self.minor, self.device, self.params = pid, minor, device, params
        from smtap import names
        self.nbd_path = names.nbd_path(pid, minor)

    @property
    def uri(self):
        return "nbd+unix:///?socket=%s" % self.nbd_path

    def destroy(self):
        from smtap.tapdisk import tapctl
        tapctl.destroy(self.pid, self.minor, timeout=30)


def wait_for(predicate, timeout=10.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- data path fixtures (VBD served in a subprocess, NBD clients) ------------------------


class Served(object):
    """A VBD served by `python -m smtap.tapdisk.vbd` in a subprocess."""

    def __init__(self, proc, nbd_path, tcp=None):
        self.proc, self.nbd_path, self.tcp = proc, nbd_path, tcp

    @property
    def uri(self):
        return "nbd+unix:///?socket=%s" % self.nbd_path

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def run(*cmd, check=True, timeout=120, input=None):
    """Run a command; CompletedProcess with text stdout/stderr (undecodable bytes from a
    tool are replaced, never an exception)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=timeout, input=input)
    if check and proc.returncode:
        raise AssertionError("%s failed (%d): %s" % (" ".join(map(str, cmd)), proc.returncode,
                                                     (proc.stderr or proc.stdout).strip()))
    return proc


def qemu_io(uri, *cmds, check=True, readonly=False):
    """qemu-io -c <cmd>... on uri; its output. check: it must succeed, no failure said."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for c in cmds:
        args += ["-c", c]
    proc = run(*(args + [uri]), check=check)
    if check:
        assert "fail" not in proc.stdout.lower(), proc.stdout
    return proc.stdout + proc.stderr


def nbd_map(uri):
    """nbdinfo --map as [(offset, length, type)]."""
    out = run("nbdinfo", "--map", "--json", uri).stdout
    import json
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def memory_of(pid):
    """{"VmRSS": bytes, "RssAnon": ..., "RssShmem": ...} of a process (/proc/<pid>/status)."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def tmpfs(path, size):
    """A tmpfs of `size` bytes mounted at path (smtap_root's teardown unmounts it)."""
    os.makedirs(str(path), exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", "size=%d" % size, "smtap-test", path)
    return path


def used(path):
    """Bytes used in the file system at path."""
    st = os.statvfs(str(path))
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# -- a raw NBD client: what well-behaved clients never send -----------------------------
NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9


class Raw(object):
    def __init__(self, path, timeout=10):
        import socket
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            c = self.s.recv(n - len(buf))
            if not c:
                raise EOFError
            buf += c
        return buf

    def greet(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1
        self.s.sendall(struct.pack(">I", 3))

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def go(self):
        self.option(7, struct.pack(">I", 0) + struct.pack(">H", 0))
        size = None
        while True:
            opt, rtype, data = self.reply()
            assert rtype < 2 ** 31, data
            if rtype == 3 and struct.unpack_from(">H", data)[0] == 0:
                size = struct.unpack_from(">Q", data, 2)[0]
            if rtype == 1:
                return size

    def request(self, typ, handle, offset, length, flags=0, payload=b""):
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, handle, offset, length)
                       + payload)

    def simple_reply(self, datalen=0):
        magic, err, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698
        return err, handle, (self.recv(datalen) if datalen and not err else b"")

    def close(self):
        self.s.close()


# -- VHD images (made with vhd-util, data written through smtap.formats) ------------------
MiB = 1 << 20


def vhd_chain(root, size, depth, name="v"):
    """A chain of `depth` VHDs under root made with vhd-util (create, then snapshots of
    the one before), each level holding data of its own: byte 0x10 + level in half-MiB
    pieces (partly filled blocks), at offsets no other level writes. Returns the leaf."""
    from smtap.formats import vhd as V
    paths = []
    for level in range(depth):
        path = str(root / ("%s%d.vhd" % (name, level)))
        if level:
            run("vhd-util", "snapshot", "-n", path, "-p", paths[-1])
        else:
            run("vhd-util", "create", "-n", path, "-s", size >> 20)
        with V.VHD(path, writable=True) as img:
            for off in range(level * MiB, size, depth * MiB):
                img.write(bytes([0x10 + level]) * (MiB // 2), off)
        paths.append(path)
    return paths[-1]


def vhd_disk(root, size, depth=1):
    """"vhd:<leaf>" of a vhd_chain (depth 1: one dynamic VHD)."""
    return "vhd:" + vhd_chain(root, size, depth)


def vhd_check(path, *flags):
    """vhd-util check passes on path."""
    out = run("vhd-util", "check", "-n", path, *flags, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("is valid"), out.stdout


# the VHD disks the engine's generic tests also run on: one image, and a chain of three
VHD_DISKS = {
    "vhd": lambda root, size: vhd_disk(root, size),
    "vhd-chain3": lambda root, size: vhd_disk(root, size, 3),
}


def check_vhds(root):
    """vhd-util check passes on every VHD under root (what the engine wrote is valid)."""
    for path in sorted(root.glob("*.vhd")):
        vhd_check(path)
