"""ram: the whole disk in memory, sparse.

    ram:/path/seed.img[?size=<bytes>][&budget=<bytes>][&writeback=1]
    ram:/tmpfs/disk.img?shared=1[&budget=<bytes>]

Private (the default): the disk lives in one anonymous private mapping; regions never
written cost no memory, nor does the per-chunk bookkeeping of regions never written
(it is mapped the same way). The image file gives the size and is loaded at open as the
seed (holes and zero blocks cost nothing); `size=` sets the size (needed when the file
does not exist). Volatile by default (kept across a pause, gone at close); with
`writeback=1` flush, pause and close write the changed chunks back to the file (runs of
zeros are punched as holes).

Shared (`shared=1`): the disk IS a file on tmpfs, served through a shared mapping of
its pages, so its data is held once (the file's pages) and writes land in the file:
nothing to write back, a pause leaves the file complete. Chunks are allocated in the
file (fallocate) before the first write into them, so a full tmpfs is ENOSPC for that
write, never a SIGBUS; chunks not known to be wholly allocated are read with pread
(a page fault on a tmpfs hole would allocate it).

Memory is accounted in chunks of 64 KiB against `budget` (default: the disk size); a
write that needs a new chunk past the budget fails with ENOSPC. trim and zero give
whole chunks back to the kernel. Sizes take the suite's suffixes (64M, 2GiB: smtap.units).
"""
import errno
import mmap
import os
import stat
import threading

from smtap import sparse
from smtap import units
from smtap.tapdisk import driver, native
from smtap.tapdisk.drivers import register

CHUNK_SHIFT = 16
CHUNK = 1 << CHUNK_SHIFT
_ZERO_CHUNK = bytes(CHUNK)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _bitmap(n):
    """n bytes of zeros that cost memory only where written (a private anonymous mapping:
    reads of untouched pages see the kernel's zero page), so an empty disk's per-chunk
    bookkeeping costs nothing."""
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)


def _runs(flags, start, end):
    """[(first, last + 1, value)] runs of equal bytes in flags[start:end]."""
    out = []
    i = start
    while i < end:
        value = flags[i]
        j = flags.find(b"\1" if not value else b"\0", i, end)
        j = end if j < 0 else j
        out.append((i, j, value))
        i = j
    return out


@register
class RamDriver(driver.Driver):
    name = "ram"
    can_write = True
    can_flush = True
    can_trim = True
    can_zero = True
    can_extents = True
    can_multi_conn = True
    options = {"size": units.parse_size, "budget": units.parse_size,
               "writeback": driver.parse_bool, "shared": driver.parse_bool}

    def __init__(self):
        super(RamDriver, self).__init__()
        self._map = None
        self._mv = None
        self._fd = None             # shared: the file whose pages are the disk
        self.writeback = False
        self._lock = threading.Lock()
        # the C loop copies into allocated chunks without a lock: a chunk given back
        # (zero, trim) is first marked free, then C's copies begun before are waited for
        self._guard = native.new_guard()

    # -- open / close ---------------------------------------------------------------
    def open(self, path, flags, options):
        self.path = path
        self.flags = flags
        self.writeback = options.get("writeback", False)
        if options.get("shared"):
            return self._open_shared(path, flags, options)
        try:
            st_size = self._file_size(path)
        except OSError as e:
            if e.errno != errno.ENOENT or "size" not in options:
                raise
            st_size = None
        self.size = options.get("size", st_size)
        if not self.size:
            raise OSError(errno.EINVAL, "ram: %s is empty: give size= for a disk of zeros" % path)
        self.budget = options.get("budget", self.size)
        nchunks = (self.size + CHUNK - 1) >> CHUNK_SHIFT
        self._alloc = _bitmap(nchunks)     # 1: chunk holds memory
        self._dirty = _bitmap(nchunks)     # 1: chunk changed since the last writeback
        self.used = 0
        self._map = mmap.mmap(-1, nchunks << CHUNK_SHIFT,
                              flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
        self._mv = memoryview(self._map)
        self._addr = native.address(self._map)
        try:
            if st_size:
                self._load(min(st_size, self.size))
        except Exception:
            self.close()
            raise

    def _open_shared(self, path, flags, options):
        if self.writeback:
            raise ValueError("ram: shared=1 writes into %s itself: writeback=1 does not apply"
                             % path)
        readonly = bool(flags & driver.OPEN_RDONLY)
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, "ram: cannot open %s: %s" % (path, e.strerror))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "ram: shared=1 needs a file; %s is not one" % path)
            if native.fs_type(fd) != native.TMPFS_MAGIC:
                raise OSError(errno.EINVAL, "ram: shared=1 serves the pages of a file in RAM; "
                              "%s is not on tmpfs" % path)
            if not st.st_size:
                raise OSError(errno.EINVAL, "ram: %s is empty" % path)
            if options.get("size", st.st_size) != st.st_size:
                raise ValueError("ram: shared=1 serves %s as it is (%d bytes), not size=%d"
                                 % (path, st.st_size, options["size"]))
            self.size = st.st_size
            self.budget = options.get("budget", self.size)
            nchunks = (self.size + CHUNK - 1) >> CHUNK_SHIFT
            # 1: the chunk is wholly allocated in the file, safe to touch through the mapping
            self._alloc = _bitmap(nchunks)
            self.used = 0
            for start, end in sparse.data_segments(fd, self.size):
                c0 = (start + CHUNK - 1) >> CHUNK_SHIFT
                c1 = (end >> CHUNK_SHIFT) if end < self.size else nchunks
                if c0 < c1:
                    self._alloc[c0:c1] = b"\1" * (c1 - c0)
                    self.used += (c1 - c0) << CHUNK_SHIFT
            prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
            self._map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=prot)
            self._mv = memoryview(self._map)
        except Exception:
            os.close(fd)
            self._map = self._mv = None
            raise
        self._fd = fd

    @staticmethod
    def _file_size(path):
        """The seed's size: a raw image file or a block device."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            hint = " (give size= for a disk of zeros)" if e.errno == errno.ENOENT else ""
            raise OSError(e.errno, "ram: cannot open %s: %s%s" % (path, e.strerror, hint))
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, "ram: %s is a directory, not a disk image" % path)
            if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
                raise OSError(errno.EINVAL, "ram: %s is neither a file nor a block device"
                              % path)
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def _load(self, size):
        """Copy the non-zero chunks of the seed file in."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, end in sparse.data_segments(fd, size):
                pos = start & ~(CHUNK - 1)
                while pos < end:
                    n = min(4 << 20, end - pos)
                    data = os.pread(fd, n, pos)
                    for i in range(0, len(data), CHUNK):
                        piece = data[i:i + CHUNK]
                        if piece != _ZERO_CHUNK[:len(piece)]:
                            self.pwrite(piece, pos + i)
                    pos += n
        finally:
            os.close(fd)
        self._dirty = _bitmap(len(self._alloc))     # the seed is not a change

    def close(self):
        if self._map is None:
            return
        try:
            if self.writeback and not self.flags & driver.OPEN_RDONLY:
                self.flush()
        finally:
            self._mv.release()
            try:
                self._map.close()
            except BufferError:
                pass        # a client still holds a read buffer: freed with it
            self._map = self._mv = None
            self._alloc = self._dirty = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def suspend(self):
        """A pause: a shared disk's file is complete, and with writeback the file gets
        everything: both are closed (the storage layer may copy the file, resume opens
        it again). A volatile disk's data is only here: kept."""
        if self.writeback or self._fd is not None:
            self.close()

    def resume(self, path, flags, options):
        if self._map is None:
            self.open(path, flags, options)

    # -- data path ------------------------------------------------------------------
    def pread(self, length, offset):
        if self._fd is not None and self._alloc.find(
                b"\0", offset >> CHUNK_SHIFT, ((offset + length - 1) >> CHUNK_SHIFT) + 1) >= 0:
            return self._pread_file(length, offset)
        return self._mv[offset:offset + length]

    def _pread_file(self, length, offset):
        """Shared, a range not wholly allocated: zeros if it is all hole, else read()
        (which, unlike a page fault, does not allocate the holes)."""
        try:
            hole = os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole = True
        return driver.zeros(length) if hole else os.pread(self._fd, length, offset)

    def preadv(self, requests):
        if self._fd is not None:
            pread = self.pread
            return [pread(length, offset) for length, offset in requests]
        mv = self._mv
        return [mv[offset:offset + length] for length, offset in requests]

    def pwrite(self, buf, offset):
        end = offset + len(buf)
        c0 = offset >> CHUNK_SHIFT
        c1 = ((end - 1) >> CHUNK_SHIFT) + 1
        if self._alloc.find(b"\0", c0, c1) >= 0:
            self._allocate(c0, c1)
        self._mv[offset:end] = buf
        if self.writeback:
            self._dirty[c0:c1] = b"\1" * (c1 - c0)

    def pwritev(self, requests):
        pwrite = self.pwrite
        for buf, offset in requests:
            pwrite(buf, offset)

    def _allocate(self, c0, c1):
        with self._lock:
            alloc = self._alloc
            need = alloc[c0:c1].count(0) << CHUNK_SHIFT
            if self.used + need > self.budget:
                raise OSError(errno.ENOSPC, "ram disk budget of %d bytes exhausted" % self.budget)
            if self._fd is not None:        # one call: tmpfs undoes it all if it fails
                start = c0 << CHUNK_SHIFT
                try:
                    os.posix_fallocate(self._fd, start, min(c1 << CHUNK_SHIFT, self.size) - start)
                except OSError as e:
                    raise OSError(e.errno, "ram: allocating in %s: %s" % (self.path, e.strerror))
            alloc[c0:c1] = b"\1" * (c1 - c0)
            self.used += need

    def flush(self):
        if self.writeback and not self.flags & driver.OPEN_RDONLY:
            self._writeback()

    def trim(self, length, offset):
        self.zero(length, offset, True)

    def zero(self, length, offset, may_trim=False):
        """Whole chunks go back to the kernel (they read as zeros); partial ones are
        cleared in place when they hold memory."""
        if self._fd is not None:
            return self._punch(length, offset)
        end = offset + length
        c0 = (offset + CHUNK - 1) >> CHUNK_SHIFT      # first whole chunk
        c1 = end >> CHUNK_SHIFT                        # past the last whole chunk
        if end == self.size:
            c1 = len(self._alloc)
        if c0 >= c1:
            self._clear(offset, end)
            return
        self._clear(offset, c0 << CHUNK_SHIFT)
        self._clear(c1 << CHUNK_SHIFT, end)
        with self._lock:
            alloc = self._alloc
            freed = [(first, last) for first, last, value in _runs(alloc, c0, c1) if value]
            for first, last in freed:
                alloc[first:last] = bytes(last - first)
                self.used -= (last - first) << CHUNK_SHIFT
            if freed:
                native.guard_wait(self._guard)
            for first, last in freed:
                native.madvise(self._addr + (first << CHUNK_SHIFT),
                               (last - first) << CHUNK_SHIFT, native.MADV_DONTNEED)
            if self.writeback:
                self._dirty[c0:c1] = b"\1" * (c1 - c0)

    def _punch(self, length, offset):
        """Shared: the range becomes a hole of the file (the kernel zeroes partial pages);
        every chunk it touches may now hold holes, so is no longer known allocated."""
        with self._lock:
            c0 = offset >> CHUNK_SHIFT
            c1 = ((offset + length - 1) >> CHUNK_SHIFT) + 1
            alloc = self._alloc
            for first, last, value in _runs(alloc, c0, c1):
                if value:                   # (untouched bookkeeping stays untouched)
                    alloc[first:last] = bytes(last - first)
                    self.used -= (last - first) << CHUNK_SHIFT
            native.guard_wait(self._guard)  # C's copies through the mapping, before
            try:
                native.fallocate(self._fd, native.FALLOC_FL_PUNCH_HOLE
                                 | native.FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                raise OSError(e.errno, "ram: punching a hole in %s: %s"
                              % (self.path, os.strerror(e.errno)))

    def _clear(self, start, end):
        """Zero bytes [start, end) inside chunks that hold memory."""
        while start < end:
            c = start >> CHUNK_SHIFT
            stop = min(end, (c + 1) << CHUNK_SHIFT)
            if self._alloc[c]:
                self._mv[start:stop] = bytes(stop - start)
                if self.writeback:
                    self._dirty[c] = 1
            start = stop

    def extents(self, length, offset):
        end = min(offset + length, self.size)
        if self._fd is not None:            # the file knows: chunks may be partly allocated
            return [(n, 0 if is_data else driver.EXTENT_HOLE | driver.EXTENT_ZERO)
                    for n, is_data in sparse.extents(self._fd, offset, end - offset, 64)]
        c0 = offset >> CHUNK_SHIFT
        c1 = ((end - 1) >> CHUNK_SHIFT) + 1
        out = []
        for first, last, value in _runs(self._alloc, c0, c1):
            start = max(first << CHUNK_SHIFT, offset)
            stop = min(last << CHUNK_SHIFT, end)
            out.append((stop - start, 0 if value else driver.EXTENT_HOLE | driver.EXTENT_ZERO))
        return out

    # -- writeback --------------------------------------------------------------------
    def _writeback(self):
        with self._lock:
            dirty = self._dirty
            runs = [(a, b) for a, b, v in _runs(dirty, 0, len(dirty)) if v]
            for a, b in runs:
                dirty[a:b] = bytes(b - a)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.lseek(fd, 0, os.SEEK_END) < self.size:
                os.ftruncate(fd, self.size)
            for a, b in runs:
                for first, last, data in self._data_runs(a, b):
                    start = first << CHUNK_SHIFT
                    stop = min(last << CHUNK_SHIFT, self.size)
                    if data:
                        sparse.pwrite_all(fd, self._mv[start:stop], start)
                    else:
                        try:
                            native.fallocate(fd, native.FALLOC_FL_PUNCH_HOLE
                                             | native.FALLOC_FL_KEEP_SIZE, start, stop - start)
                        except OSError:     # no hole punching here
                            sparse.pwrite_all(fd, bytes(stop - start), start)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _data_runs(self, a, b):
        """Split chunks [a, b) into runs of data (True) and zeros (False)."""
        alloc, mv = self._alloc, self._mv
        kinds = bytearray(b - a)
        for c in range(a, b):
            if alloc[c] and mv[c << CHUNK_SHIFT:(c + 1) << CHUNK_SHIFT] != _ZERO_CHUNK:
                kinds[c - a] = 1
        return [(a + x, a + y, v) for x, y, v in _runs(kinds, 0, b - a)]

    def c_image(self):
        """The disk's mapping, for the NBD loop's C part (Driver.c_image): it reads it
        (shared: only chunks wholly allocated in the file), writes only allocated chunks
        (new ones are accounted here) and marks them for the writeback, whose flushes
        stay here. A read-only shared mapping stays with the driver."""
        if self._map is None or (self._fd is not None and self.flags & driver.OPEN_RDONLY):
            return None
        return native.CImage(
            kind=native.IMG_MEM, size=self.size, base=native.address(self._map),
            alloc=native.address(self._alloc), shift=CHUNK_SHIFT, fd=-1,
            dirty=native.address(self._dirty) if self.writeback else None,
            guard=native.address(self._guard), shared=int(self._fd is not None))

    def debug(self):
        return {"allocated": self.used, "budget": self.budget, "writeback": self.writeback,
                "shared": self._fd is not None}
