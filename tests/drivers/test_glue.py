"""The glue's pure parts: types from the engine's registry, size parsing, sparse copies,
the plugin dispatch convention."""
import os
import xmlrpc.client

import pytest

from smtap import sparse
from smtap.sm import errors, units, xapiplugin
from smtap.tapdisk import driver, drivers


def test_types_and_plug_types_come_from_the_engine_registry():
    from smtap.sm import disktypes
    assert "ram" in disktypes.names() and "aio" in disktypes.names()
    assert disktypes.plug_types()["ram"] == "tap"

    @drivers.register
    class NewType(driver.Driver):
        name = "zz-new-type"
        plug_type = "nbd"
    try:
        assert "zz-new-type" in disktypes.names()
        assert disktypes.plug_types()["zz-new-type"] == "nbd"
    finally:
        del drivers._REGISTRY["zz-new-type"]


@pytest.mark.parametrize("text,value", [("4096", 4096), ("64MiB", 64 << 20), ("2G", 2 << 30),
                                        ("1 TiB", 1 << 40), ("512kb", 512 << 10)])
def test_parse_size(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-5", "0", "1.5G", "12 parsecs", "GiB"])
def test_parse_size_refuses(text):
    with pytest.raises(errors.SROSError) as e:
        units.parse_size(text, "device-config:size")
    assert e.value.code == 1 and "device-config:size" in e.value.message


def test_runtime_names_are_defined_once_and_parse_back():
    from smtap import names, settings
    run = settings.runtime_dir()
    assert names.ctl_path(42) == os.path.join(run, "ctl42")
    assert names.pid_of_ctl("ctl42") == 42
    assert [names.pid_of_ctl(n) for n in ("ctl", "ctlx", "nbd42.0")] == [None] * 3
    assert names.nbd_path(42, 7) == os.path.join(run, "nbd42.7")
    assert names.parse_nbd(names.nbd_path(42, 7)) == (42, 7)
    assert [names.parse_nbd(n) for n in ("nbd42", "nbd.7", "nbd42.x", "ctl42", "nbd4.2.")] == \
        [None] * 5
    assert names.nbd_name(42, 7).startswith(names.nbd_prefix(42))
    assert not names.nbd_name(420, 7).startswith(names.nbd_prefix(42))
    assert names.link_path("sr", "vdi") == os.path.join(run, "nbd", "sr", "vdi")
    assert names.params_nbd("sr", "vdi") == "nbd:unix:%s/nbd/sr/vdi:exportname=vdi" % run
    assert names.marker_path(3) == os.path.join(run, "tapdisk", "tapdisk-3")
    assert names.minor_of_marker("tapdisk-3") == 3 and names.minor_of_marker("tapdisk-") is None


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
