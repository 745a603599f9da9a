"""qcow2: a qcow2 image (v3 written, v2 too), as XCP-ng serves its QCOW2 VDIs.

    qcow2:/path/disk.qcow2[?direct=0]

The format is smtap.formats.qcow2's (header, L1/L2 tables, refcounts, zero clusters,
backing files; allocation in the crash-safe order); this driver is the data path over
it, on the libaio batch path aio uses (tapdisk/aiofile.py): data O_DIRECT when the file
system takes it, metadata (small, unaligned) through the buffered descriptor.

- A read-write open of a v3 image sets the dirty bit until close or pause clears it
  (the format's lazy mode: no barrier per allocation; refcounts are still written
  before the tables that use them, so a kill -9 leaves leaks at most); after a crash
  the next read-write open repairs the refcounts, as qemu's does. v2 images have no
  dirty bit: each allocating batch has its barriers.
- The queued path (can_queue, as vhd): a read in one allocated cluster is one I/O on
  the connection's queue, holes and zero clusters are answered at once (in a chain the
  engine reads the holes from the parent: extents() says which, exactly, from the L2
  entries), other reads are mapped run by run; a write into allocated clusters of
  refcount 1 (no metadata to change) is queued. The synchronous path (preadv/pwritev:
  one libaio batch, contiguous runs merged) serves the engine's retries and widened
  writes.
- A write that allocates (queued or not: on the synchronous path, in the batch's turn):
  new clusters (refcounts), the rest of each new cluster copied
  from the backing chain (the parents' drivers) or zeroed, the data, then the L2
  entries, then a new table's L1 entry. Writes never land on metadata or far past the
  end of the file (a corrupt table): EIO, nothing written.
- write-zeroes sets zero clusters (freeing space with may_trim), trim frees whole
  clusters and marks them zero when there is a parent: neither shows a parent's data.
  Freed clusters are reused only once no read or write in flight can still use them:
  a free waits for the synchronous requests (the gate) and is deferred past queued ones
  still in flight.
- Backing files: qcow2 (this type) or raw (aio), named relative to the image's
  directory; a missing one is refused at open.
"""
import errno
import os
import threading

from smtap.formats import qcow2 as Q
from smtap.tapdisk import aiofile
from smtap.tapdisk import driver
from smtap.tapdisk.drivers import register

HOLE = driver.EXTENT_HOLE | driver.EXTENT_ZERO
ZERO = driver.EXTENT_ZERO
MAX_EXTENTS = 256           # per extents() call
MAX_SCAN = 1 << 16          # clusters one extents() call looks at
L2_CACHE = 64 << 20         # bytes of L2 tables kept in memory
PRUNE = 4096                # queued requests remembered before the completed ones go


class _MetaIO(Q.File):
    """The format's file interface on the driver's buffered descriptor; trims through
    the AioFile (punching freed clusters)."""

    def __init__(self, afile, writable):
        self.fd = afile.bfd
        self.is_block = afile.block_device
        self.writable = writable
        self.afile = afile

    def trim(self, length, offset):
        self.afile.trim(length, offset)

    def close(self):
        pass        # the driver's AioFile owns the descriptor


class _Gate(object):
    """Reads and writes go through shared; freeing clusters waits for exclusive, so
    that no request that looked a cluster up before it was freed still uses it."""

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.shared = 0
        self.closed = False

    def enter(self):
        with self.cond:
            while self.closed:
                self.cond.wait()
            self.shared += 1

    def leave(self):
        with self.cond:
            self.shared -= 1
            if not self.shared:
                self.cond.notify_all()

    def run_exclusive(self, fn, *args):
        with self.cond:
            self.closed = True
            try:
                while self.shared:
                    self.cond.wait()
                return fn(*args)
            finally:
                self.closed = False
                self.cond.notify_all()


def _error(e, path):
    return aiofile.format_error(e, path, "qcow2")


def _chain_readv(d, requests):
    """[(length, offset)] as driver d and the parents below it show them: [bytes]. One
    batch per image: each reads what it holds (its extents) and hands its holes down,
    the last answers for the rest (zeros past an image's end)."""
    out = [bytearray(n) for n, _ in requests]
    pending = [(n, off, i, 0) for i, (n, off) in enumerate(requests)]
    while pending and d is not None:
        parent = getattr(d, "parent", None)
        reads, where, below = [], [], []
        for n, off, i, rpos in pending:
            m = max(0, min(n, d.size - off))
            if parent is None or not d.can_extents:
                if m:
                    reads.append((m, off))
                    where.append((i, rpos))
                continue
            done = 0
            while done < m:
                for elen, flags in d.extents(m - done, off + done) or [(m - done, 0)]:
                    elen = min(elen, m - done)
                    if elen <= 0:
                        break
                    if flags & driver.EXTENT_HOLE:
                        below.append((elen, off + done, i, rpos + done))
                    else:
                        reads.append((elen, off + done))
                        where.append((i, rpos + done))
                    done += elen
        if reads:
            for (i, rpos), buf in zip(where, d.preadv(reads)):
                out[i][rpos:rpos + len(buf)] = buf
        pending, d = below, parent
    return [bytes(b) for b in out]


@register
class Qcow2Driver(aiofile.ImageFileDriver, driver.Driver):
    format_error_type = Q.QCow2Error
    name = "qcow2"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True       # flush is fdatasync of the one file: every client's writes
    trim_hides_parent = True    # trimmed clusters become zero clusters under a parent
    can_queue = True
    options = {"direct": driver.parse_bool}     # direct=0: never O_DIRECT (as -D)

    def __init__(self):
        super(Qcow2Driver, self).__init__()
        self.file = self.img = self.parent = None
        self.gate = _Gate()
        self._qlock = threading.Lock()
        self._queued = []       # requests with queued I/O (a writable image): see _track
        self._deferred = []     # [(frees, the requests in flight when they were made)]
        self._prune_at = PRUNE

    # -- open / close ------------------------------------------------------------------
    def open(self, path, flags, options):
        self.path, self.flags = path, flags
        writable = not flags & driver.OPEN_RDONLY
        direct = not flags & driver.OPEN_NO_O_DIRECT and options.get("direct", True)
        self.file = aiofile.AioFile(path, writable, direct, what="qcow2")
        try:
            try:
                self.img = Q.Image(path, writable=writable, io=_MetaIO(self.file, writable),
                                   lazy=True, l2_cache=L2_CACHE)
                if writable:
                    self.img.on_free = self._free
                    self.img.begin_write()      # the dirty bit (v3) until close or pause
            except Q.QCow2Error as e:
                raise _error(e, path)
            self._setup()
        except Exception:
            self.close()
            raise

    def _setup(self):
        img = self.img
        self.size = img.size
        self.readonly = not img.writable
        self.bits = img.cluster_bits
        self.cmask = img.cluster_size - 1
        self.l2bits = img.l2_bits
        self.l2mask = img.l2_entries - 1
        aligned = Q.OFFSET_MASK & ~self.cmask
        full = (1 << 64) - 1
        self.rmask = full & ~(aligned | Q.OFLAG_COPIED)     # a plain data cluster: 0
        self.wmask = full & ~aligned                         # ... of refcount 1: COPIED
        self.zmask = Q.OFLAG_COMPRESSED | Q.OFLAG_ZERO      # a zero cluster: ZERO


    def close(self):
        """The deferred frees first: the engine closes (and pauses) with no I/O in
        flight."""
        try:
            if self._deferred and self.img is not None:
                with self.img.lock:
                    self._reap(force=True)
        finally:
            self._deferred = []
            super(Qcow2Driver, self).close()

    # -- lookups ------------------------------------------------------------------------
    def _entry(self, gc):
        img = self.img
        l1i = gc >> self.l2bits
        table = img._l2.get(l1i)
        if table is None:
            try:
                table = img.l2_table(l1i)
            except Q.QCow2Error as e:
                raise _error(e, self.path)
            if table is None:
                return 0
        return table[gc & self.l2mask]

    # -- reads ----------------------------------------------------------------------------
    def preadv(self, requests):
        self.gate.enter()
        try:
            return self._preadv(requests)
        finally:
            self.gate.leave()

    def _preadv(self, requests):
        afile, img = self.file, self.img
        bits, cmask, rmask, zmask = self.bits, self.cmask, self.rmask, self.zmask
        l2bits, l2mask, l2get = self.l2bits, self.l2mask, img._l2.get
        eof = img.file_size
        entry = self._entry
        req = []            # flat (file offset, length, buffer position) triples
        fills = []          # (buffer position, bytes or None for zeros)
        pos = acc = 0
        end = -1            # file offset just past the last run (to merge into it)
        for length, offset in requests:
            gc = offset >> bits
            if (offset + length - 1) >> bits == gc:
                table = l2get(gc >> l2bits)
                e = table[gc & l2mask] if table is not None else entry(gc)
                if e and not e & rmask:
                    phys = (e & Q.OFFSET_MASK) + (offset & cmask)
                    if phys + length <= eof:
                        if phys == end:
                            req[-2] += length
                        else:
                            req += (phys, length, pos)
                        end = phys + length
                        acc |= phys | length
                        pos += length
                        continue
                elif not e or (e & zmask == Q.OFLAG_ZERO):     # unallocated or zeros
                    fills.append((pos, None, length))
                    pos += length
                    continue
            acc |= self._map(offset, length, pos, req, fills)
            end = -1
            pos += length
        view = afile.batch(0, req, pos, buffered=not afile.direct or bool(acc & afile.mask)) \
            if req else afile.arena().buffer(0, pos).view
        zero = driver.zeros
        for fpos, data, n in fills:
            view[fpos:fpos + n] = zero(n) if data is None else data
        return afile.views(view, requests)

    def _map(self, offset, length, pos, req, fills):
        """The runs of [offset, offset + length) at buffer position pos: data into req,
        zeros and compressed clusters into fills. Returns the OR of offsets and lengths."""
        img = self.img
        acc = 0
        eof = img.file_size
        try:
            runs = img.runs(offset, length)
        except Q.QCow2Error as e:
            raise _error(e, self.path)
        for rpos, n, t, e in runs:
            at = pos + rpos - offset
            if t == Q.NORMAL:
                try:
                    phys = img.host_offset(e) + (rpos & self.cmask)
                except Q.QCow2Error as err:
                    raise _error(err, self.path)
                inside = max(0, min(n, eof - phys))         # past the end: zeros (qemu)
                if inside:
                    req += (phys, inside, at)
                    acc |= phys | inside | at
                if inside < n:
                    fills.append((at + inside, None, n - inside))
            elif t == Q.COMPRESSED:
                done = 0
                while done < n:
                    g = rpos + done
                    k = min(n - done, img.cluster_size - (g & self.cmask))
                    try:
                        cluster = img.read_compressed(self._entry(g >> self.bits))
                    except Q.QCow2Error as err:
                        raise _error(err, self.path)
                    inner = g & self.cmask
                    fills.append((at + done, cluster[inner:inner + k], k))
                    done += k
            else:
                fills.append((at, None, n))
        return acc

    def queue_reads(self, io, requests):
        """Driver.queue_reads: a request in one allocated cluster is one I/O, one in a
        hole or a zero cluster is zeros at once; others are mapped (runs: data queued,
        zeros and compressed clusters filled here). In a chain the engine hands the
        holes (extents) down to the parent's driver."""
        afile, img = self.file, self.img
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        bits, cmask, rmask, zmask = self.bits, self.cmask, self.rmask, self.zmask
        l2bits, l2mask, l2get = self.l2bits, self.l2mask, img._l2.get
        read, zero = io.read, driver.zeros
        self.gate.enter()
        try:
            eof = img.file_size
            for length, offset, view, address, op in requests:
                gc = offset >> bits
                if (offset + length - 1) >> bits == gc:
                    table = l2get(gc >> l2bits)
                    e = table[gc & l2mask] if table is not None else self._entry(gc)
                    if e and not e & rmask:
                        phys = (e & Q.OFFSET_MASK) + (offset & cmask)
                        if phys + length <= eof:
                            if direct and not (phys | length | address) & mask:
                                read(fd, phys, length, address, op)
                            else:
                                read(bfd, phys, length, address, op, True)
                            continue
                    elif not e or (e & zmask == Q.OFLAG_ZERO):     # unallocated or zeros
                        view[:] = zero(length)
                        continue
                req, fills = [], []
                align = self._map(offset, length, 0, req, fills) | address  # (always run)
                buffered = not direct or bool(align & mask)
                rfd = bfd if buffered else fd
                for i in range(0, len(req), 3):
                    read(rfd, req[i], req[i + 1], address + req[i + 2], op, buffered)
                for fpos, data, n in fills:
                    view[fpos:fpos + n] = zero(n) if data is None else data
        finally:
            self._track(requests)   # even a batch that failed midway: its I/O runs on
            self.gate.leave()

    # -- frees while queued I/O is in flight ----------------------------------------------
    # The gate holds off frees only while a request looks its clusters up; queued I/O
    # runs on after that, completed by its own connection's thread. So a free waits for
    # no one: it is kept with the requests still in flight, and run (refcounts dropped,
    # the clusters reusable) once they all completed, at the next allocation, flush or
    # close. A crash meanwhile leaks the clusters at most (the dirty bit repairs it).
    def _track(self, requests):
        if self.readonly:
            return          # a parent: its clusters are never freed while open
        ops = [r[4] for r in requests if r[4].pending]
        if ops:
            with self._qlock:
                queued = self._queued
                queued.extend(ops)
                if len(queued) > self._prune_at:      # completed ones go, now and then
                    queued = self._queued = [op for op in queued if op.pending]
                    self._prune_at = 2 * len(queued) + PRUNE

    def _free(self, frees):
        """The format's frees (under its lock): at once if no queued request is in
        flight, else once those that are completed (_reap)."""
        self.gate.run_exclusive(self._free_or_defer, frees)

    def _free_or_defer(self, frees):
        with self._qlock:
            busy = self._queued = [op for op in self._queued if op.pending]
        if busy:
            self._deferred.append((frees, busy))
        else:
            self.img.free_clusters(frees)

    def _reap(self, force=False):
        """Run the deferred frees whose requests all completed (force: all of them, when
        nothing can be in flight). Under the image's lock."""
        keep = []
        for frees, ops in self._deferred:
            if force or not any(op.pending for op in ops):
                try:
                    self.img.free_clusters(frees)
                except Q.QCow2Error as e:
                    raise _error(e, self.path)
            else:
                keep.append((frees, ops))
        self._deferred = keep

    def pread(self, length, offset):
        return bytes(self.preadv([(length, offset)])[0])

    def extents(self, length, offset):
        """From the L2 entries: data 0, zero clusters ZERO, unallocated HOLE|ZERO (in a
        chain, what the parent answers for)."""
        length = min(length, self.size - offset)
        if length <= 0:
            return [(max(length, 0), HOLE)]
        bits, l2bits = self.bits, self.l2bits
        gc = offset >> bits
        if (offset + length - 1) >> bits == gc:         # one cluster: the usual case
            e = self._entry(gc)
            if not e:
                return [(length, HOLE)]
            if e & Q.OFLAG_ZERO and not e & Q.OFLAG_COMPRESSED:
                return [(length, ZERO)]
            return [(length, 0 if e & (Q.OFFSET_MASK | Q.OFLAG_COMPRESSED) else HOLE)]
        l1 = self.img.l1
        out = []
        pos, end = offset, offset + length
        scanned = 0
        while pos < end and len(out) < MAX_EXTENTS and scanned < MAX_SCAN:
            gc = pos >> bits
            if not l1[gc >> l2bits] & Q.OFFSET_MASK:         # no table: none of it
                n = min(end, ((gc >> l2bits) + 1) << (l2bits + bits)) - pos
                flags = HOLE
            else:
                n = min(end, (gc + 1) << bits) - pos
                e = self._entry(gc)
                if e & Q.OFLAG_COMPRESSED:
                    flags = 0
                elif e & Q.OFLAG_ZERO:
                    flags = ZERO
                elif e & Q.OFFSET_MASK:
                    flags = 0
                else:
                    flags = HOLE
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
            pos += n
            scanned += 1
        return out

    # -- writes ---------------------------------------------------------------------------
    def pwritev(self, requests):
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: %s is open read-only" % self.path)
        self.gate.enter()
        try:
            if self._pwritev_fast(requests):
                return
        finally:
            self.gate.leave()
        self._pwritev_slow(requests)

    def _pwritev_fast(self, requests):
        """Every request in allocated clusters of refcount 1: one batch, True. Else
        nothing written, False."""
        writes = []
        for buf, offset in requests:
            view = memoryview(buf).cast("B")
            pieces = self._in_place(offset, len(view))
            if pieces is None:
                return False
            for phys, pos, k in pieces:
                writes.append((view[pos:pos + k], phys))
        self.file.pwritev(writes)
        return True

    def _in_place(self, offset, n):
        """[(host offset, position, length)] of a write into allocated clusters of
        refcount 1 (no metadata to change), or None (the slow path: allocation,
        copy-on-write, or a table pointing where it must not, which it reports)."""
        bits, cmask, wmask = self.bits, self.cmask, self.wmask
        meta = self.img.meta
        eof = self.img.file_size
        gc = offset >> bits
        if (offset + n - 1) >> bits == gc:
            table = self.img._l2.get(gc >> self.l2bits)
            e = table[gc & self.l2mask] if table is not None else self._entry(gc)
            if e & wmask != Q.OFLAG_COPIED:
                return None
            phys = (e & Q.OFFSET_MASK) + (offset & cmask)
            if phys >> bits in meta or phys >= eof:
                return None
            return [(phys, 0, n)]
        out = []
        pos = 0
        while pos < n:
            g = (offset + pos) >> bits
            k = min(n - pos, ((g + 1) << bits) - offset - pos)
            e = self._entry(g)
            if e & wmask != Q.OFLAG_COPIED:
                return None
            phys = (e & Q.OFFSET_MASK) + ((offset + pos) & cmask)
            if phys >> bits in meta or phys >= eof:
                return None
            out.append((phys, pos, k))
            pos += k
        return out

    def queue_writes(self, io, requests):
        """Driver.queue_writes: writes into allocated clusters of refcount 1 queued
        (no metadata changes); the others (allocation, copy-on-write) on the
        synchronous path here, in its crash-safe order, before returning."""
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: %s is open read-only" % self.path)
        afile = self.file
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        write = io.write
        slow = []
        self.gate.enter()
        try:
            for length, offset, view, address, op in requests:
                pieces = self._in_place(offset, length)
                if pieces is None:
                    slow.append((view, offset))
                    continue
                for phys, pos, k in pieces:
                    if direct and not (phys | k | (address + pos)) & mask:
                        write(fd, phys, k, address + pos, op)
                    else:
                        write(bfd, phys, k, address + pos, op, True)
        finally:
            self._track(requests)   # even a batch that failed midway: its I/O runs on
            self.gate.leave()
        if slow:
            self._pwritev_slow(slow)

    def _pwritev_slow(self, requests):
        """Allocating writes, under the image's lock: plan (clusters and refcounts), the
        copy-on-write fills and the data in one batch, then the tables."""
        img = self.img
        with img.lock:
            if self._deferred:
                self._reap()
            try:
                plan = img.plan_write([(offset, len(buf)) for buf, offset in requests])
                writes = img.fill_data(plan)
            except Q.QCow2Error as e:
                raise _error(e, self.path)
            at = {}
            for goff, n, host in plan.data:
                at[goff] = host
            for buf, offset in requests:
                view = memoryview(buf).cast("B")
                pos = 0
                for goff, n, host in self._pieces(offset, len(view), at):
                    writes.append((view[pos:pos + n], host))
                    pos += n
            writes.sort(key=lambda w: w[1])     # a new cluster's pieces: one I/O
            self.file.pwritev(writes)
            try:
                img.commit(plan)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def _pieces(self, offset, length, at):
        bits = self.bits
        pos = 0
        while pos < length:
            g = (offset + pos) >> bits
            k = min(length - pos, ((g + 1) << bits) - offset - pos)
            goff = offset + pos
            yield goff, k, at[goff] if goff in at else self._host_of(goff)
            pos += k

    def _host_of(self, goff):
        e = self._entry(goff >> self.bits)
        return (e & Q.OFFSET_MASK) + (goff & self.cmask)

    def pwrite(self, buf, offset):
        self.pwritev([(buf, offset)])

    def zero(self, length, offset, may_trim=False):
        """Zeros that never show a parent: zero clusters (may_trim: their space freed),
        partial clusters written."""
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: %s is open read-only" % self.path)
        with self.img.lock:
            if self._deferred:
                self._reap()
            try:
                self.img.write_zeroes(offset, length, unmap=may_trim)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def trim(self, length, offset):
        """Advisory: whole clusters freed (zero clusters under a parent); partial ones
        stay as they are."""
        if self.readonly:
            return
        with self.img.lock:
            if self._deferred:
                self._reap()
            try:
                self.img.discard(offset, length)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def flush(self):
        if self._deferred:
            with self.img.lock:
                self._reap()
        try:
            self.img.flush()
        except Q.QCow2Error as e:
            raise _error(e, self.path)

    # -- chains ---------------------------------------------------------------------------
    def get_parent_id(self):
        img = self.img
        if img.backing_file is None:
            return None
        path = img.backing_path()
        if not os.path.exists(path):
            raise OSError(errno.ENOENT, "qcow2: %s: backing file %s not found" % (self.path, path))
        try:
            raw = img.backing_is_raw()
        except Q.QCow2Error as e:
            raise _error(e, self.path)
        return ("aio:" if raw else "qcow2:") + os.path.realpath(path)

    def validate_parent(self, parent):
        want = "aio" if self.img.backing_is_raw() else "qcow2"
        if parent.name != want:
            raise OSError(errno.EINVAL, "qcow2: %s has a %s backing file, not %s:%s"
                          % (self.path, "raw" if want == "aio" else "qcow2", parent.name,
                             parent.path))
        if os.path.realpath(parent.path) != os.path.realpath(self.img.backing_path()):
            raise OSError(errno.EINVAL, "qcow2: %s: backing file %s, not %s"
                          % (self.path, self.img.backing_path(), parent.path))
        self.parent = parent
        self.img.backing_readv = lambda requests: _chain_readv(parent, requests)
        self.img._backing = lambda n, off: _chain_readv(parent, [(n, off)])[0]

    def debug(self):
        img = self.img
        if img is None:
            return {}
        return {"version": img.version, "cluster_size": img.cluster_size,
                "direct": self.file.direct, "dirty": img.dirty, "l2_cached": len(img._l2)}
