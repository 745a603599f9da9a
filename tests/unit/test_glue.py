"""The glue's pure parts: types from the engine's registry, size parsing, sparse copies,
the plugin dispatch convention."""
import ast
import glob
import os
import sys
import xmlrpc.client

import pytest

from lib.checkout import TOP
from smtap import sparse
from smtap import units as suite_units
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


def test_one_boolean_parser_with_each_interfaces_vocabulary():
    """The engine's options, SMAPI args and xe flags all go through smtap.units'
    parse_bool; each accepts upstream's spellings for it and refuses the rest."""
    assert driver.parse_bool is suite_units.parse_bool
    for text, value in [("1", True), ("Yes", True), ("on", True), ("true", True),
                        ("0", False), ("no", False), ("OFF", False), ("false", False)]:
        assert suite_units.parse_bool(text) is value
    with pytest.raises(ValueError) as e:
        suite_units.parse_bool("maybe", "writeback")
    assert "writeback" in str(e.value) and "maybe" in str(e.value)
    # SMAPI: XAPI sends "true"/"false"; anything else is InvalidArg, never false.
    assert units.parse_bool("True", "writable") is True
    for text in ("yes", "1", "", "flase"):
        with pytest.raises(errors.SROSError) as e:
            units.parse_bool(text, "writable")
        assert e.value.code == 1 and "writable" in e.value.message
    # xe: XAPI's cli takes true/t/1 and false/f/0, not yes/no.
    assert [suite_units.parse_bool(t, "force", suite_units.XE_BOOL)
            for t in ("T", "1", "f", "0")] == [True, True, False, False]
    with pytest.raises(ValueError):
        suite_units.parse_bool("yes", "force", suite_units.XE_BOOL)


def test_xe_reads_flags_and_sizes_with_the_suites_parsers():
    # The RPM's library (tests/unit in %check) has no toolstack.
    xe = pytest.importorskip("smtap.toolstack.xe")
    Args, CliError = xe.Args, xe.CliError
    assert Args(["force=T"]).flag("force") is True and Args([]).flag("force") is False
    with pytest.raises(CliError) as e:
        Args(["force=yes"]).flag("force")       # as XAPI's xe: true/t/1, false/f/0 only
    assert str(e.value) == "Failed to parse parameter 'force': expecting 'true' or 'false'"
    assert Args(["virtual-size=2GiB"]).size("virtual-size") == str(2 << 30)
    assert Args(["virtual-size=64m"]).size("virtual-size") == str(64 << 20)
    assert Args(["virtual-size=0"]).size("virtual-size") == "0"    # ram SR: the seed's size
    for bad in ("-1", "1.5G", "12 parsecs"):
        with pytest.raises(CliError):
            Args(["virtual-size=" + bad]).size("virtual-size")


# Comparisons with a yes/no word that parse no value: the filter language's keyword, the
# answer xe uninstall's question asks for (as XAPI's xe: the word itself).
NOT_A_BOOLEAN = {'tok[1] == "true"', 'sys.stdin.readline().strip() != "yes"'}


@pytest.mark.skipif(sys.version_info < (3, 8), reason="ast.get_source_segment: Python 3.8")
def test_no_other_boolean_or_size_parser():
    """No module but smtap/units.py compares a value with yes/no words, nor defines a
    size or boolean parser of its own (sm/units.py only turns their errors into SR
    errors)."""
    top = TOP
    files = [f for d in ("sm", "tapdisk", "toolstack", "smtap", "formats")
             for f in glob.glob(os.path.join(top, d, "**", "*.py"), recursive=True)]
    files += glob.glob(os.path.join(top, "plugins", "smtap-*"))
    words = {"true", "false", "yes", "no", "on", "off"}
    found = []
    for path in files:
        if path == os.path.join(top, "smtap", "units.py"):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.FunctionDef) and node.name in ("parse_bool", "parse_size") \
                    and path != os.path.join(top, "sm", "units.py"):
                found.append("%s:%d def %s" % (path, node.lineno, node.name))
            if not isinstance(node, ast.Compare):
                continue
            for comparator in node.comparators:
                items = comparator.elts if isinstance(
                    comparator, (ast.Tuple, ast.List, ast.Set)) else [comparator]
                if any(isinstance(i, ast.Constant) and isinstance(i.value, str)
                       and i.value.lower() in words for i in items):
                    # the source segment only for a match: it rescans the whole file
                    segment = ast.get_source_segment(source, node)
                    if segment not in NOT_A_BOOLEAN:
                        found.append("%s:%d %s" % (path, node.lineno, segment))
    assert found == []


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
