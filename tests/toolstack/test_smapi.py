"""Running drivers as XAPI does: argv encoding, keys and args per command, fault
mapping, capability gates, attach/activate once per VDI, host plugins.
The test driver (tests/lib/drivers/testsr.py) records every call it gets."""
import os
import re
import subprocess
import time
import xmlrpc.client

import pytest

from smtap import settings
from smtap.toolstack import smapi
from lib.engine import nbd_uri
from lib.procs import run
from lib.sizes import GiB
from lib.toolstack import dom0_vbd, failure, new_vdi

COMMON = {"host_ref", "command", "args", "device_config", "session_ref", "sr_ref", "sr_uuid",
          "subtask_of"}
ON_VDI = COMMON | {"vdi_ref", "vdi_location", "vdi_uuid", "vdi_on_boot", "vdi_allow_caching"}
EXPECTED = {  # command -> (keys, args)
    "sr_create": (COMMON, [str(GiB)]),
    "sr_attach": (COMMON, []), "sr_scan": (COMMON, []), "sr_update": (COMMON, []),
    "sr_detach": (COMMON, []), "sr_delete": (COMMON, []),
    "vdi_create": (COMMON | {"vdi_sm_config", "vdi_type"},
                   [str(GiB), "disk", "about it", "", "false", "19700101T00:00:00Z", "", "false"]),
    "vdi_snapshot": (ON_VDI | {"driver_params"}, []),
    "vdi_clone": (ON_VDI | {"driver_params"}, []),
    "vdi_update": (ON_VDI, []),
    "vdi_resize": (ON_VDI, [str(2 * GiB)]),
    "vdi_attach": (ON_VDI, ["true"]), "vdi_activate": (ON_VDI, ["true"]),
    "vdi_deactivate": (ON_VDI, []), "vdi_detach": (ON_VDI, []), "vdi_delete": (ON_VDI, []),
    "vdi_introduce": (COMMON | {"vdi_location", "vdi_sm_config", "new_uuid"}, []),
    "sr_probe": ({"host_ref", "command", "args", "device_config", "session_ref",
                  "sr_sm_config"}, []),
}


def setup_sr(h, x, device_config=None):
    host = x.host.get_all()[0]
    return x.SR.create(host, device_config or {"path": "/somewhere"}, str(GiB), "test sr", "",
                       "test", "user", False, {})


def create_vdi(x, sr, size=GiB, **extra):
    fields = {"name_description": "about it", "other_config": {}, "sm_config": {"k": "v"}}
    fields.update(extra)
    return new_vdi(x, sr, size, **fields)


def test_method_call_uses_xapi_encoding():
    text = smapi.method_call("vdi_attach", [{"args": ["true"], "empty": "", "b": True,
                                             "m": {"a&b": "<x>"}}])
    assert text == ("<methodCall><methodName>vdi_attach</methodName><params><param><value>"
                    "<struct><member><name>args</name><value><array><data><value>true</value>"
                    "</data></array></value></member><member><name>empty</name><value/>"
                    "</member><member><name>b</name><value><boolean>1</boolean></value>"
                    "</member><member><name>m</name><value><struct><member><name>a&amp;b"
                    "</name><value>&lt;x&gt;</value></member></struct></value></member>"
                    "</struct></value></param></params></methodCall>")
    (params,), method = xmlrpc.client.loads(text)
    assert method == "vdi_attach" and params["empty"] == "" and params["m"] == {"a&b": "<x>"}


def test_every_command_gets_its_documented_keys_and_args(test_host):
    h = test_host
    x = h.session().xenapi
    sr = setup_sr(h, x)
    vdi = create_vdi(x, sr)
    snap = x.VDI.snapshot(vdi, {"type": "single"})
    x.VDI.clone(vdi, {})
    x.VDI.resize(vdi, str(2 * GiB))
    vbd = dom0_vbd(x, vdi, device="0")
    x.VBD.plug(vbd)
    x.VBD.unplug(vbd)
    x.VBD.destroy(vbd)
    intro = x.VDI.introduce("2b4cf7a8-7e4e-4d4c-a5a7-3c1f62b1cdb1", "", "", sr, "user", False,
                            False, {}, "some-location", {}, {"s": "1"}, True, "0", "0", "",
                            False, "19700101T00:00:00Z", "")
    assert x.VDI.get_location(intro) == "some-location"
    x.VDI.destroy(snap)
    x.SR.probe(x.host.get_all()[0], {"path": "/probe"}, "test", {"p": "q"})
    for v in x.SR.get_VDIs(sr):
        x.VDI.destroy(v)
    (pbd,) = x.SR.get_PBDs(sr)
    x.PBD.unplug(pbd)
    x.SR.destroy(sr)

    host_ref = x.host.get_all()[0]
    for command, (keys, args) in EXPECTED.items():
        call = h.last_call(command)
        params = call["params"]
        assert set(params) == keys, command
        assert params["args"] == args, command
        assert params["command"] == command and params["host_ref"] == host_ref
        assert params["device_config"]["SRmaster"] == "true", command
        assert call["argv"][0].startswith("<methodCall><methodName>%s</methodName>" % command)
        assert len(call["argv"]) == 1 and call["originator"] == "SM"
        assert call["root"] == settings.root()
        assert not re.search(r">\s+<", call["argv"][0]) and "<?xml" not in call["argv"][0]
        assert "<string>" not in call["argv"][0]
        if "sr_uuid" in keys:
            assert params["device_config"]["path"] == "/somewhere"
            assert params["sr_ref"] == sr and params["sr_uuid"] == call_sr_uuid(h)
    assert "<value/>" in h.last_call("vdi_create")["argv"][0]   # empty metadata_of_pool
    create = h.last_call("vdi_create")["params"]
    assert create["vdi_sm_config"] == {"k": "v"} and create["vdi_type"] == "user"
    assert h.last_call("vdi_snapshot")["params"]["driver_params"] == {"type": "single"}
    attach = h.last_call("vdi_attach")["params"]
    assert attach["vdi_ref"] == vdi and attach["vdi_on_boot"] == "persist"
    assert attach["vdi_allow_caching"] == "false" and attach["vdi_location"]
    intro_call = h.last_call("vdi_introduce")["params"]
    assert intro_call["new_uuid"] == "2b4cf7a8-7e4e-4d4c-a5a7-3c1f62b1cdb1"
    assert intro_call["vdi_location"] == "some-location"
    assert intro_call["vdi_sm_config"] == {"s": "1"}
    probe = h.last_call("sr_probe")["params"]
    assert probe["device_config"] == {"path": "/probe", "SRmaster": "true"}
    assert probe["sr_sm_config"] == {"p": "q"}
    info = h.last_call("sr_get_driver_info")["params"]
    assert set(info) == {"host_ref", "command", "args", "device_config"}
    assert info["device_config"] == {}
    # The sequences XAPI runs.
    assert h.commands()[1:] == [
        "sr_create", "sr_attach", "sr_scan", "sr_update", "vdi_create",
        "vdi_snapshot", "vdi_update", "vdi_clone", "vdi_update", "vdi_resize",
        "vdi_attach", "vdi_activate", "vdi_deactivate", "vdi_detach", "vdi_introduce",
        "vdi_delete", "sr_probe", "vdi_delete", "vdi_delete", "vdi_delete", "sr_detach",
        "sr_attach", "sr_delete"]
    # The SR's SM session is the one drivers use, and it went with the SR.
    sessions = {c["params"]["session_ref"] for c in h.driver_calls() if "sr_ref" in c["params"]}
    assert len(sessions) == 1
    assert x.session.get_all().count(sessions.pop()) == 0


def call_sr_uuid(h):
    return h.last_call("sr_create")["params"]["sr_uuid"]


@pytest.mark.parametrize("command,code,expected", [
    ("vdi_create", 78, "SR_BACKEND_FAILURE_78"),
    ("vdi_create", 38, "SR_OPERATION_NOT_SUPPORTED"),
    ("vdi_delete", 24, "VDI_IN_USE"),
    ("vdi_delete", 144, "VDI_MISSING"),
    ("sr_delete", 39, "SR_NOT_EMPTY"),
    ("sr_delete", 16, "SR_DEVICE_IN_USE"),
])
def test_faults_map_to_xapi_errors(test_host, command, code, expected):
    h = test_host
    x = h.session().xenapi
    sr = setup_sr(h, x)
    vdi = create_vdi(x, sr)
    h.configure_driver(faults={command: [code, "it went wrong [opterr=detail]"]})
    if command == "vdi_create":
        details = failure(create_vdi, x, sr)
    elif command == "vdi_delete":
        details = failure(x.VDI.destroy, vdi)
        assert x.VDI.get_uuid(vdi)   # the record stays when the driver refuses
    else:
        x.PBD.unplug(x.SR.get_PBDs(sr)[0])
        details = failure(x.SR.destroy, sr)
        assert x.SR.get_name_label(sr) == "test sr"
        assert h.commands()[-2:] == ["sr_delete", "sr_detach"]
    assert details[0] == expected
    if expected == "SR_BACKEND_FAILURE_78":
        assert details[1:3] == ["", "it went wrong [opterr=detail]"]
        assert "testsr: vdi_create failed" in details[3]   # the driver's stderr
    elif expected == "VDI_IN_USE":
        assert details == ["VDI_IN_USE", vdi, "vdi_delete"]
    elif expected == "VDI_MISSING":
        assert details == ["VDI_MISSING", sr, vdi]


@pytest.mark.parametrize("config,reason", [
    ({"garbage": {"vdi_create": "hello, not XML"}}, "unparsable driver response"),
    ({"exit": {"vdi_create": 3}}, "non-zero exit"),
    ({"garbage": {"vdi_create": xmlrpc.client.dumps(({"uuid": "x", "location": "y"},),
                                                     methodresponse=True)},
      "exit": {"vdi_create": 1}}, "non-zero exit"),
])
def test_bad_driver_output_is_sr_backend_failure(test_host, config, reason):
    h = test_host
    x = h.session().xenapi
    sr = setup_sr(h, x)
    h.configure_driver(**config)
    details = failure(create_vdi, x, sr)
    assert details[:2] == ["SR_BACKEND_FAILURE", reason]
    assert x.SR.get_VDIs(sr) == []
    h.configure_driver()
    create_vdi(x, sr)   # the toolstack carries on


def test_failed_sr_create_leaves_no_records(test_host):
    h = test_host
    x = h.session().xenapi
    h.configure_driver(faults={"sr_create": [44, "no space"]})
    details = failure(setup_sr, h, x)
    assert details[:3] == ["SR_BACKEND_FAILURE_44", "", "no space"]
    assert x.SR.get_all() == [] and x.PBD.get_all() == []


def test_capability_gates(test_host):
    h = test_host
    h.configure_driver(caps=["VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH"])
    h.restart()   # capabilities are read at start-up
    x = h.session().xenapi
    sr = setup_sr(h, x)
    assert "sr_update" not in h.commands()          # no SR_UPDATE: no sr_update after scan
    vdi = create_vdi(x, sr)
    vbd = dom0_vbd(x, vdi, device="0")
    x.VBD.plug(vbd)
    x.VBD.unplug(vbd)
    assert [c for c in h.commands() if c.startswith("vdi_")] == [
        "vdi_create", "vdi_attach", "vdi_detach"]
    before = len(h.commands())
    assert failure(x.SR.probe, x.host.get_all()[0], {}, "test", {})[0] == \
        "SR_OPERATION_NOT_SUPPORTED"
    assert len(h.commands()) == before   # the driver never saw sr_probe


def test_attach_and_activate_once_per_vdi(test_host):
    h = test_host
    x = h.session().xenapi
    sr = setup_sr(h, x)
    vdi = create_vdi(x, sr)
    x.VDI.set_sharable(vdi, True)       # two RW VBDs: XAPI allows them on a sharable VDI
    first, second = dom0_vbd(x, vdi, "RW", "0"), dom0_vbd(x, vdi, "RW", "1")
    x.VBD.plug(first)
    x.VBD.plug(second)
    datapath = lambda: [c for c in h.commands() if c in (
        "vdi_attach", "vdi_activate", "vdi_deactivate", "vdi_detach")]
    assert datapath() == ["vdi_attach", "vdi_activate"]
    # No NBD socket behind params_nbd: no dom0 block device, the device is params' name.
    assert x.VBD.get_device(first) == x.VBD.get_device(second) == x.VDI.get_uuid(vdi)
    x.VBD.unplug(first)
    assert datapath() == ["vdi_attach", "vdi_activate"]   # the other VBD still uses it
    assert x.VBD.get_currently_attached(second) is True
    x.VBD.unplug(second)
    assert datapath()[2:] == ["vdi_deactivate", "vdi_detach"]
    ro = dom0_vbd(x, vdi, "RO", "2")
    x.VBD.plug(ro)
    assert h.last_call("vdi_attach")["params"]["args"] == ["false"]
    assert h.last_call("vdi_activate")["params"]["args"] == ["false"]
    # pbd-unplug refuses while a VBD uses a VDI of the SR (XAPI: VDI_IN_USE <vdi>)...
    pbd = x.SR.get_PBDs(sr)[0]
    assert failure(x.PBD.unplug, pbd) == ["VDI_IN_USE", vdi]
    assert x.VBD.get_currently_attached(ro) is True
    assert h.commands()[-1] == "vdi_activate"
    # ...and detaches the SR once they are unplugged.
    x.VBD.unplug(ro)
    x.PBD.unplug(pbd)
    assert h.commands()[-3:] == ["vdi_deactivate", "vdi_detach", "sr_detach"]


def test_failed_activate_undoes_the_attach(test_host):
    h = test_host
    x = h.session().xenapi
    sr = setup_sr(h, x)
    vdi = create_vdi(x, sr)
    vbd = dom0_vbd(x, vdi, device="0")
    h.configure_driver(faults={"vdi_activate": [46, "unavailable"]})
    assert failure(x.VBD.plug, vbd)[0] == "SR_BACKEND_FAILURE_46"
    # undone step by step, each idempotent: deactivate too (a failed activate may have
    # started a tapdisk), then detach
    assert h.commands()[-3:] == ["vdi_activate", "vdi_deactivate", "vdi_detach"]
    assert x.VBD.get_currently_attached(vbd) is False
    h.configure_driver()
    x.VBD.plug(vbd)
    assert x.VBD.get_currently_attached(vbd) is True


PLUGIN = """#!%s
import sys, xmlrpc.client
(session, args), fn = xmlrpc.client.loads(sys.argv[1])
if fn == "fail":
    out = {"Status": "Failure", "ErrorDescription": ["PLUGIN_SAYS_NO", args.get("why", "")]}
elif fn == "garbage":
    print("not xml"); sys.exit(0)
else:
    out = {"Status": "Success",
           "Value": "%%s:%%s:%%s:%%d" %% (fn, session[:10], args.get("a"), len(sys.argv))}
print(xmlrpc.client.dumps((out,), methodresponse=True))
"""


def test_host_call_plugin(test_host):
    h = test_host
    h.write("/etc/xapi.d/plugins/echo", PLUGIN % os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        ".venv", "bin", "python3"), 0o755)
    x = h.session().xenapi
    host = x.host.get_all()[0]
    assert x.host.call_plugin(host, "echo", "hello", {"a": "b"}) == "hello:OpaqueRef::b:2"
    assert failure(x.host.call_plugin, host, "echo", "fail", {"why": "because"}) == [
        "PLUGIN_SAYS_NO", "because"]
    assert failure(x.host.call_plugin, host, "echo", "garbage", {})[0] == \
        "XENAPI_PLUGIN_FAILURE"
    assert failure(x.host.call_plugin, host, "missing", "f", {}) == [
        "XENAPI_MISSING_PLUGIN", "missing"]
    assert failure(x.host.call_plugin, host, "../plugins/echo", "f", {})[0] == \
        "XENAPI_MISSING_PLUGIN"


@pytest.mark.alone          # losetup -a: no other test's loop device takes its number
def test_vbd_plug_makes_a_dom0_block_device_when_the_export_is_served(test_host, tmp_path):
    h = test_host
    sock = str(tmp_path / "nbd.sock")
    server = subprocess.Popen(["nbdkit", "-f", "--unix", sock, "memory", "16M"])
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.05)
        h.configure_driver(nbd=sock)
        x = h.session().xenapi
        sr = setup_sr(h, x)
        vdi = create_vdi(x, sr)
        vbd = dom0_vbd(x, vdi, device="0")
        x.VBD.plug(vbd)
        device = x.VBD.get_device(vbd)
        assert re.match(r"^loop\d+$", device)
        with open("/dev/" + device, "r+b") as f:
            f.write(b"through the loop device")
        x.VBD.unplug(vbd)
        assert x.VBD.get_device(vbd) == ""
        losetup = run("losetup", "-a").stdout
        assert "/dev/%s:" % device not in losetup
        copy = str(tmp_path / "copy.img")
        run("nbdcopy", nbd_uri(sock), copy)
        with open(copy, "rb") as f:
            assert f.read(23) == b"through the loop device"   # it reached the NBD export

        # A socket path that serves nothing: the plug fails and undoes attach/activate.
        h.configure_driver(nbd=str(tmp_path / "not-a-socket"))
        with open(str(tmp_path / "not-a-socket"), "w"):
            pass
        details = failure(x.VBD.plug, vbd)
        assert details[0] == "INTERNAL_ERROR" and "dom0 block device" in details[1]
        assert h.commands()[-2:] == ["vdi_deactivate", "vdi_detach"]
        assert x.VBD.get_currently_attached(vbd) is False
    finally:
        server.terminate()
        server.wait()
