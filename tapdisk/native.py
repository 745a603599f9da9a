"""The engine's native calls, through ctypes (the standard library: dom0 has no cffi).

- libsmtap-aio.so.1 (smtap_aio.c, built by aio_build.py): the I/O queue (io_uring or
  libaio; one call per loop turn submits, reaps and waits), and fstatfs's file system
  type; smtap_nbd.c: the NBD loop's common case (NbdLoop, nbd_serve) and the pause
  gate it shares with Python (Gate, ClientState);
- libc: fallocate (hole punching, zeroing) and madvise (giving RAM back), which
  Python 3.6's os and mmap lack.
ctypes releases the GIL during each call. Loaded on first use.
"""
import array
import ctypes
import mmap
import os

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libsmtap-aio.so.1")

MADV_DONTNEED = 4
TMPFS_MAGIC = 0x01021994
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_aio = _libc = None
_c_ll_p = ctypes.POINTER(ctypes.c_longlong)


def _load():
    global _aio, _libc
    if _aio is None:
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as e:
            raise OSError("cannot load %s (built by tapdisk/aio_build.py, `make build`): %s"
                          % (LIBRARY, e))
        lib.smtap_aio_depth.restype = ctypes.c_int
        lib.smtap_aio_depth.argtypes = []
        lib.smtap_queue_open.restype = ctypes.c_int
        lib.smtap_queue_open.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        lib.smtap_queue_close.restype = None
        lib.smtap_queue_close.argtypes = [ctypes.c_void_p]
        lib.smtap_queue_buffers.restype = None
        lib.smtap_queue_buffers.argtypes = [ctypes.c_void_p, _c_ll_p, _c_ll_p, ctypes.c_int]
        # smtap_queue_run: no argtypes (ctypes' conversions cost more than the call): it
        # takes the queue as a c_void_p and three Python ints (C ints)
        lib.smtap_queue_run.restype = ctypes.c_int
        for name, struct in (("nbd", NbdLoop), ("image", CImage), ("alloc", CAlloc)):
            sizeof = getattr(lib, "smtap_%s_sizeof" % name)
            sizeof.restype, sizeof.argtypes = ctypes.c_int, []
            if sizeof() != ctypes.sizeof(struct):
                raise OSError("%s: struct smtap_%s is %d bytes, %s %d: rebuild it"
                              % (LIBRARY, name, sizeof(), struct.__name__,
                                 ctypes.sizeof(struct)))
        lib.smtap_nbd_serve.restype = ctypes.c_int
        lib.smtap_nbd_serve.argtypes = [ctypes.c_void_p]
        lib.smtap_nbd_release.restype = None
        lib.smtap_nbd_release.argtypes = [ctypes.c_void_p]
        lib.smtap_guard_wait.restype = None
        lib.smtap_guard_wait.argtypes = [ctypes.c_void_p]
        for name in ("smtap_alloc_join", "smtap_alloc_part"):
            getattr(lib, name).restype = None
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.smtap_gate_set.restype = None
        lib.smtap_gate_set.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.smtap_fs_type.restype = ctypes.c_longlong
        lib.smtap_fs_type.argtypes = [ctypes.c_int]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.restype = ctypes.c_int
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                   ctypes.c_longlong]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc, _aio = libc, lib
    return _aio


def _raise(err, what):
    raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def aio_depth():
    """How many I/Os one queue keeps in the kernel."""
    return _load().smtap_aio_depth()


# smtap_aio.c's back ends, ops and wait modes
LIBAIO, IO_URING = 1, 2
BACKEND_NAMES = {LIBAIO: "libaio", IO_URING: "io_uring"}
OP_READ, OP_WRITE, OP_INLINE = 0, 1, 0x100
WAIT_NONE, WAIT_IO, WAIT_IO_OR_SOCKET = 0, 1, 2
FLAG_READABLE = 1


def queue_open(backend=0):
    """A new I/O queue on backend (0: io_uring if the kernel has it, else libaio):
    (handle, the back end it got)."""
    q = ctypes.c_void_p()
    r = _load().smtap_queue_open(backend, ctypes.byref(q))
    if r < 0:
        _raise(-r, "opening an I/O queue (%s)" % BACKEND_NAMES.get(backend, "any"))
    return q, r


def queue_close(q):
    _load().smtap_queue_close(q)


def queue_buffers(q, sub, done, maxdone):
    _load().smtap_queue_buffers(q, sub, done, maxdone)


def queue_run():
    """smtap_queue_run(q, n, wait, sockfd) (smtap_aio.c), the hot path: called directly,
    no wrapper."""
    return _load().smtap_queue_run


# -- the NBD loop's common case (smtap_nbd.c) ------------------------------------------
class Gate(ctypes.Structure):
    """A VBD's pause gate as C reads it (struct smtap_gate): held, and a generation
    that moves on at every hold. Set through gate_set only (it orders the store)."""
    _fields_ = [("held", ctypes.c_int), ("gen", ctypes.c_int)]


class ClientState(ctypes.Structure):
    """An NBD client as the gate sees it (struct smtap_client): written by its thread,
    in Python or in C."""
    _fields_ = [("busy", ctypes.c_int), ("inflight", ctypes.c_int)]
    __hash__ = object.__hash__      # a VBD keeps its clients in a set


NBD_SLOTS = 256         # smtap_nbd.c's SLOTS: requests in flight at most
# why nbd_serve returned (smtap_nbd.c's RET_*; < 0: -errno of the socket)
NBD_PYTHON, NBD_HELD, NBD_IDLE, NBD_EOF, NBD_GROW = range(1, 6)
SERVED_C = 6            # the counter (image.Chain.counters()) of requests C answered


class NbdFailed(ctypes.Structure):
    """A request whose I/O failed in C, handed back unanswered (struct smtap_failed)."""
    _fields_ = [("kind", ctypes.c_longlong), ("handle", ctypes.c_ulonglong),
                ("offset", ctypes.c_longlong), ("length", ctypes.c_longlong),
                ("flags", ctypes.c_longlong), ("addr", ctypes.c_longlong),
                ("error", ctypes.c_longlong)]


# Where an image's data is, for the C loop (struct smtap_image): Driver.c_image()
IMG_FILE, IMG_BLOCKS, IMG_MEM = 1, 2, 3
# a block map's entries (IMG_BLOCKS): 0 unknown (the driver's path), E_ABSENT (the
# parent's), E_ZERO, or E_DATA | the file offset of the block (512-aligned) [| E_WRITABLE:
# written in place, nothing else to change] [| E_BITMAP: a partial block, each sector
# here or the parent's as the bitmap BlockMap.set_bitmap gave says]; E_BUSY | E_ABSENT or
# E_ZERO: C allocates the block (CAlloc)
E_ABSENT, E_ZERO, E_DATA, E_WRITABLE, E_BITMAP, E_BUSY = 1, 2, 4, 8, 16, 32
MAP_PAGE_BITS = 12      # entries per page of a map: 1 << MAP_PAGE_BITS


class CImage(ctypes.Structure):
    """One image of a chain as the C loop reads it (struct smtap_image)."""
    _fields_ = [("kind", ctypes.c_longlong), ("size", ctypes.c_longlong),
                ("mask", ctypes.c_longlong), ("pages", ctypes.c_void_p),
                ("npages", ctypes.c_longlong), ("bitmaps", ctypes.c_void_p),
                ("base", ctypes.c_void_p),
                ("alloc", ctypes.c_void_p), ("dirty", ctypes.c_void_p),
                ("guard", ctypes.c_void_p), ("allocator", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("direct", ctypes.c_int),
                ("shift", ctypes.c_int), ("shared", ctypes.c_int)]


def file_image(afile, size):
    """A raw image's CImage: disk offset x at offset x of the file (aiofile.AioFile)."""
    return CImage(kind=IMG_FILE, size=size, mask=afile.mask, fd=afile.fd,
                  direct=int(afile.direct), shift=9)


class BlockMap(object):
    """A block map for the C loop (IMG_BLOCKS), the driver's to set; a store of one
    entry is atomic, and C may see either side of it for a request in flight.

    entries given (an array of "q", one per block, never resized): C reads it in
    place. Else the map is sparse, in pages made as fill() needs them, at most
    max_pages (past that, what is not mapped stays unknown): a page may be the one
    shared page of E_ABSENT entries until fill() writes into it."""

    PAGE = 1 << MAP_PAGE_BITS

    def __init__(self, afile, size, shift, entries=None, max_pages=0, guard=False):
        nblocks = (size + (1 << shift) - 1) >> shift
        npages = (nblocks + self.PAGE - 1) >> MAP_PAGE_BITS
        self.entries = entries
        self.pages = (ctypes.c_void_p * max(1, npages))()
        self._own = {}                  # page -> its array (a sparse map)
        self.max_pages = max_pages
        if entries is not None:
            base = entries.buffer_info()[0]
            for p in range(npages):
                self.pages[p] = base + (p << MAP_PAGE_BITS) * entries.itemsize
        self.guard = new_guard() if guard else None
        self._absent = array.array("q", [E_ABSENT]) * self.PAGE    # (shared: see absent)
        self.absent_page = self._absent.buffer_info()[0]
        self.bitmaps = (ctypes.c_void_p * max(1, npages))()
        self._bitmap_pages = {}         # page -> its array of bitmap addresses
        self._bitmap_views = []         # what keeps them: never freed, never resized
        self.image = CImage(kind=IMG_BLOCKS, size=size, mask=afile.mask,
                            pages=ctypes.addressof(self.pages), npages=npages,
                            bitmaps=ctypes.addressof(self.bitmaps),
                            guard=ctypes.addressof(self.guard) if guard else None,
                            fd=afile.fd, direct=int(afile.direct), shift=shift)

    def absent(self, first, count):
        """Blocks [first, first + count) hold nothing (whole pages of them: the shared
        page; the others through fill)."""
        p0 = (first + self.PAGE - 1) >> MAP_PAGE_BITS
        p1 = (first + count) >> MAP_PAGE_BITS
        for p in range(p0, p1):
            if p not in self._own:
                self.pages[p] = self.absent_page
        head = min(count, (p0 << MAP_PAGE_BITS) - first)
        if head > 0:
            self.fill(first, [E_ABSENT] * head)
        if p1 >= p0 and first + count > p1 << MAP_PAGE_BITS:
            tail = first + count - (p1 << MAP_PAGE_BITS)
            self.fill(p1 << MAP_PAGE_BITS, [E_ABSENT] * tail)

    def fill(self, first, values):
        """Entries of blocks first, first + 1, ... (a sequence of map entries)."""
        pos, n = 0, len(values)
        while pos < n:
            block = first + pos
            p, at = block >> MAP_PAGE_BITS, block & (self.PAGE - 1)
            k = min(n - pos, self.PAGE - at)
            page = self._page(p, k == self.PAGE)
            if page is not None:
                page[at:at + k] = array.array("q", values[pos:pos + k])
            pos += k

    def set_bitmap(self, block, bitmap):
        """Block block's sector bitmap (a bytearray whose bits are only ever set, in
        place) for an E_BITMAP entry: C reads it in place until the map is gone, so it
        stays (held here, pinned against resizing). Before the entry says E_BITMAP."""
        view = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        self._bitmap_views.append(view)
        p = block >> MAP_PAGE_BITS
        page = self._bitmap_pages.get(p)
        if page is None:
            page = self._bitmap_pages[p] = array.array("q", [0]) * self.PAGE
            self.bitmaps[p] = page.buffer_info()[0]
        page[block & (self.PAGE - 1)] = ctypes.addressof(view)

    def _page(self, p, whole):
        """Page p's own array, made if it has none (from what it read: unknown, or the
        shared absent page); None past max_pages: the page becomes unknown."""
        page = self._own.get(p)
        if page is not None:
            return page
        if len(self._own) >= self.max_pages:
            self.pages[p] = None            # not kept: C asks the driver
            return None
        shared = self.pages[p] == self.absent_page
        page = array.array("q", [E_ABSENT if shared and not whole else 0]) * self.PAGE
        self._own[p] = page
        self.pages[p] = page.buffer_info()[0]
        return page


class CAlloc(ctypes.Structure):
    """A leaf's blocks the C loop may allocate (struct smtap_alloc, smtap_nbd.c): the
    driver's reserve of refcounted blocks linked nowhere, the tables C may link them in
    (l2off: per L1 entry, its own L2 table's offset or 0), and the log of those C
    wrote, linked and mapped, (block, host offset) pairs, for the driver's cache."""
    _fields_ = [("users", ctypes.c_longlong), ("inflight", ctypes.c_longlong),
                ("reserve", ctypes.c_void_p), ("nreserve", ctypes.c_longlong),
                ("log", ctypes.c_void_p), ("nlog", ctypes.c_longlong),
                ("logcap", ctypes.c_longlong), ("absent_page", ctypes.c_void_p),
                ("l2off", ctypes.c_void_p), ("nl1", ctypes.c_longlong),
                ("l2bits", ctypes.c_longlong), ("meta_fd", ctypes.c_longlong)]


def alloc_join(calloc):
    """A connection about to serve the image (its C loop and its Python) counts itself
    on its CAlloc: C allocates only while one has joined; this waits for C's
    allocations in flight."""
    _load().smtap_alloc_join(ctypes.addressof(calloc))


def alloc_part(calloc):
    _load().smtap_alloc_part(ctypes.addressof(calloc))


def new_guard():
    """A guard for CImage.guard (smtap_guard_wait): the epoch, the C requests counted
    under each parity."""
    return (ctypes.c_longlong * 3)()


def guard_wait(guard):
    """The driver changed the map: wait for the C requests that may have looked it up
    before (smtap_guard_wait, without the GIL)."""
    _load().smtap_guard_wait(ctypes.addressof(guard))


class NbdLoop(ctypes.Structure):
    """One connection's C loop (struct smtap_nbd)."""
    _fields_ = [("buf", ctypes.c_void_p), ("cap", ctypes.c_longlong),
                ("have", ctypes.c_longlong), ("grow", ctypes.c_longlong),
                ("queue", ctypes.c_void_p), ("gate", ctypes.c_void_p),
                ("client", ctypes.c_void_p), ("acct", ctypes.c_void_p),
                ("size", ctypes.c_longlong),
                ("max_inflight", ctypes.c_longlong), ("max_bytes", ctypes.c_longlong),
                ("images", ctypes.c_void_p), ("nimages", ctypes.c_longlong),
                ("sockfd", ctypes.c_int), ("readonly", ctypes.c_int), ("structured", ctypes.c_int),
                ("nfailed", ctypes.c_int), ("failed", NbdFailed * NBD_SLOTS),
                ("priv", ctypes.c_void_p)]


def gate_set(gate, held):
    _load().smtap_gate_set(ctypes.addressof(gate), 1 if held else 0)


def nbd_serve():
    """smtap_nbd_serve(address of an NbdLoop): the hot call, no wrapper."""
    return _load().smtap_nbd_serve


def nbd_release(loop):
    """Free what the C loop keeps (buffers, the requests it handed back)."""
    _load().smtap_nbd_release(ctypes.addressof(loop))


def at(address, length):
    """A writable view of length bytes of C memory at address."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def fs_type(fd):
    """The type (f_type magic) of the file system holding fd."""
    t = _load().smtap_fs_type(fd)
    if t < 0:
        _raise(-t, "fstatfs")
    return t


def longlongs(n):
    """A C array of n long longs (offsets and lengths, results)."""
    return (ctypes.c_longlong * n)()


class AlignedBuffer(object):
    """size bytes, page aligned (O_DIRECT), in an anonymous mapping: `view` is a
    memoryview of it, `address` its address for C. Freed with the last reference, so a
    view a reply still holds keeps its memory alive."""

    def __init__(self, size):
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.map)
        self.address = address(self.map)


def address(buf):
    """The address of a writable buffer's memory; the ctypes export is dropped at once."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def fallocate(fd, mode, offset, length):
    _load()
    if _libc.fallocate(fd, mode, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, "fallocate: %s" % os.strerror(err))


def madvise(addr, length, advice):
    _load()
    if _libc.madvise(addr, length, advice):
        err = ctypes.get_errno()
        raise OSError(err, "madvise: %s" % os.strerror(err))
