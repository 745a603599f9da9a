"""NBD framing on bytes (tapdisk/nbdframe.py) and the transmission loop's batch of answers
(nbd.Replies): no server, no disk."""
import errno
import os
import socket
import struct

import pytest

from smtap.tapdisk import nbd
from smtap.tapdisk import nbdframe as F


def req(typ, handle, offset, length, flags=0, payload=b""):
    return F.request(typ, handle, offset, length, flags, payload)


# -- requests ------------------------------------------------------------------------------
def test_split_takes_every_complete_request_and_stops_at_an_incomplete_one():
    data = (req(F.CMD_READ, 1, 4096, 512) + req(F.CMD_WRITE, 2, 0, 4, payload=b"abcd")
            + req(F.CMD_FLUSH, 3, 0, 0) + req(F.CMD_WRITE, 4, 8, 100, payload=b"x" * 60))
    got, pos = F.split_requests(data, 0, len(data))
    assert [(r[2], r[3], r[4], r[5]) for r, _ in got] == [
        (F.CMD_READ, 1, 4096, 512), (F.CMD_WRITE, 2, 0, 4), (F.CMD_FLUSH, 3, 0, 0)]
    write_payload = got[1][1]
    assert data[write_payload:write_payload + 4] == b"abcd"
    assert pos == 3 * 28 + 4                     # the last write's payload is still coming
    assert F.pending_write(data, pos, len(data)) == 28 + 100
    assert F.pending_write(data, 0, len(data)) == 0       # starts with a complete read
    # a header cut short: nothing, from where it starts
    assert F.split_requests(data[:27], 0, 27) == ([], 0)
    assert F.split_requests(data, 28, 28 + 20) == ([], 28)


def test_split_refuses_a_bad_magic_and_a_write_over_the_limit():
    with pytest.raises(F.ProtocolError, match="magic"):
        F.split_requests(bytes(28), 0, 28)
    big = req(F.CMD_WRITE, 1, 0, F.MAX_REQUEST + 1)
    with pytest.raises(F.ProtocolError, match="write of"):
        F.split_requests(big, 0, len(big))
    # a read asks for data, it carries none: its size is the checks' business
    huge = req(F.CMD_READ, 1, 0, F.MAX_REQUEST + 1)
    assert len(F.split_requests(huge, 0, len(huge))[0]) == 1


def test_checks_name_the_error_and_say_why():
    size = 1 << 20
    err, why = F.read_error(0, size - 512, 1024, size)
    assert err == F.NBD_EINVAL == errno.EINVAL and "past the end" in why
    assert F.read_error(1 << 7, 0, 512, size)[0] == F.NBD_EINVAL
    assert "0 bytes" in F.read_error(0, 0, 0, size)[1]
    assert F.write_error(0, 0, 512, size, True)[0] == F.NBD_EPERM
    assert F.write_error(0, size, 512, size, False)[0] == F.NBD_ENOSPC
    assert F.write_error(F.CMD_FLAG_DF, 0, 512, size, False)[0] == F.NBD_EINVAL
    assert F.command_error(F.CMD_FLUSH, 0, 0, 0, size, False, False) is None
    assert F.command_error(F.CMD_FLUSH, 0, 0, 0, size, True, False)[0] == F.NBD_EINVAL
    assert F.command_error(F.CMD_TRIM, 0, 0, 512, size, True, False)[0] == F.NBD_EPERM
    assert F.command_error(F.CMD_WRITE_ZEROES, F.CMD_FLAG_NO_HOLE | F.CMD_FLAG_FAST_ZERO,
                           0, 512, size, False, False) is None
    assert F.command_error(F.CMD_TRIM, F.CMD_FLAG_NO_HOLE, 0, 512, size, False, False)
    assert "meta context" in F.command_error(F.CMD_BLOCK_STATUS, 0, 0, 512, size, False,
                                             False)[1]
    assert F.command_error(F.CMD_BLOCK_STATUS, F.CMD_FLAG_REQ_ONE, 0, 512, size, False,
                           True) is None
    assert "unknown command 42" in F.command_error(42, 0, 0, 0, size, False, False)[1]


def test_local_errors_travel_as_the_protocol_knows_them():
    assert F.nbd_error(OSError(errno.EDQUOT, "quota")) == F.NBD_ENOSPC
    assert F.nbd_error(OSError(errno.EROFS, "ro")) == F.NBD_EPERM
    assert F.nbd_error(OSError(errno.ENOENT, "gone")) == F.NBD_EIO     # not in the protocol
    assert F.nbd_error(ValueError("no errno")) == F.NBD_EIO
    assert F.nbd_error(errno.ENOTSUP) == F.NBD_ENOTSUP


# -- replies -------------------------------------------------------------------------------
def test_replies_as_the_protocol_lays_them_out():
    assert F.simple_reply(0x1122, errno.EIO) == struct.pack(">IIQ", F.SIMPLE_MAGIC, 5, 0x1122)
    magic, flags, typ, handle, length, offset = struct.unpack(">IHHQIQ",
                                                               F.chunk_data_header(9, 4096, 512))
    assert (flags, typ, handle, length, offset) == (1, F.REPLY_TYPE_OFFSET_DATA, 9, 520, 4096)
    hole = struct.unpack(">IHHQIQI", F.chunk_hole(9, 4096, 512))
    assert hole[1:] == (1, F.REPLY_TYPE_OFFSET_HOLE, 9, 12, 4096, 512)
    err = F.chunk_error(3, errno.ENOSPC, "full")
    assert struct.unpack_from(">IHHQIIH", err)[1:] == (1, F.REPLY_TYPE_ERROR, 3, 10, 28, 4)
    assert err.endswith(b"full")
    status = F.chunk_block_status(5, [(4096, 3), (1 << 33, 0)])
    assert struct.unpack(">IHHQIIIIII", status)[1:] == (
        1, F.REPLY_TYPE_BLOCK_STATUS, 5, 20, F.META_ID, 4096, 3, 0xffffffff, 0)
    assert F.error_reply(False, 1, 22) == F.simple_reply(1, 22)
    assert F.done_reply(1) == F.simple_reply(1)     # structured connections too


def test_option_payloads():
    name = b"vdi-1"
    info = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, F.INFO_NAME)
    assert F.parse_info_request(info) == ("vdi-1", [F.INFO_NAME])
    for bad in (b"\0\0", struct.pack(">I", 99) + b"ab\0\0", info + b"\0"):
        with pytest.raises(ValueError):
            F.parse_info_request(bad)
    meta = (struct.pack(">I", 0) + struct.pack(">I", 2) + struct.pack(">I", 15)
            + F.META_BASE_ALLOCATION + struct.pack(">I", 3) + b"foo")
    assert F.parse_meta_context(meta) == ("", [F.META_BASE_ALLOCATION, b"foo"])
    with pytest.raises(ValueError):
        F.parse_meta_context(meta + b"x")
    assert F.wants_allocation([b"foo", b"base:"], True)
    assert F.wants_allocation([], False) and not F.wants_allocation([], True)
    replies = F.info_replies(F.OPT_GO, 1 << 30, 0x123, "vdi-1")
    types = []
    pos = 0
    while pos < len(replies):
        magic, opt, rtype, length = F.OPTION_REPLY.unpack_from(replies, pos)
        assert (magic, opt) == (F.REPLY_MAGIC, F.OPT_GO)
        types.append((rtype, replies[pos + 20:pos + 22]))
        pos += 20 + length
    assert types == [(F.REP_INFO, b"\0\0"), (F.REP_INFO, b"\0\1"), (F.REP_INFO, b"\0\3"),
                     (F.REP_ACK, b"")]


# -- the batch of answers: the ordering rule and the buffers ------------------------------
class Wire(object):
    """A socket that records what each sendmsg carried (copied: views may change later);
    `partial`: the first sendmsg sends only that many bytes."""

    def __init__(self, partial=None):
        self.sends = []
        self.partial = partial

    def sendmsg(self, bufs):
        data = b"".join(bytes(b) for b in bufs)
        if self.partial is not None:
            data, self.partial = data[:self.partial], None
        self.sends.append(data)
        return len(data)


class CountingPool(object):
    def __init__(self):
        self.back = []

    def put(self, buf):
        self.back.append(buf)


def test_answers_viewing_chain_memory_go_out_before_the_chain_is_called_again():
    wire = Wire()
    replies = nbd.Replies(wire)
    disk = bytearray(b"A" * 8)              # a ram disk's pages
    replies.out += [F.simple_reply(1), memoryview(disk)[:4]]
    replies.viewing()
    replies.before_chain()                  # a write to the disk comes next
    disk[:4] = b"BBBB"
    replies.out.append(F.simple_reply(2))
    replies.before_chain()                  # nothing viewing: nothing sent yet
    assert wire.sends == [F.simple_reply(1) + b"AAAA"]
    replies.send()
    assert wire.sends[1] == F.simple_reply(2) and not replies.out


def test_queued_buffers_go_back_to_their_pool_once_sent_whatever_the_socket_takes():
    wire = Wire(partial=20)
    replies = nbd.Replies(wire)
    replies.pool = pool = CountingPool()
    payload = memoryview(bytearray(b"xyz" * 1000))
    replies.out += [F.simple_reply(1), payload]
    replies.release.append("buffer-1")
    replies.send()
    assert b"".join(wire.sends) == F.simple_reply(1) + bytes(payload)   # the rest followed
    assert pool.back == ["buffer-1"] and not replies.release


def test_sendall_vectors_resumes_after_partial_sends_and_beyond_iov_max():
    class Dribble(object):
        def __init__(self):
            self.got = b""

        def sendmsg(self, bufs):
            assert len(bufs) <= nbd.IOV_MAX
            data = b"".join(bytes(b) for b in bufs)[:7]
            self.got += data
            return len(data)

    sock = Dribble()
    bufs = [bytes([i % 256]) * 3 for i in range(nbd.IOV_MAX + 10)]
    nbd.sendall_vectors(sock, bufs)
    assert sock.got == b"".join(bufs)


def test_a_client_socket_holds_several_1m_replies():
    """tune(): blocking, and a send buffer of SEND_BUFFER (root: past net.core.wmem_max;
    the kernel reports twice what it was given), so a 1 MiB reply does not block."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        nbd.tune(a)
        assert a.gettimeout() is None                   # blocking (getblocking: 3.7)
        got = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        with open("/proc/sys/net/core/wmem_max") as f:
            cap = nbd.SEND_BUFFER if os.geteuid() == 0 else min(nbd.SEND_BUFFER, int(f.read()))
        assert got >= 2 * cap
        a.setblocking(False)
        assert a.send(bytes(1 << 20)) == 1 << 20       # nobody reads: it fits anyway
    finally:
        a.close()
        b.close()
