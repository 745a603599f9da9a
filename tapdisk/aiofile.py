"""A file or block device on the libaio batch path, shared by the disk types that keep
their data in one (aio: raw; vhd: the image's blocks).

O_DIRECT when the file system allows it (buffers aligned), buffered otherwise or when
asked. What O_DIRECT cannot take (not aligned to the device's logical block) goes
through a second, buffered descriptor, as does a batch asked for buffered.

Two paths: the engine's queued one (queue_reads / queue_writes: the I/O goes on the
connection's queue, tapdisk/ioqueue.py, each request answered as its own completes),
and a synchronous one (batch, pread, pwrite: one queue call waits for a whole batch, in
one aligned per-thread buffer, the arena) for the rest: single requests, retries,
metadata-driven reads of other disk types.
"""
import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from smtap import sparse
from smtap.tapdisk import ioqueue, native

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127f
PAGE = 4096
MAX_EXTENTS = 64        # per extents() call
# A buffered read the page cache can answer is done at once, without blocking
# (preadv2 RWF_NOWAIT: Python 3.7+, Linux 4.14+); one it cannot is queued.
_preadv = getattr(os, "preadv", None)
_NOWAIT = getattr(os, "RWF_NOWAIT", 0) if _preadv is not None else 0


def _raise(err, what):
    raise OSError(err, "%s: %s" % (what, os.strerror(err)))


class _Arena(object):
    """One thread's aligned buffers and queue for synchronous batches; freed with the
    thread (or when it idles)."""

    def __init__(self):
        self.queue = ioqueue.IoQueue(ioqueue.backend())
        self.bufs = [None, None]    # reads, writes: a write batch must not clobber the
                                    # read buffers a reply is still sending

    def buffer(self, op, size):
        buf = self.bufs[op]
        if buf is None or size > len(buf.view):
            cap = max(size, 1 << 20)
            buf = self.bufs[op] = native.AlignedBuffer((cap + PAGE - 1) & ~(PAGE - 1))
        return buf

    def __del__(self):
        try:
            self.queue.close()
        except Exception:       # noqa: BLE001 - interpreter shutdown
            pass


class AioFile(object):
    """path opened read-only or read-write; `direct`: try O_DIRECT. `what` prefixes errors.

    fd: the descriptor batches use (O_DIRECT when `direct` is set), bfd: the buffered one.
    size: bytes (a block device's, or the file's at open). mask: alignment O_DIRECT needs - 1.
    """

    def __init__(self, path, writable=True, direct=True, what="aio"):
        self.path, self.what = path, what
        self.fd = self.bfd = None
        self.direct = False
        self.mask = 511
        self.nowait = _NOWAIT       # 0 once the file system refused it
        self._local = threading.local()
        mode = os.O_RDWR if writable else os.O_RDONLY
        try:
            self.bfd = os.open(path, mode | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, "%s: cannot open %s: %s" % (what, path, e.strerror))
        try:
            st = os.fstat(self.bfd)
            self.block_device = stat.S_ISBLK(st.st_mode)
            if not self.block_device and not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "%s: %s is neither a file nor a block device"
                              % (what, path))
            if self.block_device:
                self.size = struct.unpack("Q", fcntl.ioctl(self.bfd, BLKGETSIZE64, b"\0" * 8))[0]
                self.mask = struct.unpack("i", fcntl.ioctl(self.bfd, BLKSSZGET, b"\0" * 4))[0] - 1
            else:
                self.size = st.st_size
            self.fd = self.bfd
            if direct:
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
                n = min(self.size, PAGE) & ~self.mask or self.mask + 1
                self.batch(0, [0, n, 0], n)
            except OSError:
                os.close(fd)
                self.fd, self.direct = self.bfd, False

    def close(self):
        for fd in {self.fd, self.bfd}:
            if fd is not None:
                os.close(fd)
        self.fd = self.bfd = None

    # -- the batch path ----------------------------------------------------------------
    def arena(self):
        arena = getattr(self._local, "arena", None)
        if arena is None:
            arena = self._local.arena = _Arena()
        return arena

    def idle(self):
        """The thread's buffers and io context go (io_destroy): a client that read
        32 MiB once keeps none of it while idle."""
        self._local.arena = None

    def batch(self, op, req, total, data=None, buffered=False):
        """Run the requests req = [offset, length, position, ...] (flat triples; request
        i uses the arena buffer at its position) as one batch in this thread's buffer
        of `total` bytes, on the buffered descriptor if asked, and wait for all of it.
        Writes first copy `data` (buffers laid end to end from position 0) in. Returns
        the buffer's memoryview; any failure raises OSError."""
        arena = self.arena()
        buf = arena.buffer(op, total)
        view = buf.view
        if data is not None:
            pos = 0
            for piece in data:
                end = pos + len(piece)
                view[pos:end] = piece
                pos = end
        queue = arena.queue
        token = ioqueue.Op()
        fd = self.bfd if buffered else self.fd
        add = queue.write if op else queue.read
        base = buf.address
        for i in range(0, len(req), 3):
            add(fd, req[i], req[i + 1], base + req[i + 2], token, buffered)
        err = queue.wait(token)
        if err:
            _raise(err, "%s: %s %s of %s" % (self.what, "write" if op else "read",
                                             "short" if err == errno.EIO else "failed",
                                             self.path))
        return view

    # -- the queued path -----------------------------------------------------------------
    def queue_reads(self, io, requests):
        """[(length, offset, view, address, op)]: each read into its buffer, O_DIRECT
        when aligned, else through the buffered descriptor (Driver.queue_reads): then
        at once if the page cache has it all, else queued."""
        read = io.read
        if not self.direct:
            bfd, nowait = self.bfd, self.nowait
            for length, offset, view, address, op in requests:
                if nowait:
                    try:
                        if _preadv(bfd, (view,), offset, nowait) == length:
                            continue            # done: no I/O to queue
                    except BlockingIOError:
                        pass                    # not all cached: queued
                    except OSError as e:
                        self.nowait = nowait = 0
                        log.info("%s: %s: no non-blocking reads (%s)", self.what, self.path, e)
                read(bfd, offset, length, address, op, True)
            return
        self._queue_direct(read, requests)

    def _queue_direct(self, submit, requests):
        """Each request one I/O (io.read or io.write): O_DIRECT where it is aligned, else
        through the buffered descriptor."""
        fd, bfd, mask = self.fd, self.bfd, self.mask
        for length, offset, _, address, op in requests:
            if (length | offset | address) & mask:
                submit(bfd, offset, length, address, op, True)
            else:
                submit(fd, offset, length, address, op)

    def queue_writes(self, io, requests):
        """[(length, offset, view, address, op)], the data in the buffers: each written
        (Driver.queue_writes); buffered ones at once."""
        write = io.write
        if not self.direct:     # into the page cache: at once, answered in the same turn
            bfd, pwrite = self.bfd, os.pwrite
            for length, offset, view, address, op in requests:
                try:
                    if pwrite(bfd, view, offset) == length:
                        continue
                except OSError:
                    pass                # queued: the engine's error path takes it
                write(bfd, offset, length, address, op, True)
            return
        self._queue_direct(write, requests)

    @staticmethod
    def views(view, requests):
        """A batch's buffer holding [(length, offset)] end to end, one view per request."""
        out = []
        pos = 0
        for length, _ in requests:
            out.append(view[pos:pos + length])
            pos += length
        return out

    def aligned(self, requests):
        mask = self.mask
        for length, offset in requests:
            if (length | offset) & mask:
                return False
        return True

    def preadv(self, requests):
        """[(length, offset)] -> [buffer] (views of the arena, valid until this thread's
        next batch)."""
        if self.direct and not self.aligned(requests):
            return [self.pread(length, offset) for length, offset in requests]
        req = []
        pos = 0
        for length, offset in requests:
            req += (offset, length, pos)
            pos += length
        return self.views(self.batch(0, req, pos), requests)

    def pwritev(self, requests):
        """[(buffer, offset)]: one batch when O_DIRECT can take them all; else straight
        from the caller's buffers, no copy into ours. Requests contiguous on the file
        (and so in the arena) go as one I/O."""
        if not self.direct or not self.aligned((len(b), o) for b, o in requests):
            pwrite = self.pwrite_buffered
            for buf, offset in requests:
                pwrite(buf, offset)
            return
        req = []
        pos = 0
        end = -1
        for buf, offset in requests:
            n = len(buf)
            if offset == end:
                req[-2] += n
            else:
                req += (offset, n, pos)
            pos += n
            end = offset + n
        self.batch(1, req, pos, [b for b, _ in requests])

    # -- one request at a time (the slow path): independent buffers ----------------------
    def pread(self, length, offset):
        """length bytes at offset (zeros past the end of the file)."""
        if self.direct and not (length | offset) & self.mask:
            try:
                return bytes(self.batch(0, [offset, length, 0], length)[:length])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        data = os.pread(self.bfd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, buf, offset):
        if self.direct and not (len(buf) | offset) & self.mask:
            try:
                self.batch(1, [offset, len(buf), 0], len(buf), [buf])
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        self.pwrite_buffered(buf, offset)

    def pwrite_buffered(self, buf, offset):
        sparse.pwrite_all(self.bfd, memoryview(buf).cast("B"), offset)

    # -- the rest ----------------------------------------------------------------------------
    def flush(self):
        os.fdatasync(self.fd)

    def _fallocate(self, mode, length, offset):
        try:
            native.fallocate(self.bfd, mode, offset, length)
        except OSError as e:
            raise OSError(e.errno, "fallocate %s: %s" % (self.path, os.strerror(e.errno)))

    def trim(self, length, offset):
        """Advisory: a trim the device cannot do is no error."""
        try:
            if self.block_device:
                fcntl.ioctl(self.bfd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                self._fallocate(native.FALLOC_FL_PUNCH_HOLE | native.FALLOC_FL_KEEP_SIZE,
                                length, offset)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise

    def zero(self, length, offset, may_trim=False):
        """Make [offset, offset + length) read as zeros: punched (may_trim) or zeroed in
        place, else written."""
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
        """[(length, is_data)] from SEEK_DATA / SEEK_HOLE (a block device: all data)."""
        if self.block_device:
            return [(length, True)]
        return sparse.extents(self.bfd, offset, length, MAX_EXTENTS)


def format_error(e, path, kind):
    """A format layer's error as the engine reports it: one line naming the disk type and
    the file, the errno kept."""
    message = e.strerror or str(e)
    if path not in message:
        message = "%s: %s" % (path, message)
    return OSError(e.errno or errno.EIO, "%s: %s" % (kind, message))


class ImageFileDriver(object):
    """What the disk types of an image format in one AioFile share (vhd, qcow2), before
    driver.Driver in their bases: the format layer's image (self.img) closed before its
    file (self.file), whose idle hook is the driver's. format_error_type: the format
    layer's exception, reported through format_error."""
    format_error_type = OSError

    def close(self):
        img, afile = self.img, self.file
        self.img = self.file = None
        try:
            if img is not None:
                try:
                    img.close()     # what the format writes on close (footer, refcounts)
                except self.format_error_type as e:
                    raise format_error(e, self.path, self.name)
        finally:
            if afile is not None:
                afile.close()

    def idle(self):
        if self.file is not None:
            self.file.idle()
