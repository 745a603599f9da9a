"""The glue's pure parts: types from the engine's registry, size parsing, sparse copies,
the plugin dispatch convention."""
import importlib
import os
import xmlrpc.client

import pytest

from smtap import sparse
from smtap.sm import errors, units, xapiplugin
from smtap.tapdisk import driver, drivers


def test_types_and_plug_types_come_from_the_engine_registry():
    from smtap.sm import tapdisk
    assert "ram" in tapdisk.TYPES and "aio" in tapdisk.TYPES
    assert tapdisk.VDI_PLUG_TYPE["ram"] == "tap"

    @drivers.register
    class NewType(driver.Driver):
        name = "zz-new-type"
        plug_type = "nbd"
    try:
        tapdisk = importlib.reload(tapdisk)
        assert "zz-new-type" in tapdisk.TYPES
        assert tapdisk.VDI_PLUG_TYPE["zz-new-type"] == "nbd"
    finally:
        del drivers._REGISTRY["zz-new-type"]
        importlib.reload(tapdisk)


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64MiB", 64 << 20), ("2G", 2 << 30),
                                        ("1 TiB", 1 << 40), ("512kb", 512 << 10)])
def test_parse_size(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-5", "0", "1.5G", "12 parsecs", "GiB"])
def test_parse_size_refuses(text):
    with pytest.raises(errors.SROSError) as e:
        units.parse_size(text, "device-config:size")
    assert e.value.code == 1 and "device-config:size" in e.value.message


def test_sparse_copy_keeps_holes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.write(b"a" * 4096)
        f.write(bytes(1 << 20))                  # written zeros become a hole
        f.seek(8 << 20)
        f.write(b"b" * 4096)
    sparse.copy(str(src), str(dst), 16 << 20)
    assert os.path.getsize(dst) == 16 << 20
    data = dst.read_bytes()
    assert data[:4096] == b"a" * 4096 and data[8 << 20:(8 << 20) + 4096] == b"b" * 4096
    assert data.count(0) == len(data) - 8192
    assert sparse.allocated(str(dst)) <= 2 * sparse.BLOCK


def test_plugin_dispatch_convention():
    def ok(session, args):
        assert session._session == "OpaqueRef:s"
        return args["n"] * 2

    def broken(session, args):
        raise KeyError("boom")

    fns = {"ok": ok, "broken": broken}
    call = xmlrpc.client.dumps(("OpaqueRef:s", {"n": 21}), "ok")
    assert xmlrpc.client.loads(xapiplugin.respond(fns, [call]))[0][0] == {
        "Status": "Success", "Value": "42"}
    call = xmlrpc.client.dumps(("OpaqueRef:s", {}), "broken")
    assert xmlrpc.client.loads(xapiplugin.respond(fns, [call]))[0][0] == {
        "Status": "Failure",
        "ErrorDescription": ["XENAPI_PLUGIN_FAILURE", "broken", "KeyError", "'boom'"]}
    call = xmlrpc.client.dumps(("OpaqueRef:s", {}), "nope")
    assert xmlrpc.client.loads(xapiplugin.respond(fns, [call]))[0][0]["ErrorDescription"] == [
        "UNKNOWN_XENAPI_PLUGIN_FUNCTION", "nope"]
