"""An image chain: the leaf a VBD serves and the read-only parents below it.

Generic over disk types: open the leaf, follow get_parent_id() opening each parent
read-only and shared, validate each pair. A read of a region an image does not hold
(its extents say HOLE and it has a parent) goes to the parent; the last image answers
for itself (its holes read as zeros). Writes, flush, trim and zero go to the leaf.

Two data paths: queued (every image can_queue: queue_reads / queue_writes add the
batch's file I/O to the caller's I/O queue and return; the caller completes each
request as its I/O does) and synchronous (preadv / pwritev: the buffers, or errors,
when they return). Retries of transient errors (EAGAIN/EBUSY/EINTR, once a second until
the request timeout) live here, so every disk type gets them, in the per-request slow
path, taken only when a batch fails. Accounting (hits and failures per image, sectors
per chain): each caller (an NBD connection) keeps its own counters (counters()), which
stats() sums: no lock on the data path.
"""
import errno
import threading
import time

from smtap.tapdisk import driver as drv
from smtap.tapdisk import drivers
from smtap.tapdisk import native

RETRY_ERRNOS = frozenset((errno.EAGAIN, errno.EBUSY, errno.EINTR))
RETRY_INTERVAL = 1.0
MAX_CHAIN = 64      # a loop in parent ids must not open images forever


class Image(object):
    """One open image of a chain, with its counters."""

    def __init__(self, params, flags):
        self.params = params
        self.kind, self.path, options = drv.parse_params(params)
        try:
            cls = drivers.get(self.kind)
        except KeyError:
            raise ValueError("unknown disk type %r in %r (known: %s)"
                             % (self.kind, params, ", ".join(sorted(drivers.types()))))
        self.options = cls.parse_options(options)
        self.flags = flags
        self.driver = cls()
        self.driver.open(self.path, flags, self.options)
        self.hits = [0, 0]
        self.fail = [0, 0]

    def stats(self):
        return {"name": self.params, "hits": list(self.hits), "fail": list(self.fail),
                "driver": {"type": self.kind, "name": self.path, "status": 0,
                           "debug": self.driver.debug()}}


class Chain(object):
    """The images of one VBD, leaf first.

    resume: a chain a pause suspended (suspend()). An image this chain shares with it
    (same params and flags) is resumed rather than opened anew, so a disk whose data
    lives in this process (a volatile ram disk) keeps it; on success the suspended
    chain's other images are closed, on failure it stays suspended as it was.
    expect: the (size, sector_size) of the paused disk: the leaf must keep the sector size
    and be at least that big (grown while paused: an online resize; never shrunk).
    """

    def __init__(self, params, flags=0, timeout=120, resume=None, expect=None):
        self.params = params
        self.flags = flags
        self.timeout = timeout
        self.secs = [0, 0]
        self.retries = 0
        self.served_c = 0       # requests the NBD loop's C part answered (retired counters)
        self._lock = threading.Lock()
        self._counters = {}     # id -> the callers' counters (counters())
        self.images = []
        kept = dict(((i.params, i.flags), i) for i in resume.images) if resume else {}
        resumed = []
        try:
            self._open(params, flags, kept, resumed)
            leaf = self.images[0].driver
            if expect is not None and (leaf.size < expect[0] or leaf.sector_size != expect[1]):
                raise ValueError("%s: size %d / sector size %d differ from the paused disk's "
                                 "%d / %d (it may grow, not shrink)"
                                 % ((params, leaf.size, leaf.sector_size) + tuple(expect)))
        except Exception:
            for image in resumed:               # back to how the pause left them
                try:
                    image.driver.suspend()
                except Exception:       # noqa: BLE001 - the first error is the one to tell
                    pass
            self.images = [i for i in self.images if i not in resumed]
            self.close()
            raise
        if resume is not None:
            resume.images = [i for i in resume.images if i not in resumed]
            resume.close()
        self.leaf = leaf
        self.size = leaf.size
        self.sector_size = leaf.sector_size
        self.readonly = bool(flags & drv.OPEN_RDONLY) or not leaf.can_write
        self.has_parent = len(self.images) > 1
        self.queued = all(i.driver.can_queue for i in self.images)
        self.write_mask = leaf.write_align - 1      # writes with these bits: widened
        if self.queued and not self.has_parent:     # the hot path: straight to the leaf
            self.queue_reads, self.queue_writes = leaf.queue_reads, leaf.queue_writes

    def c_images(self):
        """The chain for the NBD loop's C part: an array of native.CImage, the leaf
        first, if every image has one (Driver.c_image), else None."""
        images = [i.driver.c_image() for i in self.images]
        if any(i is None for i in images):
            return None
        return (native.CImage * len(images))(*images)

    def c_allocs(self):
        """The CAllocs of the chain's images (Driver.c_alloc), after c_images."""
        return [a for a in (i.driver.c_alloc() for i in self.images) if a is not None]

    def _open(self, params, flags, kept, resumed):
        parent_flags = (flags & drv.OPEN_NO_O_DIRECT) | drv.OPEN_RDONLY | drv.OPEN_SHARED
        while params:
            if len(self.images) >= MAX_CHAIN:
                raise ValueError("image chain deeper than %d at %r (a parent loop?)"
                                 % (MAX_CHAIN, params))
            image_flags = flags if not self.images else parent_flags
            image = kept.pop((params, image_flags), None)
            if image is None:
                image = Image(params, image_flags)
            else:
                image.driver.resume(image.path, image.flags, image.options)
                resumed.append(image)
            self.images.append(image)
            params = image.driver.get_parent_id()
        for child, parent in zip(self.images, self.images[1:]):
            child.driver.validate_parent(parent.driver)

    def suspend(self):
        """A pause: every image lets go of what the storage layer may change meanwhile
        (Driver.suspend). Then close(), or a new Chain(..., resume=self)."""
        first = None
        for image in self.images:
            try:
                image.driver.suspend()
            except Exception as e:      # noqa: BLE001 - suspend the others
                first = first or e
        if first is not None:
            raise first

    def close(self):
        """Close every image; the first error is raised after all were tried."""
        first = None
        for image in self.images:
            try:
                image.driver.close()
            except Exception as e:      # noqa: BLE001 - keep closing the others
                first = first or e
        self.images = []
        if first is not None:
            raise first

    def idle(self):
        """The calling thread went idle (Driver.idle on every image)."""
        for image in self.images:
            image.driver.idle()

    # -- retries ------------------------------------------------------------------------
    def _retry(self, fn, *args):
        deadline = None
        while True:
            try:
                return fn(*args)
            except OSError as e:
                if e.errno not in RETRY_ERRNOS:
                    raise
                now = time.time()
                if deadline is None:
                    deadline = now + self.timeout
                if now + RETRY_INTERVAL > deadline:
                    raise
                self.retries += 1
                time.sleep(RETRY_INTERVAL)

    # -- accounting --------------------------------------------------------------------
    def counters(self):
        """A caller's own counters, summed into stats(): [sectors read, sectors written,
        read requests, write requests, failed reads, failed writes, requests the NBD
        loop's C part answered]. The caller adds to them (no lock: they are its alone;
        a C array, which its C loop adds to too) and retire()s them when it goes."""
        c = native.longlongs(7)
        with self._lock:
            self._counters[id(c)] = c
        return c

    def retire(self, c):
        with self._lock:
            if self._counters.pop(id(c), None) is not None:
                self.secs[0] += c[0]
                self.secs[1] += c[1]
                self.served_c += c[native.SERVED_C]
                if self.images:
                    leaf = self.images[0]
                    leaf.hits[0] += c[2] - c[4]
                    leaf.hits[1] += c[3] - c[5]
                    leaf.fail[0] += c[4]
                    leaf.fail[1] += c[5]

    # -- reads ----------------------------------------------------------------------------
    def preadv(self, requests):
        """[(length, offset)] -> [buffer or OSError] in order. Buffers stay valid until
        this thread's next call into the chain."""
        try:
            if self.has_parent:
                return self._preadv_levels(requests)
            return self.leaf.preadv(requests)
        except OSError:
            pass
        return [self.read_one(length, offset) for length, offset in requests]

    def read_one(self, length, offset):
        """One request on the slow path (with retries): its buffer, or the OSError."""
        try:
            return self._read(0, length, offset)
        except OSError as e:
            return e

    def queue_reads(self, io, requests):
        """The queued path (every image can_queue): [(length, offset, view, address,
        op)] (Driver.queue_reads) through the chain: each image queues the pieces it
        holds, the next one down gets its holes."""
        if not self.has_parent:
            return self.leaf.queue_reads(io, requests)
        zeros = []
        for image, reads in self._levels([(r[0], r[1], r, 0) for r in requests], zeros):
            image.driver.queue_reads(io, [
                (length, offset, r[2][rpos:rpos + length], r[3] + rpos, r[4])
                for length, offset, r, rpos in reads])
        for r, start, end in zeros:
            r[2][start:end] = drv.zeros(end - start)

    def _preadv_levels(self, requests):
        """A batch through the chain, one preadv per image (_levels); a request held
        whole by one image is that image's buffer, others are put together from their
        pieces."""
        out = [None] * len(requests)
        made = {}           # request index -> the buffer its pieces are put together in

        def assembled(i):
            buf = made.get(i)
            if buf is None:
                buf = made[i] = out[i] = bytearray(requests[i][0])
            return buf

        zeros = []
        pieces = [(length, offset, i, 0) for i, (length, offset) in enumerate(requests)]
        for image, reads in self._levels(pieces, zeros):
            bufs = image.driver.preadv([(length, offset) for length, offset, _, _ in reads])
            for (length, _, i, rpos), buf in zip(reads, bufs):
                if rpos == 0 and out[i] is None and length == requests[i][0]:
                    out[i] = buf
                else:
                    assembled(i)[rpos:rpos + length] = buf
        for i, _, _ in zeros:
            assembled(i)        # zeros already: the pieces the chain does not hold
        return out

    def _levels(self, pending, zeros):
        """Split the pieces (length, offset, request, position in it) of a batch through
        the chain: yields (image, the pieces it reads), each image's holes going to the
        next one; the last answers for all that is left. What lies past the end of a
        smaller parent reads as zeros: (request, start, end) in the request go to zeros."""
        last = len(self.images) - 1
        hole = drv.EXTENT_HOLE
        for level, image in enumerate(self.images):
            d = image.driver
            size = d.size
            answers_all = level == last or not d.can_extents
            extents = d.extents
            reads, below = [], []
            for piece in pending:
                length, offset, r, rpos = piece
                if offset + length > size:              # past a smaller parent: zeros
                    start = max(size - offset, 0)
                    zeros.append((r, rpos + start, rpos + length))
                    if offset >= size:
                        continue
                    length = size - offset
                    piece = (length, offset, r, rpos)
                if answers_all:
                    reads.append(piece)
                    continue
                ext = extents(length, offset)
                if ext and ext[0][0] >= length:         # one extent answers for it all
                    (below if ext[0][1] & hole else reads).append(piece)
                    continue
                done = 0
                while done < length:
                    if not ext or ext[0][0] <= 0:       # says nothing: read it here
                        ext = [(length - done, 0)]
                    for elen, flags in ext:
                        if elen > length - done:
                            elen = length - done
                        if elen <= 0:
                            break
                        part = (elen, offset + done, r, rpos + done)
                        (below if flags & hole else reads).append(part)
                        done += elen
                    if done < length:
                        ext = extents(length - done, offset + done)
            if reads:
                if level:
                    with self._lock:
                        image.hits[0] += len(reads)
                yield image, reads
            if not below:
                break
            pending = below

    def _read(self, level, length, offset):
        """Read from images[level], going down the chain for its holes."""
        image = self.images[level]
        d = image.driver
        if level + 1 == len(self.images):
            end = min(offset + length, d.size)
            data = self._retry(d.pread, end - offset, offset) if end > offset else b""
            if level:
                with self._lock:
                    image.hits[0] += 1
            if len(data) < length:      # a parent smaller than its child
                data = bytes(data) + bytes(length - len(data))
            return data
        out = None
        pos = 0
        while pos < length:
            if offset + pos >= d.size:          # past a smaller image: zeros
                if out is None:
                    out = bytearray(length)
                break
            extents = [(min(length - pos, d.size - offset - pos), 0)]
            if d.can_extents:
                extents = self._retry(d.extents, min(length - pos, d.size - offset - pos),
                                      offset + pos)
            for elen, flags in extents:
                elen = min(elen, length - pos)
                if flags & drv.EXTENT_HOLE:
                    piece = self._read(level + 1, elen, offset + pos)
                else:
                    piece = self._retry(d.pread, elen, offset + pos)
                    if level:
                        with self._lock:
                            image.hits[0] += 1
                if pos == 0 and elen == length:
                    return piece
                if out is None:
                    out = bytearray(length)
                out[pos:pos + elen] = piece
                pos += elen
                if pos >= length:
                    break
        return out

    # -- writes ---------------------------------------------------------------------------
    def pwritev(self, requests):
        """[(buffer, offset)] -> None when all were written, else [None or OSError]."""
        if self.write_mask and not self._aligned(requests, self.write_mask):
            return self._pwritev_widened(requests)
        try:
            self.leaf.pwritev(requests)
            return None
        except OSError:
            pass
        return [self.write_one(buf, offset) for buf, offset in requests]

    def write_one(self, buf, offset):
        """One write on the slow path (with retries, widened if need be): None or the
        OSError."""
        try:
            self._retry(self._write_widened, buf, offset)
        except OSError as e:
            return e
        return None

    def queue_writes(self, io, requests):
        """The queued path (Driver.queue_writes), to the leaf; requests are aligned to
        its write_align (the caller sends others through pwritev, alone)."""
        self.leaf.queue_writes(io, requests)

    @staticmethod
    def _aligned(requests, mask):
        for buf, offset in requests:
            if (len(buf) | offset) & mask:
                return False
        return True

    def _widen(self, buf, offset):
        """(buffer, offset) grown to the leaf's write_align: the bytes around it as the
        chain shows them now (a parent's, for a region the leaf does not hold yet)."""
        mask = self.leaf.write_align - 1
        start, end = offset & ~mask, (offset + len(buf) + mask) & ~mask
        out = bytearray(end - start)
        partial = set()                         # the first and the last unit, if partial
        if offset & mask:
            partial.add(start)
        if (offset + len(buf)) & mask:
            partial.add(end - mask - 1)
        for pos in partial:
            out[pos - start:pos - start + mask + 1] = self._read(0, mask + 1, pos)
        out[offset - start:offset - start + len(buf)] = buf
        return out, start

    def _write_widened(self, buf, offset):
        if (len(buf) | offset) & (self.leaf.write_align - 1):
            buf, offset = self._widen(buf, offset)
        self.leaf.pwrite(buf, offset)

    def _pwritev_widened(self, requests):
        """A batch with writes the leaf cannot take as they are: one at a time, in order,
        each read-modify-written (a write must see the ones before it)."""
        out = [self.write_one(buf, offset) for buf, offset in requests]
        return out if any(out) else None

    def _leaf_op(self, rw, fn, *args):
        try:
            return self._retry(fn, *args)
        except OSError:
            with self._lock:
                self.images[0].fail[rw] += 1
            raise

    def flush(self):
        self._leaf_op(1, self.leaf.flush)

    def trim(self, length, offset):
        # With a parent a trimmed region could show the parent's data: zero instead,
        # unless the leaf's trim keeps the region its own.
        if self.has_parent and not self.leaf.trim_hides_parent:
            return self.zero(length, offset, False)
        self._leaf_op(1, self.leaf.trim, length, offset)

    def zero(self, length, offset, may_trim=False):
        """Make a region read as zeros (never the parent's data)."""
        may_trim = may_trim and not self.has_parent
        mask = self.leaf.write_align - 1
        if (offset | length) & mask:        # partial units: written, the middle zeroed
            start, end = (offset + mask) & ~mask, (offset + length) & ~mask
            edges = [(offset, min(start, offset + length) - offset)]
            if start < end:
                edges.append((end, offset + length - end))
            for pos, n in edges:
                if n > 0:
                    self._leaf_op(1, self._write_widened, bytes(n), pos)
            if start >= end:
                return
            offset, length = start, end - start
        if self.leaf.can_zero:
            self._leaf_op(1, self.leaf.zero, length, offset, may_trim)
        else:
            chunk = 1 << 20
            pos = 0
            while pos < length:
                n = min(chunk, length - pos)
                self._leaf_op(1, self.leaf.pwrite, bytes(n), offset + pos)
                pos += n
        with self._lock:
            self.secs[1] += length >> 9

    # -- allocation ----------------------------------------------------------------------
    def extents(self, length, offset):
        """[(length, EXTENT_*)] from offset, at least one byte: a region is a hole only
        where every image of the chain has a hole."""
        return self._extents(0, length, offset)

    def _extents(self, level, length, offset):
        d = self.images[level].driver
        if offset >= d.size:                    # past the end of a smaller parent
            return [(length, drv.EXTENT_HOLE | drv.EXTENT_ZERO)]
        length = min(length, d.size - offset)
        if not d.can_extents:
            return [(length, 0)]
        ext = self._retry(d.extents, length, offset)
        if level + 1 == len(self.images) or not ext:
            return ext
        out = []
        for elen, flags in ext:
            if flags & drv.EXTENT_HOLE:
                below = self._extents(level + 1, elen, offset)
                out.extend(below)
                if sum(n for n, _ in below) < elen:
                    break           # the parent answered for part of it only
            else:
                out.append((elen, flags))
            offset += elen
        return out

    def stats(self):
        with self._lock:
            secs = list(self.secs)
            served_c = self.served_c
            images = [i.stats() for i in self.images]
            for c in self._counters.values():
                secs[0] += c[0]
                secs[1] += c[1]
                served_c += c[native.SERVED_C]
                if images:
                    leaf = images[0]
                    leaf["hits"][0] += c[2] - c[4]
                    leaf["hits"][1] += c[3] - c[5]
                    leaf["fail"][0] += c[4]
                    leaf["fail"][1] += c[5]
            return {"secs": secs, "retries": self.retries, "images": images,
                    "served_c": served_c}
