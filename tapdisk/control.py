"""The tapdisk control protocol: upstream's fixed-size messages, and a client.

A message is upstream's `tapdisk_message_t` (tapdisk-message.h), host byte order,
544 bytes on x86_64:

    0  u16 type
    2  u16 cookie          the minor, or 0xffff for "all"
    8  union (536 bytes, 8-byte aligned), by message type:
       params   (OPEN, RESUME)  u32 flags, u32 devnum, u32 domid, char path[256],
                                u32 prt_devnum, u16 req_timeout, char secondary[256]
       response (ERROR, *_RSP)  int error (a positive errno), char message[256]
       pid      (PID_RSP)       pid_t pid
       image    (OPEN_RSP, DISK_INFO_RSP)  u64 sectors, u32 sector_size, u32 info
       list     (LIST_RSP)      int count, int minor, int state, char path[256]
       minors   (LIST_MINORS_RSP)  int count, int list[63]
       info     (STATS_RSP)     u16 type, u16 cookie, size_t length

One request per connection, as upstream. Trailing data, also as upstream:
  - OPEN/RESUME with FLAG_ADD_LOG: a 256-byte NUL-padded log path follows the request.
  - STATS_RSP: `info.length` bytes of JSON follow the reply (upstream's way, so
    upstream tap-ctl reads our stats and ours reads upstream's).
  - LIST: one LIST_RSP per VBD with `count` counting down, then a final one with
    count 0 and minor -1.
smtap extension (never set by upstream tools): OPEN with FLAG_EXTRA (0x80000000) is
followed by a u32 length and a JSON object {"export_name": str, "tcp": "[host:]port"}.
"""
import errno
import json
import os
import socket
import struct

from smtap import names, settings

# Message types (request, response).
ERROR = 1
RUNTIME_ERROR = 2
PID, PID_RSP = 3, 4
ATTACH, ATTACH_RSP = 5, 6
OPEN, OPEN_RSP = 7, 8
PAUSE, PAUSE_RSP = 9, 10
RESUME, RESUME_RSP = 11, 12
CLOSE, CLOSE_RSP = 13, 14
DETACH, DETACH_RSP = 15, 16
LIST_MINORS, LIST_MINORS_RSP = 17, 18
LIST, LIST_RSP = 19, 20
STATS, STATS_RSP = 21, 22
FORCE_SHUTDOWN = 23
DISK_INFO, DISK_INFO_RSP = 28, 29
EXIT = 30

NAMES = {
    ERROR: "error", RUNTIME_ERROR: "runtime error", PID: "pid", PID_RSP: "pid response",
    ATTACH: "attach", ATTACH_RSP: "attach response", OPEN: "open",
    OPEN_RSP: "open response", PAUSE: "pause", PAUSE_RSP: "pause response",
    RESUME: "resume", RESUME_RSP: "resume response", CLOSE: "close",
    CLOSE_RSP: "close response", DETACH: "detach", DETACH_RSP: "detach response",
    LIST_MINORS: "list minors", LIST_MINORS_RSP: "list minors response", LIST: "list",
    LIST_RSP: "list response", STATS: "stats", STATS_RSP: "stats response",
    FORCE_SHUTDOWN: "force shutdown", DISK_INFO: "disk info",
    DISK_INFO_RSP: "disk info response", EXIT: "exit",
}

# Open flags: the same values as smtap.tapdisk.driver.OPEN_* (upstream's).
FLAG_SHARED = 0x1
FLAG_RDONLY = 0x2
FLAG_ADD_CACHE = 0x4
FLAG_VHD_INDEX = 0x8
FLAG_ADD_LOG = 0x10
FLAG_ADD_LCACHE = 0x20
FLAG_REUSE_PRT = 0x40
FLAG_SECONDARY = 0x80
FLAG_STANDBY = 0x100
FLAG_NO_O_DIRECT = 0x200
FLAG_EXTRA = 0x80000000     # smtap: a JSON options trailer follows (see above)

SIZE = 544
PATH_LENGTH = 256
MAX_MINORS = PATH_LENGTH // 4 - 1
ALL = 0xffff                # cookie: every VBD of the process

_HEADER = struct.Struct("=HH4x")
_UNION = 8                  # offset of the union
_LAYOUTS = {
    "params": (struct.Struct("=III256sIH256s"),
               ("flags", "devnum", "domid", "path", "prt_devnum", "req_timeout",
                "secondary")),
    "response": (struct.Struct("=i256s"), ("error", "message")),
    "pid": (struct.Struct("=i"), ("pid",)),
    "image": (struct.Struct("=QII"), ("sectors", "sector_size", "info")),
    "list": (struct.Struct("=iii256s"), ("count", "minor", "state", "path")),
    "minors": (struct.Struct("=i%di" % MAX_MINORS), None),
    "info": (struct.Struct("=HH4xQ"), ("info_type", "info_cookie", "length")),
}
_LAYOUT_OF = {
    OPEN: "params", RESUME: "params", PID_RSP: "pid", OPEN_RSP: "image",
    DISK_INFO_RSP: "image", LIST_RSP: "list", LIST_MINORS_RSP: "minors",
    STATS_RSP: "info",
}
_STRINGS = ("path", "secondary", "message")
# Requests whose union is unused; every other reply type carries a response.
_BARE = (PID, ATTACH, PAUSE, CLOSE, DETACH, LIST_MINORS, LIST, STATS, FORCE_SHUTDOWN,
         DISK_INFO, EXIT)


class ProtocolError(ValueError):
    """Bytes that are not a well-formed message."""


class ControlError(OSError):
    """A tapdisk answered with an error, or could not be reached."""

    def __init__(self, err, message):
        OSError.__init__(self, err, message)


def _layout(kind):
    if kind in _LAYOUT_OF:
        return _LAYOUT_OF[kind]
    return None if kind in _BARE else "response"


def _cstr(raw):
    """A NUL-terminated char[] -> str; ProtocolError if unterminated."""
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("string field is not NUL-terminated")
    return raw[:end].decode("utf-8", "surrogateescape")


def _cbytes(value, field):
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if len(raw) >= PATH_LENGTH:
        raise ValueError("%s too long (%d bytes, at most %d)" % (field, len(raw),
                                                                 PATH_LENGTH - 1))
    return raw


def pack(kind, cookie=0, **fields):
    """One message as SIZE bytes. Fields not given are zero."""
    buf = bytearray(SIZE)
    _HEADER.pack_into(buf, 0, kind, cookie & 0xffff)
    layout = _layout(kind)
    if layout == "minors":
        minors = list(fields.get("minors", ()))[:MAX_MINORS]
        fmt = _LAYOUTS["minors"][0]
        fmt.pack_into(buf, _UNION, len(minors), *(minors + [0] * (MAX_MINORS - len(minors))))
    elif layout:
        fmt, keys = _LAYOUTS[layout]
        unknown = set(fields) - set(keys)
        if unknown:
            raise TypeError("%s message has no field %s" % (NAMES.get(kind, kind),
                                                            ", ".join(sorted(unknown))))
        values = []
        for name in keys:
            value = fields.get(name, b"" if name in _STRINGS else 0)
            if name in _STRINGS:
                value = _cbytes(value, name)
            values.append(value)
        fmt.pack_into(buf, _UNION, *values)
    elif fields:
        raise TypeError("%s message carries no fields" % NAMES.get(kind, kind))
    return bytes(buf)


def unpack(data):
    """SIZE bytes -> dict with "type", "cookie" and the fields of its layout.
    ProtocolError on a wrong size or an unterminated string."""
    if len(data) != SIZE:
        raise ProtocolError("message is %d bytes, expected %d" % (len(data), SIZE))
    kind, cookie = _HEADER.unpack_from(data, 0)
    msg = {"type": kind, "cookie": cookie}
    layout = _layout(kind)
    if layout == "minors":
        values = _LAYOUTS["minors"][0].unpack_from(data, _UNION)
        count = max(0, min(values[0], MAX_MINORS))
        msg["minors"] = list(values[1:1 + count])
    elif layout:
        fmt, keys = _LAYOUTS[layout]
        for name, value in zip(keys, fmt.unpack_from(data, _UNION)):
            msg[name] = _cstr(value) if name in _STRINGS else value
    return msg


ctl_path = names.ctl_path


def recv_exactly(sock, size, partial_on_timeout=False):
    """`size` bytes, or fewer if the peer closed first. A timeout raises socket.timeout,
    or with partial_on_timeout returns what came (the daemon answers a peer that went
    quiet mid-message with "short message")."""
    chunks, got = [], 0
    try:
        while got < size:
            chunk = sock.recv(size - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except socket.timeout:
        if not partial_on_timeout:
            raise
    return b"".join(chunks)


class Client(object):
    """Talks to one tapdisk over ctl<pid>. Every method raises ControlError (an
    OSError: .errno, .strerror = tapdisk's reason) on failure.

    io_timeout bounds each socket operation (None: wait forever, as upstream does
    for open/pause/close, which may legitimately take long)."""

    def __init__(self, pid, io_timeout=None):
        self.pid = pid
        self.path = ctl_path(pid)
        self.io_timeout = io_timeout

    # -- transport -----------------------------------------------------------------
    def _connect(self, timeout):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except (OSError, socket.timeout) as exc:
            sock.close()
            err = getattr(exc, "errno", None) or errno.ETIMEDOUT
            raise ControlError(err, "cannot reach tapdisk %d at %s: %s"
                               % (self.pid, self.path, os.strerror(err)))
        return sock

    def _read_message(self, sock, what):
        data = recv_exactly(sock, SIZE)
        if len(data) != SIZE:
            raise ControlError(errno.EPROTO, "tapdisk %d closed the connection during %s"
                               " (%d of %d bytes)" % (self.pid, what, len(data), SIZE))
        return unpack(data)

    def exchange(self, request, trailer=b"", timeout=-1):
        """Send one packed request (+ trailer); return (socket, first reply). The
        caller closes the socket. An ERROR reply raises ControlError."""
        what = NAMES.get(_HEADER.unpack_from(request, 0)[0], "request")
        sock = self._connect(self.io_timeout if timeout == -1 else timeout)
        try:
            sock.sendall(request + trailer)
            reply = self._read_message(sock, what)
        except socket.timeout:
            sock.close()
            raise ControlError(errno.ETIMEDOUT, "tapdisk %d did not answer %s in time"
                               % (self.pid, what))
        except OSError as exc:
            sock.close()
            if isinstance(exc, ControlError):
                raise
            raise ControlError(exc.errno or errno.EIO, "%s to tapdisk %d failed: %s"
                               % (what, self.pid, exc.strerror or exc))
        if reply["type"] == ERROR:
            sock.close()
            err = reply.get("error") or errno.EIO
            raise ControlError(err, reply.get("message") or os.strerror(err))
        return sock, reply

    def call(self, kind, cookie=0, expect=None, trailer=b"", timeout=-1, **fields):
        """One request, one reply (of type `expect`, if given)."""
        sock, reply = self.exchange(pack(kind, cookie, **fields), trailer, timeout)
        sock.close()
        if expect is not None and reply["type"] != expect:
            raise ControlError(errno.EPROTO, "tapdisk %d answered %s with %s"
                               % (self.pid, NAMES.get(kind, kind),
                                  NAMES.get(reply["type"], reply["type"])))
        if reply.get("error"):
            raise ControlError(reply["error"], reply.get("message")
                               or os.strerror(reply["error"]))
        return reply

    # -- operations ------------------------------------------------------------------
    def get_pid(self, timeout=10):
        return self.call(PID, expect=PID_RSP, timeout=timeout)["pid"]

    def attach(self, minor):
        self.call(ATTACH, minor, ATTACH_RSP)

    def detach(self, minor):
        self.call(DETACH, minor, DETACH_RSP)

    def open(self, minor, params, flags=0, timeout=0, secondary=None, prt_minor=None,
             logpath=None, export_name=None, tcp=None):
        """Open `params` ("type:/path") on an attached minor. timeout: the request
        timeout in seconds (0: the engine's default). Returns the image info
        {"sectors", "sector_size", "info"}."""
        if secondary:
            flags |= FLAG_SECONDARY
        if prt_minor is not None:
            flags |= FLAG_REUSE_PRT
        trailer = b""
        if logpath:
            flags |= FLAG_ADD_LOG
            trailer += _cbytes(logpath, "log path").ljust(PATH_LENGTH, b"\0")
        extra = {k: v for k, v in (("export_name", export_name), ("tcp", tcp)) if v}
        if extra:
            flags |= FLAG_EXTRA
            blob = json.dumps(extra).encode()
            trailer += struct.pack("=I", len(blob)) + blob
        if not 0 <= timeout <= 0xffff:
            raise ValueError("request timeout must be 0..65535 seconds")
        reply = self.call(OPEN, minor, OPEN_RSP, trailer, flags=flags, path=params,
                          secondary=secondary or "", req_timeout=timeout,
                          prt_devnum=prt_minor if prt_minor is not None else 0)
        return {k: reply[k] for k in ("sectors", "sector_size", "info")}

    def pause(self, minor):
        self.call(PAUSE, minor, PAUSE_RSP)

    def resume(self, minor, params=None, secondary=None, logpath=None):
        flags = FLAG_SECONDARY if secondary else 0
        trailer = b""
        if logpath:
            flags |= FLAG_ADD_LOG
            trailer = _cbytes(logpath, "log path").ljust(PATH_LENGTH, b"\0")
        self.call(RESUME, minor, RESUME_RSP, trailer, flags=flags, path=params or "",
                  secondary=secondary or "")

    def close(self, minor, force=False):
        self.call(FORCE_SHUTDOWN if force else CLOSE, minor, CLOSE_RSP)

    def disk_info(self, minor):
        reply = self.call(DISK_INFO, minor, DISK_INFO_RSP)
        return {k: reply[k] for k in ("sectors", "sector_size", "info")}

    def list(self, timeout=10):
        """[{"minor", "state", "params"}] of every VBD of this tapdisk."""
        sock, reply = self.exchange(pack(LIST, ALL), timeout=timeout)
        vbds = []
        try:
            while reply["type"] == LIST_RSP and reply["count"] > 0:
                vbds.append({"minor": reply["minor"], "state": reply["state"],
                             "params": reply["path"] or None})
                reply = self._read_message(sock, "list")
        except socket.timeout:
            raise ControlError(errno.ETIMEDOUT, "tapdisk %d: list timed out" % self.pid)
        finally:
            sock.close()
        if reply["type"] != LIST_RSP:
            raise ControlError(errno.EPROTO, "tapdisk %d answered list with %s"
                               % (self.pid, NAMES.get(reply["type"], reply["type"])))
        return vbds

    def list_minors(self):
        return self.call(LIST_MINORS, ALL, LIST_MINORS_RSP)["minors"]

    def stats(self, minor=ALL, timeout=10):
        """The JSON statistics of one VBD (or a list of all, minor=ALL)."""
        sock, reply = self.exchange(pack(STATS, minor), timeout=timeout)
        try:
            if reply["type"] != STATS_RSP:
                raise ControlError(errno.EPROTO, "tapdisk %d answered stats with %s"
                                   % (self.pid, NAMES.get(reply["type"], reply["type"])))
            data = recv_exactly(sock, reply["length"])
        except socket.timeout:
            raise ControlError(errno.ETIMEDOUT, "tapdisk %d: stats timed out" % self.pid)
        finally:
            sock.close()
        if len(data) != reply["length"]:
            raise ControlError(errno.EPROTO, "tapdisk %d: stats truncated" % self.pid)
        return json.loads(data.decode("utf-8"))

    def exit(self):
        """Ask the tapdisk to close everything and exit."""
        try:
            self.call(EXIT, ALL, timeout=30)
        except ControlError as exc:
            if exc.errno != errno.EPROTO:   # it may exit before answering
                raise


# -- processes ---------------------------------------------------------------------
def find_tapdisks():
    """Pids of the live tapdisks under this root: those whose ctl<pid> answers PID.
    Sockets left by a dead tapdisk are removed on the way."""
    try:
        entries = os.listdir(settings.runtime_dir())
    except OSError:
        return []
    pids = []
    for name in entries:
        pid = names.pid_of_ctl(name)
        if pid is None:
            continue
        try:
            if Client(pid).get_pid(timeout=10) == pid:
                pids.append(pid)
        except ControlError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT) and not _alive(pid):
                remove_sockets(pid)
    return sorted(pids)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def remove_sockets(pid):
    """Remove the control and NBD sockets a tapdisk left behind."""
    rundir = settings.runtime_dir()
    prefix = names.nbd_prefix(pid)
    try:
        entries = os.listdir(rundir)
    except OSError:
        return
    for name in entries:
        if name == names.ctl_name(pid) or name.startswith(prefix):
            try:
                os.unlink(os.path.join(rundir, name))
            except OSError:
                pass


def spawn(timeout=30):
    """Start a tapdisk; return its pid once its control socket is up.

    The daemon forks itself away and prints its ctl<pid> path on stdout (an
    "error: ..." line if it could not start)."""
    import subprocess
    import sys
    import smtap
    # The child finds the smtap package wherever this one came from (installed or not).
    libdir = os.path.dirname(os.path.dirname(os.path.abspath(smtap.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (libdir, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "smtap.tapdisk.daemon"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, close_fds=True, cwd="/")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The daemon forked: whatever hangs holds our pipes, so do not read them again.
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
        raise ControlError(errno.ETIMEDOUT, "tapdisk did not start within %ds" % timeout)
    lines = out.decode("utf-8", "replace").splitlines()
    line = lines[0].strip() if lines else ""
    pid = names.pid_of_ctl(os.path.basename(line))
    if proc.returncode == 0 and pid is not None and line == ctl_path(pid):
        return pid
    if line.startswith("error: "):
        why = line[len("error: "):]
    else:
        errs = err.decode("utf-8", "replace").strip().splitlines()
        why = line or (errs[-1] if errs else "exit status %d" % proc.returncode)
    raise ControlError(errno.EIO, "tapdisk failed to start: %s" % why)
