"""vhd: a VHD image (dynamic, differencing or fixed), as blktap's block-vhd serves it.

    vhd:/path/disk.vhd[?direct=0]

The format is smtap.formats.vhd's (footer, header, BAT, batmap, sector bitmaps,
locators, block allocation in upstream's crash-safe order, the strict footer); this
driver is the data path over it, on the libaio batch path aio uses (tapdisk/aiofile.py):
O_DIRECT when the file system takes it, buffered otherwise; metadata (small, unaligned)
through the buffered descriptor.

- A read-write open poisons the trailing footer (0xc7) until close or pause rewrites it;
  the backup footer at offset 0 stays valid, so `vhd-util repair` mends a crash.
- Reads: a batch maps to one libaio batch of physical runs (contiguous ones merged);
  a block the batmap says full (or whose bitmap was seen full) needs no bitmap; other
  bitmaps are cached. Holes read as zeros; in a chain the engine reads them from the
  parent (extents() says which, exactly, from the BAT and the bitmaps).
- The NBD loop's C part (c_image) reads the block map: full blocks in place, absent ones
  from the parent, and a partial block's sectors here or in the parent as its bitmap
  says, once this driver has read that bitmap (the first C_BITMAPS bytes of them are
  given to C and kept till close: C reads them in place, _set_bits changes them; then
  BITMAP_CACHE bytes more, evicted as needed, are Python's).
- Writes (sector aligned: the engine widens others, write_align): new blocks first
  (footer moved past, zeroed bitmap, BAT entry), then the data, then the bitmaps, then
  the batmap bit of a block that became full: a kill -9 at any point leaves a valid
  image that holds every acknowledged write. flush = fdatasync of the file.
- write-zeroes zeroes or punches allocated data and sets its bitmap bits, so it never
  shows a parent's data; trim punches whole pages of allocated data and leaves the
  bitmaps: the region reads zeros, never a parent's or stale data.
- Parents come from the locators (relative to the child's directory first) and must
  carry the uuid the child names; a raw parent (null parent uuid) opens with aio.
- Virtual size up to 2040 GiB (the storage layer's limit); larger is refused.
"""
import errno
import functools
import os
import threading
from array import array

from smtap.formats import vhd as V
from smtap.tapdisk import aiofile
from smtap.tapdisk import driver, native
from smtap.tapdisk.drivers import register

UNUSED = V.DD_BLK_UNUSED
HOLE = driver.EXTENT_HOLE | driver.EXTENT_ZERO
MAX_EXTENTS = 256           # per extents() call
MAX_SCAN = 1 << 15          # blocks one extents() call looks at
BITMAP_CACHE = 32 << 20     # bytes of partial bitmaps kept in memory, once C's are in
C_BITMAPS = 16 << 20        # the first ones, the C loop's (it reads them in place)
# bit i of a byte, MSB first, as one byte each: the batmap expanded to a flag per block
_EXPAND = [bytes((b >> (7 - i)) & 1 for i in range(8)) for b in range(256)]


class _MetaIO(V.PosixFile):
    """The format layer's file interface on the driver's buffered descriptor: metadata
    writes are small and unaligned. (A direct read of a range writes back what the page
    cache holds of it first, so the data path sees them.)"""

    def __init__(self, afile, writable):
        self.fd = afile.bfd
        self.is_block = afile.block_device
        self.writable = writable

    def flush(self):
        os.fdatasync(self.fd)

    def close(self):
        pass        # the driver's AioFile owns the descriptor


def _error(e, path):
    return aiofile.format_error(e, path, "vhd")


@register
class VhdDriver(aiofile.ImageFileDriver, driver.Driver):
    format_error_type = V.VHDError
    name = "vhd"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True       # flush is fdatasync of the one file: every client's writes
    write_align = V.SECTOR      # sector bitmaps: the engine widens unaligned writes
    trim_hides_parent = True    # trimmed data reads zeros, its bitmap bits stay set
    can_queue = True
    options = {"direct": driver.parse_bool}     # direct=0: never O_DIRECT (as -D)

    def __init__(self):
        super(VhdDriver, self).__init__()
        self.file = self.img = None
        self._lock = threading.Lock()   # allocation, bitmap and batmap updates

    # -- open / close ------------------------------------------------------------------
    def open(self, path, flags, options):
        self.path, self.flags = path, flags
        writable = not flags & driver.OPEN_RDONLY
        direct = not flags & driver.OPEN_NO_O_DIRECT and options.get("direct", True)
        self.file = aiofile.AioFile(path, writable, direct, what="vhd")
        try:
            try:
                self.img = V.VHD(path, writable=writable, io=_MetaIO(self.file, writable))
            except V.VHDError as e:
                raise _error(e, path)
            img = self.img
            if img.size > V.MAX_VHD_SIZE:
                raise OSError(errno.EFBIG, "vhd: %s: virtual size %d GiB is over the VHD "
                              "limit of %d GiB" % (path, img.size >> 30, V.MAX_VHD_SIZE >> 30))
            if img.dynamic and img.block_size < V.PAGE:
                raise OSError(errno.EINVAL, "vhd: %s: block size %d is below %d bytes"
                              % (path, img.block_size, V.PAGE))
            self._check_layout(img)
            self._setup(img)
            if writable:
                img.ordered = False     # no barrier per new block: writes keep their order
                img.poison_footer()     # strict, as tapdisk: until close or pause
        except Exception:
            self.close()
            raise

    def _check_layout(self, img):
        """Refuse an image whose blocks lie outside the file, over its headers or over
        each other (vhd-util check's BAT rules), or a fixed one longer than its file:
        I/O through it would land there (a footer moved far past the end, metadata
        overwritten by data), so nothing is written to it."""
        eof = img.io.size()
        if not img.dynamic:
            if img.size > img.footer_offset:
                raise OSError(errno.EINVAL, "vhd: %s: fixed disk of %d bytes in a file of %d"
                              % (self.path, img.size, eof))
            return
        used = sorted(off for off in img.bat if off != UNUSED)
        if not used:
            return
        per = img.spb + img.bm_secs
        if used[0] * V.SECTOR < img.end_of_headers():
            raise OSError(errno.EINVAL, "vhd: %s: a block at sector %d overlaps the headers"
                          % (self.path, used[0]))
        if (used[-1] + per) * V.SECTOR > eof:
            raise OSError(errno.EINVAL, "vhd: %s: a block at sector %d is past the end of "
                          "the file" % (self.path, used[-1]))
        for a, b in zip(used, used[1:]):
            if b - a < per:
                raise OSError(errno.EINVAL, "vhd: %s: blocks at sectors %d and %d overlap"
                              % (self.path, a, b))

    def _setup(self, img):
        self.size = img.size
        self.dynamic = img.dynamic
        self.readonly = not img.writable
        self.bitmaps = {}       # blk -> bytearray: bitmaps seen partial
        self.c_bitmaps = {}     # the same, given to the C loop: kept till close
        self._gen = 0           # bitmap writes so far: a read racing one must not cache
        if not self.dynamic:
            return
        bs = img.block_size
        self.bs, self.shift, self.bmask = bs, bs.bit_length() - 1, bs - 1
        self.bm_bytes = img.bm_secs * V.SECTOR
        self.bat = img.bat          # the format's array: allocate_blocks updates it
        nblk = len(self.bat)
        spb = img.spb
        self._ones = (b"\xff" * (spb >> 3), (0xff00 >> (spb & 7)) & 0xff)
        self._cache_max = max(64, BITMAP_CACHE // self.bm_bytes)
        self._c_bitmaps_max = C_BITMAPS // self.bm_bytes
        # full[blk]: every sector present, no bitmap needed (the batmap, or a full bitmap)
        if img.batmap_map is not None:
            expand = _EXPAND
            flags = b"".join([expand[b] for b in bytes(img.batmap_map[:(nblk + 7) >> 3])])
            self.full = bytearray(flags[:nblk].ljust(nblk, b"\0"))
        else:
            self.full = bytearray(nblk)
        # the block map the NBD loop's C part reads (c_image): a full block's data (in
        # place, in a leaf), an unallocated one the parent's, the others this driver's
        self._data = native.E_DATA | (0 if self.readonly else native.E_WRITABLE)
        data, bmb, absent = self._data, self.bm_bytes, native.E_ABSENT
        entries = array("q", [absent if sec == UNUSED else ((sec << 9) + bmb) | data if f
                              else 0 for sec, f in zip(self.bat, self.full)])
        self.cmap = native.BlockMap(self.file, img.size, self.shift, entries=entries)

    def _data_entry(self, blk):
        """The map entry of allocated block blk's data (E_DATA, E_WRITABLE in a leaf)."""
        return ((self.bat[blk] << 9) + self.bm_bytes) | self._data

    def _mapped(self, blk):
        """Block blk is full: C may read (and in a leaf write) its data in place."""
        self.full[blk] = 1
        self.cmap.entries[blk] = self._data_entry(blk)

    def c_image(self):
        """Driver.c_image: a dynamic image's block map, a fixed one's file."""
        if self.file is None:
            return None
        return self.cmap.image if self.dynamic else native.file_image(self.file, self.size)

    # -- bitmaps ------------------------------------------------------------------------
    def _is_full(self, bm):
        whole, last = self._ones
        k = len(whole)
        return bm[:k] == whole and (not last or bm[k] & last == last)

    @staticmethod
    def _uniform(bm, first, last):
        """1 if bitmap bm has sectors [first, last) all set, 0 if all clear, else None."""
        b0, b1 = first >> 3, (last + 7) >> 3
        word = int.from_bytes(bm[b0:b1], "big")
        mask = ((1 << (last - first)) - 1) << ((b1 << 3) - last)
        bits = word & mask
        return 1 if bits == mask else (0 if not bits else None)

    def _cached(self, blk):
        bm = self.c_bitmaps.get(blk)
        return self.bitmaps.get(blk) if bm is None else bm

    def _bitmap(self, blk):
        """Block blk's bitmap, or None if it is full (then marked so). Without the lock:
        cached only if no bitmap was written meanwhile."""
        bm = self._cached(blk)
        if bm is not None:
            return bm
        gen = self._gen
        bm = self._read_bitmap(blk)
        if bm is None:
            return None
        with self._lock:
            if gen == self._gen and self._cached(blk) is None:
                self._cache(blk, bm)
        return bm

    def _read_bitmap(self, blk):
        try:
            bm = self.img.read_bitmap(blk)
        except V.VHDError as e:
            raise _error(e, self.path)
        if self._is_full(bm):
            self._mapped(blk)
            return None
        return bm

    def _cache(self, blk, bm):
        """Under the lock. The C loop's while it has room: then its entry says so (C
        reads the bits in place; this one copy is the one _set_bits changes)."""
        if len(self.c_bitmaps) < self._c_bitmaps_max and not self.full[blk]:
            self.c_bitmaps[blk] = bm
            self.cmap.set_bitmap(blk, bm)
            self.cmap.entries[blk] = self._data_entry(blk) | native.E_BITMAP
            return
        cache = self.bitmaps
        if len(cache) >= self._cache_max:
            del cache[next(iter(cache))]
        cache[blk] = bm

    def _set_bits(self, ranges):
        """[(blk, first sector, last sector + 1)] written: set their bitmap bits (data
        before bitmap), then the batmap bits of blocks that became full."""
        if not ranges:
            return
        full = self.full
        with self._lock:
            self._gen += 1
            touched = {}
            for blk, first, last in ranges:
                if full[blk]:
                    continue
                bm = touched.get(blk)
                if bm is None:
                    bm = self._cached(blk)
                    if bm is None:
                        bm = self._read_bitmap(blk)
                        if bm is None:
                            continue
                        self._cache(blk, bm)
                    touched[blk] = bm
                V.set_bits(bm, first, last)
            if not touched:
                return
            writes, newly_full = [], []
            bat = self.bat
            for blk, bm in touched.items():
                writes.append((bytes(bm), bat[blk] * V.SECTOR))
                if self._is_full(bm):
                    newly_full.append(blk)
            try:
                self.img.io.pwritev(writes)
            except V.VHDError as e:
                raise _error(e, self.path)
            for blk in newly_full:
                self._mapped(blk)
                self.bitmaps.pop(blk, None)     # (a C loop's stays: C may be reading it)
            if newly_full and self.img.batmap_map is not None:
                self._set_batmap(newly_full)

    def _set_batmap(self, blocks):
        """The batmap bits of full blocks: the sectors of the map they are in, then the
        header with its checksum (kept up to date by difference)."""
        img = self.img
        bmap, bh = img.batmap_map, img.batmap
        sectors = set()
        delta = 0
        for blk in blocks:
            i = blk >> 3
            if i >= len(bmap):
                continue
            old = bmap[i]
            V.set_bit(bmap, blk)
            delta += bmap[i] - old
            sectors.add(i // V.SECTOR)
        if not sectors:
            return
        if bh.batmap_version == V.BATMAP_VERSION:
            bh.checksum = (bh.checksum - delta) & 0xFFFFFFFF
        else:
            bh.checksum = img.batmap_checksum()
        io = img.io
        for s in sorted(sectors):
            io.pwrite(bytes(bmap[s * V.SECTOR:(s + 1) * V.SECTOR]),
                      bh.batmap_offset + s * V.SECTOR)
        img.write_batmap_header()

    # -- reads ----------------------------------------------------------------------------
    def preadv(self, requests):
        afile = self.file
        if not self.dynamic:
            return afile.preadv(requests)
        bat, full, shift, bmask, bmb = self.bat, self.full, self.shift, self.bmask, self.bm_bytes
        req = []            # flat (file offset, length, buffer position) triples
        zeros = []          # (buffer position, length) of holes
        pos = acc = 0
        end = -1            # file offset just past the last run (to merge into it)
        for length, offset in requests:
            blk = offset >> shift
            sec = bat[blk]
            if sec != UNUSED and full[blk] and (offset + length - 1) >> shift == blk:
                phys = (sec << 9) + bmb + (offset & bmask)
                if phys == end:
                    req[-2] += length
                else:
                    req += (phys, length, pos)
                end = phys + length
                acc |= phys | length
            else:
                acc |= self._map(offset, length, pos, req, zeros)
                end = -1
            pos += length
        view = afile.batch(0, req, pos, buffered=not afile.direct or bool(acc & afile.mask)) \
            if req else afile.arena().buffer(0, pos).view
        zero = driver.zeros
        for zpos, zlen in zeros:
            view[zpos:zpos + zlen] = zero(zlen)
        return afile.views(view, requests)

    def _map(self, offset, length, pos, req, zeros):
        """Runs of [offset, offset + length) at buffer position pos: present ones into
        req, holes into zeros. Returns the OR of offsets and lengths (alignment)."""
        bat, full, bs, shift, bmask, bmb = (self.bat, self.full, self.bs, self.shift,
                                            self.bmask, self.bm_bytes)
        acc = 0
        while length:
            blk = offset >> shift
            boff = offset & bmask
            n = min(length, bs - boff)
            sec = bat[blk]
            if sec == UNUSED:
                zeros.append((pos, n))
            else:
                base = (sec << 9) + bmb
                bm = None if full[blk] else self._bitmap(blk)
                state = 1 if bm is None else self._uniform(bm, boff >> 9, (boff + n + 511) >> 9)
                if state == 1:
                    req += (base + boff, n, pos)
                    acc |= base + boff | n
                elif state == 0:
                    zeros.append((pos, n))
                else:
                    for s, e, bit in V.bit_runs(bm, boff >> 9, (boff + n + 511) >> 9):
                        s, e = max(s << 9, boff), min(e << 9, boff + n)
                        if bit:
                            req += (base + s, e - s, pos + s - boff)
                            acc |= base + s | (e - s) | (pos + s - boff)
                        else:
                            zeros.append((pos + s - boff, e - s))
            offset += n
            pos += n
            length -= n
        return acc

    def _queue_in_full_blocks(self, submit, requests):
        """The requests inside one full block: one I/O each, submitted (io.read or
        io.write); the others returned, for the BAT and the bitmaps."""
        bat, full, shift, bmask, bmb = self.bat, self.full, self.shift, self.bmask, self.bm_bytes
        afile = self.file
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        rest = []
        for req in requests:
            length, offset, _, address, op = req
            blk = offset >> shift
            sec = bat[blk]
            if sec != UNUSED and full[blk] and (offset + length - 1) >> shift == blk:
                phys = (sec << 9) + bmb + (offset & bmask)
                if direct and not (phys | length) & mask:
                    submit(fd, phys, length, address, op)
                else:
                    submit(bfd, phys, length, address, op, True)
            else:
                rest.append(req)
        return rest

    def queue_reads(self, io, requests):
        """Driver.queue_reads: a request inside one full block is one I/O; others are
        mapped through the BAT and bitmaps into I/O for what is present and zeros for
        the rest."""
        afile = self.file
        if not self.dynamic:
            return afile.queue_reads(io, requests)
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        read, zero = io.read, driver.zeros
        for length, offset, view, address, op in self._queue_in_full_blocks(read, requests):
            req, zeros = [], []
            align = self._map(offset, length, 0, req, zeros)    # (never short-circuited)
            buffered = not direct or bool(align & mask)
            rfd = bfd if buffered else fd
            for i in range(0, len(req), 3):
                read(rfd, req[i], req[i + 1], address + req[i + 2], op, buffered)
            for zpos, zlen in zeros:
                view[zpos:zpos + zlen] = zero(zlen)

    def pread(self, length, offset):
        return bytes(self.preadv([(length, offset)])[0])

    def extents(self, length, offset):
        """From the BAT and the bitmaps: present runs 0, the rest HOLE|ZERO (in a chain,
        what the parent answers for). A fixed image: the file's own holes."""
        length = min(length, self.size - offset)
        if not self.dynamic:
            return [(n, 0 if is_data else HOLE) for n, is_data in self.file.extents(length, offset)]
        blk = offset >> self.shift
        sec = self.bat[blk]
        if length <= self.bs - (offset & self.bmask):       # one block: the usual case
            if sec == UNUSED:
                return [(length, HOLE)]
            if self.full[blk]:
                return [(length, 0)]
            bm = self._bitmap(blk)
            boff = offset & self.bmask
            state = 1 if bm is None else self._uniform(bm, boff >> 9, (boff + length + 511) >> 9)
            if state is not None:
                return [(length, 0 if state else HOLE)]
        out = []
        end = offset + length
        pos = offset
        scan = 0
        while pos < end and len(out) < MAX_EXTENTS and scan < MAX_SCAN:
            blk = pos >> self.shift
            boff = pos & self.bmask
            n = min(end - pos, self.bs - boff)
            sec = self.bat[blk]
            if sec == UNUSED:
                runs = [(n, HOLE)]
            elif self.full[blk]:
                runs = [(n, 0)]
            else:
                bm = self._bitmap(blk)
                if bm is None:
                    runs = [(n, 0)]
                else:
                    runs = []
                    for s, e, bit in V.bit_runs(bm, boff >> 9, (boff + n + 511) >> 9):
                        s, e = max(s << 9, boff), min(e << 9, boff + n)
                        runs.append((e - s, 0 if bit else HOLE))
            for rlen, flags in runs:
                if out and out[-1][1] == flags:
                    out[-1] = (out[-1][0] + rlen, flags)
                else:
                    out.append((rlen, flags))
            pos += n
            scan += 1
        return out

    # -- writes ---------------------------------------------------------------------------
    def _pieces(self, length, offset):
        """(blk, offset in block, length) pieces of a range."""
        shift, bmask, bs = self.shift, self.bmask, self.bs
        out = []
        while length:
            blk, boff = offset >> shift, offset & bmask
            n = min(length, bs - boff)
            out.append((blk, boff, n))
            offset += n
            length -= n
        return out

    def _allocate(self, blocks):
        """Allocate the blocks of {blk: zero the data?} not allocated yet."""
        bat = self.bat
        with self._lock:
            new = dict((blk, zero) for blk, zero in blocks.items() if bat[blk] == UNUSED)
            if new:
                entries = self.cmap.entries
                for blk in new:
                    entries[blk] = 0    # the driver's now, not the parent's
                try:
                    self.img.allocate_blocks(new)   # one footer write for all of them
                except V.VHDError as e:
                    raise _error(e, self.path)

    def pwritev(self, requests):
        if self.readonly:
            raise OSError(errno.EROFS, "vhd: %s is open read-only" % self.path)
        afile = self.file
        if not self.dynamic:
            return afile.pwritev(requests)
        bat, full, shift, bmask, bmb = self.bat, self.full, self.shift, self.bmask, self.bm_bytes
        writes = []
        slow = None
        for buf, offset in requests:
            n = len(buf)
            blk = offset >> shift
            sec = bat[blk]
            if sec != UNUSED and full[blk] and (offset + n - 1) >> shift == blk:
                writes.append((buf, (sec << 9) + bmb + (offset & bmask)))
            else:
                if slow is None:
                    slow = []
                slow.append((buf, offset))
        if slow is None:
            afile.pwritev(writes)
            return
        pieces = []
        new = {}
        for buf, offset in slow:
            view = memoryview(buf).cast("B")
            pos = 0
            for blk, boff, n in self._pieces(len(view), offset):
                pieces.append((blk, boff, n, view[pos:pos + n]))
                if bat[blk] == UNUSED:  # zero the data unless written whole
                    new[blk] = new.get(blk, True) and n != self.bs
                pos += n
        if new:
            self._allocate(new)
        bits = []
        for blk, boff, n, piece in pieces:
            writes.append((piece, (bat[blk] << 9) + bmb + boff))
            if not full[blk]:
                bits.append((blk, boff >> 9, (boff + n) >> 9))
        afile.pwritev(writes)
        self._set_bits(bits)

    def queue_writes(self, io, requests):
        """Driver.queue_writes: new blocks allocated here (metadata, in order, under the
        lock), the data queued, the bitmap bits set once it is written (op.after)."""
        if self.readonly:
            raise OSError(errno.EROFS, "vhd: %s is open read-only" % self.path)
        afile = self.file
        if not self.dynamic:
            return afile.queue_writes(io, requests)
        bat, full, bmb = self.bat, self.full, self.bm_bytes
        fd, bfd, mask, direct = afile.fd, afile.bfd, afile.mask, afile.direct
        write = io.write
        for length, offset, view, address, op in self._queue_in_full_blocks(write, requests):
            pieces = self._pieces(length, offset)
            new = dict((b, n != self.bs) for b, _, n in pieces if bat[b] == UNUSED)
            if new:
                self._allocate(new)     # zero the data unless written whole
            bits = []
            pos = 0
            for b, boff, n in pieces:
                phys = (bat[b] << 9) + bmb + boff
                if direct and not (phys | n | pos) & mask:
                    write(fd, phys, n, address + pos, op)
                else:
                    write(bfd, phys, n, address + pos, op, True)
                if not full[b]:
                    bits.append((b, boff >> 9, (boff + n) >> 9))
                pos += n
            if bits:
                op.after = functools.partial(self._set_bits, bits)

    def pwrite(self, buf, offset):
        self.pwritev([(buf, offset)])

    def zero(self, length, offset, may_trim=False):
        """Zeros that hide a parent: allocated data zeroed (or punched) and its bitmap
        bits set; a differencing image allocates what it does not hold yet. A base
        image's unallocated blocks read as zeros already."""
        if self.readonly:
            raise OSError(errno.EROFS, "vhd: %s is open read-only" % self.path)
        if not self.dynamic:
            return self.file.zero(length, offset, may_trim)
        pieces = self._pieces(length, offset)
        bat = self.bat
        if self.img.type == V.HD_TYPE_DIFF:
            new = {blk: True for blk, _, _ in pieces if bat[blk] == UNUSED}
            if new:
                self._allocate(new)
        bits = []
        for blk, boff, n in pieces:
            sec = bat[blk]
            if sec == UNUSED:
                continue
            self.file.zero(n, (sec << 9) + self.bm_bytes + boff, may_trim)
            if not self.full[blk]:
                bits.append((blk, boff >> 9, (boff + n) >> 9))
        self._set_bits(bits)

    def trim(self, length, offset):
        """Advisory: whole pages of allocated data punched (they read zeros); bitmaps
        and the BAT stay as they are."""
        if self.readonly:
            return
        if not self.dynamic:
            return self.file.trim(length, offset)
        for blk, boff, n in self._pieces(length, offset):
            sec = self.bat[blk]
            if sec == UNUSED:
                continue
            start = (sec << 9) + self.bm_bytes + boff
            first = -(-start // V.PAGE) * V.PAGE
            last = (start + n) // V.PAGE * V.PAGE
            if first < last:
                self.file.trim(last - first, first)

    def flush(self):
        self.file.flush()

    # -- chains ---------------------------------------------------------------------------
    def get_parent_id(self):
        img = self.img
        if img.type != V.HD_TYPE_DIFF:
            return None
        try:
            path = img.parent_path()
        except V.VHDError as e:
            raise _error(e, self.path)
        return ("aio:" if img.parent_is_raw else "vhd:") + path

    def validate_parent(self, parent):
        img = self.img
        if img.parent_is_raw:
            if parent.name != "aio":
                raise OSError(errno.EINVAL, "vhd: %s has a raw parent, not %s:%s"
                              % (self.path, parent.name, parent.path))
            return
        pimg = getattr(parent, "img", None)
        if pimg is None:
            raise OSError(errno.EINVAL, "vhd: the parent of %s is not a VHD: %s:%s"
                          % (self.path, parent.name, parent.path))
        try:
            img.validate_parent(pimg)
        except V.VHDError as e:
            raise _error(e, self.path)

    def debug(self):
        img = self.img
        if img is None:
            return {}
        return {"type": V.TYPE_NAMES.get(img.type), "direct": self.file.direct,
                "block_size": img.block_size, "bitmaps_cached": len(self.bitmaps),
                "bitmaps_c": len(self.c_bitmaps)}
