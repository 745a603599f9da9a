"""DummySR end to end against a real XenAPI server on the local unix socket."""
import os
import re
import subprocess
import time
import xmlrpc.client

from smtap import names, settings
from smtap.sm.lock import Lock
from lib.sm import HOST_REF, SESSION_REF, SR_REF, log_lines, run_driver, vdi_create_args


def vdi_key(xapi, params):
    ref, record = xapi.vdi_by_uuid(params["uuid"])
    assert record["location"] == params["location"]
    return ref, params["uuid"], params["location"]


def test_sr_lifecycle(dummy, xapi):
    assert dummy.ok("sr_create", ["0"]) is None
    assert dummy.ok("sr_attach") is None
    assert dummy.ok("sr_scan") is None
    assert dummy.ok("sr_update") is None
    assert dummy.ok("sr_content_type") == "user"
    assert dummy.ok("sr_probe") == "<SRlist></SRlist>"
    assert dummy.ok("sr_detach") is None
    assert dummy.ok("sr_delete") is None


def test_vdi_lifecycle(dummy, xapi):
    size = 1 << 30
    params = dummy.ok("vdi_create", vdi_create_args(size, "disk & data"))
    assert set(params) == {"uuid", "location"}
    ref, record = xapi.vdi_by_uuid(params["uuid"])
    introduce = xapi.called("VDI.db_introduce")[0][1]
    assert len(introduce) == 20  # the session and 19 arguments
    assert record["SR"] == SR_REF and record["name_label"] == "disk & data"
    assert record["virtual_size"] == str(size) and record["type"] == "user"
    assert record["is_a_snapshot"] is False and record["snapshot_of"] == "OpaqueRef:NULL"
    vdi = vdi_key(xapi, params)

    attach = dummy.ok("vdi_attach", ["true"], vdi)
    sock = os.path.join(settings.runtime_dir(), "nbd", xapi.sr_uuid, vdi[1])
    assert names.link_path(xapi.sr_uuid, vdi[1]) == sock
    assert attach == {"params_nbd": "nbd:unix:%s:exportname=%s" % (sock, vdi[1])}
    dummy.ok("vdi_activate", ["true"], vdi)
    assert record["sm_config"]["host_" + HOST_REF] == "RW"
    dummy.ok("vdi_activate", ["false"], vdi)  # again, read-only: the key is replaced
    assert record["sm_config"]["host_" + HOST_REF] == "RO"

    snap = dummy.ok("vdi_snapshot", vdi=vdi)
    _, srec = xapi.vdi_by_uuid(snap["uuid"])
    assert srec["is_a_snapshot"] is True and srec["snapshot_of"] == ref
    assert srec["virtual_size"] == str(size) and srec["name_label"] == "disk & data"
    assert "host_" + HOST_REF not in srec["sm_config"]  # not active anywhere
    clone = dummy.ok("vdi_clone", vdi=vdi)
    _, crec = xapi.vdi_by_uuid(clone["uuid"])
    assert crec["is_a_snapshot"] is False and clone["uuid"] not in (snap["uuid"], vdi[1])

    dummy.ok("vdi_deactivate", vdi=vdi)
    assert "host_" + HOST_REF not in record["sm_config"]
    dummy.ok("vdi_detach", vdi=vdi)

    assert dummy.ok("vdi_resize", [str(2 * size)], vdi) == {"uuid": vdi[1], "location": vdi[2]}
    assert record["virtual_size"] == str(2 * size)
    assert list(xapi.called("VDI.set_virtual_size")[-1][1][1:]) == [ref, str(2 * size)]
    shrink = dummy.call("vdi_resize", [str(size)], vdi)
    assert shrink.code == 79 and "shrinking" in shrink.message

    config = dummy.ok("vdi_generate_config", vdi=vdi)
    (replay,), method = xmlrpc.client.loads(config)
    assert method == "vdi_attach_from_config" and replay["vdi_uuid"] == vdi[1]
    replayed = run_driver([dummy.path, config])  # as XAPI replays it, without a session
    assert replayed.fault is None, replayed.message
    assert replayed.value == attach
    assert dummy.ok("vdi_update", vdi=vdi) is None

    busy = dummy.call("sr_delete")
    assert busy.code == 39
    for v in (vdi, vdi_key(xapi, snap), vdi_key(xapi, clone)):
        assert dummy.ok("vdi_delete", vdi=v) is None
    assert xapi.vdis == {}
    assert dummy.ok("sr_delete") is None


def test_vdi_introduce(dummy, xapi):
    params = dummy.ok("vdi_introduce", vdi_location="somewhere", vdi_sm_config={"k": "v"},
                      new_uuid="11111111-2222-3333-4444-555555555555")
    assert params == {"uuid": "11111111-2222-3333-4444-555555555555", "location": "somewhere"}
    assert xapi.vdi_by_uuid(params["uuid"])[1]["sm_config"] == {"k": "v"}


def test_vdi_create_with_given_uuid(dummy, xapi):
    given = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert dummy.ok("vdi_create", vdi_create_args(4096), vdi_uuid=given)["uuid"] == given


def test_session_and_subtask_reach_xapi(dummy, xapi):
    dummy.ok("vdi_create", vdi_create_args(4096), subtask_of="OpaqueRef:task-7")
    method, args, headers = xapi.called("VDI.db_introduce")[0]
    assert args[0] == SESSION_REF
    assert headers.get("Subtask-of") == "OpaqueRef:task-7"
    assert headers.get("originator") == "SM"
    dummy.ok("vdi_create", vdi_create_args(4096))
    assert "Subtask-of" not in xapi.called("VDI.db_introduce")[1][2]


def test_invalid_session_fails_the_command(dummy, xapi):
    reply = dummy.call("vdi_create", vdi_create_args(4096), session_ref="OpaqueRef:stale")
    assert reply.code == 78 and reply.message.startswith("VDI Creation failed [opterr=")
    assert xapi.vdis == {}


def test_strict_keys(dummy, xapi):
    argv = dummy.argv("vdi_create", vdi_create_args(4096))
    argv[1] = argv[1].replace("<name>vdi_sm_config</name>", "<name>vdi_sm_confi</name>")
    reply = dummy.call("vdi_create", vdi_create_args(4096), surprise="1")
    assert reply.code == 143 and "unexpected key(s) surprise" in reply.message
    reply = run_driver(argv)
    assert reply.code == 143
    assert reply.message == ("Failed to parse the request [opterr=vdi_create: missing key(s) "
                             "vdi_sm_config; unexpected key(s) vdi_sm_confi]")
    reply = dummy.call("vdi_create", ["4096"])
    assert reply.code == 143 and "expected 8 args, got 1" in reply.message
    assert xapi.vdis == {}


def test_unimplemented_without_capability(dummy, xapi):
    reply = dummy.call("vdi_resize_online", ["4096"], ("OpaqueRef:x", "u", "l"))
    assert reply.code == 38 and "VDI_RESIZE_ONLINE" in reply.message


def test_log_lines_carry_command_sr_and_vdi(dummy, xapi):
    params = dummy.ok("vdi_create", vdi_create_args(4096))
    dummy.ok("vdi_attach", ["false"], vdi_key(xapi, params))
    lines = [l for l in log_lines() if " vdi_attach " in l]
    assert lines, log_lines()
    line = lines[0]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \[\d+\] vdi_attach ", line), line
    assert "sr=%s" % xapi.sr_uuid[:8] in line and "vdi=%s" % params["uuid"][:8] in line


def test_dispatcher_holds_the_sr_lock(dummy, xapi):
    held = Lock("sr", xapi.sr_uuid)
    held.acquire()
    try:
        proc = subprocess.Popen(dummy.argv("sr_scan"), stdout=subprocess.PIPE,
                                universal_newlines=True)
        time.sleep(1.0)
        assert proc.poll() is None, "sr_scan ran while another process held the SR lock"
    finally:
        held.release()
    out, _ = proc.communicate(timeout=30)
    assert xmlrpc.client.loads(out)[0][0] is None
