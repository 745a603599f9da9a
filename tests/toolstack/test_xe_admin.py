"""xe as an administrator knows it: the param-* commands, sr-update, vdi-introduce,
vdi-forget, vdi-copy, help <command>, xe's global options, enums in any case, device and
size checks, allowed/current operations, and errors printed as XAPI's CLI prints them
(the datamodel's description and named parameters, never a Python class name)."""
import os
import re
import threading
import time

import pytest

from smtap.toolstack import errors, inventory, xe
from smtap.toolstack.cli_params import GENERIC
from smtap.toolstack.cli_records import PREFIXES

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
def h(test_host):
    return test_host


def fails(h, *args):
    res = h.xe(*args)
    assert res.returncode == 1 and res.stdout == "", res
    assert "Traceback" not in res.stderr and "Error'>" not in res.stderr
    return res.stderr


def make_sr(h, sr_type="test"):
    host_uuid, _ = inventory.ensure()
    return h.xe_ok("sr-create", "host-uuid=" + host_uuid, "type=" + sr_type, "name-label=adm")


def make_vdi(h, sr, *extra):
    return h.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=disk", "virtual-size=1MiB", *extra)


def get(h, cls, uuid, name, key=None):
    args = ["%s-param-get" % cls, "uuid=" + uuid, "param-name=" + name]
    return h.xe_ok(*(args + (["param-key=" + key] if key else [])))


def test_param_commands(h):
    sr = make_sr(h)
    vdi = make_vdi(h, sr, "type=User", "other-config:a=1")      # enums in any case
    assert get(h, "vdi", vdi, "type") == "user"
    h.xe_ok("vdi-param-set", "uuid=" + vdi, "name-label=renamed", "other-config:b=2",
            "other-config:a=one", "on-boot=RESET", "allow-caching=TRUE")
    assert get(h, "vdi", vdi, "name-label") == "renamed"
    assert get(h, "vdi", vdi, "other-config", "a") == "one"
    assert get(h, "vdi", vdi, "other-config", "b") == "2"
    assert (get(h, "vdi", vdi, "on-boot"), get(h, "vdi", vdi, "allow-caching")) == \
        ("reset", "true")
    h.xe_ok("vdi-param-add", "uuid=" + vdi, "param-name=other-config", "c=3", "d=4")
    h.xe_ok("vdi-param-add", "uuid=" + vdi, "param-name=tags", "param-key=gold")
    assert get(h, "vdi", vdi, "tags") == "gold"
    h.xe_ok("vdi-param-remove", "uuid=" + vdi, "param-name=other-config", "param-key=a")
    h.xe_ok("vdi-param-remove", "uuid=" + vdi, "param-name=tags", "param-key=gold")
    assert get(h, "vdi", vdi, "other-config") == "b: 2; c: 3; d: 4"
    h.xe_ok("vdi-param-clear", "uuid=" + vdi, "param-name=other-config")
    h.xe_ok("vdi-param-clear", "uuid=" + vdi, "param-name=name-label")
    assert get(h, "vdi", vdi, "other-config") == "" and get(h, "vdi", vdi, "name-label") == ""
    h.xe_ok("sr-param-set", "uuid=" + sr, "name-description=words", "other-config:k=v")
    assert get(h, "sr", sr, "name-description") == "words"
    host_uuid, dom0 = inventory.ensure()
    h.xe_ok("host-param-set", "uuid=" + host_uuid, "other-config:note=x")
    assert get(h, "host", host_uuid, "other-config", "note") == "x"
    h.xe_ok("vm-param-set", "uuid=" + dom0, "user-version=3")
    assert get(h, "vm", dom0, "user-version") == "3"
    pool = h.xe_ok("pool-list", "--minimal")
    assert get(h, "pool", pool, "restrictions", "restrict_read_caching") == "false"
    vbd = h.xe_ok("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=0", "mode=ro",
                  "type=disk")
    assert (get(h, "vbd", vbd, "mode"), get(h, "vbd", vbd, "type")) == ("RO", "Disk")
    h.xe_ok("vbd-param-set", "uuid=" + vbd, "mode=rw", "bootable=t")
    assert (get(h, "vbd", vbd, "mode"), get(h, "vbd", vbd, "bootable")) == ("RW", "true")
    # refused: read-only fields, unknown fields, bad values (nothing changed)
    assert fails(h, "vdi-param-set", "uuid=" + vdi, "virtual-size=1") == \
        "Error: Parameter 'virtual-size' is read-only\n"
    assert fails(h, "vdi-param-set", "uuid=" + vdi, "colour=blue") == "Unknown field 'colour'\n"
    assert fails(h, "vbd-param-set", "uuid=" + vbd, "mode=rx").startswith(
        "Error: Failed to parse parameter 'mode'")
    assert fails(h, "vdi-param-add", "uuid=" + vdi, "param-name=sm-config", "a=b") == \
        "Error: Parameter 'sm-config' is read-only\n"
    assert get(h, "vbd", vbd, "mode") == "RW"


def test_sr_update_vdi_introduce_forget_and_copy(h):
    sr = make_sr(h)
    h.xe_ok("sr-update", "uuid=" + sr)
    assert h.last_call("sr_update")["params"]["sr_uuid"] == sr
    new = "0f3b0a4e-9f5e-4d1c-8f0e-8e7c3a2b1d01"
    assert h.xe_ok("vdi-introduce", "uuid=" + new, "sr-uuid=" + sr, "type=user",
                   "location=/there", "name-label=found", "other-config:o=p") == new
    call = h.last_call("vdi_introduce")["params"]
    assert (call["new_uuid"], call["vdi_location"]) == (new, "/there")
    assert get(h, "vdi", new, "name-label") == "found"
    h.xe_ok("vdi-forget", "uuid=" + new)
    assert h.xe_ok("vdi-list", "uuid=" + new, "--minimal") == ""
    # the test driver names no live NBD export: nothing can be read, the copy fails and
    # the VDI it made is destroyed again (as XAPI does)
    vdi = make_vdi(h, sr)
    before = set(h.xe_ok("vdi-list", "--minimal").split(","))
    assert fails(h, "vdi-copy", "uuid=" + vdi, "sr-uuid=" + sr) == \
        "The VDI copy action has failed\n"
    assert set(h.xe_ok("vdi-list", "--minimal").split(",")) == before
    assert "vdi_delete" in h.commands() and h.commands()[-1] == "vdi_delete"


def test_help_and_global_options(h):
    out = h.xe_ok("help", "vdi-create")
    assert out.split("\n")[:3] == [
        "command name            : vdi-create",
        "        reqd params     : sr-uuid, name-label, virtual-size",
        "        optional params : type, sharable, read-only, name-description, sm-config:, "
        "other-config:, xenstore-data:, tags:"]
    assert out.split("\n")[3].startswith("        description     : Create a VDI")
    assert "reqd params     : uuid, param-name" in h.xe_ok("help", "vdi-param-get")
    assert h.xe_ok("help", "frobnicate") == "Unknown command 'frobnicate'"
    assert "vdi-copy" in h.xe_ok("help").split()
    host_uuid, _ = inventory.ensure()
    assert h.xe_ok("-s", "localhost", "-u", "root", "-pw", "secret", "-p", "443", "--compat",
                   "host-list", "--minimal") == host_uuid
    assert h.xe_ok("host-list", "username=root", "password=x", "--minimal") == host_uuid
    assert fails(h, "-u", "alice", "host-list") == \
        "Authentication failed\nFor usage run: 'xe help'\n"
    assert fails(h, "host-list", "-s") == \
        "Syntax error: -s needs a value\nFor usage run: 'xe help'\n"


def test_devices_sizes_and_error_output(h):
    sr = make_sr(h)
    vdi = make_vdi(h, sr)
    _, dom0 = inventory.ensure()
    h.xe_ok("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=0")
    assert fails(h, "vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=xvda") == \
        "A device with the name given already exists on the selected VM\ndevice: xvda\n"
    assert fails(h, "vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=floppy9") == \
        "The device name is invalid\ndevice: floppy9\n"
    auto = h.xe_ok("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=autodetect")
    assert get(h, "vbd", auto, "userdevice") == "1"
    for size in ("9000000TiB", "99999999999999999999"):
        assert fails(h, "vdi-create", "sr-uuid=" + sr, "name-label=x", "virtual-size=" + size) \
            == "Error: Failed to parse field 'virtual-size': number too big (maximum = " \
            "8388607 TiB)\n"
    # an error the datamodel documents: its description, its parameters by name, a
    # reference shown as its object's uuid and name
    assert fails(h, "sr-destroy", "uuid=" + sr) == (
        "The SR is still connected to a host via a PBD. It cannot be destroyed or "
        "forgotten.\nsr: %s (adm)\n" % sr)
    assert errors.code_of_description(
        "The SR is still connected to a host via a PBD. It cannot be destroyed or "
        "forgotten.") == "SR_HAS_PBD"
    descriptions = [d for _, d in errors.DOCS.values()]
    assert len(descriptions) == len(set(descriptions))
    # a driver's own failure code: as today
    h.configure_driver(faults={"vdi_create": [44, "There is insufficient space"]})
    assert fails(h, "vdi-create", "sr-uuid=" + sr, "name-label=x", "virtual-size=1") == (
        "Error code: SR_BACKEND_FAILURE_44\nError parameters: , There is insufficient "
        "space, testsr: vdi_create failed\n\n")
    # no XenAPI answer at all (a request over XAPI's 300 KiB limit): INTERNAL_ERROR
    big = ["other-config:k%d=%s" % (i, "x" * 100000) for i in range(4)]
    assert fails(h, "vdi-create", "sr-uuid=" + sr, "name-label=x", "virtual-size=1", *big) \
        == ("The server failed to handle your request, due to an internal error. The given "
            "message may give details useful for debugging the problem.\n"
            "message: 413 Request Entity Too Large\n")


def test_allowed_and_current_operations(h):
    sr = make_sr(h)
    vdi = make_vdi(h, sr)
    ops = get(h, "vdi", vdi, "allowed-operations").split("; ")
    assert {"destroy", "snapshot", "clone", "resize", "copy", "forget"} <= set(ops)
    assert "enable_cbt" not in ops                 # the test driver lacks VDI_CONFIG_CBT
    sr_ops = get(h, "sr", sr, "allowed-operations").split("; ")
    assert {"scan", "vdi_create", "vdi_snapshot", "update"} <= set(sr_ops)
    assert "destroy" not in sr_ops and "forget" not in sr_ops     # its PBD is plugged
    _, dom0 = inventory.ensure()
    vbd = h.xe_ok("vbd-create", "vm-uuid=" + dom0, "vdi-uuid=" + vdi, "device=autodetect")
    assert get(h, "vbd", vbd, "allowed-operations") == "attach; plug"
    h.xe_ok("vbd-plug", "uuid=" + vbd)
    assert "unplug" in get(h, "vbd", vbd, "allowed-operations").split("; ")
    ops = get(h, "vdi", vdi, "allowed-operations").split("; ")
    assert "destroy" not in ops and "resize" not in ops and "snapshot" in ops
    h.xe_ok("vbd-unplug", "uuid=" + vbd)
    # while an operation runs, it is in current-operations and nothing else is allowed
    h.configure_driver(sleep={"sr_scan": 2})
    scan = threading.Thread(target=h.xe_ok, args=("sr-scan", "uuid=" + sr))
    scan.start()
    try:
        seen = ""
        for _ in range(100):
            seen = get(h, "sr", sr, "current-operations")
            if seen:
                break
            time.sleep(0.05)
        assert seen.endswith(": scan") and seen.startswith("OpaqueRef:")
        assert get(h, "sr", sr, "allowed-operations") == ""
    finally:
        scan.join()
    assert get(h, "sr", sr, "current-operations") == ""


def test_readme_lists_every_xe_command():
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(top, "README.md")) as f:
        readme = f.read().split("## The local toolstack by hand", 1)[1].split("\n## ", 1)[0]
    generic = ["%s-%s" % (p, suffix) for p in PREFIXES for suffix, *_ in GENERIC]
    for suffix, *_ in GENERIC:
        assert "-" + suffix + "`" in readme, suffix
    for prefix in PREFIXES:
        assert "`%s`" % prefix in readme, prefix
    missing = [n for n in xe.COMMANDS if n not in generic and "`%s`" % n not in readme]
    assert not missing, missing
