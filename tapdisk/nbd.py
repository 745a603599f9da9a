"""NBD server for one VBD: fixed newstyle handshake, then the transmission loop.

Follows the NBD protocol document (github.com/NetworkBlockDevice/nbd doc/proto.md).
One thread per listening socket, one per client. The transmission loop is the hot path:
it receives into one big buffer, parses every complete request in it, runs runs of
reads (and of writes) as one driver batch, and answers the whole batch with one
sendmsg. The VBD's pause gate and the accounting are taken once per batch.

The backend (a VBD) provides: enter() -> Chain or None (None: fail with EIO),
leave(), export_info() -> (size, transmission flags) (known while paused too),
idle() (this client's thread went idle: drivers may drop its buffers), and
export_name (None: any name is accepted).
"""
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import struct
import termios
import threading

from smtap.tapdisk import driver as drv
from smtap.tapdisk import fds
from smtap.tapdisk.ratelog import RateLog

log = logging.getLogger(__name__)
_refusals = RateLog(log)

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_FAST_ZERO = 1 << 11

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2 ** 31 + 1
REP_ERR_INVALID = 2 ** 31 + 3
REP_ERR_UNKNOWN = 2 ** 31 + 6
REP_ERR_TOO_BIG = 2 ** 31 + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2 ** 15 + 1

META_BASE_ALLOCATION = b"base:allocation"
META_ID = 1

MAX_REQUEST = 32 << 20      # largest read/write accepted (and advertised)
MAX_OPTION = 64 << 10       # option payloads are names and queries
MAX_EXTENTS = 2048          # per BLOCK_STATUS reply
# Per-client memory: the receive buffer starts at RECV_INITIAL, doubles while the client
# keeps it full (pipelining) up to RECV_BUFFER, and takes a write bigger than that whole
# (up to MAX_REQUEST + 28). It is an anonymous mapping, so only the bytes that really
# arrived cost memory (a write announced but not sent costs nothing); after IDLE_RELEASE
# seconds without a request it shrinks back to RECV_INITIAL and the drivers drop the
# client thread's buffers (Driver.idle).
RECV_INITIAL = 64 << 10
RECV_BUFFER = 4 << 20
IDLE_RELEASE = 5
MAX_CLIENTS = 128           # per VBD, handshaking or connected: more are refused
HANDSHAKE_TIMEOUT = 60
IOV_MAX = 1024

# errno the protocol knows; anything else travels as EIO
NBD_ERRNOS = {errno.EPERM: 1, errno.EIO: 5, errno.ENOMEM: 12, errno.EINVAL: 22,
              errno.ENOSPC: 28, errno.EDQUOT: 28, errno.EFBIG: 28, errno.EOVERFLOW: 75,
              errno.ENOTSUP: 95, errno.ESHUTDOWN: 108, errno.EROFS: 1, errno.EACCES: 1}

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")      # OFFSET_DATA header + its offset
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")


class ProtocolError(Exception):
    """The client broke the protocol in a way that cannot be answered: disconnect."""


def transmission_flags(chain):
    leaf = chain.leaf
    flags = TF_HAS_FLAGS | TF_SEND_DF
    if chain.readonly:
        flags |= TF_READ_ONLY
    else:
        flags |= TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO
        if leaf.can_trim:
            flags |= TF_SEND_TRIM
    if leaf.can_multi_conn or chain.readonly:
        flags |= TF_CAN_MULTI_CONN
    return flags


def _recvall(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("client went away")
        got += k
    return bytes(buf)


def _skip(sock, n):
    """Read and drop n bytes, 64 KiB at a time."""
    while n > 0:
        n -= len(_recvall(sock, min(n, 65536)))


def _buffer(size):
    """A receive buffer whose pages cost memory only once data lands in them."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def sendall_vectors(sock, bufs):
    """sendmsg a list of buffers, IOV_MAX at a time, looping on partial sends."""
    sendmsg = sock.sendmsg
    while bufs:
        chunk = bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs
        sent = sendmsg(chunk)
        if sent == sum(map(len, chunk)):        # the usual case: all of it went
            bufs = bufs[len(chunk):]
            continue
        i = 0
        for b in chunk:
            n = len(b)
            if sent < n:
                break
            sent -= n
            i += 1
        if i < len(chunk):
            bufs = [memoryview(chunk[i]).cast("B")[sent:]] + bufs[i + 1:]
        else:
            bufs = bufs[i:]


def nbd_errno(e):
    return NBD_ERRNOS.get(getattr(e, "errno", None), 5)


class Server(object):
    """Listeners and clients of one export."""

    def __init__(self, backend, unix_path, tcp=None):
        self.backend = backend
        self.unix_path = unix_path
        self.tcp_address = None
        self._listeners = []
        self._clients = {}          # socket -> thread
        self._lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        try:
            self._listen(socket.AF_UNIX, unix_path)
            if tcp:
                self.tcp_address = self._listen(socket.AF_INET6 if ":" in tcp[0]
                                                else socket.AF_INET, tcp)
        except Exception:
            self.close()
            raise

    def _listen(self, family, address):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_UNIX:
                try:
                    os.unlink(address)
                except OSError:
                    pass
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
        except Exception:
            sock.close()
            raise
        thread = threading.Thread(target=self._accept_loop, args=(sock,),
                                  name="nbd-listen", daemon=True)
        self._listeners.append((sock, thread))
        thread.start()
        return sock.getsockname()

    def clients(self):
        with self._lock:
            return len(self._clients)

    def _accept_loop(self, lsock):
        # poll, then accept under fds.LOCK: no descriptor is taken while waiting
        lsock.setblocking(False)
        poller = select.poll()
        poller.register(lsock, select.POLLIN)
        backoff = fds.Backoff()
        while not self._closing:
            poller.poll()               # a client, or close()'s shutdown
            sock = None
            with fds.LOCK:
                try:
                    sock, _ = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    error = e
            if sock is None:
                if self._closing:
                    return
                _refusals.warning("%s: accept failed: %s", self.unix_path, error)
                self._closed.wait(backoff.next())       # out of fds: do not spin
                continue
            backoff.reset()
            if not fds.headroom():
                sock.close()
                _refusals.warning("%s: a client refused: fewer than %d file descriptors "
                                  "left", self.unix_path, fds.RESERVE)
                continue
            sock.setblocking(True)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(sock,),
                                      name="nbd-client", daemon=True)
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                full = len(self._clients) >= MAX_CLIENTS
                if not full:
                    self._clients[sock] = thread
            if full:
                sock.close()
                _refusals.warning("%s: %d clients already: one more refused",
                                  self.unix_path, MAX_CLIENTS)
                continue
            thread.start()

    def _serve(self, sock):
        try:
            session = Session(self.backend, sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)      # a silent client must not hold a thread
            if session.handshake():
                sock.settimeout(None)
                session.transmission()
        except (EOFError, ProtocolError, OSError, socket.timeout) as e:
            if not self._closing:
                log.debug("nbd client ended: %s", e)
        except Exception:       # noqa: BLE001 - one client's bug must not end the others
            log.exception("nbd client failed")
        finally:
            with self._lock:
                self._clients.pop(sock, None)
            try:
                sock.close()
            except OSError:
                pass

    def drop_stalled(self, previous):
        """Hang up on the clients whose unread replies (their socket's send queue) have
        not moved since `previous`, the result of the last call: {socket: bytes queued}
        of the clients with replies unread."""
        with self._lock:
            clients = list(self._clients)
        queued = {}
        for sock in clients:
            try:
                n = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                   b"\0" * 4))[0]
            except (OSError, ValueError):
                continue                # it went meanwhile
            if n and previous.get(sock) == n:
                log.warning("%s: dropping a client that does not read its replies "
                            "(%d bytes unread)", self.unix_path, n)
                try:
                    sock.shutdown(socket.SHUT_RDWR)     # its sender fails with EPIPE
                except OSError:
                    pass
            elif n:
                queued[sock] = n
        return queued

    def close(self, timeout=10):
        """Stop listening, disconnect every client and wait for their threads."""
        self._closing = True
        self._closed.set()
        for sock, _ in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes accept()
            except OSError:
                pass
            sock.close()
        for _, thread in self._listeners:
            thread.join(timeout)
        self._listeners = []
        try:
            os.unlink(self.unix_path)
        except OSError:
            pass
        with self._lock:
            clients = list(self._clients.items())
        for sock, _ in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in clients:
            thread.join(timeout)


class Session(object):
    """One client connection."""

    def __init__(self, backend, sock):
        self.backend = backend
        self.sock = sock
        self.structured = False
        self.meta = False           # base:allocation selected
        self.no_zeroes = False

    # -- handshake -------------------------------------------------------------------------
    def _reply(self, opt, rtype, data=b""):
        self.sock.sendall(_OPTION_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _error(self, opt, rtype, message):
        self._reply(opt, rtype, message.encode())

    def _name_ok(self, name):
        fixed = self.backend.export_name
        return fixed is None or name in ("", fixed)     # "": the default export

    def _export_info(self):
        return self.backend.export_info()

    def handshake(self):
        """Run the option haggling. True: go to transmission; False: client left."""
        sock = self.sock
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        cflags, = struct.unpack(">I", _recvall(sock, 4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise ProtocolError("unknown client flags %#x" % cflags)
        self.no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPTION.unpack(_recvall(sock, 16))
            if magic != IHAVEOPT:
                raise ProtocolError("bad option magic %#x" % magic)
            if length > MAX_OPTION:
                # too big to be honest: skip it when affordable, else hang up
                if length > 16 * MAX_OPTION:
                    raise ProtocolError("option %d of %d bytes" % (opt, length))
                _skip(sock, length)
                self._error(opt, REP_ERR_TOO_BIG, "option too long")
                continue
            data = _recvall(sock, length) if length else b""
            handler = self._OPTIONS.get(opt)
            if handler is None:
                self._error(opt, REP_ERR_UNSUP, "option %d not supported" % opt)
                continue
            result = handler(self, opt, data)
            if result is not None:
                return result

    def _opt_export_name(self, opt, data):
        name = data.decode("utf-8", "replace")
        if not self._name_ok(name):
            raise ProtocolError("unknown export %r" % name)   # no way to say no here
        size, flags = self._export_info()
        reply = struct.pack(">QH", size, flags)
        if not self.no_zeroes:
            reply += bytes(124)
        self.sock.sendall(reply)
        return True

    def _opt_abort(self, opt, data):
        try:
            self._reply(opt, REP_ACK)
        except OSError:
            pass
        return False

    def _opt_list(self, opt, data):
        if data:
            return self._error(opt, REP_ERR_INVALID, "LIST takes no data")
        name = (self.backend.export_name or "").encode()
        self._reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name)
        self._reply(opt, REP_ACK)

    def _opt_info_go(self, opt, data):
        if len(data) < 6:
            return self._error(opt, REP_ERR_INVALID, "short INFO/GO request")
        nlen, = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            return self._error(opt, REP_ERR_INVALID, "bad name length")
        name = data[4:4 + nlen].decode("utf-8", "replace")
        nreq, = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            return self._error(opt, REP_ERR_INVALID, "bad information request count")
        requests = struct.unpack_from(">%dH" % nreq, data, 4 + nlen + 2)
        if not self._name_ok(name):
            return self._error(opt, REP_ERR_UNKNOWN, "no export %r" % name)
        try:
            size, flags = self._export_info()
        except OSError as e:
            return self._error(opt, REP_ERR_UNKNOWN, str(e))
        self._reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))
        if INFO_NAME in requests:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + name.encode())
        self._reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._reply(opt, REP_ACK)
        return True if opt == OPT_GO else None

    def _opt_structured_reply(self, opt, data):
        if data:
            return self._error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(opt, REP_ACK)

    def _opt_meta_context(self, opt, data):
        try:
            nlen, = struct.unpack_from(">I", data)
            name = data[4:4 + nlen].decode("utf-8", "replace")
            pos = 4 + nlen
            count, = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                qlen, = struct.unpack_from(">I", data, pos)
                query = data[pos + 4:pos + 4 + qlen]
                if len(query) != qlen:
                    raise struct.error("short query")
                queries.append(query)
                pos += 4 + qlen
            if pos != len(data):
                raise struct.error("trailing bytes")
        except struct.error:
            return self._error(opt, REP_ERR_INVALID, "malformed meta context request")
        setting = opt == OPT_SET_META_CONTEXT
        if setting and not self.structured:
            return self._error(opt, REP_ERR_INVALID, "structured replies not negotiated")
        if not self._name_ok(name):
            return self._error(opt, REP_ERR_UNKNOWN, "no export %r" % name)
        if setting:
            self.meta = False
        wanted = (not queries and not setting) or any(
            q in (META_BASE_ALLOCATION, b"base:") for q in queries)
        if wanted:
            if setting:
                self.meta = True
            self._reply(opt, REP_META_CONTEXT, struct.pack(">I", META_ID) + META_BASE_ALLOCATION)
        self._reply(opt, REP_ACK)

    _OPTIONS = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_INFO: _opt_info_go,
        OPT_GO: _opt_info_go,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_meta_context,
        OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    # -- transmission ------------------------------------------------------------------------
    def _error_reply(self, out, handle, err, message=""):
        code = err if isinstance(err, int) else nbd_errno(err)
        if self.structured:
            msg = message.encode()[:4096]
            out.append(_CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                                   6 + len(msg)) + struct.pack(">IH", code, len(msg)) + msg)
        else:
            out.append(_SIMPLE.pack(SIMPLE_MAGIC, code, handle))

    def _done(self, out, handle):
        if self.structured:
            out.append(_CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
        else:
            out.append(_SIMPLE.pack(SIMPLE_MAGIC, 0, handle))

    def transmission(self):
        sock = self.sock
        backend = self.backend
        enter, leave = backend.enter, backend.leave
        unpack = _REQUEST.unpack_from
        buf = _buffer(RECV_INITIAL)
        view = memoryview(buf)
        cap = RECV_INITIAL
        have = 0
        size, tflags = backend.export_info()
        readonly = bool(tflags & TF_READ_ONLY)
        # a recv that waits IDLE_RELEASE seconds fails with EAGAIN: time to give memory back
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", IDLE_RELEASE, 0))
        while True:
            try:
                n = sock.recv_into(view[have:])
            except BlockingIOError:
                if cap > RECV_INITIAL and have <= RECV_INITIAL:
                    writes = data = None        # the last batch's views of the buffer
                    buf, view, cap = self._regrow(buf, view, have, RECV_INITIAL)
                backend.idle()
                continue
            if not n:
                return
            have += n
            full = have == cap      # the client had more to send: batch more next time
            if have < 28:
                continue
            out = []
            reads = []          # a run of reads: [(length, offset)], their handles
            rhandles = []
            rbytes = 0
            # out may hold views of driver memory (read replies): they go out before any
            # write or command can change that memory, or a next batch reuse it
            views_out = False
            writes = []
            whandles = []
            wbytes = 0
            wfua = False
            pos = 0
            disconnect = False
            chain = enter()
            try:
                while have - pos >= 28:
                    magic, flags, typ, handle, offset, length = unpack(buf, pos)
                    if magic != REQUEST_MAGIC:
                        raise ProtocolError("bad request magic %#x" % magic)
                    if typ == CMD_READ:
                        pos += 28
                        if (flags & ~(CMD_FLAG_FUA | CMD_FLAG_DF) or offset + length > size
                                or length > MAX_REQUEST or not length or chain is None):
                            self._error_reply(out, handle, 5 if chain is None else 22,
                                              "bad read request")
                            continue
                        if writes:
                            if views_out:
                                sendall_vectors(sock, out)
                                out, views_out = [], False
                            self._run_writes(chain, out, writes, whandles, wbytes, wfua)
                            writes, whandles, wbytes, wfua = [], [], 0, False
                        reads.append((length, offset))
                        rhandles.append(handle)
                        rbytes += length
                        continue
                    if typ == CMD_WRITE:
                        if length > MAX_REQUEST:
                            raise ProtocolError("write of %d bytes" % length)
                        if have - pos < 28 + length:
                            break           # wait for the payload (the buffer grows below)
                        data = view[pos + 28:pos + 28 + length]
                        pos += 28 + length
                        err = 0
                        if chain is None:
                            err = 5
                        elif readonly:
                            err = 1
                        elif flags & ~CMD_FLAG_FUA or not length:
                            err = 22
                        elif offset + length > size:
                            err = 28
                        if err:
                            self._error_reply(out, handle, err, "write refused")
                            continue
                        if reads:
                            if views_out:
                                sendall_vectors(sock, out)
                                out = []
                            self._run_reads(chain, out, reads, rhandles, rbytes)
                            views_out = True
                            reads, rhandles, rbytes = [], [], 0
                        writes.append((data, offset))
                        whandles.append(handle)
                        wbytes += length
                        wfua = wfua or bool(flags & CMD_FLAG_FUA)
                        continue
                    # any other command ends the runs of reads and writes
                    pos += 28
                    if reads:
                        if views_out:
                            sendall_vectors(sock, out)
                            out = []
                        self._run_reads(chain, out, reads, rhandles, rbytes)
                        views_out = True
                        reads, rhandles, rbytes = [], [], 0
                    if views_out:
                        sendall_vectors(sock, out)
                        out, views_out = [], False
                    if writes:
                        self._run_writes(chain, out, writes, whandles, wbytes, wfua)
                        writes, whandles, wbytes, wfua = [], [], 0, False
                    if typ == CMD_DISC:
                        disconnect = True
                        break
                    self._command(chain, out, typ, flags, handle, offset, length, size, readonly)
                if reads:
                    if views_out:
                        sendall_vectors(sock, out)
                        out = []
                    self._run_reads(chain, out, reads, rhandles, rbytes)
                elif writes:
                    if views_out:
                        sendall_vectors(sock, out)
                        out = []
                    self._run_writes(chain, out, writes, whandles, wbytes, wfua)
                if out:
                    sendall_vectors(sock, out)
            finally:
                leave()
            if disconnect:
                return
            if pos:
                rest = have - pos
                if rest:
                    buf[:rest] = buf[pos:have]
                have = rest
            if have >= 28:
                # a write bigger than the buffer: grow it (before the next recv)
                length = _REQUEST.unpack_from(buf, 0)[5]
                if _REQUEST.unpack_from(buf, 0)[2] == CMD_WRITE and 28 + length > cap:
                    buf, view, cap = self._regrow(buf, view, have, 28 + length)
                    continue
            if full and cap < RECV_BUFFER:
                buf, view, cap = self._regrow(buf, view, have, min(2 * cap, RECV_BUFFER))

    @staticmethod
    def _regrow(buf, view, have, cap):
        """A receive buffer of `cap` bytes holding the first `have` bytes of buf."""
        new = _buffer(cap)
        new[:have] = buf[:have]
        view.release()
        return new, memoryview(new), cap

    def _run_reads(self, chain, out, reads, handles, nbytes):
        bufs = chain.preadv(reads, nbytes)
        if self.structured:
            pack = _DATA_CHUNK.pack
            for (length, offset), handle, data in zip(reads, handles, bufs):
                if isinstance(data, Exception):
                    self._error_reply(out, handle, data, str(data))
                else:
                    out.append(pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                    handle, length + 8, offset))
                    out.append(data)
        else:
            pack = _SIMPLE.pack
            for handle, data in zip(handles, bufs):
                if isinstance(data, Exception):
                    self._error_reply(out, handle, data)
                else:
                    out.append(pack(SIMPLE_MAGIC, 0, handle))
                    out.append(data)

    def _run_writes(self, chain, out, writes, handles, nbytes, fua):
        errors = chain.pwritev(writes, nbytes)
        if fua and errors is None:
            try:
                chain.flush()
            except OSError as e:
                errors = [e] * len(writes)
        if errors is None:
            if self.structured:
                pack = _CHUNK.pack
                for handle in handles:
                    out.append(pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
            else:
                pack = _SIMPLE.pack
                for handle in handles:
                    out.append(pack(SIMPLE_MAGIC, 0, handle))
            return
        for handle, err in zip(handles, errors):
            if err is None:
                self._done(out, handle)
            else:
                self._error_reply(out, handle, err, str(err))

    def _command(self, chain, out, typ, flags, handle, offset, length, size, readonly):
        """FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and unknown commands."""
        if chain is None:
            return self._error_reply(out, handle, 5, "the disk is not open")
        try:
            if typ == CMD_FLUSH:
                if flags or readonly:
                    return self._error_reply(out, handle, 22, "bad flush")
                chain.flush()
            elif typ == CMD_TRIM or typ == CMD_WRITE_ZEROES:
                allowed = CMD_FLAG_FUA
                if typ == CMD_WRITE_ZEROES:
                    allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
                if readonly:
                    return self._error_reply(out, handle, 1, "read-only disk")
                if flags & ~allowed or offset + length > size or not length:
                    return self._error_reply(out, handle, 22, "bad trim/zero request")
                if typ == CMD_TRIM:
                    if chain.leaf.can_trim:
                        chain.trim(length, offset)
                else:
                    if flags & CMD_FLAG_FAST_ZERO and not chain.leaf.can_zero:
                        return self._error_reply(out, handle, 95, "no fast zero")
                    chain.zero(length, offset, not flags & CMD_FLAG_NO_HOLE)
                if flags & CMD_FLAG_FUA:
                    chain.flush()
            elif typ == CMD_BLOCK_STATUS:
                if not self.meta:
                    return self._error_reply(out, handle, 22, "no meta context negotiated")
                if flags & ~CMD_FLAG_REQ_ONE or offset + length > size or not length:
                    return self._error_reply(out, handle, 22, "bad block status request")
                return self._block_status(chain, out, handle, offset, length,
                                          flags & CMD_FLAG_REQ_ONE)
            else:
                return self._error_reply(out, handle, 22, "unknown command %d" % typ)
        except OSError as e:
            return self._error_reply(out, handle, e, str(e))
        self._done(out, handle)

    def _block_status(self, chain, out, handle, offset, length, one):
        descs = []
        pos = offset
        end = offset + length
        while pos < end and len(descs) < MAX_EXTENTS:
            ext = chain.extents(end - pos, pos)
            if not ext or ext[0][0] <= 0:
                break                           # a driver that reports nothing: stop here
            for elen, flags in ext:
                elen = min(elen, end - pos)
                if elen <= 0:
                    break
                nflags = flags & (drv.EXTENT_HOLE | drv.EXTENT_ZERO)
                if descs and descs[-1][1] == nflags:
                    descs[-1][0] += elen
                else:
                    descs.append([elen, nflags])
                pos += elen
                if pos >= end or len(descs) >= MAX_EXTENTS:
                    break
            if one:
                break
        if not descs:
            descs = [[length, 0]]
        if one:
            descs = descs[:1]
        payload = struct.pack(">I", META_ID) + b"".join(
            struct.pack(">II", min(n, 0xffffffff), f) for n, f in descs)
        out.append(_CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
                               handle, len(payload)) + payload)
