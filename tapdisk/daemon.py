"""tapdisk: one process per virtual disk, driven through its control socket ctl<pid>.

Started by `tap-ctl spawn` (control.spawn): forks away from its caller, creates
<runtime>/ctl<pid>, prints that path on stdout, then detaches stdout and logs to
settings.tapdisk_log_file(). Each connection carries one request (control.py); a
malformed or unknown request gets an ERROR reply, never a crash. State-changing
requests are serialised, as upstream; PID, LIST, STATS and DISK_INFO are answered
even while a pause drains, and even with no file descriptor left (tapdisk/fds.py). The process exits once its last VBD is detached, on EXIT,
on FORCE_SHUTDOWN of all VBDs, and on SIGTERM/SIGINT, closing its images and
removing its sockets on the way out.
"""
import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading

from smtap import settings
from smtap.tapdisk import control, fds, logfile, minors
from smtap.tapdisk.ratelog import RateLog

LOG = logging.getLogger("smtap.tapdisk.daemon")
_accept_failures = RateLog(LOG)
RECV_TIMEOUT = 2            # seconds a client has to send its whole request
DEFAULT_REQ_TIMEOUT = 120   # seconds, when OPEN says 0
MAX_EXTRA = 4096            # bytes of smtap's JSON open-options trailer
# Requests answered without the exclusive lock (upstream's TAPDISK_MSG_REENTER, plus
# DISK_INFO which only reads).
REENTRANT = (control.PID, control.LIST, control.LIST_MINORS, control.STATS,
             control.DISK_INFO)


def _fail(err, fmt, *args):
    raise OSError(err, fmt % args if args else fmt)


class Daemon(object):

    def __init__(self):
        self.pid = os.getpid()
        self.path = control.ctl_path(self.pid)
        self.sock = None
        self.vbds = {}          # minor -> VBD
        self.holds = {}         # minor -> minors.Hold
        self.opened = set()     # minors with an image open
        self.excl = threading.Lock()
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.spare = fds.Spare()    # early: a low number, under any limit set later

    # -- socket ----------------------------------------------------------------------
    def listen(self):
        os.makedirs(settings.runtime_dir(), exist_ok=True)
        try:
            os.unlink(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(32)
        self.sock = sock

    def serve(self):
        import select
        LOG.info("serving %s", self.path)
        self.sock.setblocking(False)        # accept under fds.LOCK must never wait
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        backoff = fds.Backoff()
        while not self.stopping.is_set():
            poller.poll()
            if self.stopping.is_set():
                break
            try:
                conn, spare = self._accept()
            except OSError as exc:
                _accept_failures.warning("accept failed: %s", exc)
                self.stopping.wait(backoff.next())      # no spinning on a full fd table
                continue
            backoff.reset()
            if conn is not None:
                threading.Thread(target=self.handle, args=(conn, spare), daemon=True).start()

    def _accept(self):
        """(a pending connection or None, whether it took the spare descriptor). With no
        descriptor left, the spare makes room: the control socket always answers."""
        with fds.LOCK:
            try:
                return self.sock.accept()[0], False
            except (BlockingIOError, InterruptedError):
                return None, False
            except OSError as exc:
                if exc.errno not in fds.EXHAUSTED or not self.spare.release():
                    raise
            try:
                return self.sock.accept()[0], True
            except (BlockingIOError, InterruptedError):
                self.spare.take()
                return None, False
            except OSError:
                self.spare.take()
                raise

    def stop(self, why):
        if not self.stopping.is_set():
            LOG.info("stopping: %s", why)
        self.stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def shutdown(self):
        """Close every image, release every minor, remove our sockets."""
        got = self.excl.acquire(timeout=30)     # let a running request finish first
        try:
            for minor in sorted(self.vbds):
                self._drop(minor, force=True)
        finally:
            if got:
                self.excl.release()
        if self.sock is not None:
            self.sock.close()
        control.remove_sockets(self.pid)
        LOG.info("exited")

    # -- one connection ----------------------------------------------------------------
    def handle(self, conn, spare=False):
        """Answer one connection (spare: it holds the spare descriptor, retaken after)."""
        try:
            self._handle(conn)
        finally:
            if spare:
                with fds.LOCK:
                    self.spare.take()

    def _handle(self, conn):
        cookie = control.ALL
        msg = {}
        try:
            conn.settimeout(RECV_TIMEOUT)
            data = control.recv_exactly(conn, control.SIZE, partial_on_timeout=True)
            if len(data) != control.SIZE:
                _fail(errno.EINVAL, "short message: %d of %d bytes", len(data), control.SIZE)
            cookie = struct.unpack_from("=HH", data)[1]
            try:
                msg = control.unpack(data)
            except control.ProtocolError as exc:
                _fail(errno.EINVAL, "malformed %s message: %s",
                      control.NAMES.get(struct.unpack_from("=H", data)[0], "unknown"), exc)
            handler = self.HANDLERS.get(msg["type"])
            if handler is None:
                _fail(errno.EINVAL, "unsupported message type %d", msg["type"])
            self._read_trailers(conn, msg)
            if self._drain(conn):
                _fail(errno.EINVAL, "message longer than %d bytes", control.SIZE)
            LOG.debug("request %s minor %d", control.NAMES[msg["type"]], cookie)
            if msg["type"] in REENTRANT:
                replies = handler(self, msg)
            else:
                with self.excl:
                    replies = handler(self, msg)
        except Exception as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            if not isinstance(exc, (OSError, ValueError)):
                LOG.exception("request failed")
            elif not isinstance(exc, OSError):
                err = errno.EINVAL
            reason = getattr(exc, "strerror", None) or str(exc) or os.strerror(err)
            if getattr(exc, "filename", None):
                reason = "%s: %s" % (reason, exc.filename)
            LOG.warning("error reply (%s): %s", errno.errorcode.get(err, err), reason)
            replies = [control.pack(control.ERROR, cookie, error=err,
                                    message=reason.encode()[:control.PATH_LENGTH - 1])]
        try:
            self._drain(conn)
            conn.settimeout(10)
            conn.sendall(b"".join(replies))
        except OSError as exc:
            LOG.warning("reply lost: %s", exc)
        finally:
            conn.close()
        # The request that asked for the exit stops the daemon, after its own reply: it
        # is the daemon's last word (another request's thread ending meanwhile must not
        # stop it first, or that reply is lost).
        if msg.get("exit"):
            self.stop(msg["exit"])

    def _read_trailers(self, conn, msg):
        """Upstream's 256-byte log path after OPEN/RESUME with ADD_LOG, and smtap's
        JSON options after OPEN with FLAG_EXTRA."""
        msg["logpath"], msg["extra"] = None, {}
        if msg["type"] not in (control.OPEN, control.RESUME):
            return
        if msg["flags"] & control.FLAG_ADD_LOG:
            raw = control.recv_exactly(conn, control.PATH_LENGTH, partial_on_timeout=True)
            if len(raw) != control.PATH_LENGTH:
                _fail(errno.EINVAL, "log path missing after the %s message",
                      control.NAMES[msg["type"]])
            msg["logpath"] = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if msg["type"] == control.OPEN and msg["flags"] & control.FLAG_EXTRA:
            raw = control.recv_exactly(conn, 4, partial_on_timeout=True)
            length = struct.unpack("=I", raw)[0] if len(raw) == 4 else -1
            if not 0 <= length <= MAX_EXTRA:
                _fail(errno.EINVAL, "bad open options trailer")
            blob = control.recv_exactly(conn, length, partial_on_timeout=True)
            try:
                extra = json.loads(blob.decode("utf-8")) if len(blob) == length else None
            except ValueError:
                extra = None
            if not isinstance(extra, dict) or set(extra) - {"export_name", "tcp"}:
                _fail(errno.EINVAL, "bad open options trailer")
            msg["extra"] = extra

    @staticmethod
    def _drain(conn, limit=1 << 20):
        """Consume what the client sent beyond its request (closing a socket with
        unread input resets the connection, and the client would lose our reply)."""
        conn.setblocking(False)
        excess = 0
        try:
            while excess < limit:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                excess += len(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass
        finally:
            conn.setblocking(True)
        return excess

    # -- helpers -----------------------------------------------------------------------
    def _vbd(self, msg):
        minor = msg["cookie"]
        if minor not in self.vbds:
            _fail(errno.ENODEV, "minor %d is not attached to tapdisk %d", minor, self.pid)
        return self.vbds[minor]

    def _open_vbd(self, msg):
        vbd = self._vbd(msg)
        if msg["cookie"] not in self.opened:
            _fail(errno.EINVAL, "minor %d has no image open", msg["cookie"])
        return vbd

    def _drop(self, minor, force):
        """Close (if open) and detach one VBD; used on exit paths."""
        vbd = self.vbds.get(minor)
        if minor in self.opened:
            try:
                vbd.close(force=force)
            except Exception:
                LOG.exception("closing minor %d", minor)
            self.opened.discard(minor)
        self.vbds.pop(minor, None)
        hold = self.holds.pop(minor, None)
        if hold is not None:
            hold.release()

    @staticmethod
    def _image(info):
        sector_size = int(info.get("sector_size") or 512)
        return {"sectors": int(info.get("size", 0)) // sector_size,
                "sector_size": sector_size, "info": int(info.get("info", 0))}

    # -- requests ------------------------------------------------------------------
    def on_pid(self, msg):
        return [control.pack(control.PID_RSP, msg["cookie"], pid=self.pid)]

    def on_list(self, msg):
        # Answered without the lock: work on a snapshot of the VBDs.
        vbds = sorted(dict(self.vbds).items())
        count = len(vbds)
        replies = []
        for minor, vbd in vbds:
            params = (vbd.params or "") if minor in self.opened else ""
            replies.append(control.pack(control.LIST_RSP, msg["cookie"], count=count,
                                        minor=minor, state=int(vbd.state),
                                        path=params.encode()[:control.PATH_LENGTH - 1]))
            count -= 1
        replies.append(control.pack(control.LIST_RSP, msg["cookie"], count=0, minor=-1))
        return replies

    def on_list_minors(self, msg):
        return [control.pack(control.LIST_MINORS_RSP, msg["cookie"],
                             minors=sorted(self.vbds))]

    def on_attach(self, msg):
        minor = msg["cookie"]
        if minor in self.vbds:
            _fail(errno.EEXIST, "minor %d is already attached", minor)
        if minor == control.ALL:
            _fail(errno.EINVAL, "attach needs a minor")
        hold = minors.Hold(minor)
        try:
            from smtap.tapdisk.vbd import VBD
            self.vbds[minor] = VBD(minor, settings.runtime_dir())
        except BaseException:
            hold.release()
            raise
        self.holds[minor] = hold
        LOG.info("attached minor %d", minor)
        return [control.pack(control.ATTACH_RSP, minor)]

    def on_detach(self, msg):
        minor = msg["cookie"]
        self._vbd(msg)
        if minor in self.opened:
            _fail(errno.EBUSY, "minor %d still has an image open: close it first", minor)
        self._drop(minor, force=False)
        LOG.info("detached minor %d", minor)
        if not self.vbds:
            msg["exit"] = "last VBD detached"
        return [control.pack(control.DETACH_RSP, minor)]

    def on_open(self, msg):
        minor = msg["cookie"]
        vbd = self._vbd(msg)
        if minor in self.opened:
            _fail(errno.EALREADY, "minor %d already has %s open", minor, vbd.params)
        if not msg["path"]:
            _fail(errno.EINVAL, "open needs type:/path")
        if msg["logpath"] is not None:
            _fail(errno.EOPNOTSUPP, "changed-block tracking (log %s) is not supported",
                  msg["logpath"])
        flags = msg["flags"] & ~(control.FLAG_EXTRA | control.FLAG_ADD_LOG)
        if flags & control.FLAG_REUSE_PRT:
            # One process per VBD: there is no parent VBD here to share; open the chain.
            LOG.info("minor %d: parent minor %d not shared, opening the chain itself",
                     minor, msg["prt_devnum"])
        secondary = msg["secondary"] if flags & control.FLAG_SECONDARY else None
        extra = msg["extra"]
        vbd.open(msg["path"], flags, timeout=msg["req_timeout"] or DEFAULT_REQ_TIMEOUT,
                 secondary=secondary, export_name=extra.get("export_name"),
                 tcp=_tcp_address(extra.get("tcp")))
        self.opened.add(minor)
        LOG.info("minor %d opened %s flags %#x", minor, msg["path"], flags)
        return [control.pack(control.OPEN_RSP, minor, **self._image(vbd.info()))]

    def on_pause(self, msg):
        self._open_vbd(msg).pause()
        LOG.info("minor %d paused", msg["cookie"])
        return [control.pack(control.PAUSE_RSP, msg["cookie"])]

    def on_resume(self, msg):
        vbd = self._open_vbd(msg)
        if msg["logpath"] is not None:
            _fail(errno.EOPNOTSUPP, "changed-block tracking (log %s) is not supported",
                  msg["logpath"])
        if msg["flags"] & control.FLAG_SECONDARY:
            _fail(errno.EOPNOTSUPP, "a secondary image cannot be added on resume")
        vbd.resume(msg["path"] or None)
        LOG.info("minor %d resumed %s", msg["cookie"], msg["path"] or "")
        return [control.pack(control.RESUME_RSP, msg["cookie"])]

    def on_close(self, msg):
        force = msg["type"] == control.FORCE_SHUTDOWN
        if force and msg["cookie"] == control.ALL:
            for minor in sorted(self.vbds):
                self._drop(minor, force=True)
            msg["exit"] = "forced shutdown"
            return [control.pack(control.CLOSE_RSP, msg["cookie"])]
        vbd = self._vbd(msg)
        if msg["cookie"] in self.opened:
            vbd.close(force=force)
            self.opened.discard(msg["cookie"])
        elif not force:
            _fail(errno.EINVAL, "minor %d has no image open", msg["cookie"])
        LOG.info("minor %d closed%s", msg["cookie"], " (forced)" if force else "")
        return [control.pack(control.CLOSE_RSP, msg["cookie"])]

    def on_stats(self, msg):
        if msg["cookie"] == control.ALL:
            stats = [vbd.stats() for m, vbd in sorted(dict(self.vbds).items())
                     if m in self.opened]
        else:
            stats = self._open_vbd(msg).stats()
        blob = json.dumps(stats).encode()
        return [control.pack(control.STATS_RSP, msg["cookie"], length=len(blob)), blob]

    def on_disk_info(self, msg):
        info = self._open_vbd(msg).info()
        return [control.pack(control.DISK_INFO_RSP, msg["cookie"], **self._image(info))]

    def on_exit(self, msg):
        for minor in sorted(self.vbds):
            self._drop(minor, force=True)
        msg["exit"] = "exit requested"
        return [control.pack(control.EXIT, msg["cookie"])]

    HANDLERS = {
        control.PID: on_pid, control.LIST: on_list, control.LIST_MINORS: on_list_minors,
        control.ATTACH: on_attach, control.DETACH: on_detach, control.OPEN: on_open,
        control.PAUSE: on_pause, control.RESUME: on_resume, control.CLOSE: on_close,
        control.FORCE_SHUTDOWN: on_close, control.STATS: on_stats,
        control.DISK_INFO: on_disk_info, control.EXIT: on_exit,
    }


def _tcp_address(text):
    """"[host:]port" (host defaults to 127.0.0.1; "[v6]:port" for IPv6) -> (host, port)."""
    if not text:
        return None
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not 0 < port < 65536 or not host:
        _fail(errno.EINVAL, "bad NBD TCP address %r: expected [host:]port", text)
    return host, port


def _setup_logging():
    # Anything else written to stderr (a thread's traceback) lands in the log too, and
    # both follow the file across rotation (logfile).
    handler = logfile.handler(
        settings.tapdisk_log_file(),
        "%(asctime)s tapdisk[%(process)d] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if os.environ.get("SMTAP_TAPDISK_DEBUG") else logging.INFO)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--foreground"]):
        sys.stderr.write("usage: tapdisk [--foreground]  (normally started by tap-ctl)\n")
        return 22
    if not argv:
        # Fork away from the caller (tap-ctl waits for this parent, then reads our
        # path from the stdout pipe we inherit), and leave its session.
        if os.fork():
            os._exit(0)
        os.setsid()
        os.chdir("/")   # hold no mount point busy
    daemon = Daemon()
    try:
        daemon.listen()
        _setup_logging()
    except Exception as exc:
        sys.stdout.write("error: %s\n" % exc)
        sys.stdout.flush()
        return 1
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: daemon.stop("SIGINT"))
    sys.stdout.write(daemon.path + "\n")
    sys.stdout.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    code = 0
    try:
        daemon.serve()
    except Exception:
        LOG.exception("control loop failed")
        code = 1
    daemon.shutdown()
    logging.shutdown()
    # The data path may leave worker threads behind: do not wait for them.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
