"""`xe` end to end against DummySR: every command, XAPI's output layout, errors."""
import os
import re
import subprocess
import time

import pytest

from smtap.toolstack import inventory
from lib.sizes import GiB

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture
def h(host):
    return host.start()


def records(text):
    """xe list output -> [{key: value}], checking XAPI's layout on the way."""
    out = []
    for block in text.split("\n\n\n"):
        if not block.strip():
            continue
        lines = block.strip("\n").split("\n")
        colon = lines[0].index(": ")
        rec = {}
        for i, line in enumerate(lines):
            assert line[colon:colon + 2] == ": ", line     # keys aligned on one column
            key = line[:colon]
            if i == 0:
                assert not key.startswith(" ")
            assert re.search(r" \((?: RO| RW|MRO|MRW|SRO|SRW)\)\s*$", key), key
            rec[key.strip().rsplit(" (", 1)[0]] = line[colon + 2:]
        out.append(rec)
    return out


def listing(h, *args):
    return h.xe(*args, check=True).stdout


def test_dummysr_through_xe(h):
    host_uuid, dom0_uuid = inventory.ensure()
    assert h.xe_ok("host-list", "--minimal") == host_uuid
    assert h.xe_ok("vm-list", "is-control-domain=true", "--minimal") == dom0_uuid
    (vm,) = records(listing(h, "vm-list"))
    assert list(vm) == ["uuid", "name-label", "power-state"] and vm["power-state"] == "running"
    sm = records(listing(h, "sm-list", "type=dummy"))
    assert [r["name-label"] for r in sm] == ["Dummy"]

    sr = h.xe_ok("sr-create", "name-label=my sr", "type=dummy", "physical-size=1GiB",
                 "device-config:foo=bar", "sm-config:x=y", "content-type=user")
    assert UUID.match(sr)
    out = h.xe("sr-list", "uuid=" + sr).stdout
    assert out.endswith("\n\n\n")
    (rec,) = records(out)
    assert list(rec) == ["uuid", "name-label", "name-description", "host", "type",
                         "content-type"]
    assert rec["name-label"] == "my sr" and rec["type"] == "dummy"
    assert out.split("\n")[0] == "uuid ( RO)                : " + sr   # padded to 4 + longest
    assert out.split("\n")[1] == "          name-label ( RW): my sr"
    full = records(listing(h, "sr-param-list", "uuid=" + sr))[0]
    assert full["physical-size"] == str(GiB) and full["sm-config"] == "x: y"
    pbd = h.xe_ok("pbd-list", "sr-uuid=" + sr, "--minimal")
    (prec,) = records(listing(h, "pbd-list", "sr-uuid=" + sr))
    assert prec["device-config"] == "foo: bar" and prec["currently-attached"] == "true"
    assert prec["host-uuid"] == host_uuid

    vdis = [h.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=disk%d" % i,
                    "virtual-size=%s" % size) for i, size in enumerate(["512MiB", "1GiB", "4096"])]
    assert h.xe_ok("vdi-param-get", "uuid=" + vdis[0], "param-name=virtual-size") == str(GiB // 2)
    assert h.xe_ok("vdi-param-get", "uuid=" + vdis[2], "param-name=virtual-size") == "4096"
    listed = h.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal").split(",")
    assert sorted(listed) == sorted(vdis)
    assert h.xe_ok("vdi-list", "name-label=disk1", "params=uuid,virtual-size",
                   "--minimal") == vdis[1]
    (vrec,) = records(listing(h, "vdi-list", "name-label=disk1",
                              "params=name-label,virtual-size"))
    assert vrec == {"name-label": "disk1", "virtual-size": str(GiB)}
    assert records(listing(h, "vdi-param-list", "uuid=" + vdis[0]))[0]["sr-uuid"] == sr

    snap = h.xe_ok("vdi-snapshot", "uuid=" + vdis[0])
    assert h.xe_ok("vdi-param-get", "uuid=" + snap, "param-name=is-a-snapshot") == "true"
    assert h.xe_ok("vdi-param-get", "uuid=" + snap, "param-name=snapshot-of") == vdis[0]
    clone = h.xe_ok("vdi-clone", "uuid=" + vdis[0], "new-name-label=the clone")
    assert h.xe_ok("vdi-param-get", "uuid=" + clone, "param-name=name-label") == "the clone"
    h.xe_ok("vdi-resize", "uuid=" + vdis[0], "disk-size=2GiB")
    assert h.xe_ok("vdi-param-get", "uuid=" + vdis[0], "param-name=virtual-size") == \
        str(2 * GiB)

    vbd = h.xe_ok("vbd-create", "vm-uuid=" + dom0_uuid, "vdi-uuid=" + vdis[0], "device=0")
    assert h.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") == "false"
    h.xe_ok("vbd-plug", "uuid=" + vbd)
    assert h.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=currently-attached") == "true"
    (brec,) = records(listing(h, "vbd-list", "vdi-uuid=" + vdis[0]))
    assert list(brec) == ["uuid", "vm-uuid", "vm-name-label", "vdi-uuid", "empty", "device"]
    sm_config = h.xe_ok("vdi-param-get", "uuid=" + vdis[0], "param-name=sm-config")
    (key,) = [kv.split(": ")[0] for kv in sm_config.split("; ") if kv.startswith("host_")]
    assert key.startswith("host_OpaqueRef:") and "read-caching-enabled-on-" in sm_config
    assert h.xe_ok("vdi-param-get", "uuid=" + vdis[0], "param-name=sm-config",
                   "param-key=" + key) == "RW"
    res = h.xe("vdi-destroy", "uuid=" + vdis[0])
    assert res.returncode != 0 and res.stderr == (
        "This operation cannot be performed because this VDI is in use by some other "
        "operation\nvdi: %s (disk0)\noperation: destroy\n" % vdis[0])
    h.xe_ok("vbd-unplug", "uuid=" + vbd)
    h.xe_ok("vbd-destroy", "uuid=" + vbd)
    assert h.xe_ok("vbd-list", "--minimal") == ""

    h.xe_ok("sr-scan", "uuid=" + sr)
    assert "<SRlist>" in h.xe_ok("sr-probe", "type=dummy", "device-config:a=b")
    res = h.xe("sr-destroy", "uuid=" + sr)
    assert res.returncode == 1
    assert res.stderr == ("The SR is still connected to a host via a PBD. It cannot be "
                          "destroyed or forgotten.\nsr: %s (my sr)\n" % sr)
    for v in vdis + [snap, clone]:
        h.xe_ok("vdi-destroy", "uuid=" + v)
    h.xe_ok("pbd-unplug", "uuid=" + pbd)
    h.xe_ok("sr-destroy", "uuid=" + sr)
    assert h.xe_ok("sr-list", "--minimal") == ""


def test_sr_introduce_pbd_create_plug_forget(h):
    host_uuid, _ = inventory.ensure()
    sr = h.xe_ok("sr-introduce", "uuid=0f3b0a4e-9f5e-4d1c-8f0e-8e7c3a2b1d00",
                 "name-label=again", "type=dummy", "content-type=user")
    assert sr == "0f3b0a4e-9f5e-4d1c-8f0e-8e7c3a2b1d00"
    pbd = h.xe_ok("pbd-create", "host-uuid=" + host_uuid, "sr-uuid=" + sr,
                  "device-config:path=/x")
    assert h.xe_ok("pbd-list", "uuid=" + pbd, "params=currently-attached",
                   "--minimal") == "false"
    h.xe_ok("pbd-plug", "uuid=" + pbd)
    assert h.xe_ok("pbd-list", "uuid=" + pbd, "params=currently-attached",
                   "--minimal") == "true"
    h.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=v", "virtual-size=1M")
    h.xe_ok("pbd-unplug", "uuid=" + pbd)
    h.xe_ok("sr-forget", "uuid=" + sr)
    assert h.xe_ok("sr-list", "--minimal") == "" and h.xe_ok("vdi-list", "--minimal") == ""


@pytest.mark.parametrize("args,message", [
    (["sr-create", "type=dummy"],
     "Required parameter not found: name-label\nFor usage run: 'xe help'\n"),
    (["vdi-create", "name-label=x", "virtual-size=1"],
     "Required parameter not found: sr-uuid\nFor usage run: 'xe help'\n"),
    (["vdi-param-get", "uuid=x"],
     "Required parameter not found: param-name\nFor usage run: 'xe help'\n"),
    (["vdi-create", "sr-uuid=x", "name-label=x", "virtual-size=12 parsecs"],
     "Error: Failed to parse field 'virtual-size': expecting an integer (possibly with "
     "suffix)\n"),
    (["sr-create", "name-label=x", "type=nope"],
     "The SR could not be connected because the driver was not recognised.\ndriver: nope\n"),
    (["sr-scan", "uuid=no-such-sr"],
     "The uuid you supplied was invalid.\ntype: SR\nuuid: no-such-sr\n"),
    (["vdi-list", "colour=blue"], "Unknown field 'colour'\n"),
    (["vdi-list", "params=uuid,colour"], "Unknown field 'colour'\n"),
    (["sr-list", "garbage"],
     "Syntax error: expected key=value, got 'garbage'\nFor usage run: 'xe help'\n"),
    (["frobnicate"], "Unknown command: frobnicate\nFor usage run: 'xe help'\n"),
    ([], "Usage: xe <command> [key=value ...] [--minimal]\nFor usage run: 'xe help'\n"),
])
def test_xe_errors(h, args, message):
    res = h.xe(*args)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == message
    assert h.xe_ok("host-list", "--minimal")       # the daemon keeps serving


def test_xe_without_a_daemon(host):
    res = host.xe("sr-list")
    assert res.returncode == 1
    assert res.stderr.startswith("Error: cannot connect to the toolstack at ")


def test_xe_host_call_plugin(h):
    h.write("/etc/xapi.d/plugins/hello", "#!/bin/sh\n"
            "echo '<methodResponse><params><param><value><struct><member><name>Status</name>"
            "<value>Success</value></member><member><name>Value</name><value>hi there</value>"
            "</member></struct></value></param></params></methodResponse>'\n", 0o755)
    host_uuid, _ = inventory.ensure()
    assert h.xe_ok("host-call-plugin", "host-uuid=" + host_uuid, "plugin=hello", "fn=f",
                   "args:a=b") == "hi there"
    res = h.xe("host-call-plugin", "host-uuid=" + host_uuid, "plugin=nope", "fn=f")
    assert res.returncode == 1
    assert res.stderr == "The requested plug-in could not be found.\nname: nope\n"


def test_daemon_mode(host):
    pidfile = host.path("/var/lib/smtap/smtap-xapi.pid")
    subprocess.run(["smtap-xapi", "--daemon"], check=True, timeout=30)
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        assert host.xe_ok("host-list", "--minimal")
        again = subprocess.run(["smtap-xapi", "--daemon"], stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=30)
        assert again.returncode == 1 and "already serving" in again.stderr
    finally:
        os.kill(pid, 15)
    for _ in range(100):
        if not os.path.exists(pidfile):
            break
        time.sleep(0.05)
    assert not os.path.exists(pidfile) and not os.path.exists(host.path("/var/lib/xcp/xapi"))
