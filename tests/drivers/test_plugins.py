"""The suite's host plugins through host.call_plugin, and the testing hooks the tapdisk
glue consults (fault injection on real failure paths)."""
import json
import os
import xmlrpc.client

from smtap import settings
from lib.engine import tap_list, tap_state
from lib.procs import run
from lib.sizes import MiB
from lib.toolstack import failure
from lib.vdis import holds, host_tags, link_path, minor_allocated, tapdisk_of, write

PAUSE = "smtap-tapdisk-pause"


def test_pause_unpause_refresh_and_is_open(dhost, ram_sr):
    x = dhost.x
    vdi = dhost.vdi_create(ram_sr, 8 * MiB)
    ids = {"sr_uuid": x.SR.get_uuid(ram_sr), "vdi_uuid": x.VDI.get_uuid(vdi)}
    assert dhost.call_plugin("smtap-on-slave", "is_open", ids) == "False"
    assert dhost.call_plugin(PAUSE, "pause", ids) == "False"        # nothing active here
    vbd = dhost.plug(vdi)
    pid, _ = tapdisk_of(x, vdi)
    assert dhost.call_plugin("smtap-on-slave", "is_open", ids) == "True"
    assert dhost.call_plugin("smtap-on-slave", "is_open",
                             {"srRef": ram_sr, "vdiUuid": ids["vdi_uuid"]}) == "True"
    write(x, vdi, 0x42, 0, MiB)
    assert dhost.call_plugin(PAUSE, "pause", ids) == "True"
    assert tap_state(pid) == "0x2a"
    ram_file = os.path.join(settings.sr_mount_dir(), ids["sr_uuid"], ids["vdi_uuid"] + ".ram")
    with open(ram_file, "rb") as f:                  # paused: written back to the tmpfs
        assert f.read(MiB) == b"\x42" * MiB
    assert dhost.call_plugin(PAUSE, "unpause", ids) == "True"
    assert tap_state(pid) == "0"
    assert dhost.call_plugin(PAUSE, "refresh", ids) == "True"
    assert tap_state(pid) == "0" and holds(x, vdi, 0x42, 0, MiB)

    err = failure(dhost.call_plugin, PAUSE, "frobnicate", ids)
    assert err == ["UNKNOWN_XENAPI_PLUGIN_FUNCTION", "frobnicate"]
    err = failure(dhost.call_plugin, PAUSE, "pause", {"sr_uuid": ids["sr_uuid"]})
    assert err[:3] == ["XENAPI_PLUGIN_FAILURE", "pause", "ValueError"] and "vdi_uuid" in err[3]
    dhost.unplug(vbd)
    assert dhost.call_plugin("smtap-on-slave", "is_open", ids) == "False"


def test_plugin_stdout_is_only_the_response_and_host_modules_cannot_shadow(dhost):
    plugins = settings.plugins_dir()
    # A host plugin directory full of foreign modules must not shadow our imports.
    with open(os.path.join(plugins, "XenAPI.py"), "w") as f:
        f.write("raise ImportError('the host plugin directory shadowed an import')\n")
    call = xmlrpc.client.dumps(("OpaqueRef:none", {}), "list")
    proc = run(os.path.join(plugins, "smtap-testing-hooks"), call, check=False, timeout=60,
               env=dict(os.environ, ORIGINATOR="SM"))
    assert proc.returncode == 0, proc.stderr
    (result,), method = xmlrpc.client.loads(proc.stdout)
    assert result == {"Status": "Success", "Value": "{}"}
    assert proc.stdout.startswith("<?xml") and proc.stdout.rstrip().endswith("</methodResponse>")


def test_activate_failure_rolls_back(dhost, ram_sr):
    x = dhost.x
    vdi = dhost.vdi_create(ram_sr, 8 * MiB)
    hooks = "smtap-testing-hooks"
    assert dhost.call_plugin(hooks, "set", {"name": "activate-fail"}) == "True"
    assert json.loads(dhost.call_plugin(hooks, "list", {})) == {"activate-fail": "1"}
    err = failure(dhost.call_plugin, hooks, "set", {"name": "no-such-hook"})
    assert err[0] == "XENAPI_PLUGIN_FAILURE" and "unknown hook" in err[3]

    before = {e.get("pid") for e in tap_list()}
    err = failure(dhost.plug, vdi)
    assert err[0] == "SR_BACKEND_FAILURE_202" and "activate-fail" in err[2]
    assert {e.get("pid") for e in tap_list()} == before          # the tapdisk is gone
    assert not os.path.lexists(link_path(x, vdi)) and host_tags(x, vdi) == []
    assert not os.listdir(os.path.join(settings.runtime_dir(), "tapdisk"))   # minor freed

    assert dhost.call_plugin(hooks, "clear", {"name": "activate-fail"}) == "True"
    assert dhost.call_plugin(hooks, "clear", {"name": "activate-fail"}) == "False"
    vbd = dhost.plug(vdi)
    write(x, vdi, 0x99, 0, MiB)

    # A pause that fails: the snapshot fails cleanly, the VDI keeps working unpaused.
    dhost.call_plugin(hooks, "set", {"name": "pause-fail"})
    vdis_before = set(x.VDI.get_all())
    err = failure(x.VDI.snapshot, vdi, {})
    assert err[0] == "SR_BACKEND_FAILURE_46" and "pause-fail" in err[2]
    assert set(x.VDI.get_all()) == vdis_before
    assert "paused" not in x.VDI.get_sm_config(vdi)
    mnt = os.path.join(settings.sr_mount_dir(), x.SR.get_uuid(ram_sr))
    assert sorted(os.listdir(mnt)) == sorted([".sr.json"] + [
        x.VDI.get_uuid(vdi) + ext for ext in (".ram", ".json")])
    assert holds(x, vdi, 0x99, 0, MiB)
    dhost.call_plugin(hooks, "clear", {"name": "pause-fail"})
    snap = x.VDI.snapshot(vdi, {})
    assert x.VDI.get_snapshot_of(snap) == vdi
    pid, minor = tapdisk_of(x, vdi)
    dhost.unplug(vbd)
    assert not minor_allocated(minor)
