"""NBD server for one VBD: fixed newstyle handshake, then the transmission loop.

Follows the NBD protocol document (github.com/NetworkBlockDevice/nbd doc/proto.md); its
framing (messages as bytes, the checks of a request) is tapdisk/nbdframe.py's. One
thread per listening socket, one per client.

The transmission loop is the hot path, one turn at a time: answer the requests whose
I/O completed (each as soon as its own did), receive what the client sent (into one
buffer), split it into requests and start them, then send every answer of the turn
with one sendmsg. On a chain whose images say where their data is (Driver.c_image: a
raw file, a VHD's block map, a RAM disk's mapping) the common case runs in C
(tapdisk/smtap_nbd.c, through ctypes, without the GIL): reads, writes and flushes
whose data is in one place (a write: in the leaf, changing no metadata), received,
checked, started and answered there, until a request that is not that case (which C leaves in
the receive buffer, for this loop), an I/O error (the request handed back unanswered),
a pause or the client's idling; this loop then starts a few requests (HANDBACK) and
gives the connection back once they completed; SMTAP_NBD_C=0 turns it off. On a chain whose drivers
queue their I/O (aio, vhd) a turn's reads
and writes go on the connection's I/O queue (tapdisk/ioqueue.py: io_uring or libaio,
one submit per turn) and the loop keeps receiving while they are in flight; a command
(flush, trim, zeroes, block status, disconnect) and a write the leaf cannot take as
it is wait for the connection's I/O to finish first. Other chains (ram, null) answer
in the turn, synchronously. The VBD's pause gate and the accounting cost O(1) per turn.

The backend (a VBD) provides: export_info() -> (size, transmission flags) (known while
paused too), export_name (None: any name is accepted), io_backend (the I/O queue's back
end, chosen when it opened), the gate: join() -> a client record (busy, inflight),
part(client), held (a pause or close waits for its clients to go quiet), chain (None:
fail requests with EIO), park(client) (wait out a pause) and quiet(client) (about to
wait for the client with nothing in flight); and idle() (this client's thread went
idle: drivers may drop its buffers).
"""
import ctypes
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
from smtap.tapdisk import ioqueue
from smtap.tapdisk import native
from smtap.tapdisk import nbdframe as F
from smtap.tapdisk.nbdframe import ProtocolError
from smtap.tapdisk.ratelog import RateLog

log = logging.getLogger(__name__)
_refusals = RateLog(log)

MAX_REQUEST = F.MAX_REQUEST
MAX_OPTION = 64 << 10       # option payloads are names and queries
# Per-client memory: the receive buffer starts at RECV_INITIAL, doubles while the client
# keeps it full (pipelining) up to RECV_BUFFER, and takes a write bigger than that whole
# (up to MAX_REQUEST + 28). It is an anonymous mapping, so only the bytes that really
# arrived cost memory (a write announced but not sent costs nothing); after IDLE_RELEASE
# seconds without a request it shrinks back to RECV_INITIAL and the client's I/O queue,
# its buffers and the drivers' per-thread ones (Driver.idle) go.
RECV_INITIAL = 64 << 10
RECV_BUFFER = 4 << 20
IDLE_RELEASE = 5
# Requests in flight per client (queued I/O): at most MAX_INFLIGHT, holding at most
# MAX_INFLIGHT_BYTES of buffers (one request always: up to MAX_REQUEST). Past that the
# loop stops receiving until some complete: the client's sends block.
MAX_INFLIGHT = 256
MAX_INFLIGHT_BYTES = 64 << 20
# A client that had two requests in flight at once is watched (its socket polled while
# I/O is outstanding) for PIPELINE_TURNS turns since; one that never does (queue depth 1)
# is not: the loop then blocks on the I/O alone, a system call less per request.
PIPELINE_TURNS = 256
# After the C loop handed the connection back (a request it does not take), this loop
# starts at most HANDBACK requests, then stops receiving until what it started has
# completed, and C takes the connection again: a client that always keeps requests
# outstanding would otherwise keep it here for as long as it pipelines. (Backing off
# while C hands back at once, doubling up to 4096, was slower on qcow2's allocating
# 4k writes at QD32: 7.6k against 16.8k IOPS; their in-place neighbours are C's.)
HANDBACK = 64
C_LOOP_ENV = "SMTAP_NBD_C"  # 0: the transmission loop runs all in Python
MAX_CLIENTS = 128           # per VBD, handshaking or connected: more are refused
HANDSHAKE_TIMEOUT = 60
IOV_MAX = 1024
# The socket's send buffer: a few 1 MiB replies fit, so the loop hands one to the kernel
# and goes on to start I/O instead of blocking in sendmsg until the client has read it
# (1M reads at QD8: +10-15% over the 208 KiB default). SO_SNDBUFFORCE (root) passes
# net.core.wmem_max; else the kernel caps it there.
SEND_BUFFER = 2 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def tune(sock):
    """A client's socket for the transmission loop: blocking, SEND_BUFFER, no Nagle."""
    sock.setblocking(True)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
    except OSError:             # not root: up to net.core.wmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


_leaked = []    # I/O queues that could not be drained, and their buffers: never freed
# the hot loop's names, one lookup each
CMD_READ, CMD_WRITE, READ_FLAGS, WRITE_FLAGS = F.CMD_READ, F.CMD_WRITE, F.READ_FLAGS, F.WRITE_FLAGS
FLAG_FUA = F.CMD_FLAG_FUA
REQUEST_SIZE, REQUEST_MAGIC = F.REQUEST_SIZE, F.REQUEST_MAGIC
_unpack_request = F.REQUEST.unpack_from
Op = ioqueue.Op
C_EOF, C_IDLE, C_GROW = native.NBD_EOF, native.NBD_IDLE, native.NBD_GROW



def _queued_op(pool, ops, kind, handle, length, offset):
    """The Op of a request going on the I/O queue, with a pool buffer of its length."""
    b = pool.get(length)
    op = Op()
    op.kind, op.handle, op.length, op.offset, op.buf = kind, handle, length, offset, b
    op.view = b[0] if len(b[0]) == length else b[0][:length]
    ops[op.tag] = op
    return op

def transmission_flags(chain):
    leaf = chain.leaf
    flags = F.TF_HAS_FLAGS | F.TF_SEND_DF
    if chain.readonly:
        flags |= F.TF_READ_ONLY
    else:
        flags |= (F.TF_SEND_FLUSH | F.TF_SEND_FUA | F.TF_SEND_WRITE_ZEROES
                  | F.TF_SEND_FAST_ZERO)
        if leaf.can_trim:
            flags |= F.TF_SEND_TRIM
    if leaf.can_multi_conn or chain.readonly:
        flags |= F.TF_CAN_MULTI_CONN
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


def sendall_vectors(sock, bufs, sent=0):
    """sendmsg a list of buffers, IOV_MAX at a time, looping on partial sends; the first
    `sent` bytes of them went already."""
    sendmsg = sock.sendmsg
    while True:
        if sent:
            bufs = _after(bufs, sent)
        if not bufs:
            return
        chunk = bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs
        sent = sendmsg(chunk)
        if sent == sum(map(len, chunk)):        # the usual case: all of it went
            bufs = bufs[len(chunk):]
            sent = 0


def _after(bufs, n):
    """bufs without their first n bytes."""
    i = 0
    for b in bufs:
        k = len(b)
        if n < k:
            break
        n -= k
        i += 1
    if i < len(bufs) and n:
        return [memoryview(bufs[i]).cast("B")[n:]] + bufs[i + 1:]
    return bufs[i:]


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
            tune(sock)
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


class Replies(object):
    """The answers of one loop turn, sent with one sendmsg (send()).

    It owns the data path's ordering rule: an answer to a synchronous read may be a
    view of memory the next call into the chain can change (a ram disk's pages, which a
    write changes; the synchronous path's per-thread buffer, which its next batch
    reuses), so answers holding such views (viewing()) go out before any further call
    into the chain (before_chain()). Queued requests' buffers are the connection's
    own, safe from that: given back to their pool once sent (release)."""

    __slots__ = ("out", "release", "views", "pool", "_sock")

    def __init__(self, sock):
        self.out = []           # what to send, in order
        self.release = []       # pool buffers to give back once sent
        self.views = False      # out views memory the chain may change
        self.pool = None
        self._sock = sock

    def viewing(self):
        """What was just added views memory the next call into the chain may change."""
        self.views = True

    def before_chain(self):
        """A call into the chain comes: answers viewing its memory go first."""
        if self.views:
            self.send()

    def send(self):
        out = self.out
        if out:
            if len(out) > IOV_MAX:
                sendall_vectors(self._sock, out)
            else:
                sent = self._sock.sendmsg(out)
                if sent != sum(map(len, out)):      # a partial send (rare): the rest
                    sendall_vectors(self._sock, out, sent)
            del out[:]
        self.views = False
        release = self.release
        if release:
            put = self.pool.put
            for b in release:
                put(b)
            del release[:]


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
        self.sock.sendall(F.option_reply(opt, rtype, data))

    def _error(self, opt, rtype, message):
        self._reply(opt, rtype, message.encode())

    def _name_ok(self, name):
        fixed = self.backend.export_name
        return fixed is None or name in ("", fixed)     # "": the default export

    def handshake(self):
        """Run the option haggling. True: go to transmission; False: client left."""
        sock = self.sock
        sock.sendall(F.server_greeting())
        cflags, = struct.unpack(">I", _recvall(sock, 4))
        if cflags & ~(F.FLAG_FIXED_NEWSTYLE | F.FLAG_NO_ZEROES):
            raise ProtocolError("unknown client flags %#x" % cflags)
        self.no_zeroes = bool(cflags & F.FLAG_NO_ZEROES)
        while True:
            magic, opt, length = F.OPTION.unpack(_recvall(sock, 16))
            if magic != F.IHAVEOPT:
                raise ProtocolError("bad option magic %#x" % magic)
            if length > MAX_OPTION:
                # too big to be honest: skip it when affordable, else hang up
                if length > 16 * MAX_OPTION:
                    raise ProtocolError("option %d of %d bytes" % (opt, length))
                _skip(sock, length)
                self._error(opt, F.REP_ERR_TOO_BIG, "option too long")
                continue
            data = _recvall(sock, length) if length else b""
            handler = self._OPTIONS.get(opt)
            if handler is None:
                self._error(opt, F.REP_ERR_UNSUP, "option %d not supported" % opt)
                continue
            result = handler(self, opt, data)
            if result is not None:
                return result

    def _opt_export_name(self, opt, data):
        name = data.decode("utf-8", "replace")
        if not self._name_ok(name):
            raise ProtocolError("unknown export %r" % name)   # no way to say no here
        size, flags = self.backend.export_info()
        reply = struct.pack(">QH", size, flags)
        if not self.no_zeroes:
            reply += bytes(124)
        self.sock.sendall(reply)
        return True

    def _opt_abort(self, opt, data):
        try:
            self._reply(opt, F.REP_ACK)
        except OSError:
            pass
        return False

    def _opt_list(self, opt, data):
        if data:
            return self._error(opt, F.REP_ERR_INVALID, "LIST takes no data")
        name = (self.backend.export_name or "").encode()
        self._reply(opt, F.REP_SERVER, struct.pack(">I", len(name)) + name)
        self._reply(opt, F.REP_ACK)

    def _opt_info_go(self, opt, data):
        try:
            name, requests = F.parse_info_request(data)
        except ValueError as e:
            return self._error(opt, F.REP_ERR_INVALID, str(e))
        if not self._name_ok(name):
            return self._error(opt, F.REP_ERR_UNKNOWN, "no export %r" % name)
        try:
            size, flags = self.backend.export_info()
        except OSError as e:
            return self._error(opt, F.REP_ERR_UNKNOWN, str(e))
        self.sock.sendall(F.info_replies(opt, size, flags,
                                         name if F.INFO_NAME in requests else None))
        return True if opt == F.OPT_GO else None

    def _opt_structured_reply(self, opt, data):
        if data:
            return self._error(opt, F.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(opt, F.REP_ACK)

    def _opt_meta_context(self, opt, data):
        try:
            name, queries = F.parse_meta_context(data)
        except ValueError:
            return self._error(opt, F.REP_ERR_INVALID, "malformed meta context request")
        setting = opt == F.OPT_SET_META_CONTEXT
        if setting and not self.structured:
            return self._error(opt, F.REP_ERR_INVALID, "structured replies not negotiated")
        if not self._name_ok(name):
            return self._error(opt, F.REP_ERR_UNKNOWN, "no export %r" % name)
        if setting:
            self.meta = False
        if F.wants_allocation(queries, setting):
            if setting:
                self.meta = True
            self._reply(opt, F.REP_META_CONTEXT,
                        struct.pack(">I", F.META_ID) + F.META_BASE_ALLOCATION)
        self._reply(opt, F.REP_ACK)

    _OPTIONS = {
        F.OPT_EXPORT_NAME: _opt_export_name,
        F.OPT_ABORT: _opt_abort,
        F.OPT_LIST: _opt_list,
        F.OPT_INFO: _opt_info_go,
        F.OPT_GO: _opt_info_go,
        F.OPT_STRUCTURED_REPLY: _opt_structured_reply,
        F.OPT_LIST_META_CONTEXT: _opt_meta_context,
        F.OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    # -- transmission ------------------------------------------------------------------------
    def transmission(self):
        sock, backend = self.sock, self.backend
        self.size, tflags = backend.export_info()
        self.readonly = bool(tflags & F.TF_READ_ONLY)
        # a recv that waits IDLE_RELEASE seconds fails with EAGAIN: time to give memory back
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", IDLE_RELEASE, 0))
        self.client = backend.join()
        self.replies = Replies(sock)
        self.io = None              # the I/O queue, made on first queued request
        self.chain = self.acct = None
        self.entered = False        # self.chain is the gate's (None: the disk is closed)
        self.write_mask = 0
        self.inflight = self.inbytes = 0    # queued requests not answered, their bytes
        self.started = 0                    # requests the last turn started
        self.cloop = None           # the C loop's state (native.NbdLoop) when it may run
        self._cstate = None         # (kept across chain changes: its buffers)
        self._cimages = None        # the chain's native.CImage array C reads
        self._cbuf = None           # the receive buffer cstate knows
        self._serve_c = None
        self._joined = []           # the chain's native.CAllocs this connection counts in
        try:
            self._loop()
        finally:
            self._end()

    def _end(self):
        io = self.io
        if io is not None:
            try:
                io.close()          # waits for what is in flight: its buffers are ours
            except Exception:       # noqa: BLE001 - the kernel may still write to them
                log.exception("nbd client: I/O queue not drained; its buffers are kept")
                _leaked.append((io, self.replies.pool))
        if self._cstate is not None:
            native.nbd_release(self._cstate)
        self._part()
        if self.chain is not None:
            self.chain.retire(self.acct)
        self.client.inflight = 0
        self.backend.part(self.client)

    def _enter(self):
        """Busy (the gate counts this client until quiet or parked): wait out a pause,
        take the gate's chain if it changed."""
        client, backend = self.client, self.backend
        client.busy = True
        if backend.held:
            backend.park(client)
        chain = backend.chain
        if chain is not self.chain or not self.entered:
            self._switch(chain)

    def _switch(self, chain):
        """The gate's chain changed (open, resume onto another, close)."""
        self._part()
        if self.chain is not None:
            self.chain.retire(self.acct)
        self.chain = chain
        self.entered = True
        self.acct = chain.counters() if chain is not None else None
        if self._serve_c is None:
            self._serve_c = native.nbd_serve()
        if chain is not None and chain.queued and self.io is None:
            self.io = ioqueue.IoQueue(self.backend.io_backend)
            self.replies.pool = ioqueue.Pool()
        self.write_mask = chain.write_mask if chain is not None else 0
        self._c_take(chain)

    def _c_take(self, chain):
        """Let the C loop serve this chain if its images say where their data is
        (Driver.c_image): files need the connection's I/O queue, a RAM disk none."""
        self.cloop = self._cimages = None
        images = chain.c_images() if chain is not None else None
        if images is not None:
            # a leaf whose blocks C allocates: while one connection alone serves it (C
            # or Python: before any request); kept until parted (the driver may go first)
            for a in chain.c_allocs():
                native.alloc_join(a)
                self._joined.append(a)
        gate = getattr(self.backend, "gate", None)
        if images is None or gate is None or os.environ.get(C_LOOP_ENV, "1") == "0":
            return
        if self.io is None and any(i.kind != native.IMG_MEM for i in images):
            return
        c = self._cstate
        if c is None:
            c = self._cstate = native.NbdLoop()
            c.gate, c.client = ctypes.addressof(gate), ctypes.addressof(self.client)
            c.sockfd, c.structured = self.sock.fileno(), self.structured
            c.grow, c.max_inflight = RECV_BUFFER, min(MAX_INFLIGHT, native.NBD_SLOTS)
            c.max_bytes = MAX_INFLIGHT_BYTES
        self._cimages = images          # (C reads them in place)
        c.images, c.nimages = ctypes.addressof(images), len(images)
        c.queue = self.io.handle if self.io is not None else None
        c.acct = ctypes.addressof(self.acct)
        c.size, c.readonly = self.size, self.readonly
        self.cloop = c

    def _part(self):
        """No longer counted on the chain's CAllocs."""
        for a in self._joined:
            native.alloc_part(a)
        self._joined = []

    def _c_serve(self, buf, have, cap):
        """Run the C loop (nothing in flight): (status, bytes left in buf). The
        requests it handed back are answered here (their replies in self.replies).
        The gate: busy is set (this thread set it when the requests came) and stays so
        while C works, so a pause waits for it; C reads the gate before each request it
        starts and returns, drained, once it is held. It clears busy only to wait for
        the client with nothing in flight, as _loop does, with a barrier between each
        store and the read of the gate that follows it (smtap_gate_set puts one on the
        pause's side): VBD.park's "whichever comes second sees the other's write" holds
        (smtap_nbd.c's top comment)."""
        c = self.cloop
        if buf is not self._cbuf:
            c.buf, c.cap = native.address(buf), cap
            self._cbuf = buf
        c.have = have
        r = self._serve_c(ctypes.addressof(c))
        if c.nfailed:
            self._c_failed(c)
        if r < 0:
            raise OSError(-r, "nbd: %s" % os.strerror(-r))
        return r, c.have

    def _c_failed(self, c):
        """The requests whose I/O failed in C: redone and answered on the Python path
        (_answer_slow: retries, the errno the client is told, the failure counters)."""
        for f in c.failed[:c.nfailed]:
            op = Op()
            op.kind, op.handle, op.offset, op.length = f.kind, f.handle, f.offset, f.length
            op.fua, op.error = f.flags & FLAG_FUA, f.error or -errno.EIO
            if op.kind == CMD_WRITE:
                op.view = native.at(f.addr, f.length)
            self._answer_slow(op)
        c.nfailed = 0           # (client.inflight counts them until their answers are sent)

    def _idle(self):
        """No request for IDLE_RELEASE seconds, nothing in flight: give memory back."""
        if self.io is not None:
            self.io.close()
            self.io = None
            self.replies.pool = None
        if self._cstate is not None:
            native.nbd_release(self._cstate)
        self.cloop = self._cbuf = None      # (the receive buffer may shrink: let it go)
        self.entered = False        # a new queue comes with the next request
        self.backend.idle()

    def _loop(self):
        sock, backend, client, replies = self.sock, self.backend, self.client, self.replies
        out = replies.out
        recv_into = sock.recv_into
        fileno = sock.fileno()
        WAIT_IO, WAIT_IO_OR_SOCKET = native.WAIT_IO, native.WAIT_IO_OR_SOCKET
        DONTWAIT = socket.MSG_DONTWAIT
        buf = _buffer(RECV_INITIAL)
        view = memoryview(buf)
        cap = RECV_INITIAL
        have = 0
        backlog = False         # complete requests wait in buf (a barrier, the limits)
        pipelined = 0           # turns left watching the socket while I/O is outstanding
        stint = 0               # requests started since C handed the connection back
        io = None
        while True:
            if out:
                replies.send()
                client.inflight = self.inflight     # what was answered went out
            # 1. answers: each request whose I/O completed
            readable = False
            inflight = self.inflight if io is not None else 0
            # C's turn next: start nothing more, let what is in flight complete
            handing = stint >= HANDBACK and self.cloop is not None
            if inflight:
                admit = (inflight < MAX_INFLIGHT and self.inbytes < MAX_INFLIGHT_BYTES
                         and not backend.held and not handing)
                done = io.run(WAIT_IO_OR_SOCKET if pipelined and admit and not backlog
                              else WAIT_IO, fileno)
                if done:
                    self._answer(done)
                    inflight = self.inflight
                readable = io.readable
                if pipelined:
                    pipelined -= 1
            # 2. receive
            if not inflight and not out and not backlog and self.cloop is not None \
                    and not backend.held:
                # the C loop: it returns busy, with nothing in flight, buf holding what
                # it did not take (or nothing)
                r, have = self._c_serve(buf, have, cap)
                stint = 0
                if r == C_EOF:
                    return
                if r == C_IDLE:
                    if cap > RECV_INITIAL and have <= RECV_INITIAL:
                        buf, view, cap = self._regrow(buf, view, have, RECV_INITIAL)
                    self._idle()
                    io = None
                    continue
                if backend.held or backend.chain is not self.chain or not self.entered:
                    self._enter()
                    io = self.io
                if r == C_GROW and cap < RECV_BUFFER and not F.pending_write(buf, 0, have):
                    buf, view, cap = self._regrow(buf, view, have, min(2 * cap, RECV_BUFFER))
                    continue
            elif not inflight and not out and not backlog:
                client.busy = False             # quiet: a pause need not wait for us
                if backend.held:
                    backend.quiet(client)
                try:
                    n = recv_into(view[have:])
                except BlockingIOError:         # idle for IDLE_RELEASE seconds
                    if cap > RECV_INITIAL and have <= RECV_INITIAL:
                        buf, view, cap = self._regrow(buf, view, have, RECV_INITIAL)
                    self._idle()
                    io = None
                    continue
                if not n:
                    return
                have += n
                client.busy = True              # (then held is read: see VBD.park)
                if backend.held or backend.chain is not self.chain or not self.entered:
                    self._enter()
                    io = self.io
            elif handing and (inflight or out):
                continue                        # (a drain: C's turn comes after it)
            elif readable and have < cap:
                try:
                    n = recv_into(view[have:], 0, DONTWAIT)
                except BlockingIOError:
                    n = -1
                if not n:
                    return                      # gone, with requests in flight
                if n > 0:
                    have += n
            elif not backlog:
                continue
            # 3. start the complete requests
            if have < REQUEST_SIZE:
                continue
            if backend.held and self.entered:
                if inflight or out:
                    backlog = True
                    continue                    # drain first, then wait out the pause
                self._enter()
                io = self.io
            full = have == cap      # the client had more to send: batch more next time
            before = self.inflight
            pos, backlog, disconnect = self._dispatch(buf, view, have)
            stint += self.started
            if before + self.started > 1:       # requests in flight together
                pipelined = PIPELINE_TURNS
            if disconnect:
                replies.send()
                return
            if pos:
                rest = have - pos
                if rest:
                    buf[:rest] = buf[pos:have]
                have = rest
            need = have and F.pending_write(buf, 0, have)
            if need > cap:                      # a write bigger than the buffer
                buf, view, cap = self._regrow(buf, view, have, need)
            elif full and cap < RECV_BUFFER:
                buf, view, cap = self._regrow(buf, view, have, min(2 * cap, RECV_BUFFER))

    @staticmethod
    def _regrow(buf, view, have, cap):
        """A receive buffer of `cap` bytes holding the first `have` bytes of buf."""
        new = _buffer(cap)
        new[:have] = buf[:have]
        view.release()
        return new, memoryview(new), cap

    # -- starting requests ------------------------------------------------------------------
    def _dispatch(self, buf, view, have):
        """Start the complete requests in buf[:have], in order: reads and writes of a
        queued chain go on the I/O queue, the rest is answered in the turn. Stops at a
        request that must wait: a command (or a write the leaf cannot take as it is)
        while I/O is in flight, or the limits of what may be in flight. Returns (where
        it stopped, whether complete requests are left, DISC seen); self.started: how
        many requests it started."""
        if not self.inflight and have >= REQUEST_SIZE:
            # queue depth 1: the buffer holds one read or write, nothing is in flight
            magic, flags, typ, handle, offset, length = _unpack_request(buf, 0)
            if (magic == REQUEST_MAGIC and typ <= CMD_WRITE and have == REQUEST_SIZE
                    + (length if typ else 0) and self._start_one(
                        view, flags, typ, handle, offset, length)):
                return have, False, False
        reqs, end = F.split_requests(buf, 0, have)
        chain = self.chain
        size, readonly = self.size, self.readonly
        queued = chain is not None and chain.queued
        if queued:
            io, pool, write_mask = self.io, self.replies.pool, self.write_mask
            ops = io.ops
            qreads, qwrites = [], []    # queued this turn: (length, offset, view, address, op)
        run, run_kind = None, None      # a run of synchronous reads or writes
        nread = rbytes = nwrite = wbytes = 0
        inflight, inbytes = self.inflight, self.inbytes
        stop = None
        disconnect = False
        k = -1
        for (_, flags, typ, handle, offset, length), dpos in reqs:
            k += 1
            if typ == CMD_READ:
                if (flags & ~READ_FLAGS or offset + length > size or not length
                        or length > MAX_REQUEST or chain is None):
                    self._refuse(handle, F.read_error(flags, offset, length, size)
                                 if chain is not None else None)
                    continue
                nread += 1
                rbytes += length
                if queued:
                    if inflight and (inflight >= MAX_INFLIGHT
                                     or inbytes + length > MAX_INFLIGHT_BYTES):
                        stop = k
                        break
                    op = _queued_op(pool, ops, CMD_READ, handle, length, offset)
                    qreads.append((length, offset, op.view, op.buf[1], op))
                    inflight += 1
                    inbytes += length
                elif run_kind == CMD_READ:
                    run.append((length, offset, handle))
                else:
                    if run:
                        self._run_sync(chain, run_kind, run)
                    run, run_kind = [(length, offset, handle)], CMD_READ
                continue
            if typ == CMD_WRITE:
                if (readonly or flags & ~WRITE_FLAGS or offset + length > size or not length
                        or chain is None):
                    self._refuse(handle, F.write_error(flags, offset, length, size, readonly)
                                 if chain is not None else None)
                    continue
                if queued and not (offset | length) & write_mask:
                    if inflight and (inflight >= MAX_INFLIGHT
                                     or inbytes + length > MAX_INFLIGHT_BYTES):
                        stop = k
                        break
                    op = _queued_op(pool, ops, CMD_WRITE, handle, length, offset)
                    op.view[:] = view[dpos:dpos + length]   # the receive buffer moves on
                    op.fua = flags & FLAG_FUA
                    qwrites.append((length, offset, op.view, op.buf[1], op))
                    inflight += 1
                    inbytes += length
                else:
                    if queued and inflight:     # widened: after all that came before it
                        stop = k
                        break
                    data = (view[dpos:dpos + length], offset, handle, flags & FLAG_FUA)
                    if run_kind == CMD_WRITE:
                        run.append(data)
                    else:
                        if run:
                            self._run_sync(chain, run_kind, run)
                        run, run_kind = [data], CMD_WRITE
                nwrite += 1
                wbytes += length
                continue
            # any other command: after everything before it
            if inflight:
                stop = k
                break
            if run:
                self._run_sync(chain, run_kind, run)
                run, run_kind = None, None
            if typ == F.CMD_DISC:
                disconnect = True
                break
            self.replies.before_chain()
            self._command(chain, typ, flags, handle, offset, length)
        self.inflight, self.inbytes = inflight, inbytes
        if nread or nwrite:
            acct = self.acct
            acct[0] += rbytes >> 9
            acct[1] += wbytes >> 9
            acct[2] += nread
            acct[3] += nwrite
        if run:
            self._run_sync(chain, run_kind, run)
        started = len(reqs) if stop is None else stop
        if queued:
            if qreads:
                self._queue(chain.queue_reads, qreads)
            if qwrites:
                self._queue(chain.queue_writes, qwrites)
            # answered in the turn, requests count as in flight until their answers are sent
            self.client.inflight = self.inflight + started - len(qreads) - len(qwrites)
        else:
            self.client.inflight = started
        self.started = started
        if stop is None:
            return end, False, disconnect
        return reqs[stop][1] - F.REQUEST_SIZE, True, disconnect

    def _start_one(self, view, flags, typ, handle, offset, length):
        """Start the read or write that is the whole receive buffer, with nothing in
        flight (queue depth 1), without _dispatch's batching. False: it is not the
        simple case (a check fails, a write to widen): _dispatch's general path
        takes it."""
        chain = self.chain
        if (chain is None or offset + length > self.size or not length
                or length > MAX_REQUEST):
            return False
        acct = self.acct
        if typ == CMD_READ:
            if flags & ~READ_FLAGS:
                return False
            acct[0] += length >> 9
            acct[2] += 1
            if chain.queued:
                op = _queued_op(self.replies.pool, self.io.ops, CMD_READ, handle, length,
                                offset)
                self.inflight, self.inbytes = 1, length
                self._queue(chain.queue_reads, [(length, offset, op.view, op.buf[1], op)])
                self.client.inflight = self.inflight    # (answered at once: not counted)
            else:
                self._run_sync(chain, CMD_READ, [(length, offset, handle)])
                self.client.inflight = 1    # answered in the turn: until its answer is sent
        else:
            if self.readonly or flags & ~WRITE_FLAGS:
                return False
            queued = chain.queued
            if queued and (offset | length) & self.write_mask:
                return False
            acct[1] += length >> 9
            acct[3] += 1
            data = view[REQUEST_SIZE:REQUEST_SIZE + length]
            if queued:
                op = _queued_op(self.replies.pool, self.io.ops, CMD_WRITE, handle, length,
                                offset)
                op.view[:] = data           # the receive buffer moves on
                op.fua = flags & FLAG_FUA
                self.inflight, self.inbytes = 1, length
                self._queue(chain.queue_writes, [(length, offset, op.view, op.buf[1], op)])
                self.client.inflight = self.inflight
            else:
                self._run_sync(chain, CMD_WRITE, [(data, offset, handle, flags & FLAG_FUA)])
                self.client.inflight = 1
        self.started = 1
        return True

    def _refuse(self, handle, why):
        """Answer a request that cannot be run: why = (NBD error, message), None: the
        disk is not open."""
        err, message = why or (F.NBD_EIO, "the disk is not open")
        self.replies.out.append(F.error_reply(self.structured, handle, err, message))

    def _queue(self, queue, batch):
        """Hand a batch to the chain's queued path; answer at once what needed no I/O
        (zeros). A batch the chain could not queue is redone on the synchronous path,
        request by request, once what it did queue completed."""
        io = self.io
        try:
            queue(io, batch)
        except OSError as e:
            log.debug("nbd: a queued batch failed (%s): redone one by one", e)
            for r in batch:
                r[4].error = r[4].error or -errno.EIO
        now = [r[4] for r in batch if not r[4].pending]
        if now:
            ops = io.ops
            for op in now:
                del ops[op.tag]
            self._answer(now)

    # -- answers ----------------------------------------------------------------------------
    def _answer(self, done):
        """Answer the requests whose I/O all completed."""
        replies = self.replies
        out, release = replies.out, replies.release
        structured = self.structured
        nbytes = 0
        for op in done:
            nbytes += op.length
            if op.error or op.after is not None or op.fua:
                self._answer_slow(op)
            elif op.kind == F.CMD_READ:
                out.append(F.DATA_CHUNK.pack(F.STRUCTURED_MAGIC, F.REPLY_FLAG_DONE,
                                             F.REPLY_TYPE_OFFSET_DATA, op.handle,
                                             op.length + 8, op.offset) if structured
                           else F.SIMPLE.pack(F.SIMPLE_MAGIC, 0, op.handle))
                out.append(op.view)
            else:
                out.append(F.SIMPLE.pack(F.SIMPLE_MAGIC, 0, op.handle))    # (done_reply)
            release.append(op.buf)
        self.inflight -= len(done)
        self.inbytes -= nbytes

    def _answer_slow(self, op):
        """A queued request that failed (redone on the synchronous path, with retries),
        or that has more to do: the driver's after(), a FUA flush."""
        chain, replies = self.chain, self.replies
        err = None
        if op.kind == F.CMD_READ:
            replies.before_chain()
            data = chain.read_one(op.length, op.offset)
            if isinstance(data, Exception):
                return self._read_failed(op.handle, data)
            replies.out.append(F.chunk_data_header(op.handle, op.offset, op.length)
                               if self.structured else F.simple_reply(op.handle))
            replies.out.append(data)
            replies.viewing()
            return
        if op.error:
            replies.before_chain()
            err = chain.write_one(op.view, op.offset)
        elif op.after is not None:
            try:
                op.after()
            except OSError as e:
                err = e
        if err is None and op.fua:
            err = self._flush(chain)
        self._write_answer(op.handle, err)

    def _write_answer(self, handle, err):
        if err is None:
            self.replies.out.append(F.done_reply(handle))
        else:
            self.acct[5] += 1
            self._refuse(handle, (F.nbd_error(err), str(err)))

    @staticmethod
    def _flush(chain):
        try:
            chain.flush()
        except OSError as e:
            return e
        return None

    def _run_sync(self, chain, kind, run):
        """A run of reads [(length, offset, handle)] or writes [(data, offset, handle,
        fua)] on the synchronous path, answered in the turn."""
        replies = self.replies
        if replies.views:
            replies.send()          # before_chain(), inline: this is the hot path
        out = replies.out
        if kind == F.CMD_READ:
            bufs = chain.preadv([(length, offset) for length, offset, _ in run])
            if self.structured:
                header = F.chunk_data_header
                for (length, offset, handle), data in zip(run, bufs):
                    if isinstance(data, Exception):
                        self._read_failed(handle, data)
                    else:
                        out.append(header(handle, offset, length))
                        out.append(data)
            else:
                pack, magic = F.SIMPLE.pack, F.SIMPLE_MAGIC
                for (_, _, handle), data in zip(run, bufs):
                    if isinstance(data, Exception):
                        self._read_failed(handle, data)
                    else:
                        out.append(pack(magic, 0, handle))
                        out.append(data)
            replies.views = True    # viewing()
            return
        requests = []
        fua = 0
        for data, offset, _, f in run:      # loops, no generators: runs are often of one
            requests.append((data, offset))
            fua |= f
        errors = chain.pwritev(requests)
        if errors is None and fua:
            err = self._flush(chain)
            if err is not None:
                errors = [err] * len(run)
        if errors is None:
            pack, magic = F.SIMPLE.pack, F.SIMPLE_MAGIC     # (done_reply)
            for _, _, handle, _ in run:
                out.append(pack(magic, 0, handle))
            return
        for (_, _, handle, _), err in zip(run, errors):
            self._write_answer(handle, err)

    def _read_failed(self, handle, err):
        self.acct[4] += 1
        self._refuse(handle, (F.nbd_error(err), str(err)))

    # -- commands ---------------------------------------------------------------------------
    def _command(self, chain, typ, flags, handle, offset, length):
        """FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and unknown commands."""
        if chain is None:
            return self._refuse(handle, None)
        bad = F.command_error(typ, flags, offset, length, self.size, self.readonly, self.meta)
        if bad:
            return self._refuse(handle, bad)
        try:
            if typ == F.CMD_FLUSH:
                chain.flush()
            elif typ == F.CMD_TRIM:
                if chain.leaf.can_trim:
                    chain.trim(length, offset)
            elif typ == F.CMD_WRITE_ZEROES:
                if flags & F.CMD_FLAG_FAST_ZERO and not chain.leaf.can_zero:
                    return self._refuse(handle, (F.NBD_ENOTSUP, "no fast zero"))
                chain.zero(length, offset, not flags & F.CMD_FLAG_NO_HOLE)
            elif typ == F.CMD_BLOCK_STATUS:
                return self._block_status(chain, handle, offset, length,
                                          flags & F.CMD_FLAG_REQ_ONE)
            if typ != F.CMD_FLUSH and flags & F.CMD_FLAG_FUA:
                chain.flush()
        except OSError as e:
            return self._refuse(handle, (F.nbd_error(e), str(e)))
        self.replies.out.append(F.done_reply(handle))

    def _block_status(self, chain, handle, offset, length, one):
        descs = []
        pos = offset
        end = offset + length
        while pos < end and len(descs) < F.MAX_EXTENTS:
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
                if pos >= end or len(descs) >= F.MAX_EXTENTS:
                    break
            if one:
                break
        if not descs:
            descs = [[length, 0]]
        if one:
            descs = descs[:1]
        self.replies.out.append(F.chunk_block_status(handle, descs))
