"""aio: a raw file or block device, through Linux native AIO (libaio, tapdisk.native).

    aio:/path/disk.img

O_DIRECT when the file system allows it (buffers aligned), buffered otherwise and with
OPEN_NO_O_DIRECT (tap-ctl -D). A batch of requests is one C call (io_submit +
io_getevents, GIL released), into one aligned per-thread buffer. Requests O_DIRECT
cannot take (not sector aligned) go through a second, buffered descriptor.
"""
import errno
import fcntl
import os
import stat
import struct
import threading

from smtap import sparse
from smtap.tapdisk import driver, native
from smtap.tapdisk.drivers import register

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127f
PAGE = 4096
MAX_EXTENTS = 64        # per extents() call


def _raise(err, what):
    raise OSError(err, "%s: %s" % (what, os.strerror(err)))


class _Arena(object):
    """One thread's aligned buffers and io context; freed with the thread."""

    def __init__(self):
        self.ctx = None
        self.ctx = native.io_setup(native.aio_depth())
        self.bufs = [None, None]    # reads, writes: a write batch must not clobber the
        self.nreq = 0               # read buffers a reply is still sending
        self.offlen = self.res = None

    def buffer(self, op, size):
        buf = self.bufs[op]
        if buf is None or size > len(buf.view):
            cap = max(size, 1 << 20)
            buf = self.bufs[op] = native.AlignedBuffer((cap + PAGE - 1) & ~(PAGE - 1))
        return buf

    def arrays(self, n):
        if n > self.nreq:
            self.nreq = max(n, 64)
            self.offlen = native.longlongs(2 * self.nreq)
            self.res = native.longlongs(self.nreq)
        return self.offlen, self.res

    def __del__(self):
        try:
            if self.ctx is not None:
                native.io_destroy(self.ctx)
        except Exception:       # noqa: BLE001 - interpreter shutdown
            pass


@register
class AioDriver(driver.Driver):
    name = "aio"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True
    options = {"direct": driver.parse_bool}     # direct=0: never O_DIRECT (as -D)

    def __init__(self):
        super(AioDriver, self).__init__()
        self.fd = self.bfd = None
        self.direct = False
        self.block_device = False
        self._mask = 511
        self._local = threading.local()
        self._arenas = []

    def open(self, path, flags, options):
        self.path, self.flags = path, flags
        mode = os.O_RDONLY if flags & driver.OPEN_RDONLY else os.O_RDWR
        try:
            self.bfd = os.open(path, mode | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, "aio: cannot open %s: %s" % (path, e.strerror))
        try:
            st = os.fstat(self.bfd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if not self.block_device and not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "aio: %s is neither a file nor a block device" % path)
            if self.block_device:
                self.size = struct.unpack("Q", fcntl.ioctl(self.bfd, BLKGETSIZE64, b"\0" * 8))[0]
                self._mask = struct.unpack("i", fcntl.ioctl(self.bfd, BLKSSZGET, b"\0" * 4))[0] - 1
                self.can_extents = False
            else:
                self.size = st.st_size
            self.fd = self.bfd
            if not flags & driver.OPEN_NO_O_DIRECT and options.get("direct", True):
                self._open_direct(path, mode)
        except Exception:
            self.close()
            raise

    def _open_direct(self, path, mode):
        """Use O_DIRECT if the file system takes it, for opens and for a first read."""
        try:
            fd = os.open(path, mode | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return
            raise
        self.fd = fd
        self.direct = True
        if self.size:
            try:
                self._batch(0, [(min(self.size, PAGE) & ~self._mask or self._mask + 1, 0)])
            except OSError:
                os.close(fd)
                self.fd, self.direct = self.bfd, False

    def close(self):
        for fd in {self.fd, self.bfd}:
            if fd is not None:
                os.close(fd)
        self.fd = self.bfd = None

    # -- the batch path ----------------------------------------------------------------
    def _arena(self):
        arena = getattr(self._local, "arena", None)
        if arena is None:
            arena = self._local.arena = _Arena()
        return arena

    def idle(self):
        """The thread's buffers and io context go (io_destroy): a client that read
        32 MiB once keeps none of it while idle."""
        self._local.arena = None

    def _batch(self, op, requests, data=None):
        """Run [(length, offset)] as one AIO batch in this thread's buffer (writes copy
        `data` in first). Returns (a memoryview of the buffer, total). Any failure
        raises OSError."""
        arena = self._arena()
        n = len(requests)
        total = 0
        flat = []
        for length, offset in requests:
            flat.append(offset)
            flat.append(length)
            total += length
        buf = arena.buffer(op, total)
        offlen, res = arena.arrays(n)
        offlen[0:2 * n] = flat
        view = buf.view
        if data is not None:
            pos = 0
            for piece in data:
                end = pos + len(piece)
                view[pos:end] = piece
                pos = end
        failed = native.aio_batch(arena.ctx, self.fd, op, n, offlen, buf.address, res)
        if failed:
            if failed < 0:
                _raise(-failed, "io_getevents")
            for i in range(n):
                if res[i] < 0:
                    _raise(-res[i], "aio %s at %d" % ("write" if op else "read", flat[2 * i]))
            _raise(errno.EIO, "short aio %s" % ("write" if op else "read"))
        return view, total

    def _aligned(self, requests):
        mask = self._mask
        for length, offset in requests:
            if (length | offset) & mask:
                return False
        return True

    def preadv(self, requests):
        if self.direct and not self._aligned(requests):
            return [self.pread(length, offset) for length, offset in requests]
        view, total = self._batch(0, requests)
        out = []
        pos = 0
        for length, _ in requests:
            out.append(view[pos:pos + length])
            pos += length
        return out

    def pwritev(self, requests):
        if not self.direct or not self._aligned((len(b), o) for b, o in requests):
            # buffered: straight from the caller's buffer, no copy into ours
            pwrite = self.pwrite
            for buf, offset in requests:
                pwrite(buf, offset)
            return
        self._batch(1, [(len(b), o) for b, o in requests], [b for b, _ in requests])

    # -- one request at a time (the slow path): independent buffers ----------------------
    def pread(self, length, offset):
        if self.direct and not (length | offset) & self._mask:
            try:
                view, total = self._batch(0, [(length, offset)])
                return bytes(view[:total])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        data = os.pread(self.bfd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, buf, offset):
        if self.direct and not (len(buf) | offset) & self._mask:
            try:
                self._batch(1, [(len(buf), offset)], [buf])
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        view = memoryview(buf).cast("B")
        while len(view):
            n = os.pwrite(self.bfd, view, offset)
            view = view[n:]
            offset += n

    # -- the rest ----------------------------------------------------------------------------
    def flush(self):
        os.fdatasync(self.fd)

    def _fallocate(self, mode, length, offset):
        try:
            native.fallocate(self.bfd, mode, offset, length)
        except OSError as e:
            raise OSError(e.errno, "fallocate %s: %s" % (self.path, os.strerror(e.errno)))

    def trim(self, length, offset):
        try:
            if self.block_device:
                fcntl.ioctl(self.bfd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                self._fallocate(native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE,
                                length, offset)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise       # a trim the device cannot do is no error: it is advisory

    def zero(self, length, offset, may_trim=False):
        try:
            if self.block_device:
                fcntl.ioctl(self.bfd, BLKZEROOUT, struct.pack("QQ", offset, length))
            elif may_trim:
                self._fallocate(native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE,
                                length, offset)
            else:
                self._fallocate(native.FALLOC_FL_ZERO_RANGE | native.FALLOC_FL_KEEP_SIZE,
                                length, offset)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise
        chunk = bytes(min(length, 1 << 20))
        pos = 0
        while pos < length:
            n = min(len(chunk), length - pos)
            self.pwrite(chunk[:n], offset + pos)
            pos += n

    def extents(self, length, offset):
        """SEEK_DATA / SEEK_HOLE: holes read as zeros."""
        if self.block_device:
            return [(length, 0)]
        return [(n, 0 if is_data else driver.EXTENT_HOLE | driver.EXTENT_ZERO)
                for n, is_data in sparse.extents(self.bfd, offset, length, MAX_EXTENTS)]

    def debug(self):
        return {"direct": self.direct, "block_device": self.block_device}
