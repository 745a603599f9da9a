"""The engine from outside: tap-ctl, VBDs created (Tap) or served in a subprocess
(Served), raw images, NBD clients (qemu-io, nbdinfo, a raw client that sends what
well-behaved clients never do)."""
import json
import os
import socket
import struct
import subprocess
import sys

from lib.fs import tmpfs, used                      # noqa: F401  (enginelib's names)
from lib.hosts import tapdisks_under                # noqa: F401
from lib.procs import memory_of, run, wait_for      # noqa: F401
from lib.vhd import VHD_DISKS, check_vhds, vhd_chain, vhd_check, vhd_disk  # noqa: F401
from smtap import names


IO_BACKENDS = ["io_uring", "libaio"]     # tapdisk/ioqueue.py's, forced with SMTAP_IO
NBD_LOOPS = ["c", "python"]     # the NBD loop's C part on (the default) or off (SMTAP_NBD_C=0)


def nbd_loop_env(loop):
    """The environment variable and value a tapdisk's NBD loop runs as `loop` with."""
    return "SMTAP_NBD_C", "1" if loop == "c" else "0"


def have_io_uring():
    """Whether this kernel lets this process open an io_uring queue."""
    from smtap.tapdisk import native
    try:
        q, _ = native.queue_open(native.IO_URING)
    except OSError:
        return False
    native.queue_close(q)
    return True


def tap_ctl(*args, check=True, timeout=60):
    """Run tap-ctl (the checkout's, on PATH); its CompletedProcess."""
    return run("tap-ctl", *args, check=check, timeout=timeout)


def tap_list():
    """`tap-ctl list` as [{"pid": .., "minor": .., "state": .., "args": ..}] (the fields
    a line has), each field parsed by upstream sm's rule: exactly one `=`."""
    out = tap_ctl("list").stdout
    rows = [[f.split("=") for f in line.split()] for line in out.splitlines()]
    assert all(len(f) == 2 for row in rows for f in row), out
    return [dict(row) for row in rows]


def tap_state(pid):
    """The state field (`0`, `0x2a`...) tap-ctl lists for the tapdisk pid."""
    (entry,) = [e for e in tap_list() if e.get("pid") == str(pid)]
    return entry["state"]


def image_file(path, size, pattern=None):
    """A raw image of `size` bytes; `pattern` (bytes) repeated as its content."""
    with open(str(path), "wb") as f:
        if pattern:
            f.write((pattern * (size // len(pattern) + 1))[:size])
        else:
            f.truncate(size)
    return str(path)


def nbd_uri(socket_path, export=""):
    """The NBD URI of a unix socket (and an export name)."""
    return "nbd+unix:///%s?socket=%s" % (export, socket_path)


def linked_tapdisk(link):
    """(pid, minor) of the tapdisk whose NBD socket a runtime link names."""
    return names.parse_nbd(os.readlink(link))


class Tap(object):
    """A created VBD: pid, minor, device, params, and its NBD socket."""

    def __init__(self, pid, minor, device, params):
        self.pid, self.minor, self.device, self.params = pid, minor, device, params
        self.nbd_path = names.nbd_path(pid, minor)

    @classmethod
    def create(cls, params, **kwargs):
        """tap-ctl create's operation, in process (smtap.tapdisk.tapctl.create)."""
        from smtap.tapdisk import tapctl
        pid, minor, device = tapctl.create(params, **kwargs)
        return cls(pid, minor, device, params)

    @property
    def uri(self):
        return nbd_uri(self.nbd_path)

    def destroy(self):
        from smtap.tapdisk import tapctl
        tapctl.destroy(self.pid, self.minor, timeout=30)


class Served(object):
    """A VBD served by `python -m smtap.tapdisk.vbd` in a subprocess."""

    def __init__(self, proc, nbd_path, tcp=None):
        self.proc, self.nbd_path, self.tcp = proc, nbd_path, tcp

    @classmethod
    def start(cls, params, *args, minor=0):
        """Serve params (`type:/path`) with smtap.tapdisk.vbd's flags (`-R`, ...), once
        it printed its socket."""
        cmd = [sys.executable, "-m", "smtap.tapdisk.vbd", "-m", str(minor)] + list(args) + [params]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
        line = proc.stdout.readline().split()
        if not line:
            err = proc.stderr.read()
            proc.wait()
            raise AssertionError("serving %s failed: %s" % (params, err.strip()))
        return cls(proc, line[0], line[1] if len(line) > 1 else None)

    @property
    def uri(self):
        return nbd_uri(self.nbd_path)

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


# -- NBD clients ------------------------------------------------------------------------
def qemu_io(uri, *cmds, check=True, readonly=False):
    """qemu-io -c <cmd>... on uri: the CompletedProcess, with .output (stdout + stderr).
    check: it must succeed and report no failure."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for c in cmds:
        args += ["-c", c]
    proc = run(*(args + [uri]), check=check)
    if check:
        assert "fail" not in proc.stdout.lower(), proc.stdout
    proc.output = proc.stdout + proc.stderr
    return proc


def nbd_size(uri):
    """nbdinfo --size."""
    return int(run("nbdinfo", "--size", uri, timeout=30).stdout)


def nbd_map(uri):
    """nbdinfo --map as [(offset, length, type)]."""
    out = run("nbdinfo", "--map", "--json", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


# -- a raw NBD client: what well-behaved clients never send -----------------------------
NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9


class Raw(object):
    def __init__(self, path, timeout=10):
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

    def structured(self):
        """Negotiate structured replies (before go())."""
        self.option(8)
        assert self.reply()[1] == 1

    def chunk(self):
        """A structured reply's chunk: (flags, type, handle, payload)."""
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == 0x668e33ef
        return flags, rtype, handle, self.recv(length) if length else b""

    def close(self):
        self.s.close()


# -- helpers the disk-type tests share (vhd, qcow2) ------------------------------------------
def write_model(path, model):
    """A raw file holding model (bytes): the reference a disk is compared with."""
    with open(str(path), "wb") as f:
        f.write(model)
    return str(path)


def disk_sha256(uri, root):
    """sha256 of the whole disk at uri (nbdcopy to a file under root, then removed)."""
    import hashlib
    out = root / "copy.img"
    run("nbdcopy", uri, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def create_refused(params):
    """tap-ctl create of params fails with one line on stderr, which it returns."""
    proc = tap_ctl("create", "-a", params, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def tapdisk_log():
    """The host root's tapdisk log ("" when there is none)."""
    from smtap import settings
    try:
        with open(settings.tapdisk_log_file(), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def minor_freed(minor):
    """minors.free(minor) succeeded (its tapdisk let it go)."""
    from smtap.tapdisk import minors
    try:
        minors.free(minor)
        return True
    except OSError:
        return False


# fio jobs killed -9 mid-write: verify headers, a flush every 8 writes (%d: the seed)
FIO_CRASH = ["--name=crash", "--ioengine=nbd", "--rw=randwrite", "--bsrange=4k-256k",
             "--size=64M", "--iodepth=16", "--verify=crc32c", "--fsync=8",
             "--randseed=%d", "--output-format=json"]


def acknowledged_writes(log):
    """{offset: length} of the writes a fio completion log holds (time, latency,
    direction, length, offset, ...)."""
    done = {}
    if not os.path.exists(str(log)):        # none completed
        return done
    with open(str(log)) as f:
        for line in f:
            fields = [int(x) for x in line.split(",")[:5]]
            if fields[2] == 1:
                done[fields[4]] = fields[3]
    return done


class FuzzTapdisk(object):
    """One real tapdisk that opens damaged images again and again (an anchor VBD keeps it
    alive: a tapdisk exits with its last VBD), counting what it opened and refused."""

    def __init__(self):
        from smtap.tapdisk import control, minors
        self.minors = minors
        self.pid = control.spawn()
        self.client = control.Client(self.pid, io_timeout=60)
        self.anchor = minors.allocate()
        self.client.attach(self.anchor)
        self.opened = self.refused = 0

    def try_open(self, params, flags, what, after_close=None):
        """Open params: refused with one clear line naming its disk type or file, or
        opened, read whole by nbdcopy, closed (then after_close()); the tapdisk still
        answers after. True if it opened."""
        from smtap import names
        kind, _, path = params.partition(":")
        minor = self.minors.allocate()
        self.client.attach(minor)
        try:
            self.client.open(minor, params, flags)
        except OSError as e:
            message = e.strerror or ""
            assert message and "\n" not in message and "Traceback" not in message, (what, e)
            assert kind in message or path in message, (what, message)
            self.refused += 1
            ok = False
        else:
            self.opened += 1
            run("nbdcopy", nbd_uri(names.nbd_path(self.pid, minor)), "null:", check=False,
                timeout=60)
            self.client.close(minor)
            if after_close is not None:
                after_close()
            ok = True
        self.client.detach(minor)
        self.minors.free(minor)
        assert [v["minor"] for v in self.client.list()] == [self.anchor], what   # answering
        return ok

    def finish(self):
        """Alive, no traceback logged, and both outcomes seen."""
        os.kill(self.pid, 0)
        log = tapdisk_log()
        assert "Traceback" not in log, log[-4000:]
        print("corrupted images: %d opened, %d refused" % (self.opened, self.refused))
        assert self.opened and self.refused, (self.opened, self.refused)


def check_raw_parent_opens_with_aio(make_tap, root, disk_type, snapshot, check, unwritten):
    """A <disk_type> leaf over a raw parent: the engine opens the parent with aio, reads
    come from it, a write lands in the leaf only (`unwritten`: how much of the leaf's
    allocation unit after the write still reads the parent's bytes), the leaf checks
    clean and the parent is unchanged. snapshot(leaf, raw) makes the leaf, check(leaf)
    runs the format's checker."""
    from smtap.tapdisk import control
    raw = root / "raw.img"
    raw.write_bytes(b"\x3c" * (8 << 20))
    leaf = str(root / ("leaf." + disk_type))
    snapshot(leaf, str(raw))
    tap = make_tap(disk_type + ":" + leaf)
    images = control.Client(tap.pid).stats(tap.minor)["images"]
    assert [(i["driver"]["type"], i["driver"]["name"]) for i in images] == [
        (disk_type, leaf), ("aio", str(raw))]
    qemu_io(tap.uri, "read -P 0x3c 0 8M", "write -P 0x3d 1M 4k", "read -P 0x3d 1M 4k",
            "read -P 0x3c 1052672 %s" % unwritten)
    tap.destroy()
    check(leaf)
    assert raw.read_bytes() == b"\x3c" * (8 << 20)
