"""Asynchronous I/O of one NBD connection: its queue, its requests' I/O in flight, and
the aligned buffers they use.

The queue is smtap_aio.c's (through tapdisk.native): io_uring where the kernel has it,
libaio otherwise (dom0's 4.19), chosen when a VBD opens (`backend()`; SMTAP_IO=io_uring
or libaio forces one: the tests run both). A driver that can queue (Driver.can_queue)
adds I/O with read()/write(), each tagged with the Op of the NBD request it serves; the
connection's loop calls run() once per turn, which submits what was added, returns the
Ops whose I/O all completed and, if asked, waits for one (or for the client's socket).
"""
import errno
import os

from smtap.tapdisk import native

BACKEND_ENV = "SMTAP_IO"        # io_uring, libaio or auto (the default)
_BY_NAME = {"auto": 0, "libaio": native.LIBAIO, "io_uring": native.IO_URING}
_probed = {}
PAGE = 4096
MIN_SHIFT = 12                  # the smallest buffer: 4 KiB
SLAB = 1 << 20                  # buffers up to this size are carved from 1 MiB mappings


def backend():
    """The back end a VBD opened now uses: SMTAP_IO's, or io_uring if this kernel lets
    this process have one, else libaio. ValueError for an unknown name, OSError if the
    one asked for cannot be had."""
    name = os.environ.get(BACKEND_ENV) or "auto"
    if name not in _BY_NAME:
        raise ValueError("%s=%s: expected one of %s" % (BACKEND_ENV, name,
                                                         ", ".join(sorted(_BY_NAME))))
    if name not in _probed:
        q, got = native.queue_open(_BY_NAME[name])
        native.queue_close(q)
        _probed[name] = native.BACKEND_NAMES[got]
    return _probed[name]


class Op(object):
    """The I/O of one request in flight. pending: its I/Os not completed yet; error: the
    first failure's -errno (0: none); after: what the driver runs once they all
    completed (a VHD's bitmaps after its data), before the reply; the rest is the
    engine's (what the request was, its buffer). Made bare: the engine sets what it
    uses (this is per request, on the hot path)."""

    __slots__ = ("pending", "error", "after", "tag", "handle", "kind", "length", "offset",
                 "buf", "view", "fua")

    def __init__(self):
        self.pending = self.error = self.fua = 0
        self.after = None
        self.tag = id(self)


class IoQueue(object):
    """One connection's queue (smtap_aio.c). Not thread-safe: its connection's thread
    only. Close it only with nothing outstanding (the kernel would write into buffers
    that may be gone)."""

    SUB_MAX = 512               # requests handed over per call (at most)

    def __init__(self, name):
        self._q, got = native.queue_open(_BY_NAME[name])
        self.backend = native.BACKEND_NAMES[got]
        self._run = native.queue_run()
        self._subs = []             # flat (op, fd, offset, length, address, tag) sextuples
        self._maxdone = 2 * native.aio_depth()
        self._done = native.longlongs(2 * self._maxdone)
        self._room(32)
        self.ops = {}               # tag -> Op with I/O outstanding
        self.outstanding = 0        # I/Os given and not completed
        self.readable = False       # the last run saw the socket readable

    @property
    def handle(self):
        """The queue's address, for C (smtap_nbd.c puts its I/O on it)."""
        return self._q.value

    def _room(self, n):
        """A submission array for n requests (grown on demand: an idle client's queue
        stays small)."""
        self._cap = n
        self._sub = native.longlongs(6 * n)
        native.queue_buffers(self._q, self._sub, self._done, self._maxdone)

    # -- what drivers call -----------------------------------------------------------------
    def read(self, fd, offset, length, address, op, buffered=False):
        """Read length bytes at offset of fd into address, for op. buffered: fd is not
        O_DIRECT (libaio runs it at once: it would be synchronous anyway)."""
        self._subs += (native.OP_INLINE if buffered else native.OP_READ, fd, offset,
                       length, address, op.tag)
        op.pending += 1

    def write(self, fd, offset, length, address, op, buffered=False):
        """Write length bytes from address to fd at offset, for op. buffered: fd is not
        O_DIRECT (the next run() writes it into the page cache at once)."""
        self._subs += (native.OP_INLINE | native.OP_WRITE if buffered else native.OP_WRITE,
                       fd, offset, length, address, op.tag)
        op.pending += 1

    # -- what the engine calls ---------------------------------------------------------
    def track(self, op):
        self.ops[op.tag] = op

    def run(self, wait=native.WAIT_NONE, sockfd=-1):
        """Submit what was added; the Ops whose I/O all completed (error set on those
        that failed). wait: WAIT_IO blocks for at least one completion if any I/O is
        outstanding, WAIT_IO_OR_SOCKET also returns when sockfd becomes readable
        (then self.readable)."""
        subs = self._subs
        n = len(subs) // 6
        finished = []
        if n:
            if n > self._cap:
                self._room(min(max(n, 2 * self._cap), self.SUB_MAX))
            while n > self._cap:            # a big batch: handed over in pieces
                cap = self._cap
                self._sub[:] = subs[:6 * cap]
                del subs[:6 * cap]
                self.outstanding += cap
                self._collect(self._run(self._q, cap, native.WAIT_NONE, -1), finished)
                n -= cap
            self._sub[:6 * n] = subs
            del subs[:]
            self.outstanding += n
        r = self._run(self._q, n, wait, sockfd)
        self.readable = r & 1               # FLAG_READABLE
        if not 0 <= r <= 1:                 # completions (or an error: -errno)
            self._collect(r, finished)
        return finished

    def _collect(self, r, finished):
        """The completions a call of smtap_queue_run that returned r left in done: the
        Ops they finished go to finished."""
        if r < 0:
            raise OSError(-r, "I/O queue (%s): %s" % (self.backend, os.strerror(-r)))
        done = self._done[:r & ~1]
        self.outstanding -= r >> 1
        ops = self.ops
        for i in range(0, len(done), 2):
            op = ops[done[i]]
            if done[i + 1] and not op.error:
                op.error = done[i + 1]
            op.pending -= 1
            if not op.pending:
                del ops[op.tag]
                finished.append(op)

    def drain(self):
        """Wait for every outstanding I/O (their Ops are dropped)."""
        while self.outstanding or self._subs:
            self.run(native.WAIT_IO)
        self.ops.clear()

    def close(self):
        if self._q is not None:
            self.drain()
            native.queue_close(self._q)
            self._q = None

    def wait(self, op):
        """Run until op's I/O completed (a synchronous caller's batch)."""
        self.track(op)
        while op.pending:
            self.run(native.WAIT_IO)
        if op.error:
            err = -op.error
            if err == errno.ENODATA:
                err = errno.EIO
            return err
        return 0


class Pool(object):
    """A connection's I/O buffers: page aligned (O_DIRECT), in power-of-two sizes from
    4 KiB, those up to 1 MiB carved from 1 MiB anonymous mappings (a page costs memory
    once used; a buffer's view is made the first time it is handed out). get() ->
    (memoryview, address, size class); put() gives it back. Kept until the pool goes
    (the connection idles or ends)."""

    def __init__(self):
        self._free = [[] for _ in range(26 - MIN_SHIFT)]
        self._slabs = [None] * (26 - MIN_SHIFT)    # per class: (slab, next position)

    def get(self, size):
        c = (size - 1).bit_length() - MIN_SHIFT if size > PAGE else 0
        free = self._free[c]
        if free:
            return free.pop()
        return self._carve(c)

    def put(self, buf):
        self._free[buf[2]].append(buf)

    def _carve(self, c):
        size = 1 << (c + MIN_SHIFT)
        slab = self._slabs[c]
        if slab is None or slab[1] + size > len(slab[0].view):
            slab = [native.AlignedBuffer(max(size, SLAB)), 0]
            self._slabs[c] = slab
        mem, pos = slab
        slab[1] = pos + size
        return (mem.view[pos:pos + size], mem.address + pos, c)
