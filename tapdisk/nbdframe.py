"""NBD framing: the protocol's constants, messages as bytes, and the checks of a request.

Pure (no sockets, no disks): what tapdisk/nbd.py's handshake and transmission loop put
on and take off the wire, testable on bytes (tests/engine/test_nbd_framing.py). From
the NBD protocol document (github.com/NetworkBlockDevice/nbd doc/proto.md).
"""
import errno
import struct

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_FAST_ZERO = 1 << 11

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2 ** 31 + 1
REP_ERR_INVALID = 2 ** 31 + 3
REP_ERR_UNKNOWN = 2 ** 31 + 6
REP_ERR_TOO_BIG = 2 ** 31 + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2 ** 15 + 1

META_BASE_ALLOCATION = b"base:allocation"
META_ID = 1

MAX_REQUEST = 32 << 20      # largest read/write accepted (and advertised)
MAX_EXTENTS = 2048          # per BLOCK_STATUS reply
REQUEST_SIZE = 28

# The protocol's error values (they are Linux's numbers; named here, sent as these).
NBD_EPERM = errno.EPERM
NBD_EIO = errno.EIO
NBD_ENOMEM = errno.ENOMEM
NBD_EINVAL = errno.EINVAL
NBD_ENOSPC = errno.ENOSPC
NBD_EOVERFLOW = errno.EOVERFLOW
NBD_ENOTSUP = errno.ENOTSUP
NBD_ESHUTDOWN = errno.ESHUTDOWN
# a local errno -> what the client is told; anything else travels as NBD_EIO
_NBD_ERRORS = {errno.EPERM: NBD_EPERM, errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM,
               errno.EINVAL: NBD_EINVAL, errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC,
               errno.EFBIG: NBD_ENOSPC, errno.EOVERFLOW: NBD_EOVERFLOW,
               errno.ENOTSUP: NBD_ENOTSUP, errno.ESHUTDOWN: NBD_ESHUTDOWN,
               errno.EROFS: NBD_EPERM, errno.EACCES: NBD_EPERM}

READ_FLAGS = CMD_FLAG_FUA | CMD_FLAG_DF
WRITE_FLAGS = CMD_FLAG_FUA

REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
DATA_CHUNK = struct.Struct(">IHHQIQ")       # OFFSET_DATA's header and its offset
HOLE_CHUNK = struct.Struct(">IHHQIQI")      # OFFSET_HOLE: offset, length
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")


class ProtocolError(Exception):
    """The client broke the protocol in a way that cannot be answered: disconnect."""


def nbd_error(err):
    """What the client is told for an OSError (or a local errno)."""
    if not isinstance(err, int):
        err = getattr(err, "errno", None)
    return _NBD_ERRORS.get(err, NBD_EIO)


# -- transmission: requests ------------------------------------------------------------------
def split_requests(buf, pos, end):
    """The complete requests in buf[pos:end]: ([((magic, flags, type, handle, offset,
    length), payload position)], where the first incomplete one starts). A write's
    payload is part of it. ProtocolError: a bad magic, a write over MAX_REQUEST."""
    unpack = REQUEST.unpack_from
    out = []
    while end - pos >= REQUEST_SIZE:
        req = unpack(buf, pos)
        if req[0] != REQUEST_MAGIC:
            raise ProtocolError("bad request magic %#x" % req[0])
        data = pos + REQUEST_SIZE
        if req[2] == CMD_WRITE:
            if req[5] > MAX_REQUEST:
                raise ProtocolError("write of %d bytes" % req[5])
            if end - data < req[5]:
                break                       # its payload is still coming
            out.append((req, data))
            pos = data + req[5]
        else:
            out.append((req, data))
            pos = data
    return out, pos


def pending_write(buf, pos, end):
    """The size a write needs whole (header and payload) if buf[pos:end] starts with an
    incomplete one, else 0 (the receive buffer may have to grow for it)."""
    if end - pos < REQUEST_SIZE:
        return 0
    req = REQUEST.unpack_from(buf, pos)
    if req[2] == CMD_WRITE and end - pos < REQUEST_SIZE + req[5]:
        return REQUEST_SIZE + req[5]
    return 0


def request(typ, handle, offset, length, flags=0, payload=b""):
    """A request as a client sends it (tests, tools)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, typ, handle, offset, length) + payload


# -- transmission: the checks of a request (out of the loop's way) -------------------------
def read_error(flags, offset, length, size):
    """(NBD error, message) for a read the fast check refused."""
    if flags & ~READ_FLAGS:
        return NBD_EINVAL, "read: unknown flags %#x" % (flags & ~READ_FLAGS)
    if not length:
        return NBD_EINVAL, "read of 0 bytes"
    if length > MAX_REQUEST:
        return NBD_EINVAL, "read of %d bytes (at most %d)" % (length, MAX_REQUEST)
    return NBD_EINVAL, "read past the end (%d + %d > %d)" % (offset, length, size)


def write_error(flags, offset, length, size, readonly):
    """(NBD error, message) for a write the fast check refused."""
    if readonly:
        return NBD_EPERM, "write to a read-only export"
    if flags & ~WRITE_FLAGS:
        return NBD_EINVAL, "write: unknown flags %#x" % (flags & ~WRITE_FLAGS)
    if not length:
        return NBD_EINVAL, "write of 0 bytes"
    return NBD_ENOSPC, "write past the end (%d + %d > %d)" % (offset, length, size)


def command_error(typ, flags, offset, length, size, readonly, meta):
    """(NBD error, message) if FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS or another
    command cannot be run as sent, else None."""
    if typ == CMD_FLUSH:
        if flags or readonly:
            return NBD_EINVAL, "flush: %s" % ("unknown flags" if flags else "read-only export")
        return None
    if typ in (CMD_TRIM, CMD_WRITE_ZEROES):
        allowed = CMD_FLAG_FUA
        if typ == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
        if readonly:
            return NBD_EPERM, "trim/zero on a read-only export"
        if flags & ~allowed:
            return NBD_EINVAL, "trim/zero: unknown flags %#x" % (flags & ~allowed)
        if not length or offset + length > size:
            return NBD_EINVAL, "trim/zero of %d bytes at %d (size %d)" % (length, offset, size)
        return None
    if typ == CMD_BLOCK_STATUS:
        if not meta:
            return NBD_EINVAL, "block status: no meta context negotiated"
        if flags & ~CMD_FLAG_REQ_ONE:
            return NBD_EINVAL, "block status: unknown flags %#x" % (flags & ~CMD_FLAG_REQ_ONE)
        if not length or offset + length > size:
            return NBD_EINVAL, "block status of %d bytes at %d (size %d)" % (length, offset, size)
        return None
    return NBD_EINVAL, "unknown command %d" % typ


# -- transmission: replies -------------------------------------------------------------------
def simple_reply(handle, error=0):
    return SIMPLE.pack(SIMPLE_MAGIC, error, handle)


def chunk_error(handle, error, message=""):
    msg = message.encode("utf-8", "replace")[:4096]
    return CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                      6 + len(msg)) + struct.pack(">IH", error, len(msg)) + msg


def chunk_data_header(handle, offset, length):
    """The header of a read's OFFSET_DATA chunk (the only one: DONE set); the data
    follows it."""
    return DATA_CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle,
                           length + 8, offset)


def chunk_hole(handle, offset, length):
    """A read answered by one OFFSET_HOLE chunk: the region reads as zeros."""
    return HOLE_CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, handle,
                           12, offset, length)


def chunk_block_status(handle, descs):
    """A BLOCK_STATUS reply for base:allocation: descs [(length, flags)]."""
    payload = struct.pack(">I", META_ID) + b"".join(
        struct.pack(">II", min(n, 0xffffffff), f) for n, f in descs)
    return CHUNK.pack(STRUCTURED_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle,
                      len(payload)) + payload


def error_reply(structured, handle, error, message=""):
    return chunk_error(handle, error, message) if structured else simple_reply(handle, error)


def done_reply(handle):
    """What succeeded with no data to return (a write, a flush, a trim): a simple reply,
    on a structured connection too. The protocol allows it for anything but a read, as
    nbdkit and qemu-nbd do; a client reads its 16 bytes at once (libnbd takes a chunk's
    20 in two calls)."""
    return simple_reply(handle)


# -- handshake --------------------------------------------------------------------------------
def server_greeting():
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(opt, rtype, data=b""):
    return OPTION_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data


def parse_info_request(data):
    """INFO/GO's payload -> (export name, [information requests]); ValueError (with
    the message for REP_ERR_INVALID) if it is malformed."""
    if len(data) < 6:
        raise ValueError("short INFO/GO request")
    nlen, = struct.unpack_from(">I", data)
    if 4 + nlen + 2 > len(data):
        raise ValueError("bad name length")
    name = data[4:4 + nlen].decode("utf-8", "replace")
    nreq, = struct.unpack_from(">H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * nreq:
        raise ValueError("bad information request count")
    return name, list(struct.unpack_from(">%dH" % nreq, data, 4 + nlen + 2))


def info_replies(opt, size, flags, name=None):
    """The REP_INFO replies of an INFO/GO, then its ACK: export, name (if asked), block
    sizes (1, 4096, MAX_REQUEST)."""
    out = [option_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))]
    if name is not None:
        out.append(option_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + name.encode()))
    out.append(option_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096,
                                                       MAX_REQUEST)))
    out.append(option_reply(opt, REP_ACK))
    return b"".join(out)


def parse_meta_context(data):
    """LIST/SET_META_CONTEXT's payload -> (export name, [queries]); ValueError if it is
    malformed."""
    try:
        nlen, = struct.unpack_from(">I", data)
        name = data[4:4 + nlen].decode("utf-8", "replace")
        pos = 4 + nlen
        count, = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            qlen, = struct.unpack_from(">I", data, pos)
            query = data[pos + 4:pos + 4 + qlen]
            if len(query) != qlen:
                raise ValueError("short query")
            queries.append(query)
            pos += 4 + qlen
        if pos != len(data):
            raise ValueError("trailing bytes")
    except struct.error:
        raise ValueError("malformed meta context request")
    return name, queries


def wants_allocation(queries, setting):
    """Whether a meta context request selects base:allocation (LIST with no query
    lists every context)."""
    return (not queries and not setting) or any(
        q in (META_BASE_ALLOCATION, b"base:") for q in queries)
