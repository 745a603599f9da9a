"""The VHD format as tapdisk and vhd-util write it (and as qemu, Hyper-V read it).

Layout of a dynamic or differencing image (all integers big-endian, sector = 512):

    0      footer copy (the "backup" footer)         512 bytes
    512    dynamic header                            1024 bytes
    1536   BAT: u32 sector offset per block, 0xFFFFFFFF = unallocated, sector padded
           batmap header ("tdbatmap", tapdisk's), then the batmap (1 bit = block full)
           parent locators (MACX, W2KU, W2RU), sector aligned
           blocks: sector bitmap (1 bit per sector, MSB first) + data, data 4 KiB aligned
    end    footer (the "primary" footer)             512 bytes

A fixed image is the raw data followed by the footer. This module reads and writes one
image; `Chain` reads through a chain of them. Everything goes through a small file
interface (`PosixFile`: pread/pwrite/preadv/pwritev/flush/size/truncate) so that a disk
driver can feed the same code through its own I/O path.

Errors are `VHDError`, an OSError with the errno upstream's libvhd returns (EINVAL for
anything that is not a valid VHD), so command lines exit with it and drivers pass it on.
"""
import errno
import os
import stat
import struct
import time
import uuid as uuidlib
from array import array

from smtap.sparse import pwrite_all

SECTOR = 512
PAGE = 4096
DEFAULT_BLOCK_SIZE = 2 << 20
MAX_VHD_SIZE = 2040 << 30            # what the storage layer allows (vhdutil.MAX_VHD_SIZE)
DD_BLK_UNUSED = 0xFFFFFFFF

HD_TYPE_NONE, HD_TYPE_FIXED, HD_TYPE_DYNAMIC, HD_TYPE_DIFF = 0, 2, 3, 4
HD_TYPE_MAX = 6
TYPE_NAMES = {HD_TYPE_FIXED: "Fixed", HD_TYPE_DYNAMIC: "Dynamic", HD_TYPE_DIFF: "Differencing"}

HD_COOKIE = b"conectix"
POISON_COOKIE = b"v_poison"          # a journalled operation is in progress
DD_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
HD_TEMPORARY, HD_RESERVED = 0x1, 0x2
HD_FF_VERSION = 0x00010000
DD_VERSION = 0x00010000
HD_CR_OS_WINDOWS, HD_CR_OS_MACINTOSH = 0x5769326B, 0x4D616320

PLAT_CODE_NONE = 0
PLAT_CODE_WI2R = 0x57693272
PLAT_CODE_WI2K = 0x5769326B
PLAT_CODE_W2RU = 0x57327275
PLAT_CODE_W2KU = 0x57326B75
PLAT_CODE_MAC = 0x4D616320
PLAT_CODE_MACX = 0x4D616358
PLAT_CODES = {PLAT_CODE_NONE: "PLAT_CODE_NONE", PLAT_CODE_WI2R: "PLAT_CODE_WI2R",
              PLAT_CODE_WI2K: "PLAT_CODE_WI2K", PLAT_CODE_W2RU: "PLAT_CODE_W2RU",
              PLAT_CODE_W2KU: "PLAT_CODE_W2KU", PLAT_CODE_MAC: "PLAT_CODE_MAC",
              PLAT_CODE_MACX: "PLAT_CODE_MACX"}

VHD_EPOCH = 946684800                # 2000-01-01 00:00:00 UTC


def version(major, minor):
    return (major << 16) | (minor & 0xFFFF)


CREATOR_APP = b"tap\0"
CREATOR_VERSION = version(1, 3)      # 1.3: batmap 1.2
BATMAP_VERSION = version(1, 2)       # 1.2: unsigned batmap checksum (1.1: signed chars)
# tapdisk poisons the primary footer of a leaf it has open read-write with these bytes.
FOOTER_POISON = b"\xc7" * SECTOR
NULL_UUID = bytes(16)


class VHDError(OSError):
    """An OSError whose errno is what upstream's libvhd would return."""

    def __init__(self, err, message):
        super(VHDError, self).__init__(err, message)


def _einval(message):
    return VHDError(errno.EINVAL, message)


def vhd_time(unix_time=None):
    if unix_time is None:
        unix_time = time.time()
    return (int(unix_time) - VHD_EPOCH) & 0xFFFFFFFF


def secs_round_up(nbytes):
    return (nbytes + SECTOR - 1) // SECTOR


def secs_round_up_no_zero(nbytes):
    return secs_round_up(nbytes) or 1


def bytes_padded(nbytes):
    return secs_round_up_no_zero(nbytes) * SECTOR


def chs(size):
    """The CHS geometry of the VHD specification (u32: cyl << 16 | heads << 8 | spt)."""
    secs = secs_round_up_no_zero(size)
    secs = min(secs, 65535 * 16 * 255)
    if secs >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = secs // spt
    else:
        spt = 17
        cth = secs // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = secs // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = secs // spt
    return ((cth // heads) << 16) | (heads << 8) | spt


def checksum(raw):
    """One's complement of the byte sum (the checksum field must be zero in `raw`)."""
    return ~sum(raw) & 0xFFFFFFFF


# -- bitmaps: 1 bit per item, most significant bit first --------------------------------
def test_bit(buf, n):
    return bool(buf[n >> 3] & (0x80 >> (n & 7)))


def set_bit(buf, n):
    buf[n >> 3] |= 0x80 >> (n & 7)


def clear_bit(buf, n):
    buf[n >> 3] &= ~(0x80 >> (n & 7)) & 0xFF


def set_bits(buf, start, end):
    """Set bits [start, end) of bytearray buf."""
    while start < end and start & 7:
        set_bit(buf, start)
        start += 1
    full = (end - start) >> 3
    if full:
        buf[start >> 3:(start >> 3) + full] = b"\xff" * full
        start += full << 3
    while start < end:
        set_bit(buf, start)
        start += 1


def bit_runs(buf, start, end):
    """[(first, last_plus_one, bit)] runs of equal bits in [start, end) of buf."""
    nbits = len(buf) * 8
    value = int.from_bytes(bytes(buf), "big")     # bit n <-> 1 << (nbits - 1 - n)
    inverse = value ^ ((1 << nbits) - 1)
    runs, pos = [], start
    while pos < end:
        bit = (value >> (nbits - 1 - pos)) & 1
        other = inverse if bit else value          # look for the first bit != bit
        rest = other & ((1 << (nbits - pos)) - 1)
        nxt = end if not rest else min(end, nbits - rest.bit_length())
        runs.append((pos, nxt, bit))
        pos = nxt
    return runs


# -- on-disk records ---------------------------------------------------------------------
class _Record(object):
    """A fixed-size big-endian record: FIELDS in STRUCT order."""
    STRUCT = None
    FIELDS = ()

    def __init__(self, **values):
        for name, value in zip(self.FIELDS, self.STRUCT.unpack(bytes(self.STRUCT.size))):
            setattr(self, name, values.get(name, value))

    @classmethod
    def unpack(cls, raw):
        raw = bytes(raw[:cls.STRUCT.size]).ljust(cls.STRUCT.size, b"\0")
        rec = cls.__new__(cls)
        for name, value in zip(cls.FIELDS, cls.STRUCT.unpack(raw)):
            setattr(rec, name, value)
        return rec

    def pack(self, **override):
        return self.STRUCT.pack(*[override.get(n, getattr(self, n)) for n in self.FIELDS])

    def copy(self):
        return self.unpack(self.pack())

    def __eq__(self, other):
        return type(self) is type(other) and self.pack() == other.pack()

    def __ne__(self, other):
        return not self == other


class Footer(_Record):
    STRUCT = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")
    FIELDS = ("cookie", "features", "ff_version", "data_offset", "timestamp", "crtr_app",
              "crtr_ver", "crtr_os", "orig_size", "curr_size", "geometry", "type",
              "checksum", "uuid", "saved", "hidden", "reserved")

    def compute_checksum(self):
        return checksum(self.pack(checksum=0))

    def checksum_ok(self):
        if self.compute_checksum() == self.checksum:
            return True
        # Early td-util set 'hidden' without updating the checksum (creator 0.1 / 1.1).
        if self.hidden and self.from_tapdisk() and self.crtr_ver in (version(0, 1), version(1, 1)):
            return checksum(self.pack(checksum=0, hidden=0)) == self.checksum
        return False

    def seal(self):
        self.checksum = self.compute_checksum()
        return self.pack()

    def from_tapdisk(self):
        return self.crtr_app[:3] == b"tap"

    @property
    def dynamic(self):
        return self.type in (HD_TYPE_DYNAMIC, HD_TYPE_DIFF)


class Locator(object):
    """A parent locator entry of the dynamic header."""
    STRUCT = struct.Struct(">IIIIQ")

    def __init__(self, code=0, data_space=0, data_len=0, res=0, data_offset=0):
        self.code, self.data_space, self.data_len = code, data_space, data_len
        self.res, self.data_offset = res, data_offset

    def pack(self):
        return self.STRUCT.pack(self.code, self.data_space, self.data_len, self.res,
                                self.data_offset)

    def size(self):
        """Bytes the locator occupies: data_space is sectors per the spec, but tapdisk
        (for Microsoft's sake) writes bytes; 0 if neither reading makes sense."""
        if self.data_space < 512:
            return self.data_space * SECTOR
        if self.data_space % 512 == 0:
            return self.data_space
        return 0


class Header(_Record):
    STRUCT = struct.Struct(">8sQQIIII16sII512s192s256s")
    FIELDS = ("cookie", "data_offset", "table_offset", "hdr_ver", "max_bat_size",
              "block_size", "checksum", "prt_uuid", "prt_ts", "res1", "prt_name",
              "loc_raw", "res2")

    @property
    def locators(self):
        if not hasattr(self, "_locators") or self._locators_raw != self.loc_raw:
            self._locators = [Locator(*Locator.STRUCT.unpack_from(self.loc_raw, 24 * i))
                              for i in range(8)]
            self._locators_raw = self.loc_raw
        return self._locators

    def store_locators(self):
        self.loc_raw = b"".join(loc.pack() for loc in self.locators)
        self._locators_raw = self.loc_raw

    def pack(self, **override):
        if hasattr(self, "_locators") and "loc_raw" not in override:
            self.store_locators()
        return super(Header, self).pack(**override)

    def compute_checksum(self):
        return checksum(self.pack(checksum=0))

    def seal(self):
        self.checksum = self.compute_checksum()
        return self.pack()


class BatmapHeader(_Record):
    STRUCT = struct.Struct(">8sQIIIBB32s32s418s")
    FIELDS = ("cookie", "batmap_offset", "batmap_size", "batmap_version", "checksum",
              "marker", "kh_cookie", "kh_nonce", "kh_hash", "res")


def encode_parent_name(path):
    """The header's parent name: the parent's basename, UTF-16BE, 512 bytes."""
    name = os.path.basename(path)
    if not name:
        raise _einval("empty parent name")
    raw = name.encode("utf-16-be")
    if len(raw) > 512:
        raise VHDError(errno.ENAMETOOLONG, "parent name too long: %s" % name)
    return raw.ljust(512, b"\0")


def _w2u_decode(raw, codec):
    try:
        name = raw.decode(codec)
    except UnicodeDecodeError:
        return None
    name = name.split("\0", 1)[0].replace("\\", "/")
    if name[:2] in ("C:", "c:"):
        name = name[2:]
    return name


def decode_parent_name(footer, header):
    codec = "utf-16" if footer.from_tapdisk() and footer.crtr_ver == version(0, 1) else "utf-16-be"
    name = _w2u_decode(header.prt_name, codec)
    if name is None:
        raise _einval("invalid parent name")
    return name


def encode_locator(code, relative):
    if code == PLAT_CODE_MACX:
        return ("file://" + relative).encode("utf-8")
    if relative[0] != "/":      # Microsoft wants relative paths to start with ".\"
        relative = ".\\" + (relative[2:] if relative.startswith("./") else relative)
    return relative.replace("/", "\\").encode("utf-16-le")


def decode_locator(code, raw):
    if code == PLAT_CODE_MACX:
        try:
            name = raw.decode("utf-8").split("\0", 1)[0]
        except UnicodeDecodeError:
            return None
        return name[len("file://"):] if name.startswith("file://") else None
    if code in (PLAT_CODE_W2KU, PLAT_CODE_W2RU):
        return _w2u_decode(raw, "utf-16-le")
    return None


def relative_path(from_file, to_file):
    """Path of to_file relative to from_file's directory, as "./x" or "../d/x"."""
    rel = os.path.relpath(os.path.realpath(to_file), os.path.dirname(os.path.realpath(from_file)))
    return rel if rel.startswith("../") else "./" + rel


# -- storage layer size estimates (sm's vhdutil.calcOverhead*) ---------------------------
def overhead_empty(virtual_size):
    """Metadata bytes of an empty VHD of virtual_size, as the storage layer reserves them."""
    size_mb = virtual_size // (1 << 20)
    overhead = 3 * 1024 + (size_mb // 2) * 4
    overhead = -(-overhead // 512) * 512
    overhead += (size_mb // 2) // 8
    return -(-overhead // 4096) * 4096


def overhead_bitmap(virtual_size):
    """Bitmap bytes of a fully allocated VHD: 4 KiB per 2 MiB block."""
    return -(-virtual_size // DEFAULT_BLOCK_SIZE) * 4096


def overhead_full(virtual_size):
    return overhead_empty(virtual_size) + overhead_bitmap(virtual_size)


# -- file interface ----------------------------------------------------------------------
class PosixFile(object):
    """The file interface the format code uses (the engine's driver can supply its own
    with the same methods: pread, pwrite, preadv, pwritev, flush, size, truncate, close;
    is_block tells whether the footer lives at the end of a fixed-size device)."""

    def __init__(self, path, writable=False, create=False):
        flags = os.O_RDWR if writable or create else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not self.is_block and not stat.S_ISREG(st.st_mode):
                raise _einval("%s is not a regular file or block device" % path)
        except Exception:
            os.close(self.fd)
            raise
        self.writable = writable or create

    def pread(self, length, offset):
        out = []
        while length > 0:
            data = os.pread(self.fd, length, offset)
            if not data:
                break
            out.append(data)
            length -= len(data)
            offset += len(data)
        return b"".join(out) if len(out) != 1 else out[0]

    def pwrite(self, buf, offset):
        pwrite_all(self.fd, buf, offset)

    def preadv(self, requests):
        return [self.pread(length, offset) for length, offset in requests]

    def pwritev(self, requests):
        for buf, offset in requests:
            pwrite_all(self.fd, buf, offset)

    def flush(self):
        os.fsync(self.fd)

    def size(self):
        return os.lseek(self.fd, 0, os.SEEK_END)

    def truncate(self, size):
        os.ftruncate(self.fd, size)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_file(path, writable):
    try:
        return PosixFile(path, writable)
    except VHDError:
        raise
    except OSError as e:
        raise VHDError(e.errno, "%s: %s" % (path, e.strerror))


# -- one image -----------------------------------------------------------------------------
class VHD(object):
    """One open VHD image.

    VHD(path, writable=False) opens it: the primary footer (end of file; a 511-byte one
    too), else the backup at offset 0 (use_backup=True goes straight to it); a footer
    poisoned by a journalled operation opens only with ignore_disabled=True. strict=True
    (read-write leaf, as tapdisk): the trailing footer is poisoned until close()
    rewrites it, so only the backup at 0 is valid while the image is open.

    Geometry: size (virtual bytes), type, block_size, spb (sectors per block), bm_secs,
    blocks (BAT entries in use). BAT: bat[blk] (sector or DD_BLK_UNUSED), block_offset().
    Data: extents(), read(), write(), allocate_block(). Chains: parent_path(),
    parent_is_raw, validate_parent(). flush() makes data and metadata durable.
    """

    def __init__(self, path, writable=False, use_backup=False, ignore_disabled=False,
                 strict=False, io=None, fast=False, lax_batmap=False):
        self.path = path
        self.writable = writable
        self.io = io if io is not None else _open_file(path, writable)
        self.strict = False
        self.dirty = False
        self.ordered = True         # barrier (flush) between a new block and its BAT entry
        self.header = None
        self.batmap = None
        self.batmap_map = None
        self.bat = None
        self._eod = None
        self.lax_batmap = lax_batmap    # keep a damaged batmap for `check` to report
        try:
            self._load(use_backup or fast, ignore_disabled, fast)
            if strict and writable:
                self.poison_footer()
                self.strict = True
        except Exception:
            if io is None:
                self.io.close()
            raise

    # -- loading -----------------------------------------------------------------------
    def _load(self, use_backup, ignore_disabled, fast):
        self.file_size = self.io.size()
        self.footer, self.footer_offset = self._read_footer(use_backup)
        if self.footer.cookie == POISON_COOKIE and not ignore_disabled:
            raise _einval("%s: disabled by an unfinished journalled operation (revert it)"
                          % self.path)
        if self.footer.from_tapdisk() and self.footer.crtr_ver == 0x00000001:
            raise _einval("%s: unsupported VHD version 0.1" % self.path)
        if self.footer.type not in (HD_TYPE_FIXED, HD_TYPE_DYNAMIC, HD_TYPE_DIFF):
            raise _einval("%s: invalid disk type %d" % (self.path, self.footer.type))
        if not self.dynamic:
            self.block_size = DEFAULT_BLOCK_SIZE
            self.spb = self.block_size // SECTOR
            self.bm_secs = 0
            return
        self.header = self._read_header()
        self.block_size = self.header.block_size
        self.spb = self.block_size // SECTOR
        self.bm_secs = secs_round_up_no_zero(self.spb >> 3)
        if not fast:
            self._read_bat()
            if self.has_batmap():
                self._read_batmap()

    def _pread_exact(self, length, offset, what):
        data = self.io.pread(length, offset)
        if len(data) != length:
            raise _einval("%s: %s at %d is past the end of the file" % (self.path, what, offset))
        return data

    def _read_footer(self, use_backup):
        size = self.file_size
        if not use_backup and size >= SECTOR:
            f = self._valid_footer(self.io.pread(SECTOR, size - SECTOR))
            if f:
                return f, size - SECTOR
            if size % SECTOR == SECTOR - 1:          # a 511-byte footer
                f = self._valid_footer(self.io.pread(SECTOR - 1, size - SECTOR + 1))
                if f:
                    return f, size - SECTOR + 1
        if size >= SECTOR:
            f = self._valid_footer(self.io.pread(SECTOR, 0))
            if f:
                return f, 0
        raise _einval("%s: not a VHD (no valid footer)" % self.path)

    @staticmethod
    def _valid_footer(raw):
        f = Footer.unpack(raw)
        if f.cookie not in (HD_COOKIE, POISON_COOKIE) or not f.checksum_ok():
            return None
        return f

    def _read_header(self):
        off = self.footer.data_offset
        if off > self.file_size:
            raise _einval("%s: header offset %#x past the end of the file" % (self.path, off))
        h = Header.unpack(self._pread_exact(1024, off, "header"))
        problem = validate_header(h)
        if problem:
            raise _einval("%s: invalid header: %s" % (self.path, problem))
        return h

    def _read_bat(self):
        h = self.header
        entries = -(-self.footer.curr_size // self.block_size)
        if entries > h.max_bat_size:
            raise _einval("%s: more blocks (%d) than the BAT holds (%d)"
                          % (self.path, entries, h.max_bat_size))
        nbytes = entries * 4
        if h.table_offset + nbytes > self.file_size:
            raise _einval("%s: BAT past the end of the file" % self.path)
        bat = array("I")
        bat.frombytes(self._pread_exact(nbytes, h.table_offset, "BAT"))
        if bat.itemsize != 4:
            raise RuntimeError("array('I') is not 32 bits here")
        if struct.pack("=I", 1) != struct.pack(">I", 1):
            bat.byteswap()
        self.bat = bat

    def has_batmap(self):
        """tapdisk's batmap: only in images tapdisk created (creator 1.1 maybe, 1.2+ always)."""
        f = self.footer
        if not self.dynamic or not f.from_tapdisk() or f.crtr_ver <= version(0, 1):
            return False
        if f.crtr_ver >= version(1, 2):
            return True
        try:
            return self._read_batmap_header().cookie == BATMAP_COOKIE
        except VHDError:
            return False

    def batmap_header_offset(self):
        return self.header.table_offset + bytes_padded(self.header.max_bat_size * 4)

    def _read_batmap_header(self):
        off = self.batmap_header_offset()
        return BatmapHeader.unpack(self._pread_exact(SECTOR, off, "batmap header"))

    def batmap_map_bytes(self):
        """The part of the batmap libvhd reads, writes and checksums (depends on the size)."""
        return secs_round_up_no_zero(self.footer.curr_size >> (21 + 3)) * SECTOR

    def _read_batmap(self):
        bh = self._read_batmap_header()
        if self.lax_batmap:
            self.batmap = bh
            n = min(self.batmap_map_bytes(), max(0, self.file_size - bh.batmap_offset))
            self.batmap_map = bytearray(self.io.pread(n, bh.batmap_offset).ljust(
                self.batmap_map_bytes(), b"\0"))
            return
        if bh.cookie != BATMAP_COOKIE:
            raise _einval("%s: invalid batmap cookie" % self.path)
        if bh.batmap_version > BATMAP_VERSION:
            raise _einval("%s: unsupported batmap version %#x" % (self.path, bh.batmap_version))
        nbytes = self.batmap_map_bytes()
        if bh.batmap_size * SECTOR < nbytes or bh.batmap_offset + nbytes > self.file_size:
            raise _einval("%s: batmap does not fit" % self.path)
        self.batmap = bh
        self.batmap_map = bytearray(self._pread_exact(nbytes, bh.batmap_offset, "batmap"))
        if self.batmap_checksum() != bh.checksum:
            raise _einval("%s: invalid batmap checksum" % self.path)

    def batmap_checksum(self, bh=None, data=None):
        bh = bh or self.batmap
        data = self.batmap_map if data is None else data
        data = bytes(data[:self.batmap_map_bytes()])
        if bh.batmap_version == version(1, 1):          # summed as signed chars
            total = sum(data) - 256 * sum(1 for b in data if b > 127)
        else:
            total = sum(data)
        return ~total & 0xFFFFFFFF

    # -- geometry ------------------------------------------------------------------------
    @property
    def dynamic(self):
        return self.footer.dynamic

    @property
    def type(self):
        return self.footer.type

    @property
    def size(self):
        return self.footer.curr_size

    @property
    def uuid(self):
        return uuidlib.UUID(bytes=self.footer.uuid)

    @property
    def blocks(self):
        return len(self.bat) if self.bat is not None else 0

    @property
    def disabled(self):
        return self.footer.cookie == POISON_COOKIE

    @property
    def parent_uuid(self):
        return uuidlib.UUID(bytes=self.header.prt_uuid) if self.header else None

    @property
    def parent_is_raw(self):
        return self.type == HD_TYPE_DIFF and self.header.prt_uuid == NULL_UUID

    def block_offset(self, blk):
        """Sector of block blk's bitmap, or None when it is not allocated."""
        off = self.bat[blk]
        return None if off == DD_BLK_UNUSED else off

    def allocated_blocks(self):
        return sum(1 for off in self.bat if off != DD_BLK_UNUSED) if self.bat else 0

    def block_full(self, blk):
        """The batmap says every sector of the block is written (reads skip the bitmap)."""
        if self.batmap_map is None or blk >= len(self.batmap_map) * 8:
            return False
        return test_bit(self.batmap_map, blk)

    def read_bitmap(self, blk):
        off = self.block_offset(blk)
        if off is None:
            return None
        return bytearray(self._pread_exact(self.bm_secs * SECTOR, off * SECTOR, "bitmap"))

    def read_bitmaps(self, blocks):
        """{blk: bitmap} for allocated blocks, one batch of reads."""
        blocks = [b for b in blocks if self.bat[b] != DD_BLK_UNUSED]
        n = self.bm_secs * SECTOR
        datas = self.io.preadv([(n, self.bat[b] * SECTOR) for b in blocks])
        out = {}
        for b, d in zip(blocks, datas):
            if len(d) != n:
                raise _einval("%s: bitmap of block %d past the end of the file" % (self.path, b))
            out[b] = bytearray(d)
        return out

    def end_of_headers(self):
        if not self.dynamic:
            return 0
        h = self.header
        eom = max(self.footer.data_offset + 1024,
                  h.table_offset + bytes_padded(h.max_bat_size * 4))
        if self.batmap is not None:
            eom = max(eom, self.batmap_header_offset() + SECTOR,
                      self.batmap.batmap_offset + self.batmap.batmap_size * SECTOR)
        for loc in h.locators:
            if loc.code != PLAT_CODE_NONE:
                eom = max(eom, loc.data_offset + loc.size())
        return eom

    def end_of_data(self):
        """First byte past data and metadata: where the primary footer belongs."""
        if not self.dynamic:
            return self.file_size - SECTOR
        if self._eod is None:
            end = self.end_of_headers()
            per = self.spb + self.bm_secs
            used = [off for off in self.bat if off != DD_BLK_UNUSED]
            if used:
                end = max(end, (max(used) + per) * SECTOR)
            self._eod = -(-end // SECTOR) * SECTOR
        return self._eod

    def phys_size(self):
        return self.end_of_data() + SECTOR

    # -- data ------------------------------------------------------------------------------
    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise VHDError(errno.ERANGE, "%s: %d bytes at %d past the virtual size %d"
                           % (self.path, length, offset, self.size))

    def _segments(self, offset, length):
        """(blk, in-block offset, length) pieces of [offset, offset+length)."""
        bs = self.block_size
        while length > 0:
            blk, boff = divmod(offset, bs)
            n = min(length, bs - boff)
            yield blk, boff, n
            offset += n
            length -= n

    def _runs(self, offset, length):
        """(offset, length, present) runs, never across a block boundary."""
        if not self.dynamic:
            return [(offset, length, True)] if length else []
        segs = list(self._segments(offset, length))
        need = [b for b, _, _ in segs if self.bat[b] != DD_BLK_UNUSED and not self.block_full(b)]
        bitmaps = self.read_bitmaps(need) if need else {}
        out = []
        for blk, boff, n in segs:
            base = blk * self.block_size
            if self.bat[blk] == DD_BLK_UNUSED:
                out.append((base + boff, n, False))
            elif self.block_full(blk):
                out.append((base + boff, n, True))
            else:
                first, last = boff // SECTOR, -(-(boff + n) // SECTOR)
                for s, e, bit in bit_runs(bitmaps[blk], first, last):
                    s, e = max(s * SECTOR, boff), min(e * SECTOR, boff + n)
                    out.append((base + s, e - s, bool(bit)))
        return out

    def extents(self, offset, length):
        """[(offset, length, present)] over [offset, offset+length): present = this image
        holds the data (its sector bitmap bit is set, or the image is fixed)."""
        self._check_range(offset, length)
        out = []
        for off, n, present in self._runs(offset, length):
            if out and out[-1][2] == present:
                out[-1] = (out[-1][0], out[-1][1] + n, present)
            else:
                out.append((off, n, present))
        return out

    def data_offset(self, offset):
        """File offset of virtual byte `offset` if its block is allocated, else None."""
        if not self.dynamic:
            return offset
        blk, boff = divmod(offset, self.block_size)
        off = self.bat[blk]
        return None if off == DD_BLK_UNUSED else (off + self.bm_secs) * SECTOR + boff

    def read(self, offset, length):
        """This image's own data over [offset, offset+length); zeros where it holds none
        (in a chain those bytes come from the parent: see extents())."""
        self._check_range(offset, length)
        if not self.dynamic:
            return self.io.pread(length, offset).ljust(length, b"\0")
        buf = bytearray(length)
        reqs = []
        for off, n, present in self._runs(offset, length):
            if present:
                reqs.append((off, n))
        datas = self.io.preadv([(n, self.data_offset(off)) for off, n in reqs])
        for (off, n), data in zip(reqs, datas):
            buf[off - offset:off - offset + len(data)] = data
        return bytes(buf)

    def write(self, data, offset):
        """Write sector-aligned data: new blocks first (zeroed bitmap + data, then the BAT
        entry), then the data, then the bitmaps (data before bitmap), then the batmap."""
        self.write_runs([(data, offset)])

    def write_runs(self, runs):
        """write() of several [(data, offset)] at once: the new blocks of all of them
        allocated together (one barrier), one vectored data write, each bitmap written once."""
        if not self.writable:
            raise VHDError(errno.EROFS, "%s: opened read-only" % self.path)
        segs, writes = [], []
        for data, offset in runs:
            length = len(data)
            if offset % SECTOR or length % SECTOR:
                raise _einval("%s: unaligned write (%d bytes at %d)" % (self.path, length, offset))
            self._check_range(offset, length)
            if not self.dynamic:
                writes.append((data, offset))
                continue
            view, pos = memoryview(data), 0
            for blk, boff, n in self._segments(offset, length):
                segs.append((blk, boff, n, view[pos:pos + n]))
                pos += n
        if not self.dynamic:
            if writes:
                self.io.pwritev(writes)
            return
        if not segs:
            return
        self.dirty = True
        new = {}
        for blk, boff, n, _ in segs:
            if self.bat[blk] == DD_BLK_UNUSED:
                new[blk] = new.get(blk, True) and n < self.block_size
        if new:
            self.allocate_blocks(new)
        self.io.pwritev([(piece, (self.bat[blk] + self.bm_secs) * SECTOR + boff)
                         for blk, boff, n, piece in segs])
        self._update_bitmaps([(blk, boff // SECTOR, (boff + n) // SECTOR)
                              for blk, boff, n, _ in segs if not self.block_full(blk)])

    def _update_bitmaps(self, ranges):
        if not ranges:
            return
        bitmaps = self.read_bitmaps(sorted(set(blk for blk, _, _ in ranges)))
        for blk, first, last in ranges:
            set_bits(bitmaps[blk], first, last)
        writes, full = [], []
        for blk, bm in bitmaps.items():
            writes.append((bytes(bm), self.bat[blk] * SECTOR))
            if self.batmap_map is not None and all(
                    b == 0xFF for b in bm[:self.spb >> 3]) and not self.block_full(blk):
                full.append(blk)
        self.io.pwritev(writes)
        if full:
            for blk in full:        # only a full bitmap sets the batmap bit (coalesce)
                if blk < len(self.batmap_map) * 8:
                    set_bit(self.batmap_map, blk)
            self.write_batmap()

    def allocate_block(self, blk, zero=True):
        """Allocate block blk at the end of the file, in upstream's crash-safe order: the
        footer moved past it, its zeroed bitmap (and data when `zero`), then the BAT entry."""
        self.allocate_blocks({blk: zero})

    def allocate_blocks(self, blocks):
        """allocate_block for each of {blk: zero}, one after the other at the end of the
        file: the footer past the last, every block's bitmap (and zeroed data), one
        barrier (when ordered), then the BAT entries."""
        placed = []
        try:
            self._place_blocks(blocks, placed)
        except BaseException:
            self._eod = None        # from the BAT again: nothing placed is referenced
            raise
        for blk, bm_sec in placed:
            self.bat[blk] = bm_sec
        sectors = sorted(set(blk * 4 // SECTOR for blk, _ in placed))
        for first in sectors:       # each BAT sector once
            self.write_bat_entry(first * (SECTOR // 4))
        self.dirty = True

    def _place_blocks(self, blocks, placed):
        """Lay the blocks out past the end of data, the trailing footer first: a kill -9
        after any write leaves a file whose last sector is the poison (or the footer),
        never a zeroed bitmap where the poison was."""
        layout, eod = [], self.end_of_data()
        for blk in sorted(blocks):
            sec = eod // SECTOR
            bm_sec = sec + (-(sec + self.bm_secs) % (PAGE // SECTOR))
            if bm_sec + self.bm_secs + self.spb > DD_BLK_UNUSED:
                raise VHDError(errno.EIO, "%s: file too large for 32-bit block offsets"
                               % self.path)
            layout.append((blk, eod, bm_sec))
            eod = (bm_sec + self.bm_secs + self.spb) * SECTOR
        # Past the old end of the file, extending it gives zeros: only what lies before
        # it needs zeroing (measured before the trailer extends the file).
        old_size = None if self.io.is_block else self.io.size()
        self._write_trailer(eod)
        for blk, start, bm_sec in layout:
            data_start = (bm_sec + self.bm_secs) * SECTOR
            self.io.pwrite(bytes(data_start - start), start)   # gap and zeroed bitmap
            if blocks[blk]:
                end = data_start + self.block_size
                stale_end = end if old_size is None else min(end, old_size)
                for pos in range(data_start, stale_end, 1 << 20):
                    self.io.pwrite(_zeros(min(stale_end - pos, 1 << 20)), pos)
            placed.append((blk, bm_sec))
        self._eod = eod
        if self.ordered:
            self.io.flush()

    def write_bat_entry(self, blk):
        """Rewrite the BAT sector that holds entry blk."""
        first = (blk * 4) // SECTOR * (SECTOR // 4)
        entries = self.bat[first:first + SECTOR // 4]
        raw = struct.pack(">%dI" % len(entries), *entries)
        if len(raw) < SECTOR:       # the BAT's last sector: the rest of what is on disk
            off = self.header.table_offset + first * 4
            tail = self.io.pread(SECTOR, off)[len(raw):]
            raw += tail.ljust(SECTOR - len(raw), b"\0")
        self.io.pwrite(raw, self.header.table_offset + first * 4)

    def write_bat(self):
        """The whole BAT as stored (entries past the used ones are unallocated)."""
        h = self.header
        total = bytes_padded(h.max_bat_size * 4)
        raw = bytearray(struct.pack(">%dI" % h.max_bat_size,
                                    *(list(self.bat) + [DD_BLK_UNUSED] * (h.max_bat_size - len(self.bat)))))
        raw += bytes(total - len(raw))
        self.io.pwrite(bytes(raw), h.table_offset)

    def write_batmap(self):
        bh = self.batmap
        bh.checksum = self.batmap_checksum()
        self.io.pwrite(bytes(self.batmap_map[:self.batmap_map_bytes()]), bh.batmap_offset)
        self.write_batmap_header()

    def write_batmap_header(self):
        self.io.pwrite(self.batmap.pack(), self.batmap_header_offset())

    def write_header(self):
        self.io.pwrite(self.header.seal(), self.footer.data_offset)

    # -- footers ---------------------------------------------------------------------------
    def _write_trailer(self, end):
        """The trailing footer at `end`: the poison while strict, else the footer."""
        self.io.pwrite(FOOTER_POISON if self.strict else self.footer.seal(), end)

    def write_footer(self):
        """Primary footer at the end of data (file truncated there), then the backup at 0."""
        raw = self.footer.seal()
        if self.io.is_block:
            off = self.io.size() - SECTOR
        else:
            off = self.end_of_data()
        self.io.pwrite(raw, off)
        if not self.io.is_block:
            self.io.truncate(off + SECTOR)
            self.file_size = off + SECTOR
        if self.dynamic:
            self.io.pwrite(raw, 0)
        self.footer_offset = off
        self.strict = False

    def poison_footer(self):
        """tapdisk's strict read-write open: the primary footer is overwritten until close."""
        if not self.dynamic:
            return
        end = self.end_of_data()
        self.io.pwrite(FOOTER_POISON, end)
        if not self.io.is_block:
            self.io.truncate(end + SECTOR)
        self.io.flush()
        self.strict = True

    def flush(self):
        self.io.flush()

    def close(self):
        if self.io is None:
            return
        try:
            if self.writable and (self.dirty or self.strict):
                self.write_footer()
                self.io.flush()
        finally:
            self.io.close()
            self.io = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- fields ------------------------------------------------------------------------
    def hidden(self):
        """The hidden flag (early tapdisk images keep it in the backup footer only)."""
        f = self.footer
        if self.dynamic and f.from_tapdisk() and f.crtr_ver in (version(0, 1), version(1, 1)):
            copy = self._valid_footer(self.io.pread(SECTOR, 0))
            if copy is None:
                raise _einval("%s: invalid backup footer" % self.path)
            return copy.hidden
        return f.hidden

    def set_hidden(self, value):
        self.footer.hidden = value
        self.write_footer()

    def _batmap_header(self):
        if not self.has_batmap():
            raise VHDError(errno.ENOTSUP, "%s: no batmap (not created by tapdisk)" % self.path)
        return self.batmap if self.batmap is not None else self._read_batmap_header()

    def marker(self):
        return self._batmap_header().marker

    def set_marker(self, value):
        bh = self._batmap_header()
        bh.marker = value
        self.batmap = bh
        self.write_batmap_header()

    def keyhash(self):
        """(nonce, hash) bytes, or None when the image has no keyhash."""
        bh = self._batmap_header()
        return (bh.kh_nonce, bh.kh_hash) if bh.kh_cookie == 1 else None

    def set_keyhash(self, nonce, hashed):
        bh = self._batmap_header()
        bh.kh_cookie, bh.kh_nonce, bh.kh_hash = 1, nonce, hashed
        self.batmap = bh
        self.write_batmap_header()

    # -- parents ---------------------------------------------------------------------------
    def locator_name(self, loc):
        """The path a locator holds (decoded), or raise EINVAL."""
        if self.type != HD_TYPE_DIFF or loc.code not in (PLAT_CODE_MACX, PLAT_CODE_W2KU,
                                                          PLAT_CODE_W2RU):
            raise _einval("%s: not a readable parent locator" % self.path)
        size = loc.size()
        if size <= 0 or loc.data_len > size or loc.data_offset + size > self.file_size:
            raise _einval("%s: parent locator out of bounds" % self.path)
        raw = self.io.pread(loc.data_len, loc.data_offset)
        name = decode_locator(loc.code, raw)
        if name is None:
            raise _einval("%s: undecodable parent locator" % self.path)
        return name

    def parent_name(self):
        """The header's parent name (the parent's basename)."""
        return decode_parent_name(self.footer, self.header)

    def find_parent(self, name):
        """Resolve a locator's path: absolute if it exists, else relative to the child's
        directory; the canonical path."""
        if name.startswith("/") and os.access(name, os.R_OK):
            return name
        location = os.path.join(os.path.dirname(os.path.realpath(self.path)), name)
        if os.access(location, os.R_OK):
            return os.path.realpath(location)
        raise VHDError(errno.ENOENT, "%s: parent %s not found" % (self.path, name))

    def parent_path(self, resolve=True):
        """The parent's path from the first locator that resolves (upstream's order)."""
        if self.type != HD_TYPE_DIFF:
            raise _einval("%s has no parent" % self.path)
        err = _einval("%s: no usable parent locator" % self.path)
        for loc in self.header.locators:
            try:
                name = self.locator_name(loc)
            except VHDError:
                continue
            if not resolve:
                return name
            try:
                return self.find_parent(name)
            except VHDError as e:
                err = e
        raise err

    def validate_parent(self, parent):
        """parent: an open VHD (or None for a raw parent). Raise unless it is ours."""
        if self.parent_is_raw:
            return
        if parent is None or parent.footer.uuid != self.header.prt_uuid:
            raise _einval("%s: parent uuid %s does not match %s"
                          % (self.path, self.parent_uuid,
                             parent.uuid if parent is not None else "a raw image"))


def validate_header(h):
    """libvhd's header check: None, or what is wrong."""
    if h.cookie != DD_COOKIE:
        return "invalid cookie"
    if h.hdr_ver != DD_VERSION:
        return "invalid header version %#x" % h.hdr_ver
    if h.data_offset != 0xFFFFFFFFFFFFFFFF:
        return "invalid data offset"
    bs = h.block_size
    if bs < SECTOR or bs & (bs - 1) or bs > 1 << 30:
        return "invalid block size %d" % bs
    for loc in h.locators:
        if loc.code not in PLAT_CODES:
            return "invalid parent locator code %#x" % loc.code
    if h.compute_checksum() != h.checksum:
        return "invalid checksum"
    return None


_ZERO_CACHE = [b""]


def _zeros(n):
    if len(_ZERO_CACHE[0]) < n:
        _ZERO_CACHE[0] = bytes(max(n, 1 << 20))
    return memoryview(_ZERO_CACHE[0])[:n]


# -- chains --------------------------------------------------------------------------------
class Chain(object):
    """A leaf and its ancestors (opened read-only, parents found from the locators and
    checked against the child's parent uuid); a raw parent ends it as a plain file."""

    def __init__(self, path, max_depth=1024):
        self.images = []
        self.raw = None
        try:
            cur = VHD(path)
            self.images.append(cur)
            while cur.type == HD_TYPE_DIFF:
                if len(self.images) > max_depth:
                    raise VHDError(errno.ELOOP, "%s: chain deeper than %d" % (path, max_depth))
                ppath = cur.parent_path()
                if cur.parent_is_raw:
                    self.raw = _open_file(ppath, False)
                    break
                parent = VHD(ppath)
                self.images.append(parent)
                cur.validate_parent(parent)
                cur = parent
        except Exception:
            self.close()
            raise

    @property
    def size(self):
        return self.images[0].size

    def read(self, offset, length):
        """length bytes at offset as the leaf shows them (zeros past an image's end)."""
        out = bytearray(length)
        self._fill(out, offset, 0, offset, length)
        return bytes(out)

    def _fill(self, out, base, level, offset, length):
        if level == len(self.images):
            if self.raw is not None:
                data = self.raw.pread(length, offset)
                out[offset - base:offset - base + len(data)] = data
            return
        img = self.images[level]
        n = max(0, min(length, img.size - offset))
        for off, ln, present in (img.extents(offset, n) if n else []):
            if present:
                out[off - base:off - base + ln] = img.read(off, ln)
            else:
                self._fill(out, base, level + 1, off, ln)

    def close(self):
        for img in self.images:
            img.close()
        self.images = []
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_chain(path, offset=0, length=None):
    """The virtual disk as a chain's leaf shows it."""
    with Chain(path) as chain:
        if length is None:
            length = chain.size - offset
        return chain.read(offset, length)


def chain_depth(path):
    """Images in the chain, counting the image itself (a raw parent counts as one)."""
    depth, cur = 0, path
    while True:
        depth += 1
        with VHD(cur) as img:
            if img.type != HD_TYPE_DIFF:
                return depth
            if img.parent_is_raw:
                return depth + 1
            cur = img.parent_path()
        if depth > 4096:
            raise VHDError(errno.ELOOP, "%s: parent loop" % path)


# -- creating ------------------------------------------------------------------------------
def create(path, size, fixed=False, meta_size=0, parent=None, parent_raw=False):
    """Create a VHD as vhd-util does. size, meta_size: bytes (rounded up to 2 MiB
    blocks; meta_size presizes BAT and batmap for growth). With parent: a differencing
    disk (size 0 = the parent's). Returns the new image's uuid. On failure nothing is
    left behind."""
    bs = DEFAULT_BLOCK_SIZE
    if size and meta_size and meta_size < size:
        raise _einval("metadata size %d < virtual size %d" % (meta_size, size))
    kind = HD_TYPE_DIFF if parent else (HD_TYPE_FIXED if fixed else HD_TYPE_DYNAMIC)
    blks = -(-(meta_size or size) // bs)
    vsize = blks * bs
    footer = Footer(cookie=HD_COOKIE, features=HD_RESERVED, ff_version=HD_FF_VERSION,
                    data_offset=0xFFFFFFFFFFFFFFFF, timestamp=vhd_time(), crtr_app=CREATOR_APP,
                    crtr_ver=CREATOR_VERSION, crtr_os=0, orig_size=vsize, curr_size=vsize,
                    geometry=chs(vsize), type=kind, uuid=uuidlib.uuid4().bytes)
    header = None
    psize = 0
    if kind != HD_TYPE_FIXED:
        if blks > 0xFFFFFFFF:
            raise _einval("virtual size %d too large" % vsize)
        header = Header(cookie=DD_COOKIE, data_offset=0xFFFFFFFFFFFFFFFF,
                        table_offset=3 * SECTOR, hdr_ver=DD_VERSION, max_bat_size=blks,
                        block_size=bs)
        footer.data_offset = SECTOR
        if parent:
            st = os.stat(parent)
            header.prt_ts = vhd_time(st.st_mtime)
            if parent_raw:
                with open(parent, "rb") as f:
                    psize = f.seek(0, os.SEEK_END)
            else:
                with VHD(parent) as p:
                    header.prt_uuid = p.footer.uuid
                    psize = p.size
                if header.prt_uuid == NULL_UUID:
                    raise _einval("%s: parent has a null uuid" % parent)
            if (size or meta_size) and (size or meta_size) < psize:
                raise _einval("snapshot size %d < parent size %d" % (size or meta_size, psize))
            if not meta_size:
                vsize = -(-(size or psize) // bs) * bs
                blks = vsize // bs
                header.max_bat_size = blks
            footer.orig_size = footer.curr_size = vsize
            footer.geometry = chs(vsize)
            header.prt_name = encode_parent_name(parent)
    fio = PosixFile(path, create=True)
    ok = False
    try:
        if kind == HD_TYPE_FIXED:
            fio.truncate(vsize)           # zeros, sparse: same bytes as vhd-util's writes
            end = vsize
        else:
            end = _write_dynamic_metadata(fio, path, footer, header, parent)
            if meta_size:
                vsize = -(-(size or psize) // bs) * bs
                footer.orig_size = footer.curr_size = vsize
                footer.geometry = chs(vsize)
            raw = footer.seal()
            fio.pwrite(raw, 0)
            fio.pwrite(header.seal(), SECTOR)
        fio.pwrite(footer.seal(), end)
        fio.flush()
        ok = True
    finally:
        fio.close()
        if not ok:
            try:
                os.unlink(path)
            except OSError:
                pass
    return uuidlib.UUID(bytes=footer.uuid)


def _write_dynamic_metadata(fio, path, footer, header, parent):
    """BAT, batmap and locators of a new image; returns where the footer goes."""
    blks = header.max_bat_size
    bat_bytes = bytes_padded(blks * 4)
    fio.pwrite(b"\xff" * (blks * 4) + bytes(bat_bytes - blks * 4), header.table_offset)
    bh_off = header.table_offset + bat_bytes
    map_bytes = secs_round_up_no_zero((blks + 7) >> 3) * SECTOR
    bh = BatmapHeader(cookie=BATMAP_COOKIE, batmap_offset=bh_off + SECTOR,
                      batmap_size=map_bytes // SECTOR, batmap_version=BATMAP_VERSION)
    bh.checksum = ~0 & 0xFFFFFFFF               # of an all-zero map
    fio.pwrite(bytes(map_bytes), bh.batmap_offset)
    fio.pwrite(bh.pack(), bh_off)
    end = bh.batmap_offset + map_bytes
    if parent:
        rel = relative_path(path, parent)
        for i, code in enumerate((PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU)):
            data = encode_locator(code, rel)
            space = bytes_padded(len(data))
            fio.pwrite(data + bytes(space - len(data)), end)
            header.locators[i] = Locator(code, space, len(data), 0, end)
            end += space
        header.store_locators()
    return end


def snapshot(path, parent, parent_raw=False, meta_size=0, check_empty=True, limit=0):
    """vhd-util snapshot: a differencing child of `parent` (resolved against the cwd).
    Unless parent_raw or not check_empty, empty differencing ancestors are skipped: the
    child links to the first one with data (sized as the given parent). The parent's
    keyhash is copied. Returns the backing file's path."""
    ppath = os.path.realpath(parent)
    if not os.path.exists(ppath):
        raise VHDError(errno.ENOENT, "%s: no such parent" % parent)
    size = 0
    backing = ppath
    if not parent_raw and check_empty:
        backing, raw = _snapshot_target(ppath)
        if backing != ppath:
            with VHD(ppath) as p:
                size = p.size
        parent_raw = raw
    if limit and not parent_raw:
        depth = chain_depth(backing)
        if depth + 1 > limit:
            raise VHDError(errno.ENOSPC, "snapshot depth exceeded: current depth: %d, limit: %d"
                           % (depth, limit))
    create(path, size, meta_size=meta_size, parent=backing, parent_raw=parent_raw)
    if not parent_raw:
        with VHD(backing) as p:
            kh = p.keyhash() if p.has_batmap() else None
        if kh:
            with VHD(path, writable=True) as child:
                child.set_keyhash(*kh)
    return backing


def _snapshot_target(path):
    """Walk up past empty differencing disks: (first non-empty image, parent is raw)."""
    cur = path
    for _ in range(4096):
        with VHD(cur) as img:
            if img.type != HD_TYPE_DIFF or img.allocated_blocks():
                return cur, False
            nxt = img.parent_path()
            if img.parent_is_raw:
                return nxt, True
        cur = nxt
    raise VHDError(errno.ELOOP, "%s: parent loop" % path)


# -- modifying -----------------------------------------------------------------------------
def set_parent(path, parent, parent_raw=False):
    """vhd-util modify -p: point a differencing disk at a new parent; the locators are
    rewritten in place (ENAMETOOLONG when the new path does not fit)."""
    with VHD(path, writable=True) as child:
        if child.type != HD_TYPE_DIFF:
            raise _einval("%s is not a differencing disk" % path)
        ppath = os.path.realpath(parent)
        st = os.stat(ppath)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise _einval("%s is not a file or block device" % parent)
        h = child.header
        if parent_raw:
            h.prt_uuid = NULL_UUID
        else:
            with VHD(ppath) as p:
                h.prt_uuid = p.footer.uuid
        h.prt_name = encode_parent_name(ppath)
        h.prt_ts = vhd_time(st.st_mtime)
        rel = relative_path(path, ppath)
        writes = []
        for loc in h.locators:
            if loc.code not in (PLAT_CODE_MACX, PLAT_CODE_W2KU, PLAT_CODE_W2RU):
                continue
            data = encode_locator(loc.code, rel)
            space = bytes_padded(len(data))
            if space > loc.size():
                raise VHDError(errno.ENAMETOOLONG, "%s: new parent path does not fit its "
                               "locator" % path)
            writes.append((data + bytes(space - len(data)), loc.data_offset))
            loc.data_len, loc.data_space = len(data), space
        child.io.pwritev(writes)
        h.store_locators()
        child.write_header()
        child.io.flush()


def reset(path):
    """vhd-util modify -z: every block unallocated, the batmap cleared (a VDI reset)."""
    with VHD(path, writable=True) as img:
        if not img.dynamic:
            raise VHDError(errno.ENOSYS, "%s: a fixed VHD cannot be reset" % path)
        for i in range(len(img.bat)):
            img.bat[i] = DD_BLK_UNUSED
        img.write_bat()
        if img.batmap is not None:
            img.batmap_map[:] = bytes(len(img.batmap_map))
            img.write_batmap()
        img._eod = None
        img.write_footer()
        img.io.flush()


def set_phys_size(path, size):
    """vhd-util modify -s: the file (and the footer at its end) set to `size` bytes."""
    with VHD(path, writable=True) as img:
        if size < img.phys_size():
            raise _einval("new size (%d) < phys size (%d)" % (size, img.phys_size()))
        img.io.pwrite(img.footer.seal(), size - SECTOR)
        if not img.io.is_block:
            img.io.truncate(size)
        img.io.flush()


def repair(path, use_backup=False):
    """Rewrite the primary footer (from the backup when the trailing one is lost)."""
    with VHD(path, writable=True, use_backup=use_backup, ignore_disabled=False) as img:
        if img.footer.uuid == NULL_UUID:
            img.footer.uuid = uuidlib.uuid4().bytes
        img.write_footer()
        img.io.flush()


def coalesce(path, progress=None):
    """Copy a differencing disk's data into its parent: whole blocks where the child's
    batmap says full, else the sectors set in its bitmap. Returns the sectors copied.
    progress(blocks done, blocks allocated in the child), when given, is called before
    the first block and after each one; an exception it raises stops the copy (the
    parent is closed cleanly: what was copied stays, the child is unchanged)."""
    with VHD(path) as child:
        if child.type != HD_TYPE_DIFF:
            raise _einval("coalescing of non-differencing disks is not supported")
        ppath = child.parent_path()
        if child.parent_is_raw:
            target = _open_file(ppath, True)
            write = target.pwrite
            parent = None
        else:
            parent = VHD(ppath, writable=True)
            child.validate_parent(parent)
            write = lambda data, off: parent.write(data, off)     # noqa: E731
            target = None
        total = 0
        todo = [blk for blk in range(child.blocks) if child.bat[blk] != DD_BLK_UNUSED]
        try:
            if progress is not None:
                progress(0, len(todo))
            for first in range(0, len(todo), COALESCE_BATCH):
                group = todo[first:first + COALESCE_BATCH]
                runs, sectors = _coalesce_runs(child, group)
                if target is not None:
                    target.pwritev(runs)
                else:
                    parent.write_runs(runs)
                total += sectors
                if progress is not None:
                    for done in range(first + 1, first + len(group) + 1):
                        progress(done, len(todo))
        finally:
            if parent is not None:
                parent.close()
            if target is not None:
                target.flush()
                target.close()
        return total


COALESCE_BATCH = 16     # blocks copied per round: 32 MiB of 2 MiB blocks at most in memory


def _coalesce_runs(child, blocks):
    """[(data, virtual offset)] of what the child holds in these blocks (whole blocks
    where its batmap says full, else the runs its bitmaps set), read with one vectored
    read; and how many sectors that is."""
    wanted = []
    for blk in blocks:
        base = blk * child.block_size
        n = min(child.block_size, child.size - base)
        if child.block_full(blk):
            wanted.append((base, n))
        else:
            wanted += [(off, ln) for off, ln, present in child.extents(base, n) if present]
    datas = child.io.preadv([(ln, child.data_offset(off)) for off, ln in wanted])
    runs = []
    for (off, ln), data in zip(wanted, datas):
        if len(data) != ln:
            raise _einval("%s: data of %d bytes at %d past the end of the file"
                          % (child.path, ln, off))
        runs.append((data, off))
    return runs, sum(ln for _, ln in wanted) // SECTOR


def keyhash_of(nonce, key):
    """tapdisk's keyhash: SHA256 of the nonce followed by the key."""
    import hashlib
    return hashlib.sha256(bytes(nonce) + bytes(key)).digest()
