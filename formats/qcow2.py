"""The qcow2 format (qemu's docs/interop/qcow2.txt): version 3 written, 2 and 3 read.

Layout (all integers big-endian, every table cluster aligned):

    cluster 0    header (72 bytes in v2, header_length in v3), header extensions
                 (type, length, data padded to 8; type 0 ends them), backing file name
    anywhere     refcount table (contiguous) -> refcount blocks (one cluster each):
                 one refcount of refcount_bits per host cluster
                 L1 table (contiguous) -> L2 tables (one cluster each): one 64-bit entry
                 per guest cluster (host offset | COPIED (refcount 1) | COMPRESSED | ZERO)
                 data clusters

What this module does with it:
- Reads v2 and v3, any cluster size qemu opens (512 B - 2 MiB), refcounts of 1 to 64
  bits, zero clusters, zlib-compressed clusters (zstd ones: ENOTSUP on read); refuses
  encrypted images, external data files and extended L2 entries (ENOTSUP), and a
  write open of an image with internal snapshots (their clusters are shared).
- Writes in the crash-safe order: refcounts (allocation) and data first, a barrier,
  then the L2 entries; a new L2 table is durable before the L1 entry that points at it;
  clusters are freed (refcount decremented) only once no table points at them. With
  `lazy` (v3), the barriers between refcounts and tables are skipped and the dirty bit
  is set (durably) before the first write, cleared on close: a crash then leaves an
  image qemu repairs on its next read-write open (as its lazy_refcounts do); every
  open here repairs it the same way. Without a crash every step is still in order
  (a kill -9 leaves leaks at most).
- The hidden flag of XCP-ng: header extension 0x76617465 ("vate"), first data byte.
  Unknown header extensions are kept as they are whenever the header is rewritten.

Errors are `QCow2Error`, an OSError with an errno: EINVAL for what is not a valid
qcow2 image, ENOTSUP for valid images using what this module does not do.
"""
import ctypes
import errno
import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict

from smtap.formats.vhd import Chain as VhdChain
from smtap.formats.vhd import PosixFile

MAGIC = b"QFI\xfb"
DEFAULT_CLUSTER_BITS = 16                       # 64 KiB
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21      # qemu opens 512 B to 2 MiB
MAX_SIZE = 16 << 40                             # what the storage layer creates
MAX_L1_BYTES = 32 << 20                         # qemu's implementation limits
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_CHAIN = 1024
# Lazy mode: an allocation that extends the file takes SPARE clusters more, for the
# allocations that follow (one refcount write and one extension for them all, not one
# each). They are never written until handed out; close gives back the ones left (a
# crash leaves them to the dirty bit's repair, as any refcount of lazy mode).
SPARE = 64

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1f
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
FEATURE_NAMES = {(0, 0): "dirty bit", (0, 1): "corrupt bit", (0, 2): "external data file",
                 (0, 3): "compression type", (0, 4): "extended L2 entries",
                 (1, 0): "lazy refcounts", (2, 0): "bitmaps", (2, 1): "raw external data"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_TABLE = 0x6803f857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537be77
EXT_DATA_FILE = 0x44415441
EXT_HIDDEN = 0x76617465                         # "vate": XCP-ng's hidden flag

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00fffffffffffe00                # L1 and L2 entries: bits 9-55
REFT_OFFSET_MASK = 0xfffffffffffffe00
L1E_RESERVED = 0x7f000000000001ff
L2E_RESERVED = 0x3f000000000001fe

# Guest cluster types (from an L2 entry).
UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED = range(5)
# What a region holds, for extents(): this image's data, zeros of its own (a zero
# cluster: the backing file does not show through), or nothing (the backing file's).
DATA, ZERO, HOLE = "data", "zero", "hole"

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")    # 72 bytes
HEADER_V3 = struct.Struct(">QQQII")             # bytes 72-103
V3_HEADER_LENGTH = 112                          # with compression_type (1 byte) + padding
EXT_HEAD = struct.Struct(">II")

NATIVE_BE = sys.byteorder == "big"


class QCow2Error(OSError):
    """An OSError with the errno a command line exits with and a driver returns."""

    def __init__(self, err, message):
        super(QCow2Error, self).__init__(err, message)


def _einval(message):
    return QCow2Error(errno.EINVAL, message)


def _unpack_u64(raw):
    """Big-endian u64s -> array('Q') of native integers."""
    a = array("Q")
    a.frombytes(bytes(raw[:len(raw) & ~7]))
    if not NATIVE_BE:
        a.byteswap()
    return a


def _pack_u64(a):
    if NATIVE_BE:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def cluster_type(entry):
    """The type of a guest cluster from its L2 entry (qemu's qcow2_get_cluster_type)."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & OFFSET_MASK else ZERO_PLAIN
    return NORMAL if entry & OFFSET_MASK else UNALLOCATED


def refcount_get(blk, i, order):
    """Entry i of a refcount block (big-endian, 2^order bits each; sub-byte ones from
    the least significant bit)."""
    if order >= 3:
        w = 1 << (order - 3)
        return int.from_bytes(blk[i * w:(i + 1) * w], "big")
    per = 8 >> order
    return (blk[i // per] >> ((i % per) << order)) & ((1 << (1 << order)) - 1)


def refcount_put(blk, i, value, order):
    """Entry i of refcount block blk (a bytearray) := value; returns the bytes changed."""
    if order >= 3:
        w = 1 << (order - 3)
        blk[i * w:(i + 1) * w] = value.to_bytes(w, "big")
        return i * w, (i + 1) * w
    per = 8 >> order
    first = i // per
    shift = (i % per) << order
    mask = ((1 << (1 << order)) - 1) << shift
    blk[first] = (blk[first] & ~mask & 0xff) | (value << shift)
    return first, first + 1


# -- the file interface -------------------------------------------------------------------
_libc = []


def _punch(fd, offset, length):
    """FALLOC_FL_PUNCH_HOLE | KEEP_SIZE (Python 3.6's os has no fallocate modes)."""
    if not _libc:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.restype = ctypes.c_int
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                   ctypes.c_longlong]
        _libc.append(libc)
    if _libc[0].fallocate(fd, 0x3, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class File(PosixFile):
    """The file interface of smtap.formats (pread/pwrite/preadv/pwritev/flush/size/
    truncate/close), plus trim(length, offset): give the space of freed clusters back
    (advisory). A driver passes its own object with the same methods."""

    def flush(self):
        os.fdatasync(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def trim(self, length, offset):
        if self.is_block:
            return
        try:
            _punch(self.fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise


def open_file(path, writable=False, create=False):
    try:
        return File(path, writable, create)
    except QCow2Error:
        raise
    except OSError as e:
        raise QCow2Error(e.errno or errno.EIO, "%s: %s" % (path, e.strerror or e))


def is_qcow2(path):
    """The file starts with qcow2's magic (a probe, as qemu's for a backing file)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# -- the header ---------------------------------------------------------------------------
class Header(object):
    """The header, its extensions (in file order, unknown ones kept byte for byte) and
    the backing file name."""

    FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size",
              "cluster_bits", "size", "crypt_method", "l1_size", "l1_table_offset",
              "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
              "snapshots_offset")
    V3_FIELDS = ("incompatible_features", "compatible_features", "autoclear_features",
                 "refcount_order", "header_length")

    def __init__(self):
        for name in self.FIELDS + self.V3_FIELDS:
            setattr(self, name, 0)
        self.magic = MAGIC
        self.version = 3
        self.refcount_order = 4
        self.header_length = V3_HEADER_LENGTH
        self.compression_type = 0
        self.extra = b""                # v3 header bytes past compression_type, kept
        self.extensions = []            # [[type, bytes]]
        self.backing_file = None        # str, or None

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @classmethod
    def parse(cls, raw, what):
        """The header in `raw` (the first cluster, or what the file has of it)."""
        h = cls()
        if len(raw) < HEADER_V2.size or raw[:4] != MAGIC:
            raise _einval("%s: not a qcow2 image" % what)
        values = HEADER_V2.unpack_from(raw)
        for name, value in zip(cls.FIELDS, values):
            setattr(h, name, value)
        if h.version not in (2, 3):
            raise QCow2Error(errno.ENOTSUP, "%s: unsupported qcow2 version %d" % (what, h.version))
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise _einval("%s: invalid cluster size 2^%d" % (what, h.cluster_bits))
        cs = h.cluster_size
        if h.version == 2:
            h.refcount_order, h.header_length = 4, HEADER_V2.size
        else:
            if len(raw) < HEADER_V2.size + HEADER_V3.size:
                raise _einval("%s: header past the end of the file" % what)
            for name, value in zip(cls.V3_FIELDS, HEADER_V3.unpack_from(raw, HEADER_V2.size)):
                setattr(h, name, value)
            if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
                raise _einval("%s: invalid header length %d" % (what, h.header_length))
            if h.header_length > len(raw):
                raise _einval("%s: header past the end of the file" % what)
            if h.header_length > 104:
                h.compression_type = raw[104]
                h.extra = bytes(raw[105:h.header_length])
            if h.refcount_order > 6:
                raise _einval("%s: invalid refcount order %d" % (what, h.refcount_order))
            if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != bool(h.compression_type):
                raise _einval("%s: compression type %d does not match the feature bit"
                              % (what, h.compression_type))
            if h.compression_type > 1:
                raise QCow2Error(errno.ENOTSUP, "%s: unknown compression type %d"
                                 % (what, h.compression_type))
        h._parse_extensions(raw, what)
        if h.backing_file_offset:
            off, n = h.backing_file_offset, h.backing_file_size
            if n > MAX_BACKING_NAME or off > cs or off + n > cs or off + n > len(raw):
                raise _einval("%s: invalid backing file name (%d bytes at %d)" % (what, n, off))
            try:
                h.backing_file = bytes(raw[off:off + n]).decode("utf-8")
            except UnicodeDecodeError:
                raise _einval("%s: backing file name is not UTF-8" % what)
            if not h.backing_file or "\0" in h.backing_file:
                raise _einval("%s: invalid backing file name" % what)
        return h

    def _parse_extensions(self, raw, what):
        """As qemu: from the header's end to the backing file name (or the cluster's
        end); reaching that end without an end marker is no error."""
        pos = self.header_length
        end = self.backing_file_offset or self.cluster_size
        end = min(end, self.cluster_size)
        self.used_length = pos
        while pos < end:
            if pos + EXT_HEAD.size > len(raw):
                raise _einval("%s: header extensions past the end of the file" % what)
            kind, length = EXT_HEAD.unpack_from(raw, pos)
            pos += EXT_HEAD.size
            if pos > end or length > end - pos:
                raise _einval("%s: header extension %#x too large" % (what, kind))
            if kind == EXT_END:
                break
            if pos + length > len(raw):
                raise _einval("%s: header extension %#x past the end of the file" % (what, kind))
            self.extensions.append([kind, bytes(raw[pos:pos + length])])
            pos += (length + 7) & ~7
        self.used_length = max(pos, self.backing_file_offset + self.backing_file_size)

    def ext(self, kind):
        for k, data in self.extensions:
            if k == kind:
                return data
        return None

    def set_ext(self, kind, data):
        for item in self.extensions:
            if item[0] == kind:
                item[1] = data
                return
        self.extensions.append([kind, data])

    def del_ext(self, kind):
        self.extensions = [e for e in self.extensions if e[0] != kind]

    @property
    def backing_format(self):
        data = self.ext(EXT_BACKING_FORMAT)
        return data.decode("ascii", "replace") if data is not None else None

    @property
    def hidden(self):
        data = self.ext(EXT_HIDDEN)
        return 1 if data and data[0] else 0

    def hidden_offset(self):
        """File offset of the hidden byte (the "vate" data), or None."""
        pos = self.header_length
        for kind, data in self.extensions:
            if kind == EXT_HIDDEN and data:
                return pos + EXT_HEAD.size
            pos += EXT_HEAD.size + ((len(data) + 7) & ~7)
        return None

    def feature_name(self, kind, bit):
        table = self.ext(EXT_FEATURE_TABLE) or b""
        for i in range(0, len(table) - 47, 48):
            if table[i] == kind and table[i + 1] == bit:
                return table[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
        return FEATURE_NAMES.get((kind, bit), "bit %d" % bit)

    def pack(self):
        """Header, extensions, end marker and backing file name: the bytes of the first
        cluster's used part. ENOSPC when they do not fit in the first cluster."""
        values = [getattr(self, n) for n in self.FIELDS]
        out = bytearray(HEADER_V2.pack(*values))
        if self.version >= 3:
            out += HEADER_V3.pack(*[getattr(self, n) for n in self.V3_FIELDS])
            if self.header_length > 104:
                out.append(self.compression_type)
                out += self.extra
            out += bytes(self.header_length - len(out))
        for kind, data in self.extensions:
            out += EXT_HEAD.pack(kind, len(data)) + data + bytes(-len(data) % 8)
        out += EXT_HEAD.pack(EXT_END, 0)
        if self.backing_file:
            name = self.backing_file.encode("utf-8")
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            out += name
            struct.pack_into(">QI", out, 8, self.backing_file_offset, self.backing_file_size)
        else:
            self.backing_file_offset = self.backing_file_size = 0
            struct.pack_into(">QI", out, 8, 0, 0)
        if len(out) > self.cluster_size:
            raise QCow2Error(errno.ENOSPC, "header, extensions and backing file name (%d "
                             "bytes) do not fit in the first cluster (%d)"
                             % (len(out), self.cluster_size))
        return bytes(out)


# -- one image ----------------------------------------------------------------------------
class Plan(object):
    """An allocating write in its three steps (Image.plan_write, the data, commit):
    data: [(guest offset, length, host offset)] where each piece's bytes go;
    fills: [(host offset, length, source, argument)] the rest of new clusters, from
           "zero", "backing" (guest offset), "host" (old host offset) or "compressed"
           (old L2 entry, the guest cluster's offset within it);
    entries: {guest cluster: new L2 entry}; new_l2: {L1 index: host offset};
    frees: [(host offset, length)] to free once no table points there."""

    def __init__(self):
        self.data, self.fills, self.entries, self.new_l2, self.frees = [], [], {}, {}, []
        self.fresh = set()              # host clusters past the old end of file (zeros)


class Image(object):
    """One open qcow2 image.

    Image(path, writable=False): reads the header and the L1 table; L2 tables and
    refcount blocks on demand (an LRU of `l2_cache` bytes for L2 tables). A read-write
    open of an image with the dirty bit repairs its refcounts first (qemu's rule;
    repair_dirty=False leaves it, for check). `io`: the file interface to use (the
    driver's); `lazy`: see the module doc; `backing`: a reader (length, offset) ->
    bytes of the backing chain, for copy-on-write (default: the chain, opened when
    first needed).

    Geometry: size, cluster_size, cluster_bits, l2_entries, version, backing_file.
    Data: extents(), read(), write(), write_zeroes(), discard(); chains: Chain.
    """

    def __init__(self, path, writable=False, io=None, lazy=False, backing=None,
                 repair_dirty=True, l2_cache=32 << 20):
        self.path = path
        self.writable = writable
        self.own_io = io is None
        self.io = io if io is not None else open_file(path, writable)
        self.lock = threading.RLock()
        self._backing = backing
        self._backing_chain = None
        self._l2 = OrderedDict()
        self._l2_max = max(16, l2_cache >> 16)
        self._rb = OrderedDict()        # refcount blocks: table index -> bytearray
        self._rc_dirty = {}             # table index -> [first byte, last byte + 1]
        self.reftable = None
        self.free_hint = 0
        self._spare = None              # (first cluster, count): see SPARE
        self.started = False            # the first write's header updates were done
        self.meta = frozenset()         # metadata clusters, once track_metadata() ran
        self.backing_readv = None       # [(length, offset)] -> [bytes] of the backing chain
        self.on_l2 = None               # (l1i, table, indices or None: all) after an L2
                                        # table is cached or entries of one change: a
                                        # driver mirroring them
        self.on_l1 = None               # (l1i) after L1 entry l1i got a table of its own
        self.on_free = None             # frees(list) instead of free_clusters: a driver
                                        # runs them once no I/O in flight can use them
        try:
            self._load()
            self.lazy = lazy and self.version >= 3
            if writable:
                self._check_writable()
                if self.header.incompatible_features & INCOMPAT_DIRTY and repair_dirty:
                    self._repair_dirty()
                self.track_metadata()
        except Exception:
            if self.own_io:
                self.io.close()
            raise

    # -- loading -------------------------------------------------------------------------
    def _load(self):
        self.file_size = self.io.size()
        first = self.io.pread(min(self.file_size, 4096), 0)
        if len(first) >= 24 and first[:4] == MAGIC:
            bits = struct.unpack_from(">I", first, 20)[0]
            if 4096 < (1 << min(bits, MAX_CLUSTER_BITS)):
                first = self.io.pread(min(self.file_size, 1 << min(bits, MAX_CLUSTER_BITS)), 0)
        h = self.header = Header.parse(first, self.path)
        self.version = h.version
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.l2_entries = cs // 8
        self.l2_bits = self.cluster_bits - 3
        self.size = h.size
        self.rb_bits = self.cluster_bits + 3 - h.refcount_order   # entries per block, log2
        self.rb_entries = 1 << self.rb_bits
        self.refcount_bits = 1 << h.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        bad = h.incompatible_features & ~INCOMPAT_KNOWN
        if bad:
            names = [h.feature_name(0, b) for b in range(64) if bad >> b & 1]
            raise QCow2Error(errno.ENOTSUP, "%s: unsupported incompatible features: %s"
                             % (self.path, ", ".join(names)))
        if h.crypt_method:
            raise QCow2Error(errno.ENOTSUP, "%s: encrypted image (%s): not supported"
                             % (self.path, {1: "AES", 2: "LUKS"}.get(h.crypt_method, "method %d"
                                                                       % h.crypt_method)))
        if h.incompatible_features & INCOMPAT_DATA_FILE:
            raise QCow2Error(errno.ENOTSUP, "%s: external data file: not supported" % self.path)
        if h.incompatible_features & INCOMPAT_EXTL2:
            raise QCow2Error(errno.ENOTSUP, "%s: extended L2 entries (subclusters): not "
                             "supported" % self.path)
        if h.size >= 1 << 63:
            raise _einval("%s: invalid virtual size" % self.path)
        need = -(-h.size // (cs * self.l2_entries))
        if h.l1_size < need:
            raise _einval("%s: L1 table too small (%d entries for %d)" % (self.path, h.l1_size, need))
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise QCow2Error(errno.EFBIG, "%s: L1 table too large (%d entries)" % (self.path, h.l1_size))
        if h.l1_size and (h.l1_table_offset % cs or not h.l1_table_offset):
            raise _einval("%s: invalid L1 table offset %#x" % (self.path, h.l1_table_offset))
        if not h.refcount_table_clusters:
            raise _einval("%s: no refcount table" % self.path)
        if h.refcount_table_offset % cs or not h.refcount_table_offset:
            raise _einval("%s: invalid refcount table offset %#x"
                          % (self.path, h.refcount_table_offset))
        if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise QCow2Error(errno.EFBIG, "%s: refcount table too large (%d clusters)"
                             % (self.path, h.refcount_table_clusters))
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise _einval("%s: too many snapshots (%d)" % (self.path, h.nb_snapshots))
        if h.nb_snapshots and h.snapshots_offset % cs:
            raise _einval("%s: invalid snapshot table offset" % self.path)
        if h.backing_file is not None and ":" in h.backing_file.split("/", 1)[0] \
                and not h.backing_file.startswith("file:"):
            raise QCow2Error(errno.ENOTSUP, "%s: backing file %s is not a local file"
                             % (self.path, h.backing_file))
        self.l1 = _unpack_u64(self._read_table(h.l1_table_offset, h.l1_size * 8))
        self.hidden = h.hidden

    def _read_table(self, offset, nbytes):
        """nbytes at offset; what lies past the end of the file reads as zeros (qemu)."""
        have = max(0, min(nbytes, self.file_size - offset))
        data = self.io.pread(have, offset) if have else b""
        return bytes(data) + bytes(nbytes - len(data))

    def _check_writable(self):
        h = self.header
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise QCow2Error(errno.EACCES, "%s: image marked corrupt (repair it first); "
                             "cannot be opened read-write" % self.path)
        if h.nb_snapshots:
            raise QCow2Error(errno.ENOTSUP, "%s: has %d internal snapshots: not supported for "
                             "writing" % (self.path, h.nb_snapshots))
        self._load_reftable()

    def _load_reftable(self):
        if self.reftable is None:
            h = self.header
            self.reftable = _unpack_u64(self._read_table(
                h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size))

    def track_metadata(self):
        """Keep the set of metadata clusters (header, tables, refcount blocks, L2 tables)
        that writes must never land on (qemu's overlap check): a corrupt table pointing a
        data cluster there gets EIO instead of spreading the damage."""
        self._load_reftable()
        h, cs, bits = self.header, self.cluster_size, self.cluster_bits
        meta = set([0])
        for off, n in ((h.l1_table_offset, h.l1_size * 8),
                       (h.refcount_table_offset, h.refcount_table_clusters * cs)):
            if n:
                meta.update(range(off >> bits, (off + n - 1 >> bits) + 1))
        meta.update((e & REFT_OFFSET_MASK) >> bits for e in self.reftable if e & REFT_OFFSET_MASK)
        meta.update((e & OFFSET_MASK) >> bits for e in self.l1 if e & OFFSET_MASK)
        self.meta = meta

    def _meta(self, off, n, add=True):
        if isinstance(self.meta, set):
            clusters = range(off >> self.cluster_bits, ((off + n - 1) >> self.cluster_bits) + 1)
            if add:
                self.meta.update(clusters)
            else:
                self.meta.difference_update(clusters)

    def _repair_dirty(self):
        from smtap.formats import qcow2check
        result = qcow2check.check_image(self, repair="all")
        if result.corruptions or result.check_errors:
            raise QCow2Error(errno.EIO, "%s: dirty image could not be repaired: %d errors left"
                             % (self.path, result.corruptions + result.check_errors))

    # -- geometry ----------------------------------------------------------------------
    @property
    def backing_file(self):
        return self.header.backing_file

    @property
    def backing_format(self):
        return self.header.backing_format

    @property
    def dirty(self):
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self):
        return bool(self.header.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self):
        return bool(self.header.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def backing_path(self):
        """The backing file as qemu finds it: a relative name is relative to the
        directory of this image (as it was opened); None without one."""
        name = self.header.backing_file
        if name is None:
            return None
        if name.startswith("file:"):
            name = name[5:]
        if name.startswith("/"):
            return name
        return os.path.join(os.path.dirname(self.path), name)

    def backing_is_raw(self):
        """The backing file's format: the header's, else probed as qemu does."""
        fmt = self.backing_format
        if fmt is not None:
            if fmt not in ("qcow2", "raw"):
                raise QCow2Error(errno.ENOTSUP, "%s: backing file format %s: not supported"
                                 % (self.path, fmt))
            return fmt == "raw"
        return not is_qcow2(self.backing_path())

    def l1_capacity(self):
        """Virtual bytes the L1 table's clusters can map without moving it."""
        l1_clusters = -(-self.header.l1_size * 8 // self.cluster_size)
        return l1_clusters * (self.cluster_size // 8) * self.l2_entries * self.cluster_size

    # -- L2 tables ---------------------------------------------------------------------
    def l2_table(self, l1i):
        """The L2 table of L1 entry l1i (array of native entries), or None."""
        table = self._l2.get(l1i)
        if table is not None:
            return table
        if l1i >= len(self.l1):
            return None
        # Read and cached under the lock: writers change cached tables (and write them)
        # under it, so a copy read from the file meanwhile could replace a newer one.
        # Lock-free readers take it here, on a miss only: whoever holds it must never
        # wait for them (a driver defers frees past its readers instead of waiting).
        with self.lock:
            table = self._l2.get(l1i)
            if table is None:
                table = self._read_l2(l1i)
                if table is not None:
                    self._l2_replace(l1i, table)
        return table

    def _read_l2(self, l1i):
        """The L2 table of l1i read from the file (None: it has none), checked."""
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return None
        if off % self.cluster_size:
            raise QCow2Error(errno.EIO, "%s: L2 table offset %#x is not cluster aligned"
                             % (self.path, off))
        if off + self.cluster_size > self.file_size:
            raise QCow2Error(errno.EIO, "%s: L2 table at %#x past the end of the file"
                             % (self.path, off))
        table = _unpack_u64(self.io.pread(self.cluster_size, off))
        if len(table) != self.l2_entries:
            raise QCow2Error(errno.EIO, "%s: short read of the L2 table at %#x"
                             % (self.path, off))
        return table

    def entry(self, gc):
        """The L2 entry of guest cluster gc (0 when unallocated)."""
        table = self.l2_table(gc >> self.l2_bits)
        return table[gc & (self.l2_entries - 1)] if table is not None else 0

    def host_offset(self, entry):
        """Host offset of a NORMAL/ZERO_ALLOC entry, checked."""
        off = entry & OFFSET_MASK
        if off % self.cluster_size:
            raise QCow2Error(errno.EIO, "%s: cluster offset %#x is not aligned" % (self.path, off))
        return off

    # -- reading -------------------------------------------------------------------------
    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise QCow2Error(errno.ERANGE, "%s: %d bytes at %d past the virtual size %d"
                             % (self.path, length, offset, self.size))

    def runs(self, offset, length):
        """[(guest offset, length, type, entry)] runs of [offset, offset + length):
        consecutive clusters of one type (NORMAL ones also contiguous on the host)."""
        self._check_range(offset, length)
        out = []
        cs, bits = self.cluster_size, self.cluster_bits
        end = offset + length
        pos = offset
        while pos < end:
            gc = pos >> bits
            l1i = gc >> self.l2_bits
            table = self.l2_table(l1i)
            stop = min(end, (l1i + 1) << (self.l2_bits + bits))
            if table is None:
                self._add_run(out, pos, stop - pos, UNALLOCATED, 0)
                pos = stop
                continue
            mask = self.l2_entries - 1
            while pos < stop:
                gc = pos >> bits
                e = table[gc & mask]
                n = min(stop, (gc + 1) << bits) - pos
                t = cluster_type(e)
                self._add_run(out, pos, n, t, e)
                pos += n
        return out

    def _add_run(self, out, pos, n, t, e):
        if out:
            p, pn, pt, pe = out[-1]
            if pt == t and t in (UNALLOCATED, ZERO_PLAIN):
                out[-1] = (p, pn + n, t, pe)
                return
            if pt == t and t in (NORMAL, ZERO_ALLOC) and \
                    (pe & OFFSET_MASK) + (pos - (p & ~(self.cluster_size - 1))) == \
                    (e & OFFSET_MASK) + (pos & (self.cluster_size - 1)):
                out[-1] = (p, pn + n, t, pe)
                return
        out.append((pos, n, t, e))

    def extents(self, offset, length):
        """[(offset, length, DATA | ZERO | HOLE)] over [offset, offset + length), merged:
        HOLE = unallocated (a backing file's data shows there)."""
        out = []
        kinds = {UNALLOCATED: HOLE, ZERO_PLAIN: ZERO, ZERO_ALLOC: ZERO, NORMAL: DATA,
                 COMPRESSED: DATA}
        for pos, n, t, _ in self.runs(offset, length):
            k = kinds[t]
            if out and out[-1][2] == k:
                out[-1] = (out[-1][0], out[-1][1] + n, k)
            else:
                out.append((pos, n, k))
        return out

    def read(self, offset, length):
        """This image's own data over [offset, offset + length): zeros where it holds
        none (in a chain the backing file answers there: see extents(), Chain)."""
        buf = bytearray(length)
        reqs, where = [], []
        for pos, n, t, e in self.runs(offset, length):
            if t == NORMAL:
                host = self.host_offset(e) + (pos & (self.cluster_size - 1))
                self._check_data(host, n)
                reqs.append((n, host))
                where.append(pos - offset)
            elif t == COMPRESSED:
                done = 0
                while done < n:
                    gpos = pos + done
                    cluster = self.read_compressed(self.entry(gpos >> self.cluster_bits))
                    inner = gpos & (self.cluster_size - 1)
                    k = min(n - done, self.cluster_size - inner)
                    buf[gpos - offset:gpos - offset + k] = cluster[inner:inner + k]
                    done += k
        for at, data in zip(where, self.io.preadv(reqs)):
            buf[at:at + len(data)] = data
        return bytes(buf)

    def _check_data(self, host, n):
        if host + n > self.file_size and not getattr(self.io, "is_block", False):
            # qemu reads zeros there too; a table pointing far past the end is corrupt
            if host > self.file_size + (1 << 40):
                raise QCow2Error(errno.EIO, "%s: data cluster at %#x far past the end of "
                                 "the file" % (self.path, host))

    def compressed_extent(self, entry):
        """(host offset, bytes) of a compressed cluster's data."""
        shift = 62 - (self.cluster_bits - 8)
        off = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return off, sectors * 512 - (off & 511)

    def read_compressed(self, entry):
        if self.header.compression_type != 0:
            raise QCow2Error(errno.ENOTSUP, "%s: zstd-compressed clusters: not supported"
                             % self.path)
        off, n = self.compressed_extent(entry)
        if off + n > self.file_size + 512:
            raise QCow2Error(errno.EIO, "%s: compressed cluster at %#x past the end of the "
                             "file" % (self.path, off))
        raw = self.io.pread(n, off)
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(bytes(raw), self.cluster_size)
        except zlib.error as e:
            raise QCow2Error(errno.EIO, "%s: compressed cluster at %#x: %s" % (self.path, off, e))
        if len(out) != self.cluster_size:
            raise QCow2Error(errno.EIO, "%s: compressed cluster at %#x: short (%d bytes)"
                             % (self.path, off, len(out)))
        return out

    # -- the backing chain ----------------------------------------------------------------
    def backing_reader(self):
        """(length, offset) -> bytes of the backing chain (zeros past its end)."""
        if self._backing is not None:
            return self._backing
        if self.backing_file is None:
            return None
        if self._backing_chain is None:
            self._backing_chain = Chain.open_backing(self)
        return self._backing_chain.pread

    # -- refcounts -------------------------------------------------------------------------
    def _rb_load(self, ri):
        """Refcount block of table index ri (bytearray, big-endian entries) or None."""
        blk = self._rb.get(ri)
        if blk is not None:
            self._rb.move_to_end(ri)
            return blk
        off = self.reftable[ri] & REFT_OFFSET_MASK if ri < len(self.reftable) else 0
        if not off:
            return None
        if off % self.cluster_size or off + self.cluster_size > self.file_size:
            raise QCow2Error(errno.EIO, "%s: refcount block at %#x outside the file"
                             % (self.path, off))
        blk = bytearray(self.io.pread(self.cluster_size, off))
        self._rb[ri] = blk
        while len(self._rb) > 256:
            old = next(iter(self._rb))
            if old in self._rc_dirty:
                break
            del self._rb[old]
        return blk

    def _rc_get_in(self, blk, i):
        return refcount_get(blk, i, self.header.refcount_order)

    def refcount(self, cluster):
        self._load_reftable()
        ri, i = cluster >> self.rb_bits, cluster & (self.rb_entries - 1)
        blk = self._rb_load(ri) if ri < len(self.reftable) else None
        return self._rc_get_in(blk, i) if blk is not None else 0

    def _rc_put(self, blk, i, value):
        return refcount_put(blk, i, value, self.header.refcount_order)

    def _rc_set(self, cluster, value):
        """Set a refcount in memory (its block must exist); written by _rc_flush."""
        if value < 0 or value > self.refcount_max:
            raise QCow2Error(errno.EIO, "%s: refcount of cluster %d out of range (%d)"
                             % (self.path, cluster, value))
        ri, i = cluster >> self.rb_bits, cluster & (self.rb_entries - 1)
        first, last = self._rc_put(self._rb_load(ri), i, value)
        span = self._rc_dirty.get(ri)
        if span is None:
            self._rc_dirty[ri] = [first, last]
        else:
            span[0], span[1] = min(span[0], first), max(span[1], last)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster

    def _rc_flush(self):
        """Write the refcount changes made in memory (the sectors they are in)."""
        writes = []
        for ri, (first, last) in sorted(self._rc_dirty.items()):
            first, last = first & ~511, min(self.cluster_size, (last + 511) & ~511)
            writes.append((bytes(self._rb[ri][first:last]),
                           (self.reftable[ri] & REFT_OFFSET_MASK) + first))
        self._rc_dirty = {}
        if writes:
            self.io.pwritev(writes)

    def _next_free(self, cluster):
        """The first cluster from `cluster` on with refcount 0."""
        rbe = self.rb_entries
        order = self.header.refcount_order
        while True:
            ri, i = cluster >> self.rb_bits, cluster & (rbe - 1)
            if ri >= len(self.reftable) or not self.reftable[ri] & REFT_OFFSET_MASK:
                return cluster
            blk = self._rb_load(ri)
            if order >= 3:
                w = 1 << (order - 3)
                zero = bytes(w)
                pos = i * w
                while True:
                    pos = blk.find(zero, pos)
                    if pos < 0 or pos % w == 0:
                        break
                    pos += w - pos % w
                if pos >= 0:
                    return (ri << self.rb_bits) + pos // w
            else:
                for j in range(i, rbe):
                    if not self._rc_get_in(blk, j):
                        return (ri << self.rb_bits) + j
            cluster = (ri + 1) << self.rb_bits

    def _used_in(self, start, n):
        """The last cluster of [start, start + n) with a refcount, or None."""
        order = self.header.refcount_order
        end = start + n
        last = None
        c = start
        while c < end:
            ri = c >> self.rb_bits
            stop = min(end, (ri + 1) << self.rb_bits)
            blk = self._rb_load(ri) if ri < len(self.reftable) else None
            if blk is not None:
                i, j = c & (self.rb_entries - 1), ((stop - 1) & (self.rb_entries - 1)) + 1
                if order >= 3:
                    w = 1 << (order - 3)
                    part = blk[i * w:j * w]
                    if part.count(0) != len(part):
                        k = len(part.rstrip(b"\0"))
                        last = (ri << self.rb_bits) + i + (k - 1) // w
                else:
                    for k in range(j - 1, i - 1, -1):
                        if refcount_get(blk, k, order):
                            last = (ri << self.rb_bits) + k
                            break
            c = stop
        return last

    def _find_run(self, n):
        """The first run of n clusters with refcount 0 from the free hint on."""
        start = self.free_hint = self._next_free(self.free_hint)   # none free below it
        while n > 1:
            used = self._used_in(start, n)
            if used is None:
                break
            start = self._next_free(used + 1)
        return start

    def _rc_set_range(self, start, n, value):
        """Refcounts of [start, start + n) := value (their blocks exist)."""
        order = self.header.refcount_order
        if order < 3:
            for c in range(start, start + n):
                self._rc_set(c, value)
            return
        w = 1 << (order - 3)
        raw = value.to_bytes(w, "big")
        c, end = start, start + n
        while c < end:
            ri = c >> self.rb_bits
            stop = min(end, (ri + 1) << self.rb_bits)
            i, j = c & (self.rb_entries - 1), ((stop - 1) & (self.rb_entries - 1)) + 1
            self._rb_load(ri)[i * w:j * w] = raw * (j - i)
            span = self._rc_dirty.get(ri)
            if span is None:
                self._rc_dirty[ri] = [i * w, j * w]
            else:
                span[0], span[1] = min(span[0], i * w), max(span[1], j * w)
            c = stop

    def _alloc(self, n):
        """n contiguous new clusters (refcount 1, in memory: _rc_flush writes them);
        returns the first one's host offset. The file is extended over them. In lazy
        mode they come from the spare clusters while no cluster below them is free."""
        spare = self._spare
        if spare is not None:
            first, count = spare
            if count >= n and self.free_hint >= first + count:
                self._spare = (first + n, count - n) if count > n else None
                return first << self.cluster_bits
            self._drop_spare()
        self._load_reftable()
        for _ in range(1 << 16):
            start = self._find_run(n)
            total = n
            if (self.lazy and (start + n) << self.cluster_bits > self.file_size
                    and self._used_in(start + n, SPARE) is None):
                total += SPARE
            missing = [ri for ri in range(start >> self.rb_bits,
                                          ((start + total - 1) >> self.rb_bits) + 1)
                       if ri >= len(self.reftable) or not self.reftable[ri] & REFT_OFFSET_MASK]
            if not missing:
                break
            self._add_refblock(missing[0])
        else:
            raise QCow2Error(errno.EIO, "%s: cannot allocate %d clusters" % (self.path, n))
        self._rc_set_range(start, total, 1)
        if start == self.free_hint:
            self.free_hint = start + total
        end = (start + total) << self.cluster_bits
        if end > self.file_size:
            self._extend(end)
        if total > n:
            self._spare = (start + n, total - n)
        return start << self.cluster_bits

    def _drop_spare(self):
        """The spare clusters free again (in memory)."""
        first, count = self._spare
        self._spare = None
        self._rc_set_range(first, count, 0)
        self.free_hint = min(self.free_hint, first)

    def _zeros_from(self):
        """Where the file reads zeros from: its end, or the spare clusters' start when
        they end it (never written)."""
        spare = self._spare
        if spare is not None and (spare[0] + spare[1]) << self.cluster_bits == self.file_size:
            return spare[0] << self.cluster_bits
        return self.file_size

    def _release_spare(self):
        """Close: the spare clusters left are freed, and cut off the file if they end it."""
        if self._spare is None:
            return
        end = self._zeros_from()
        self._drop_spare()              # (close writes the refcounts next)
        if end < self.file_size and not getattr(self.io, "is_block", False):
            self.io.truncate(end)
            self.file_size = end

    def _extend(self, end):
        if getattr(self.io, "is_block", False):
            raise QCow2Error(errno.ENOSPC, "%s: device full (%d bytes needed)" % (self.path, end))
        self.io.truncate(end)
        self.file_size = end

    def _add_refblock(self, ri):
        """A refcount block for table index ri: written (with its own refcount), made
        durable, then linked into the table."""
        if ri >= len(self.reftable):
            self._grow_reftable(ri + 1)
            return
        c = self._next_free(self.free_hint)
        cri = c >> self.rb_bits
        if cri != ri and (cri >= len(self.reftable) or not self.reftable[cri] & REFT_OFFSET_MASK):
            self._add_refblock(cri)         # where it goes needs a block first
            return
        blk = bytearray(self.cluster_size)
        off = c << self.cluster_bits
        if off + self.cluster_size > self.file_size:
            self._extend(off + self.cluster_size)
        if cri == ri:                       # it describes itself
            self._rc_put(blk, c & (self.rb_entries - 1), 1)
            self.io.pwrite(bytes(blk), off)
        else:
            self.io.pwrite(bytes(blk), off)
            self._rc_set(c, 1)
            self._rc_flush()
        self._barrier()
        self._meta(off, self.cluster_size)
        self._rb[ri] = blk
        self.reftable[ri] = off
        self.io.pwrite(struct.pack(">Q", off), self.header.refcount_table_offset + ri * 8)

    def _grow_reftable(self, min_entries):
        """A bigger refcount table: it and the blocks describing it are placed past all
        the table covers now, written, made durable, then the header switched to it;
        the old table's clusters are freed last."""
        cs, rbe = self.cluster_size, self.rb_entries
        old = self.reftable
        start = len(old) * rbe                  # first cluster the old table cannot cover
        start = max(start, -(-self.file_size // cs))
        entries, nblocks = max(min_entries, len(old)), 0
        while True:
            tclusters = -(-entries * 8 // cs)
            end = start + nblocks + tclusters
            first_r, last_r = start >> self.rb_bits, (end - 1) >> self.rb_bits
            need_blocks = sum(1 for r in range(first_r, last_r + 1)
                              if r >= len(old) or not old[r] & REFT_OFFSET_MASK)
            need_entries = max(entries, last_r + 1)
            if need_blocks == nblocks and need_entries == entries:
                break
            nblocks, entries = need_blocks, need_entries
        if tclusters * cs > MAX_REFTABLE_BYTES:
            raise QCow2Error(errno.EFBIG, "%s: refcount table would exceed %d bytes"
                             % (self.path, MAX_REFTABLE_BYTES))
        table = array("Q", list(old) + [0] * (tclusters * (cs // 8) - len(old)))
        blocks = {}
        k = start
        for r in range(first_r, last_r + 1):
            if r < len(old) and old[r] & REFT_OFFSET_MASK:
                continue
            blocks[r] = (k, bytearray(cs))
            table[r] = k << self.cluster_bits
            k += 1
        self._extend(max(self.file_size, end << self.cluster_bits))
        self.reftable = table
        for r, (c, blk) in blocks.items():
            self._rb[r] = blk
        for c in range(start, end):             # the area's own refcounts
            self._rc_set(c, 1)
        self._rc_dirty = dict((r, v) for r, v in self._rc_dirty.items() if r not in blocks)
        writes = [(bytes(blk), c << self.cluster_bits) for r, (c, blk) in blocks.items()]
        toff = (start + nblocks) << self.cluster_bits
        writes.append((_pack_u64(table), toff))
        self.io.pwritev(writes)
        self._rc_flush()                        # area clusters in old, existing blocks
        self._meta(start << self.cluster_bits, (end - start) << self.cluster_bits)
        self._barrier(force=True)
        h = self.header
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        h.refcount_table_offset, h.refcount_table_clusters = toff, tclusters
        self.io.pwrite(struct.pack(">QI", toff, tclusters), 48)
        self._barrier(force=True)
        for c in range(old_off >> self.cluster_bits, (old_off >> self.cluster_bits) + old_clusters):
            self._rc_set(c, self.refcount(c) - 1)
        self._rc_flush()
        self._meta(old_off, old_clusters * cs, add=False)

    def free_clusters(self, frees):
        """Decrement the refcounts of [(host offset, length)]: clusters no table points
        at any more (the caller made that durable first); freed ones are trimmed."""
        trims = []
        cs = self.cluster_size
        for off, n in frees:
            first, last = off >> self.cluster_bits, (off + n - 1) >> self.cluster_bits
            for c in range(first, last + 1):
                rc = self.refcount(c)
                if rc == 0:
                    raise QCow2Error(errno.EIO, "%s: freeing free cluster %d" % (self.path, c))
                self._rc_set(c, rc - 1)
                if rc == 1:
                    trims.append(c)
        self._rc_flush()
        trim = getattr(self.io, "trim", None)
        if trim is not None:
            for c in trims:
                trim(cs, c << self.cluster_bits)

    # -- ordering ------------------------------------------------------------------------
    def _barrier(self, force=False):
        """Make what was written so far durable before what comes next (not in lazy
        mode, unless forced: where a crash would leave the tables pointing at garbage)."""
        if force or not self.lazy:
            self.io.flush()

    def begin_write(self):
        """Before the first change: clear the autoclear bits (the bitmaps this module
        does not keep up to date become inconsistent, as the spec asks) and, lazy,
        set the dirty bit, durably."""
        if self.started:
            return
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        h = self.header
        if h.version >= 3:
            changed = False
            if h.autoclear_features:
                h.autoclear_features = 0
                changed = True
            if self.lazy and not h.incompatible_features & INCOMPAT_DIRTY:
                h.incompatible_features |= INCOMPAT_DIRTY
                changed = True
            if changed:
                self.io.pwrite(struct.pack(">QQQ", h.incompatible_features, h.compatible_features,
                                           h.autoclear_features), 72)
                self.io.flush()
        self.started = True

    def _write_features(self):
        h = self.header
        self.io.pwrite(struct.pack(">Q", h.incompatible_features), 72)

    # -- writing -----------------------------------------------------------------------
    def plan_write(self, ranges):
        """Allocate what writing [(guest offset, length)] needs (refcounts written) and
        say where the bytes go: a Plan. The caller writes plan.fills and plan.data, then
        calls commit(plan). Under self.lock from here to commit."""
        self.begin_write()
        plan = Plan()
        cs, bits = self.cluster_size, self.cluster_bits
        covered = {}                                # guest cluster -> [(start, end)]
        for offset, length in ranges:
            self._check_range(offset, length)
            pos, end = offset, offset + length
            while pos < end:
                gc = pos >> bits
                n = min(end, (gc + 1) << bits) - pos
                covered.setdefault(gc, []).append((pos & (cs - 1), (pos & (cs - 1)) + n))
                pos += n
        host = {}                                   # guest cluster -> host offset
        need = []                                   # guest clusters needing a new one
        for gc in sorted(covered):
            e = self.entry(gc)
            t = cluster_type(e)
            if t in (NORMAL, ZERO_ALLOC):
                self._check_in_place(self.host_offset(e))
            if t == NORMAL and (e & OFLAG_COPIED or self.refcount(self.host_offset(e) >> bits) == 1):
                host[gc] = self.host_offset(e)
                if not e & OFLAG_COPIED:
                    plan.entries[gc] = host[gc] | OFLAG_COPIED
            elif t == ZERO_ALLOC and (e & OFLAG_COPIED or
                                      self.refcount(self.host_offset(e) >> bits) == 1):
                host[gc] = self.host_offset(e)      # preallocated: reuse, zero the rest
                plan.entries[gc] = host[gc] | OFLAG_COPIED
                self._plan_fills(plan, gc, host[gc], covered[gc], ("zero", None))
            else:
                need.append((gc, e, t))
        for l1i in sorted(set(gc >> self.l2_bits for gc, _, _ in need)):
            self._plan_l2(plan, l1i)
        if need:
            base = self._alloc_data(len(need))
            for k, (gc, e, t) in enumerate(need):
                h = base[k]
                host[gc] = h
                if h >= self._old_size:
                    plan.fresh.add(h)
                plan.entries[gc] = h | OFLAG_COPIED
                if t == UNALLOCATED:
                    src = ("backing", None) if self.backing_file else ("zero", None)
                elif t == NORMAL:
                    src = ("host", self.host_offset(e))
                    plan.frees.append((self.host_offset(e), cs))
                elif t == COMPRESSED:
                    src = ("compressed", e)
                    plan.frees.append(self.compressed_extent(e))
                else:
                    src = ("zero", None)
                    if t == ZERO_ALLOC:
                        plan.frees.append((self.host_offset(e), cs))
                self._plan_fills(plan, gc, h, covered[gc], src)
        self._rc_flush()
        for offset, length in ranges:
            pos, end = offset, offset + length
            while pos < end:
                gc = pos >> bits
                n = min(end, (gc + 1) << bits) - pos
                plan.data.append((pos, n, host[gc] + (pos & (cs - 1))))
                pos += n
        return plan

    def _check_in_place(self, host):
        """A cluster about to be written where it is: not metadata, not past the end of
        the file (a corrupt table); EIO and nothing written otherwise."""
        if host >> self.cluster_bits in self.meta or host >= self.file_size:
            raise QCow2Error(errno.EIO, "%s: a data cluster at %#x %s: the image is corrupt, "
                             "nothing written" % (self.path, host, "overlaps metadata" if
                                                  host >> self.cluster_bits in self.meta else
                                                  "lies past the end of the file"))

    def _alloc_data(self, count):
        """Host offsets of `count` new data clusters, contiguous when free space allows."""
        self._old_size = self._zeros_from()
        try:
            base = self._alloc(count)
            return [base + (k << self.cluster_bits) for k in range(count)]
        except QCow2Error as e:
            if e.errno == errno.ENOSPC or count == 1:
                raise
        return [self._alloc(1) for _ in range(count)]

    def _plan_l2(self, plan, l1i):
        """A new L2 table for l1i if it has none."""
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off:
            if not e & OFLAG_COPIED:
                if self.refcount(off >> self.cluster_bits) != 1:
                    raise QCow2Error(errno.ENOTSUP, "%s: L2 table at %#x is shared (internal "
                                     "snapshots?): not supported for writing" % (self.path, off))
                plan.new_l2[l1i] = off          # only the flag to set
            return
        plan.new_l2[l1i] = self._alloc(1)
        self._meta(plan.new_l2[l1i], self.cluster_size)

    def _plan_fills(self, plan, gc, host, spans, src):
        """The parts of guest cluster gc not covered by `spans`, filled from src."""
        cs = self.cluster_size
        kind, arg = src
        pos = 0
        for s, e in sorted(spans) + [(cs, cs)]:
            if s > pos:
                fill_arg = arg
                if kind == "backing":
                    fill_arg = (gc << self.cluster_bits) + pos
                elif kind == "host":
                    fill_arg = arg + pos
                elif kind == "compressed":
                    fill_arg = (arg, pos)
                if not (kind == "zero" and host in plan.fresh):
                    plan.fills.append((host + pos, s - pos, kind, fill_arg))
            pos = max(pos, e)

    def fill_data(self, plan):
        """[(bytes, host offset)] of plan.fills (backing/host/compressed/zero sources);
        the backing file's parts in one batch when a batch reader is set."""
        out = []
        cache = {}
        reader = None
        backing = [(n, arg) for _, n, kind, arg in plan.fills if kind == "backing"]
        if backing and self.backing_readv is not None:
            backing = iter(self.backing_readv(backing))
            reader = lambda n, off: next(backing)       # noqa: E731 - in the same order
        for host, n, kind, arg in plan.fills:
            if kind == "zero":
                data = bytes(n)
            elif kind == "backing":
                if reader is None:
                    reader = self.backing_reader()
                data = reader(n, arg) if reader is not None else bytes(n)
            elif kind == "host":
                data = self.io.pread(n, arg)
            else:
                entry, pos = arg
                if entry not in cache:
                    cache[entry] = self.read_compressed(entry)
                data = cache[entry][pos:pos + n]
            out.append((data, host))
        return out

    def commit(self, plan):
        """After the plan's data: a barrier, the L2 tables and entries, a barrier when
        there are new tables, their L1 entries; then frees (after a barrier)."""
        if not plan.entries and not plan.new_l2 and not plan.frees:
            return
        self._barrier()
        cs = self.cluster_size
        mask = self.l2_entries - 1
        writes = []
        by_table = {}
        for gc, e in plan.entries.items():
            by_table.setdefault(gc >> self.l2_bits, []).append((gc & mask, e))
        for l1i in sorted(set(by_table) | set(plan.new_l2)):
            changes = by_table.get(l1i, [])
            if l1i in plan.new_l2:
                old = self.l2_table(l1i)
                table = array("Q", old) if old is not None else array("Q", bytes(cs))
                for i, e in changes:
                    table[i] = e
                writes.append((_pack_u64(table), plan.new_l2[l1i]))
                self._l2_replace(l1i, table)
            else:
                self._change_entries(l1i, changes, writes)
        self.io.pwritev(writes)
        if plan.new_l2:
            self._barrier(force=True)
            l1w = []
            for l1i, off in sorted(plan.new_l2.items()):
                self.l1[l1i] = off | OFLAG_COPIED
                l1w.append((struct.pack(">Q", self.l1[l1i]), self.header.l1_table_offset + l1i * 8))
            self.io.pwritev(l1w)
            if self.on_l1 is not None:
                for l1i in sorted(plan.new_l2):
                    self.on_l1(l1i)
        if plan.frees:
            self._barrier()
            (self.on_free or self.free_clusters)(plan.frees)

    def _change_entries(self, l1i, changes, writes, frees=None):
        """[(index, entry)] set in the existing table of l1i; the sectors they are in
        (64 entries each) added to writes; frees: what the old entries held goes there."""
        table = self.l2_table(l1i)
        base = self.l1[l1i] & OFFSET_MASK
        for i, e in changes:
            if frees is not None:
                self._replaced(table[i], e, frees)
            table[i] = e
        if self.on_l2 is not None:
            self.on_l2(l1i, table, [i for i, _ in changes])
        for sector in sorted(set(i >> 6 for i, _ in changes)):
            first = sector << 6
            writes.append((_pack_u64(table[first:first + 64]), base + first * 8))

    def _replaced(self, old, new, frees):
        """What an L2 entry old held that new does not keep, added to frees."""
        t = cluster_type(old)
        if t in (NORMAL, ZERO_ALLOC) and new & OFFSET_MASK != old & OFFSET_MASK:
            frees.append((self.host_offset(old), self.cluster_size))
        elif t == COMPRESSED:
            frees.append(self.compressed_extent(old))

    # -- allocation by a caller that writes the data itself (a driver's queued writes) ----
    # Under self.lock: alloc_data (refcounts written), the caller writes the clusters,
    # then set_entries; prepare_l2 first for a table that does not exist yet.
    def prepare_l2(self, l1i):
        """Give L1 entry l1i a table of its own (zeros; or the COPIED flag on the one it
        has), durably linked, so that set_entries only changes entries."""
        e = self.l1[l1i]
        if e & OFFSET_MASK and e & OFLAG_COPIED:
            return
        self.begin_write()
        plan = Plan()
        self._plan_l2(plan, l1i)
        self._rc_flush()
        self.commit(plan)

    def alloc_data(self, count):
        """Host offsets of `count` new data clusters (contiguous when free space allows;
        refcounts written) and the file size before them: what lies at or past it
        reads zeros."""
        self.begin_write()
        hosts = self._alloc_data(count)
        self._rc_flush()
        return hosts, self._old_size

    def give_back(self, hosts):
        """Before close: clusters alloc_data gave that no table points at (a caller's
        reserve) freed, the spare ones too, and the free clusters that end the file cut
        off it."""
        self.free_clusters([(h, self.cluster_size) for h in hosts])
        if self._spare is not None:
            self._drop_spare()
        end = self.end_offset()
        if end < self.file_size and not getattr(self.io, "is_block", False):
            self.io.truncate(end)
            self.file_size = end

    def set_entries(self, entries, written=False):
        """After the data they point at (a barrier first, unless lazy): {guest cluster:
        entry} into tables prepare_l2 made (written: the caller wrote them into the
        file already, the cached tables only). Returns the frees of what they replace
        (the caller runs them once no request in flight can still use those clusters)."""
        if not written:
            self._barrier()
        mask = self.l2_entries - 1
        by_table = {}
        for gc, e in entries.items():
            by_table.setdefault(gc >> self.l2_bits, []).append((gc & mask, e))
        writes, frees = [], []
        for l1i, changes in sorted(by_table.items()):
            self._change_entries(l1i, changes, writes, frees)
        if not written:
            self.io.pwritev(writes)
        return frees

    def _l2_replace(self, l1i, table):
        with self.lock:
            self._l2[l1i] = table
            while len(self._l2) > self._l2_max:
                self._l2.popitem(last=False)
            if self.on_l2 is not None:
                self.on_l2(l1i, table, None)

    def write(self, data, offset):
        """Write data at guest offset (any alignment): allocation, copy-on-write from the
        backing chain, data, then the tables, in the crash-safe order."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        with self.lock:
            plan = self.plan_write([(offset, len(view))])
            writes = self.fill_data(plan)
            for goff, n, host in plan.data:
                writes.append((view[goff - offset:goff - offset + n], host))
            self.io.pwritev(writes)
            self.commit(plan)

    def _whole_clusters(self, offset, length):
        cs = self.cluster_size
        first = -(-offset // cs)
        end = offset + length
        last = end // cs if end < self.size else -(-end // cs)      # the last may be short
        return first, last

    def _set_entries(self, entries, frees):
        """New L2 entries {gc: entry} for existing or new tables (as commit does)."""
        plan = Plan()
        plan.entries = entries
        plan.frees = frees
        for l1i in sorted(set(gc >> self.l2_bits for gc in entries)):
            self._plan_l2(plan, l1i)
        self._rc_flush()
        self.commit(plan)

    def write_zeroes(self, offset, length, unmap=False):
        """Make [offset, offset + length) read as zeros, never the backing file's data:
        whole clusters by their entries (v3: zero clusters; unmap frees their space),
        partial ones written."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        self._check_range(offset, length)
        cs = self.cluster_size
        with self.lock:
            self.begin_write()
            first, last = self._whole_clusters(offset, length)
            if first >= last:
                return self._write_zero_bytes(offset, length)
            if offset < first * cs:
                self._write_zero_bytes(offset, first * cs - offset)
            tail = min(offset + length, self.size)
            if tail > last * cs:
                self._write_zero_bytes(last * cs, tail - last * cs)
            backing = self.backing_file is not None
            inplace = []

            def zeroed(gc, e, t):
                if t == ZERO_PLAIN or (t == UNALLOCATED and not backing and self.version < 3):
                    return None
                if self.version >= 3:
                    if t in (NORMAL, ZERO_ALLOC) and not unmap and e & OFLAG_COPIED:
                        return self.host_offset(e) | OFLAG_COPIED | OFLAG_ZERO
                    return OFLAG_ZERO
                if backing or (t == NORMAL and not unmap):
                    inplace.append(gc)              # v2 has no zero flag: real zeros
                    return None
                return 0                            # v2 without a backing file

            self._rewrite(first, last, zeroed)
            for gc in inplace:
                self._write_zero_bytes(gc * cs, min(cs, self.size - gc * cs))

    def _rewrite(self, first, last, new_entry):
        """Whole clusters [first, last): new_entry(gc, entry, type) is the new L2 entry,
        or None to leave it; the old clusters a new entry does not keep are freed once
        the tables no longer point at them. In chunks of 8192 entries."""
        entries, frees = {}, []
        for gc in range(first, last):
            e = self.entry(gc)
            t = cluster_type(e)
            new = new_entry(gc, e, t)
            if new is None:
                continue
            entries[gc] = new
            self._replaced(e, new, frees)
            if len(entries) >= 8192:
                self._set_entries(entries, frees)
                entries, frees = {}, []
        if entries or frees:
            self._set_entries(entries, frees)

    def _write_zero_bytes(self, offset, length):
        if length <= 0:
            return
        for pos, n, kind in self.extents(offset, length):
            if kind == ZERO or (kind == HOLE and self.backing_file is None):
                continue
            self.write(bytes(n), pos)

    def discard(self, offset, length):
        """Give whole clusters of [offset, offset + length) back (partial ones stay):
        they read as zeros afterwards, never as the backing file's data."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        self._check_range(offset, length)
        cs = self.cluster_size
        with self.lock:
            first, last = self._whole_clusters(offset, length)
            if first >= last:
                return
            self.begin_write()
            backing = self.backing_file is not None
            punch = []

            def discarded(gc, e, t):
                if t == ZERO_PLAIN or (t == UNALLOCATED and (not backing or self.version < 3)):
                    return None
                if self.version < 3 and backing:
                    if t == NORMAL and e & OFLAG_COPIED:
                        punch.append(self.host_offset(e))   # stays allocated, reads zeros
                    return None
                return OFLAG_ZERO if backing else 0

            self._rewrite(first, last, discarded)
            trim = getattr(self.io, "trim", None)
            for host in punch:
                if trim is not None:
                    trim(cs, host)
                else:
                    self.io.pwrite(bytes(cs), host)

    # -- header changes ----------------------------------------------------------------
    def write_header(self):
        """Rewrite the first cluster's header part (extensions and backing name kept or
        changed in self.header), one write, made durable."""
        raw = self.header.pack()
        pad = max(0, self.header.used_length - len(raw))    # the old tail, zeroed
        self.io.pwrite(raw + bytes(pad), 0)
        self.header.used_length = len(raw)
        self.io.flush()

    def set_hidden(self, value):
        """XCP-ng's hidden flag: the "vate" extension's first byte (added if missing)."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        value = 1 if value else 0
        pos = self.header.hidden_offset()
        if pos is not None:
            data = bytearray(self.header.ext(EXT_HIDDEN))
            data[0] = value
            self.header.set_ext(EXT_HIDDEN, bytes(data))
            self.io.pwrite(bytes([value]), pos)
            self.io.flush()
        else:
            self.header.set_ext(EXT_HIDDEN, bytes([value]) + bytes(7))
            self.write_header()
        self.hidden = value

    def set_backing(self, name, fmt):
        """rebase -u: a new backing file name (None: none) and format, nothing copied."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        h = self.header
        if name is not None:
            raw = name.encode("utf-8")
            if not raw or len(raw) > MAX_BACKING_NAME or b"\0" in raw:
                raise _einval("invalid backing file name %r" % name)
        h.backing_file = name
        if name is None or fmt is None:
            h.del_ext(EXT_BACKING_FORMAT)
        else:
            h.set_ext(EXT_BACKING_FORMAT, fmt.encode("ascii"))
        self.write_header()
        self._backing_chain = None

    def grow(self, new_size):
        """A bigger virtual size (the L1 table moved if it must grow); the new part reads
        as zeros even where the backing file is bigger (as qemu)."""
        if not self.writable:
            raise QCow2Error(errno.EROFS, "%s: opened read-only" % self.path)
        if new_size < self.size:
            raise QCow2Error(errno.EINVAL, "%s: shrinking (%d -> %d) is not supported"
                             % (self.path, self.size, new_size))
        if new_size >= 1 << 62:
            raise QCow2Error(errno.EFBIG, "%s: size %d too large" % (self.path, new_size))
        with self.lock:
            self.begin_write()
            h = self.header
            cs = self.cluster_size
            old_size = self.size
            need = -(-new_size // (cs * self.l2_entries))
            if need * 8 > MAX_L1_BYTES:
                raise QCow2Error(errno.EFBIG, "%s: size %d needs an L1 table over %d bytes"
                                 % (self.path, new_size, MAX_L1_BYTES))
            if need > h.l1_size:
                nclusters = -(-need * 8 // cs)
                old_clusters = -(-h.l1_size * 8 // cs)
                table = array("Q", list(self.l1) + [0] * (need - len(self.l1)))
                if nclusters <= old_clusters and h.l1_size:
                    off = h.l1_table_offset         # room in place: zero the new entries
                    self.io.pwrite(bytes((need - h.l1_size) * 8), off + h.l1_size * 8)
                    self._barrier(force=True)
                    old = None
                else:
                    off = self._alloc(nclusters)
                    self._meta(off, nclusters * cs)
                    self._rc_flush()
                    self.io.pwrite(_pack_u64(table) + bytes(nclusters * cs - need * 8), off)
                    self._barrier(force=True)
                    old = (h.l1_table_offset, old_clusters * cs) if h.l1_size else None
                h.l1_size, h.l1_table_offset, h.size = need, off, new_size
                self.io.pwrite(struct.pack(">QIIQ", new_size, h.crypt_method, need, off), 24)
                self._barrier(force=True)
                self.l1 = table
                if old:
                    self._meta(old[0], old[1], add=False)
                    self.free_clusters([old])
            else:
                h.size = new_size
                self.io.pwrite(struct.pack(">Q", new_size), 24)
                self.io.flush()
            self.size = new_size
            bsize = self._backing_size()
            if bsize > old_size:
                self.write_zeroes(old_size, min(new_size, bsize) - old_size)

    def _backing_size(self):
        if self.backing_file is None:
            return 0
        try:
            if self.backing_is_raw():
                return os.path.getsize(self.backing_path())
            with Image(self.backing_path()) as b:
                return b.size
        except (OSError, QCow2Error):
            return 0

    # -- queries ---------------------------------------------------------------------------
    def allocated_clusters(self):
        """Guest clusters with data of their own (qemu check's allocated-clusters:
        normal, compressed and preallocated zero clusters)."""
        total = 0
        for l1i in range(len(self.l1)):
            table = self._table_for_scan(l1i)
            if table is None:
                continue
            for e in table:
                if e and cluster_type(e) in (NORMAL, COMPRESSED, ZERO_ALLOC):
                    total += 1
        return total

    def _table_for_scan(self, l1i):
        """An L2 table for a full scan (not kept in the cache)."""
        table = self._l2.get(l1i)
        return table if table is not None else self._read_l2(l1i)

    def allocation_bitmap(self):
        """1 bit per guest cluster (MSB first), set where this image holds data of its own
        (as vhd-util read -B: ceil(clusters / 8) bytes)."""
        nclusters = -(-self.size // self.cluster_size)
        bm = bytearray(-(-nclusters // 8))
        for l1i in range(len(self.l1)):
            table = self._table_for_scan(l1i)
            if table is None:
                continue
            base = l1i << self.l2_bits
            for i, e in enumerate(table):
                gc = base + i
                if gc >= nclusters:
                    break
                if e and cluster_type(e) in (NORMAL, COMPRESSED, ZERO_ALLOC):
                    bm[gc >> 3] |= 0x80 >> (gc & 7)
        return bytes(bm)

    def end_offset(self):
        """End of the last cluster in use (refcount > 0): the image's physical size."""
        self._load_reftable()
        for ri in range(len(self.reftable) - 1, -1, -1):
            if not self.reftable[ri] & REFT_OFFSET_MASK:
                continue
            blk = self._rb_load(ri)
            for i in range(self.rb_entries - 1, -1, -1):
                if self._rc_get_in(blk, i):
                    return min(((ri << self.rb_bits) + i + 1) << self.cluster_bits,
                               max(self.file_size, 1))
        return self.file_size

    # -- closing -----------------------------------------------------------------------
    def flush(self):
        with self.lock:
            self._rc_flush()
            self.io.flush()

    def close(self):
        if self.io is None:
            return
        try:
            if self._backing_chain is not None:
                self._backing_chain.close()
                self._backing_chain = None
            if self.writable and self.started:
                self._release_spare()
                self._rc_flush()
                self.io.flush()
                if self.header.incompatible_features & INCOMPAT_DIRTY and self.lazy:
                    self.header.incompatible_features &= ~INCOMPAT_DIRTY
                    self._write_features()
                    self.io.flush()
        finally:
            if self.own_io:
                self.io.close()
            self.io = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- chains ---------------------------------------------------------------------------------
class Chain(VhdChain):
    """A leaf and its backing files (read-only below the leaf; qcow2 or raw, the last
    may be raw), read as the leaf shows them (read, close, with: VHD's chain's)."""

    def __init__(self, path, writable=False, max_depth=MAX_CHAIN, **kw):
        self.images = []
        self.raw = None
        self.raw_path = None
        self.raw_size = 0
        try:
            leaf = Image(path, writable=writable, **kw)
            self.images.append(leaf)
            self._follow(leaf, max_depth)
            if writable:
                leaf._backing = self._reader(1)
        except Exception:
            self.close()
            raise

    @classmethod
    def open_backing(cls, image, max_depth=MAX_CHAIN):
        """The chain below an open image (the image itself not included)."""
        chain = cls.__new__(cls)
        chain.images, chain.raw, chain.raw_path, chain.raw_size = [], None, None, 0
        try:
            chain._follow(image, max_depth, below=True)
        except Exception:
            chain.close()
            raise
        return chain

    def _follow(self, cur, max_depth, below=False):
        seen = set()
        try:
            st = os.stat(cur.path)
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        depth = 1
        while cur.backing_file is not None:
            depth += 1
            if depth > max_depth:
                raise QCow2Error(errno.ELOOP, "%s: chain deeper than %d" % (self.path_of(), max_depth))
            bpath = cur.backing_path()
            try:
                st = os.stat(bpath)
            except OSError as e:
                raise QCow2Error(e.errno, "%s: backing file %s: %s"
                                 % (cur.path, bpath, e.strerror))
            if (st.st_dev, st.st_ino) in seen:
                raise QCow2Error(errno.ELOOP, "%s: backing file loop at %s" % (cur.path, bpath))
            seen.add((st.st_dev, st.st_ino))
            if cur.backing_is_raw():
                self.raw = open_file(bpath)
                self.raw_path = bpath
                self.raw_size = self.raw.size()
                return
            nxt = Image(bpath)
            self.images.append(nxt)
            cur = nxt

    def path_of(self):
        return self.images[0].path if self.images else "?"

    @property
    def depth(self):
        """Images in the chain counting a raw backing file (a lone image: 1)."""
        return len(self.images) + (1 if self.raw is not None else 0)

    def _reader(self, level):
        def read(length, offset):
            out = bytearray(length)
            self._fill(out, offset, level, offset, length)
            return bytes(out)
        return read

    def pread(self, length, offset):
        """length bytes at offset as the top of this chain shows them."""
        return self.read(offset, length)

    def _fill(self, out, base, level, offset, length):
        if level == len(self.images):
            if self.raw is not None:
                n = max(0, min(length, self.raw_size - offset))
                if n:
                    data = self.raw.pread(n, offset)
                    out[offset - base:offset - base + len(data)] = data
            return
        img = self.images[level]
        n = max(0, min(length, img.size - offset))
        if not n:
            return
        for off, ln, kind in img.extents(offset, n):
            if kind == DATA:
                out[off - base:off - base + ln] = img.read(off, ln)
            elif kind == HOLE:
                self._fill(out, base, level + 1, off, ln)


def chain_depth(path):
    """Images in the chain counting the image itself and a raw backing file."""
    with Chain(path) as chain:
        return chain.depth
