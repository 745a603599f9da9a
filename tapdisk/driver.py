"""The disk-driver interface.

A disk type is one module in tapdisk/drivers/: a Driver subclass that declares what it
can do and implements only that, registered with one `@register` line. The engine
(image chains, accounting, retries, NBD) is written against this class alone.

Options ("type:path?k=v&...") are declared per type, name -> parser: the engine parses
them before open() and refuses unknown ones or bad values with a message naming them.

Offsets and lengths are bytes. Errors are OSError with an errno: the engine retries
EAGAIN/EBUSY/EINTR until the request timeout and returns every other errno to the client.
"""
from smtap import units

# Open flags, values as upstream tapdisk-message.h so they travel unchanged in OPEN.
OPEN_SHARED = 0x1
OPEN_RDONLY = 0x2
OPEN_ADD_CACHE = 0x4
OPEN_VHD_INDEX = 0x8
OPEN_ADD_LOG = 0x10
OPEN_ADD_LCACHE = 0x20
OPEN_REUSE_PRT = 0x40
OPEN_SECONDARY = 0x80
OPEN_STANDBY = 0x100
OPEN_NO_O_DIRECT = 0x200

_ZEROS = memoryview(bytes(32 << 20))    # calloc'd: costs no memory until read; shared


def zeros(length):
    """A read-only buffer of `length` zero bytes, without allocating (up to 32 MiB)."""
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


# Extent flags, as NBD base:allocation.
EXTENT_HOLE = 0x1
EXTENT_ZERO = 0x2


class Driver(object):
    """Base class of every disk type. Subclasses set the class attributes that apply."""

    name = None             # the "type" in "type:/path"
    can_write = False
    can_flush = False
    can_trim = False
    can_zero = False        # efficient write-zeroes (else the engine writes zero buffers)
    can_extents = False     # extents() reports holes / zero regions
    can_multi_conn = False  # a flush on one connection covers writes done on all
    is_filter = False       # no image data of its own: stacks on the image below
    write_align = 1         # writes it takes are multiples of this at multiples of it:
                            # the engine reads-modifies-writes others (a VHD's sectors)
    trim_hides_parent = False   # after trim() the region still reads as this image's
                                # (zeros), never a parent's: trims pass down with a parent
    plug_type = "tap"       # how SM plugs a VDI of this type (its VDI_PLUG_TYPE)
    options = {}            # the "?k=v" options it accepts: name -> parser(text) -> value

    def __init__(self):
        self.size = 0           # bytes, set by open()
        self.sector_size = 512
        self.path = None
        self.flags = 0

    # -- mandatory --------------------------------------------------------------
    def open(self, path, flags, options):
        """Open the image. `options`: the parsed values of the declared options given
        after '?' in "type:path?k=v&k2=v2" (absent ones are left out). Must set self.size."""
        raise NotImplementedError

    @classmethod
    def parse_options(cls, raw):
        """{name: text} -> {name: value} through the declared parsers; ValueError naming
        the option for an unknown one or a bad value."""
        parsed = {}
        for key, text in raw.items():
            parser = cls.options.get(key)
            if parser is None:
                raise ValueError("%s: unknown option %r (accepted: %s)" % (
                    cls.name, key, ", ".join(sorted(cls.options)) or "none"))
            try:
                parsed[key] = parser(text)
            except ValueError as e:
                raise ValueError("%s: option %s=%s: %s" % (cls.name, key, text, e))
        return parsed

    def close(self):
        pass

    def pread(self, length, offset):
        """Return `length` bytes (any buffer object) read at `offset`."""
        raise NotImplementedError

    # -- declared capabilities ---------------------------------------------------
    def pwrite(self, buf, offset):
        raise OSError(30, "read-only disk type")   # EROFS

    def flush(self):
        pass

    def trim(self, length, offset):
        pass

    def zero(self, length, offset, may_trim=False):
        self.pwrite(bytes(length), offset)

    def extents(self, length, offset):
        """[(length, EXTENT_* flags), ...] covering at least one byte from offset.
        In an image with a parent, a HOLE is a region this image does not hold: the
        engine reads it from the parent."""
        return [(length, 0)]

    # -- batching: override when the driver can submit many requests at once -----
    # A buffer returned by pread/preadv stays valid until the same thread's next call
    # into the driver (so a driver may reuse one per-thread buffer for every batch).
    # On any failure the batch calls raise; the engine then redoes that batch one
    # request at a time (with retries and per-request errors).
    def preadv(self, requests):
        """requests: [(length, offset), ...] -> [buffer, ...] in the same order."""
        pread = self.pread
        return [pread(length, offset) for length, offset in requests]

    def pwritev(self, requests):
        """requests: [(buffer, offset), ...]: write them all."""
        pwrite = self.pwrite
        for buf, offset in requests:
            pwrite(buf, offset)

    def idle(self):
        """The calling thread (one NBD client's) has been idle a while: drop what it
        keeps for its batches (buffers). It may be called on a closed driver."""

    # -- queued I/O (optional, the fast path): set can_queue and implement both ------
    # The engine gives a batch of requests and the calling NBD connection's I/O queue
    # (tapdisk/ioqueue.py IoQueue: io_uring or libaio); the driver adds the file I/O
    # each request needs and returns without waiting. The engine submits it, answers
    # each request as soon as its own I/O completed and keeps receiving meanwhile.
    # A request is (length, offset, view, address, op): view is its buffer (a writable
    # memoryview of `length` bytes), address the buffer's page-aligned address (for
    # O_DIRECT), op its ioqueue.Op (tag every I/O with it). For each piece of a request:
    #     io.read(fd, file_offset, n, address + pos, op, buffered=False)
    #     io.write(fd, file_offset, n, address + pos, op, buffered=False)
    # (buffered=True: fd is not O_DIRECT), or fill the view itself (view[pos:pos + n] =
    # driver.zeros(n) for a hole). Only reads: a request's pieces are its own; never
    # wait for I/O here (no io.run). A write whose metadata must follow its data (a
    # bitmap, a table entry) sets op.after = callable: the engine calls it once the op's
    # I/O completed, before the reply (an OSError from it is the request's error).
    # Raise OSError when a batch cannot be queued: the engine waits for what was
    # queued, then redoes every request of that batch on the synchronous path (pread /
    # pwrite, with retries). A failed I/O does the same for its request. Requests in
    # flight together may overlap (NBD clients must not rely on their order) and other
    # connections' threads queue their own: allocation and metadata updates stay under
    # the driver's locks. Writes the engine must widen (write_align) take the
    # synchronous path, alone (it waits for every I/O of the connection first).
    # The engine keeps the synchronous path (preadv/pwritev) for drivers without it.
    can_queue = False

    def queue_reads(self, io, requests):
        raise NotImplementedError

    def queue_writes(self, io, requests):
        raise NotImplementedError

    def c_image(self):
        """Where the image's data is, for the NBD loop's C part (tapdisk/smtap_nbd.c),
        which then serves the reads, writes and flushes it can place itself: a
        native.CImage (a raw file, a block map, a RAM mapping), or None (the default:
        every request of the chain through the drivers). Called when an NBD connection
        takes the chain; what it points at must stay until a pause or close, which wait
        for the connections first. C writes only where the image says a write changes
        nothing but the data (flush: fdatasync of the leaf's descriptor)."""
        return None

    def c_alloc(self):
        """The native.CAlloc of a leaf whose blocks the C loop allocates (after
        c_image), which each connection serving the chain counts itself on
        (native.alloc_join); None: none."""
        return None

    # -- pause ----------------------------------------------------------------------
    def suspend(self):
        """tap-ctl pause: let go of what the storage layer may change while paused (the
        image's files). Default: close(). A disk whose data lives only in this process
        keeps it instead: nothing may be lost across a pause. close() may follow."""
        self.close()

    def resume(self, path, flags, options):
        """tap-ctl unpause onto the same image, after suspend(): open it again (default)."""
        self.open(path, flags, options)

    # -- image chains -------------------------------------------------------------
    def get_parent_id(self):
        """"type:path" of the parent image, or None."""
        return None

    def validate_parent(self, parent):
        """Raise OSError if `parent` (an open Driver) is not this image's parent."""

    # -- introspection --------------------------------------------------------------
    def capabilities(self):
        return {k: getattr(self, k) for k in (
            "can_write", "can_flush", "can_trim", "can_zero", "can_extents",
            "can_multi_conn", "is_filter")}

    def debug(self):
        return {}


parse_bool = units.parse_bool      # an option's yes/no: the suite's one boolean parser


def parse_params(params):
    """"type:path?k=v&k=v" -> (type, path, {k: v})."""
    kind, sep, rest = params.partition(":")
    if not sep or not kind:
        raise ValueError("expected type:/path, got %r" % params)
    path, _, query = rest.partition("?")
    options = {}
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        options[key] = value
    return kind, path, options
