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
- A write that allocates is queued too, in qemu's crash-safe order: under the image's
  lock the batch's new clusters are allocated (refcounts written and the file extended
  once per formats.qcow2.SPARE clusters) and each one's content made (the data; around
  it the parents' data, read in one batch, or zeros), its writes queued, and its L2 entry set once they completed
  (op.after). Reads see the old entry until then: the old data or the new, never a
  half-written cluster. A new cluster past the old end of the file, where the guest
  cluster read zeros, is linked at once (it reads zeros too). Writes to a cluster
  whose allocation is in flight never wait: see "allocations in flight". Compressed,
  shared and preallocated zero clusters take the format's plan_write, synchronously.
  Writes never land on metadata or far past the end of the file (a corrupt table):
  EIO, nothing written.
- The C loop (smtap_nbd.c) allocates too, while one connection serves the image: a
  write into one cluster the leaf lacks takes a cluster this driver reserved, is
  written whole there (the chain's data around it), then its L2 entry, and mapped; the
  driver puts C's entries in its cached tables before it next looks at them (see "the
  C loop's allocations").
- write-zeroes sets zero clusters (freeing space with may_trim), trim frees whole
  clusters and marks them zero when there is a parent: neither shows a parent's data.
  Freed clusters are reused only once no read or write in flight can still use them:
  a free waits for no one (it is made under the image's lock), it is deferred past
  the batches of requests still busy.
- Backing files: qcow2 (this type) or raw (aio), named relative to the image's
  directory; a missing one is refused at open.
"""
import ctypes
import errno
import functools
import os
import threading
import time

from smtap.formats import qcow2 as Q
from smtap.tapdisk import aiofile
from smtap.tapdisk import driver, ioqueue, native
from smtap.tapdisk.drivers import register

HOLE = driver.EXTENT_HOLE | driver.EXTENT_ZERO
ZERO = driver.EXTENT_ZERO
MAX_EXTENTS = 256           # per extents() call
MAX_SCAN = 1 << 16          # clusters one extents() call looks at
L2_CACHE = 64 << 20         # bytes of L2 tables kept in memory
C_MAP = 64 << 20            # bytes of the C loop's block map at most (8 per cluster)
C_RESERVE = 512             # clusters the C loop may allocate before it asks again ...
C_LOW = 64                  # ... refilled below this many
C_LOG = 4096                # its allocations logged before the driver links them
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


class _Batch(object):
    """The requests of one batch (queued, or one synchronous call) as frees see them:
    busy from before its first lookup until all its I/O completed. A free never waits
    for a batch: it is deferred past the busy ones (_free)."""
    __slots__ = ("ops", "open")

    def __init__(self):
        self.ops = ()
        self.open = True

    def busy(self):
        if self.open:
            return True
        for op in self.ops:
            if op.pending:
                return True
        return False


class _Gen(object):
    """A new cluster for a guest cluster (gc), written by one request (op) and linked
    in its L2 entry once that completed: num orders it among the changes to gc; data
    (the request's bytes, at inner) and buf (the whole cluster's content, when the
    rest of it must be written too: copy-on-write or zeros) say what it holds."""
    __slots__ = ("gc", "num", "host", "inner", "pos", "data", "buf", "op", "base")


class _Pending(object):
    """A guest cluster with allocations in flight: gens (in order) and top, the num of
    the newest change linked (a gen, or a zero or trim of the whole cluster): a gen
    at or below it lost and is freed when it completes."""
    __slots__ = ("top", "gens")

    def __init__(self):
        self.top = 0
        self.gens = []

    def latest(self):
        """The newest gen still to be linked whose content is usable (its request not
        failed), or None."""
        for g in reversed(self.gens):
            if g.num > self.top and not (g.op is not None and g.op.error and
                                         not g.op.pending):
                return g
        return None


def _merged(pieces):
    """[(host offset, position, length)] with pieces contiguous both on the host and
    in the request merged (a write over new clusters allocated together: one I/O)."""
    pieces.sort(key=lambda p: p[1])
    out = []
    for phys, pos, k in pieces:
        if out and out[-1][0] + out[-1][2] == phys and out[-1][1] + out[-1][2] == pos:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + k)
        else:
            out.append((phys, pos, k))
    return out


def _error(e, path):
    return aiofile.format_error(e, path, "qcow2")


def _chain_readv(d, requests):
    """[(length, offset)] as driver d and the parents below it show them: [bytes]
    (_chain_read_into's walk, on each image's synchronous path)."""
    out = [bytearray(n) for n, _ in requests]
    _chain_read_into(d, [(n, off, memoryview(b), 0) for b, (n, off) in zip(out, requests)])
    return [bytes(b) for b in out]


def _chain_read_into(d, reads, queue=None):
    """[(length, offset, view, address)] as driver d and the parents below it show them,
    read straight into those buffers (a copy-on-write's cluster: no buffer between):
    each image reads what it holds (extents), queued on `queue` (one wait for all) or
    without one on its synchronous path; its holes go down, the last answers for the
    rest; zeros past an image's end."""
    token = ioqueue.Op()
    zero = driver.zeros
    pending = reads
    while pending and d is not None:
        parent = getattr(d, "parent", None)
        here, below = [], []
        for n, off, view, address in pending:
            m = max(0, min(n, d.size - off))
            if m < n:
                view[m:n] = zero(n - m)
            if not m:
                continue
            if parent is None or not d.can_extents:
                here.append((m, off, view[:m], address))
                continue
            done = 0
            while done < m:
                for elen, flags in d.extents(m - done, off + done) or [(m - done, 0)]:
                    elen = min(elen, m - done)
                    if elen <= 0:
                        break
                    piece = (elen, off + done, view[done:done + elen], address + done)
                    (below if flags & driver.EXTENT_HOLE else here).append(piece)
                    done += elen
        if here:
            if queue is not None and d.can_queue:
                d.queue_reads(queue, [(n, off, v, a, token) for n, off, v, a in here])
            else:
                for (_, _, v, _), buf in zip(here, d.preadv([(n, off) for n, off, _, _ in here])):
                    v[:] = buf
        pending, d = below, parent
    for _, _, view, _ in pending:       # below the last image: zeros
        view[:] = zero(len(view))
    if token.pending:
        err = queue.wait(token)
        if err:
            raise OSError(err, "qcow2: the backing chain's read for a copy-on-write "
                          "failed: %s" % os.strerror(err))


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
        self._qlock = threading.Lock()
        self._batches = []      # _Batch of the requests in flight (a writable image)
        self._deferred = []     # [(frees, the batches busy when they were made)]
        self._prune_at = PRUNE
        self._pending = {}      # guest cluster -> _Pending: allocations in flight
        self._seq = 0           # the last _Gen / whole-cluster change number
        self._pool = None       # aligned cluster buffers of the gens (under img.lock)
        self.cmap = None        # the C loop's mirror of the L2 entries (c_image)
        self.calloc = None      # ... and the clusters it may allocate (native.CAlloc)
        self._clinks = None     # C's allocations being linked: {gc: host} (_mirror)
        self._ca = None         # calloc's struct, kept across reopens (see _c_setup)

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
        self._pool = ioqueue.Pool()
        self._setup_map(img)

    # -- the C loop's block map: the L2 entries mirrored as tables are cached or change -----
    def _setup_map(self, img):
        """Clusters of L1 entries with no table are absent; the others unknown until
        their table is read (the format calls _mirror). A writable image's map has a
        guard: a free waits for C's requests that looked the map up before (_free)."""
        self.cmap = native.BlockMap(self.file, img.size, self.bits,
                                    max_pages=C_MAP >> (native.MAP_PAGE_BITS + 3),
                                    guard=img.writable)
        self._nclusters = (img.size + self.cmask) >> self.bits
        # per L1 entry, its L2 table's offset while the table is its own (COPIED), else
        # 0: the tables C may link its allocations in (CAlloc.l2off)
        self._l2off = (ctypes.c_longlong * max(1, len(img.l1)))()
        per = img.l2_entries
        for l1i in range(len(img.l1)):
            self._note_l1(l1i)
            first = l1i * per
            if first >= self._nclusters:
                break
            if not img.l1[l1i] & Q.OFFSET_MASK:
                self.cmap.absent(first, min(per, self._nclusters - first))
        for l1i, table in list(img._l2.items()):
            self._mirror(l1i, table, None)
        img.on_l2 = self._mirror
        img.on_l1 = self._note_l1

    def _note_l1(self, l1i):
        """L1 entry l1i's table as C may link in it (after it was made or changed)."""
        e = self.img.l1[l1i]
        self._l2off[l1i] = e & Q.OFFSET_MASK if e & Q.OFLAG_COPIED and self.img.writable else 0

    def _mirror(self, l1i, table, indices):
        """L2 table l1i cached (indices None) or these of its entries changed (under the
        image's lock, before what changed them is answered or freed): into the map. A
        cluster is written in place by C only as _in_place would: refcount 1, no
        allocation in flight; a data cluster past the end of the file or over
        metadata, a compressed one: the driver's."""
        cmap = self.cmap
        if cmap is None:
            return
        img = self.img
        first = l1i << self.l2bits
        n = min(len(table), self._nclusters - first)
        if n <= 0:
            return
        rmask, zmask, cs = self.rmask, self.zmask, self.cmask + 1
        eof, meta, pending, bits = img.file_size, img.meta, self._pending, self.bits
        data = native.E_DATA
        writable = 0 if self.readonly else native.E_WRITABLE
        absent, zero = native.E_ABSENT, native.E_ZERO
        linking = self._clinks

        def value(i):
            if linking and first + i in linking:    # C wrote it, mapped it already
                return linking[first + i] | data | writable
            e = table[i]
            if not e:
                return absent
            if not e & rmask:
                off = e & Q.OFFSET_MASK
                if off + cs > eof or off >> bits in meta:
                    return 0
                if e & Q.OFLAG_COPIED and writable and first + i not in pending:
                    return off | data | writable
                return off | data
            return zero if e & zmask == Q.OFLAG_ZERO else 0
        if indices is None:
            cmap.fill(first, [value(i) for i in range(n)])
        else:
            for i in indices:
                if i < n:
                    cmap.fill(first + i, [value(i)])

    def c_image(self):
        """Driver.c_image: the mirror of the L2 entries; a writable leaf in lazy mode
        (the dirty bit: its reserve leaks at most in a crash) with its chain lets C
        allocate clusters too (_c_setup)."""
        if self.cmap is None or self.file is None:
            return None
        if self.calloc is None:
            with self._qlock:           # (connections take the chain in parallel)
                if self.calloc is None and self._c_may_allocate():
                    self._c_setup()
        return self.cmap.image

    # -- the C loop's allocations (native.CAlloc, smtap_nbd.c) -------------------------------
    # C writes a cluster whole (the chain's data around the request's) into one of the
    # reserve's clusters (refcounted here, linked nowhere), then its L2 entry into a
    # table of the image's own (as qemu orders it: data, then the table; through the
    # page cache, as this driver writes its tables), maps it and logs it; here the log
    # goes into the cached tables (_c_links) before any lookup of them. C allocates
    # only while one connection serves the image, whose Python runs once C drained:
    # nothing of the driver's changes under it (no allocation of ours in flight, no
    # table read or written).
    def _c_may_allocate(self):
        img = self.img
        return (not self.readonly and img.lazy and img.dirty and
                (img.backing_file is None or self.parent is not None))

    def c_alloc(self):
        """Driver.c_alloc: the CAlloc connections count themselves on (c_image first)."""
        return self._ca if self.calloc is not None else None

    def _c_setup(self):
        # one CAlloc for the driver's life: connections count themselves on it across
        # a pause (they part from it when they take the resumed chain, and keep it)
        ca = self._ca = self._ca or native.CAlloc()
        self._creserve = (ctypes.c_longlong * C_RESERVE)()
        self._clog = (ctypes.c_longlong * (2 * C_LOG))()
        self._clost = set()
        self._crefill_at = 0.0
        ca.reserve, ca.log = ctypes.addressof(self._creserve), ctypes.addressof(self._clog)
        ca.nreserve = ca.nlog = 0
        ca.logcap, ca.absent_page = C_LOG, self.cmap.absent_page
        ca.l2off, ca.nl1, ca.l2bits = ctypes.addressof(self._l2off), len(self.img.l1), self.l2bits
        ca.meta_fd = self.file.bfd
        self.cmap.image.allocator = ctypes.addressof(ca)     # (the reserve: at a write)
        self.calloc = ca                # last: c_image reads it without the lock

    def _c_refill(self):
        """After a write of ours: the reserve topped up once low, the lowest clusters
        on top (C takes them first)."""
        ca = self.calloc
        if ca is None or ca.nreserve >= C_LOW or time.time() < self._crefill_at:
            return
        with self.img.lock:
            n = ca.nreserve
            if n >= C_LOW:
                return                  # (another connection's write topped it up)
            try:
                hosts, _ = self.img.alloc_data(C_RESERVE - n)
            except (Q.QCow2Error, OSError):
                self._crefill_at = time.time() + 1  # (full: allocations are the driver's)
                return
            for k, host in enumerate(reversed(hosts)):
                self._creserve[n + k] = host
            ca.nreserve = n + len(hosts)

    def _c_links(self):
        """C's allocations (its log) linked in their L2 entries: before any lookup of
        the tables, so that they show what C acknowledged."""
        ca = self.calloc
        if ca is None or not ca.nlog:
            return
        with self.img.lock:
            n = ca.nlog
            log = self._clog[:2 * n]
            hosts = {}
            for j in range(0, 2 * n, 2):
                gc, host = log[j], log[j + 1]
                if gc < 0:
                    self._clost.add(host)           # its I/O never completed
                    continue
                if gc in hosts:                     # (C allocates a cluster once)
                    self._clost.add(hosts[gc])
                hosts[gc] = host
            pending = self._pending
            for gc in hosts:
                rec = pending.get(gc)
                if rec is not None:     # a gen a failed session left: older, it loses
                    self._seq += 1
                    rec.top = self._seq
            entries = dict((gc, host | Q.OFLAG_COPIED) for gc, host in hosts.items())
            self._clinks = hosts        # (_mirror: a table read meanwhile)
            try:
                frees = self.img.set_entries(entries, written=True)
            except Q.QCow2Error as e:
                raise _error(e, self.path)
            finally:
                self._clinks = None
            ca.nlog = 0
            if frees:                   # (a preallocated zero cluster replaced)
                self._free(frees)

    def _c_close(self):
        """Close, C's allocations linked: the reserve and the lost clusters given back."""
        ca = self.calloc
        if ca is None or self.img is None:
            return
        self.cmap.image.allocator = None
        with self.img.lock:
            left = list(self._creserve[:ca.nreserve]) + sorted(self._clost)
            ca.nreserve = 0
            self._clost = set()
            if left:
                try:
                    self.img.give_back(left)
                except Q.QCow2Error as e:
                    raise _error(e, self.path)

    def close(self):
        """The deferred frees first, and the clusters of allocations that never got
        linked (their requests failed): the engine closes (and pauses) with no I/O in
        flight."""
        try:
            try:
                self._c_links()
            finally:
                if (self._deferred or self._pending) and self.img is not None:
                    with self.img.lock:
                        self._drop_failed(force=True)
                        self._reap(force=True)
                self._c_close()         # (last: it cuts the free clusters off the end)
        finally:
            self._deferred = []
            self._pending = {}
            self.calloc = None
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
        self._c_links()
        batch = self._enter()
        try:
            return self._preadv(requests)
        finally:
            batch.open = False

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
        self._c_links()
        batch = self._enter()
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
            self._leave(batch, requests)    # even one that failed midway: its I/O runs on

    # -- frees while queued I/O is in flight ----------------------------------------------
    # A request looks its clusters up without a lock, and its queued I/O runs on after
    # that, completed by its own connection's thread. So a free waits for no one (it is
    # made under the image's lock, which a lookup may need to load a table: waiting for
    # lookups there could deadlock): it is kept with the batches busy when it was made
    # (registered before their first lookup), and run (refcounts dropped, the clusters
    # reusable) once they all completed, at the next allocation, flush or close. A
    # crash meanwhile leaks the clusters at most (the dirty bit repairs it).
    _IDLE = _Batch()
    _IDLE.open = False

    def _enter(self):
        """A batch of requests about to look clusters up (_leave when queued)."""
        if self.readonly:
            return self._IDLE   # a parent: its clusters are never freed while open
        batch = _Batch()
        with self._qlock:
            batches = self._batches
            batches.append(batch)
            if len(batches) > self._prune_at:      # completed ones go, now and then
                batches = self._batches = [b for b in batches if b.busy()]
                self._prune_at = 2 * len(batches) + PRUNE
        return batch

    def _leave(self, batch, requests):
        if batch is not self._IDLE:
            batch.ops = [r[4] for r in requests if r[4].pending]
            batch.open = False

    def _free(self, frees):
        """The format's frees (under its lock): at once if no batch is busy, else once
        those that are completed (_reap). The map no longer points at them (_mirror):
        first the C requests that may have looked it up before are waited for."""
        if self.cmap is not None and self.cmap.guard is not None:
            native.guard_wait(self.cmap.guard)
        with self._qlock:
            busy = self._batches = [b for b in self._batches if b.busy()]
        if busy:
            self._deferred.append((frees, busy))
        else:
            self.img.free_clusters(frees)

    def _reap(self, force=False):
        """Run the deferred frees whose requests all completed (force: all of them, when
        nothing can be in flight). Under the image's lock."""
        keep = []
        for frees, batches in self._deferred:
            if force or not any(b.busy() for b in batches):
                try:
                    self.img.free_clusters(frees)
                except Q.QCow2Error as e:
                    raise _error(e, self.path)
            else:
                keep.append((frees, batches))
        self._deferred = keep

    def pread(self, length, offset):
        return bytes(self.preadv([(length, offset)])[0])

    def extents(self, length, offset):
        """From the L2 entries: data 0, zero clusters ZERO, unallocated HOLE|ZERO (in a
        chain, what the parent answers for)."""
        self._c_links()
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
        self._c_links()
        batch = self._enter()
        try:
            if not self._pwritev_fast(requests):
                self._pwritev_slow(requests)
        finally:
            batch.open = False
        self._c_refill()

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
        refcount 1 with no allocation in flight (no metadata to change), or None (the
        allocating path, which also reports a table pointing where it must not)."""
        bits, cmask, wmask = self.bits, self.cmask, self.wmask
        meta = self.img.meta
        eof = self.img.file_size
        pending = self._pending     # read before the entries: see _plan
        gc = offset >> bits
        if (offset + n - 1) >> bits == gc:
            if pending and gc in pending:
                return None
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
            if pending and g in pending:
                return None
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
        """Driver.queue_writes: writes into allocated clusters of refcount 1 queued as
        they are; allocating and copy-on-write ones queued too (_plan: the new clusters'
        refcounts written, their data with the rest of each cluster, then their L2
        entries in op.after, once it is written). What _plan cannot take (compressed,
        shared or preallocated zero clusters) runs on the synchronous path here."""
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: %s is open read-only" % self.path)
        afile = self.file
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        write = io.write
        slow = []
        self._c_links()
        batch = self._enter()
        try:
            for r in requests:
                length, offset, view, address, op = r
                pieces = self._in_place(offset, length)
                if pieces is None:
                    slow.append(r)
                    continue
                for phys, pos, k in pieces:
                    if direct and not (phys | k | (address + pos)) & mask:
                        write(fd, phys, k, address + pos, op)
                    else:
                        write(bfd, phys, k, address + pos, op, True)
            if slow:
                self._queue_allocating(io, slow)
        finally:
            self._leave(batch, requests)    # even one that failed midway: its I/O runs on
        self._c_refill()

    def _queue_allocating(self, io, requests):
        afile = self.file
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        write = io.write
        cs = self.cmask + 1
        sync = []
        with self.img.lock:
            plans = self._plan([(r[1], r[2], r[4]) for r in requests])
            for r, plan in zip(requests, plans):
                if plan is None:
                    sync.append((r[2], r[1]))
                    continue
                _, _, _, address, op = r
                pieces, gens = plan
                for phys, pos, k in _merged(pieces):
                    if direct and not (phys | k | (address + pos)) & mask:
                        write(fd, phys, k, address + pos, op)
                    else:
                        write(bfd, phys, k, address + pos, op, True)
                for g in gens:
                    if g.buf is not None:
                        if direct and not (g.host | g.buf[1]) & mask:
                            write(fd, g.host, cs, g.buf[1], op)
                        else:
                            write(bfd, g.host, cs, g.buf[1], op, True)
                if gens:
                    op.after = functools.partial(self._link, gens)
        if sync:
            self._pwritev_slow(sync)

    def _pwritev_slow(self, requests):
        """Allocating writes on the synchronous path, under the image's lock: _plan's
        (its clusters written in one batch, then linked), the rest plan_write's."""
        img = self.img
        cs = self.cmask + 1
        with img.lock:
            views = [memoryview(buf).cast("B") for buf, _ in requests]
            plans = self._plan([(offset, v, None) for (_, offset), v in zip(requests, views)])
            writes, gens, rest = [], [], []
            for (buf, offset), view, plan in zip(requests, views, plans):
                if plan is None:
                    rest.append((view, offset))
                    continue
                pieces, gs = plan
                for phys, pos, k in pieces:
                    writes.append((view[pos:pos + k], phys))
                for g in gs:
                    if g.buf is not None:
                        writes.append((g.buf[0][:cs], g.host))
                gens += gs
            if writes:
                writes.sort(key=lambda w: w[1])
                try:
                    self.file.pwritev(writes)
                except Exception:
                    self._abandon(gens)
                    raise
            if gens:
                self._link(gens)
            if rest:
                self._plan_write(rest)

    def _plan_write(self, requests):
        """The format's allocating write (plan_write: the clusters _plan leaves)."""
        img = self.img
        try:
            plan = img.plan_write([(offset, len(buf)) for buf, offset in requests])
            writes = img.fill_data(plan)
        except Q.QCow2Error as e:
            raise _error(e, self.path)
        at = {}
        for goff, n, host in plan.data:
            at[goff] = host
        for view, offset in requests:
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

    # -- allocations in flight ------------------------------------------------------------
    # A write to a cluster it must allocate gets a new cluster (a _Gen) whose content is
    # whole before its L2 entry is set: the data, and around it the cluster's content
    # until then (the backing chain's, zeros, or an earlier gen's still in flight, from
    # memory). Reads see the old entry until then, so the old data or the new, never a
    # half-written cluster. A second write to the cluster while the first is in flight
    # never writes into the first's cluster (the first's copy of the rest could land
    # over it): it gets a gen of its own, holding the first's data too, and whichever
    # is linked last of the two must be the newer (num), the older one is then freed.
    # So no write ever waits for another. A zero or trim of the whole cluster counts as
    # the newest change (top); a partial zero is a gen.
    _BACKING, _ZERO = "backing", "zero"

    def _plan(self, reqs):
        """Under the image's lock: reqs [(offset, data, op or None)] -> for each,
        ([(host offset, position, length)] to write from data, [_Gen] whose buf (if
        any) is written whole), or None for what plan_write must take. New clusters
        are allocated (refcounts written) and their gens registered in _pending."""
        img = self.img
        if self._deferred:
            self._reap()
        self._drop_failed()
        bits, cmask, wmask = self.bits, self.cmask, self.wmask
        cs = cmask + 1
        pending = self._pending
        parent = self.parent is not None
        orphan = img.backing_file is not None and not parent     # no chain to copy from
        out, new = [], []
        try:
            for offset, data, op in reqs:
                length = len(data)
                pieces, gens = [], []
                pos = 0
                while pos < length:
                    goff = offset + pos
                    gc = goff >> bits
                    inner = goff & cmask
                    k = min(length - pos, cs - inner)
                    rec = pending.get(gc)
                    base = rec.latest() if rec is not None else None
                    if base is None:
                        e = self._entry(gc)
                        if e & wmask == Q.OFLAG_COPIED:
                            phys = (e & Q.OFFSET_MASK) + inner
                            if phys >> bits in img.meta or phys >= img.file_size:
                                break       # plan_write reports it
                            pieces.append((phys, pos, k))
                            pos += k
                            continue
                        t = Q.cluster_type(e)
                        if t == Q.UNALLOCATED and parent:
                            base = self._BACKING
                        elif t == Q.ZERO_PLAIN or (t == Q.UNALLOCATED and not orphan):
                            base = self._ZERO
                        else:
                            break
                    g = _Gen()
                    self._seq += 1
                    g.gc, g.num, g.inner, g.pos, g.data, g.op, g.base = \
                        gc, self._seq, inner, pos, data[pos:pos + k], op, base
                    g.host = g.buf = None
                    if rec is None:
                        rec = pending[gc] = _Pending()
                    rec.gens.append(g)
                    gens.append(g)
                    pos += k
                if pos < length:
                    self._forget(gens)
                    out.append(None)
                    continue
                new += gens
                out.append((pieces, gens))
            if new:
                self._allocate(new, out)
        except Q.QCow2Error as e:
            self._abandon(new)
            raise _error(e, self.path)
        except Exception:
            self._abandon(new)
            raise
        return out

    def _allocate(self, new, out):
        """The clusters of the new gens and their content. One past the old end of the
        file (zeros) where the cluster read zeros before is linked at once: until its
        writes land it reads zeros, the old content; its writes (and those of the
        batch stacked on it) are then plain writes into it. A gen written whole by its
        data writes only that; others write their whole cluster from their buffer."""
        img = self.img
        cmask = self.cmask
        cs = cmask + 1
        for l1i in sorted(set(g.gc >> self.l2bits for g in new)):
            img.prepare_l2(l1i)
        own = set(new)
        first = [g for g in new if g.base not in own]
        hosts, old_end = img.alloc_data(len(first))
        for g, host in zip(first, hosts):
            g.host = host
        early = set(g for g in first if g.base is self._ZERO and g.host >= old_end)
        root = {}                       # a gen stacked on an early one -> that one
        rest = []
        for g in new:
            if g.host is None:
                r = root.get(g.base, g.base)
                if r in early:
                    root[g] = r
                else:
                    rest.append(g)
        if rest:
            hosts, _ = img.alloc_data(len(rest))
            for g, host in zip(rest, hosts):
                g.host = host
        if early:
            self._link_now(early, root)
        backing = []
        for g in new:
            if g in early or g in root or (not g.inner and len(g.data) == cs):
                continue
            g.buf = self._pool.get(cs)
            if g.base is self._BACKING:
                backing.append((cs, g.gc << self.bits, g.buf[0][:cs], g.buf[1]))
        if backing:
            _chain_read_into(self.parent, backing, self.file.arena().queue)
        for g in new:                   # in order: a gen's base may be the one before
            v = g.buf[0][:cs] if g.buf is not None else None
            if v is not None:
                if g.base is self._ZERO:
                    v[:] = driver.zeros(cs)
                elif g.base is not self._BACKING:
                    self._content(g.base, v)
                v[g.inner:g.inner + len(g.data)] = g.data
        for pieces, gens in (p for p in out if p is not None):
            keep = []
            for g in gens:
                if g.buf is None:       # the data alone, from the request's buffer
                    host = root[g].host if g in root else g.host
                    pieces.append((host + g.inner, g.pos, len(g.data)))
                if g in early or g in root:
                    self._release(g)
                else:
                    keep.append(g)
            gens[:] = keep

    def _link_now(self, early, root):
        """Link the early gens (and forget those stacked on them): their clusters read
        zeros, as the guest clusters did."""
        pending = self._pending
        entries = {}
        for g in sorted(list(early) + list(root), key=lambda g: g.num):
            rec = pending.get(g.gc)
            if rec is not None and g in rec.gens:
                rec.gens.remove(g)
                rec.top = max(rec.top, g.num)
                if not rec.gens:
                    del pending[g.gc]
            if g in early:
                entries[g.gc] = g.host | Q.OFLAG_COPIED
        frees = self.img.set_entries(entries)
        if frees:
            self._free(frees)

    def _content(self, g, v):
        """Gen g's content into v (a cluster's bytes)."""
        if g.buf is not None:
            v[:] = g.buf[0][:len(v)]
        else:
            v[:] = driver.zeros(len(v))
            v[g.inner:g.inner + len(g.data)] = g.data

    def _link(self, gens):
        """Once a request's new clusters are written (op.after; or at once on the
        synchronous path): each linked in its L2 entry, with those of every other
        request whose writes completed meanwhile (one table write for all), unless a
        newer change to its guest cluster was linked first (then it is freed: no table
        ever pointed at it). What a link replaces is freed once no request in flight
        can use it (_free)."""
        img = self.img
        cs = self.cmask + 1
        with img.lock:
            pending = self._pending
            ready = set(gens)
            for rec in pending.values():
                for g in rec.gens:
                    op = g.op
                    if op is not None and not op.pending and not op.error:
                        ready.add(g)
            entries, lost = {}, []
            linked = {}
            for g in sorted(ready, key=lambda g: g.num):
                rec = pending.get(g.gc)
                if rec is not None and g in rec.gens:
                    rec.gens.remove(g)
                    if not rec.gens:
                        del pending[g.gc]
                    if g.num > rec.top:
                        rec.top = g.num
                        if g.gc in linked:          # an older one of this batch loses
                            lost.append((linked[g.gc], cs))
                        linked[g.gc] = g.host
                        entries[g.gc] = g.host | Q.OFLAG_COPIED
                    else:
                        lost.append((g.host, cs))
                self._release(g)
            try:
                if entries:
                    frees = img.set_entries(entries)
                    if frees:
                        self._free(frees)
                if lost:
                    img.free_clusters(lost)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def _release(self, g):
        if g.buf is not None:
            self._pool.put(g.buf)
            g.buf = None
        g.data = None

    def _forget(self, gens):
        """Gens registered but given no cluster: gone."""
        pending = self._pending
        for g in gens:
            rec = pending.get(g.gc)
            if rec is not None and g in rec.gens:
                rec.gens.remove(g)
                if not rec.gens:
                    del pending[g.gc]
            self._release(g)

    def _abandon(self, gens):
        """Gens whose writes will never be linked: gone, their clusters freed (no table
        points at them)."""
        self._forget(gens)
        frees = [(g.host, self.cmask + 1) for g in gens if g.host is not None]
        for g in gens:
            g.host = None
        if frees:
            try:
                self.img.free_clusters(frees)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def _drop_failed(self, force=False):
        """The gens whose requests failed (their I/O completed, no after: the engine
        redoes them on the synchronous path), or all that are left (force: at close)."""
        failed = []
        for rec in list(self._pending.values()):
            for g in list(rec.gens):
                op = g.op
                if force or (op is not None and op.error and not op.pending):
                    failed.append(g)
        if failed:
            self._abandon(failed)

    def _settle(self, offset, length, write_partial):
        """A zero (write_partial) or trim of [offset, offset + length) that meets
        allocations in flight: the whole clusters' become older than it (lost), a
        partial cluster's is zeroed by a gen here (write_partial) or left (a trim is
        advisory). Returns the ranges left for the format. Under the image's lock."""
        pending = self._pending
        if not pending:
            return [(offset, length)]
        bits, cmask = self.bits, self.cmask
        out = []
        pos, end = offset, offset + length
        while pos < end:
            gc = pos >> bits
            n = min(end, (gc + 1) << bits) - pos
            rec = pending.get(gc)
            if rec is not None:
                if not pos & cmask and (n == cmask + 1 or pos + n >= self.size):
                    self._seq += 1
                    rec.top = self._seq
                elif rec.latest() is not None:
                    if write_partial:
                        self._pwritev_slow([(driver.zeros(n), pos)])
                    pos += n
                    continue
            if out and sum(out[-1]) == pos:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((pos, n))
            pos += n
        return out

    def pwrite(self, buf, offset):
        self.pwritev([(buf, offset)])

    def zero(self, length, offset, may_trim=False):
        """Zeros that never show a parent: zero clusters (may_trim: their space freed),
        partial clusters written."""
        if self.readonly:
            raise OSError(errno.EROFS, "qcow2: %s is open read-only" % self.path)
        self._c_links()
        with self.img.lock:
            if self._deferred:
                self._reap()
            try:
                for off, n in self._settle(offset, length, True):
                    self.img.write_zeroes(off, n, unmap=may_trim)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def trim(self, length, offset):
        """Advisory: whole clusters freed (zero clusters under a parent); partial ones
        stay as they are."""
        if self.readonly:
            return
        self._c_links()
        with self.img.lock:
            if self._deferred:
                self._reap()
            try:
                for off, n in self._settle(offset, length, False):
                    self.img.discard(off, n)
            except Q.QCow2Error as e:
                raise _error(e, self.path)

    def flush(self):
        self._c_links()
        if self._deferred or self._pending:
            with self.img.lock:
                self._drop_failed()
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
