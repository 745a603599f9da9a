"""The control message layout against upstream tapdisk-message.h, laid out by ctypes
with the C compiler's alignment rules (so a wrong offset in control.py shows up)."""
import ctypes
import struct

import pytest

from smtap.tapdisk import control, driver

PATH = 256
MAX_RING_PAGES = 8      # xen_blkif.h


class Params(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("devnum", ctypes.c_uint32),
                ("domid", ctypes.c_uint32), ("path", ctypes.c_char * PATH),
                ("prt_devnum", ctypes.c_uint32), ("req_timeout", ctypes.c_uint16),
                ("secondary", ctypes.c_char * PATH)]


class Image(ctypes.Structure):
    _fields_ = [("sectors", ctypes.c_uint64), ("sector_size", ctypes.c_uint32),
                ("info", ctypes.c_uint32)]


class Response(ctypes.Structure):
    _fields_ = [("error", ctypes.c_int), ("message", ctypes.c_char * 256)]


class Minors(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int), ("list", ctypes.c_int * (PATH // 4 - 1))]


class List(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int), ("minor", ctypes.c_int), ("state", ctypes.c_int),
                ("path", ctypes.c_char * PATH)]


class Stat(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint16), ("cookie", ctypes.c_uint16),
                ("length", ctypes.c_size_t)]


class Blkif(ctypes.Structure):
    _fields_ = [("domid", ctypes.c_uint32), ("devid", ctypes.c_uint32),
                ("gref", ctypes.c_uint32 * MAX_RING_PAGES), ("order", ctypes.c_uint32),
                ("proto", ctypes.c_uint32), ("pool_name", ctypes.c_char * 256),
                ("port", ctypes.c_uint32), ("poll_duration", ctypes.c_uint32),
                ("poll_idle_threshold", ctypes.c_uint32)]


class Resume(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("new_params", ctypes.c_char * PATH),
                ("secondary", ctypes.c_char * PATH)]


class Query(ctypes.Structure):
    _fields_ = [("current_progress", ctypes.c_uint64), ("total_progress", ctypes.c_uint64),
                ("status", ctypes.c_char * 256)]


class Union(ctypes.Union):
    _fields_ = [("tapdisk_pid", ctypes.c_int), ("image", Image), ("params", Params),
                ("string", ctypes.c_char * 256), ("minors", Minors),
                ("response", Response), ("list", List), ("info", Stat),
                ("blkif", Blkif), ("resume", Resume), ("query", Query)]


class Message(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint16), ("cookie", ctypes.c_uint16), ("u", Union)]


def test_size_is_upstreams():
    assert ctypes.sizeof(Message) == control.SIZE == 544


def test_open_request_matches_c_layout():
    raw = control.pack(control.OPEN, 7, flags=control.FLAG_RDONLY | control.FLAG_SECONDARY,
                       devnum=3, domid=5, path="vhd:/a/b.vhd", prt_devnum=9,
                       req_timeout=300, secondary="aio:/c")
    msg = Message.from_buffer_copy(raw)
    assert (msg.type, msg.cookie) == (control.OPEN, 7)
    p = msg.u.params
    assert p.flags == control.FLAG_RDONLY | control.FLAG_SECONDARY
    assert (p.devnum, p.domid, p.prt_devnum, p.req_timeout) == (3, 5, 9, 300)
    assert p.path == b"vhd:/a/b.vhd" and p.secondary == b"aio:/c"
    # And the other way round: what C writes, we read.
    back = control.unpack(bytes(msg))
    assert back["path"] == "vhd:/a/b.vhd" and back["req_timeout"] == 300
    assert back["secondary"] == "aio:/c" and back["prt_devnum"] == 9


@pytest.mark.parametrize("kind,fields,ctype,attr", [
    (control.ERROR, {"error": 28, "message": "no space"}, "response", None),
    (control.CLOSE_RSP, {"error": 0, "message": ""}, "response", None),
    (control.PID_RSP, {"pid": 4242}, None, "tapdisk_pid"),
    (control.OPEN_RSP, {"sectors": 1 << 40, "sector_size": 512, "info": 3}, "image", None),
    (control.DISK_INFO_RSP, {"sectors": 20480, "sector_size": 4096, "info": 0}, "image", None),
    (control.LIST_RSP, {"count": 2, "minor": 17, "state": 0x2a, "path": "aio:/x"}, "list", None),
    (control.STATS_RSP, {"length": 1234}, "info", None),
])
def test_reply_layouts_match_c(kind, fields, ctype, attr):
    raw = control.pack(kind, 3, **fields)
    msg = Message.from_buffer_copy(raw)
    if attr:
        assert getattr(msg.u, attr) == fields["pid"]
    else:
        sub = getattr(msg.u, ctype)
        for name, value in fields.items():
            cname = {"length": "length"}.get(name, name)
            got = getattr(sub, cname)
            assert got == (value.encode() if isinstance(value, str) else value)
    back = control.unpack(raw)
    assert back["type"] == kind and back["cookie"] == 3
    for name, value in fields.items():
        assert back[name] == value


def test_list_minors_and_all_cookie():
    raw = control.pack(control.LIST_MINORS_RSP, control.ALL, minors=[1, 5, 9])
    msg = Message.from_buffer_copy(raw)
    assert msg.cookie == 0xffff
    assert msg.u.minors.count == 3 and list(msg.u.minors.list)[:3] == [1, 5, 9]
    assert control.unpack(raw)["minors"] == [1, 5, 9]
    # A negative cookie (-1, "all" in C) wraps like a u16 does.
    assert control.unpack(control.pack(control.LIST, -1))["cookie"] == 0xffff


def test_type_numbers_are_upstreams():
    assert (control.ERROR, control.RUNTIME_ERROR, control.PID, control.ATTACH,
            control.OPEN, control.PAUSE, control.RESUME, control.CLOSE, control.DETACH,
            control.LIST_MINORS, control.LIST, control.STATS, control.FORCE_SHUTDOWN,
            control.DISK_INFO, control.EXIT) == (1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19,
                                                  21, 23, 28, 30)
    for name in ("RDONLY", "SHARED", "SECONDARY", "STANDBY", "NO_O_DIRECT", "ADD_LOG",
                 "ADD_LCACHE", "REUSE_PRT", "ADD_CACHE", "VHD_INDEX"):
        assert getattr(control, "FLAG_" + name) == getattr(driver, "OPEN_" + name)


def test_bad_messages_are_refused():
    with pytest.raises(control.ProtocolError):
        control.unpack(b"\0" * 100)
    with pytest.raises(control.ProtocolError):
        control.unpack(b"\0" * 545)
    unterminated = bytearray(control.pack(control.OPEN, 1))
    unterminated[20:20 + PATH] = b"x" * PATH
    with pytest.raises(control.ProtocolError):
        control.unpack(bytes(unterminated))
    with pytest.raises(ValueError):
        control.pack(control.OPEN, 1, path="aio:/" + "x" * 300)
    with pytest.raises(TypeError):
        control.pack(control.PID, 1, path="x")
    # An unknown type still parses (the daemon answers it with an error).
    assert control.unpack(struct.pack("=HH", 0xabcd, 1) + bytes(540))["type"] == 0xabcd
