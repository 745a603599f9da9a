"""The XenAPI surface through the real XenAPI client, against DummySR."""
import socket
import xmlrpc.client

import pytest

from smtap import settings
from smtap.toolstack import inventory
from lib.sizes import GiB
from lib.toolstack import failure, new_sr, new_vdi, raw_call, raw_post


def test_this_host_dom0_and_pool_come_from_the_inventory(xapi):
    host_uuid, dom0_uuid = inventory.ensure()
    host = xapi.host.get_by_uuid(host_uuid)
    dom0 = xapi.VM.get_by_uuid(dom0_uuid)
    assert xapi.host.get_all() == [host]
    assert xapi.host.get_control_domain(host) == dom0
    vm = xapi.VM.get_record(dom0)
    assert vm["is_control_domain"] is True and vm["resident_on"] == host
    assert vm["power_state"] == "Running" and vm["domid"] == "0"   # int64 as a string
    assert xapi.host.get_record(host)["resident_VMs"] == [dom0]
    assert xapi.pool.get_master(xapi.pool.get_all()[0]) == host
    assert xapi.host.get_by_name_label(xapi.host.get_name_label(host)) == [host]
    where = xapi.VM.get_all_records_where(
        'field "is_control_domain" = "true" and field "uuid" = "%s"' % dom0_uuid)
    assert list(where) == [dom0]
    # no VM but dom0 (the built-in template is no VM)
    assert xapi.VM.get_all_records_where(
        'field "is_control_domain" = "false" and field "is_a_template" = "false"') == {}


def test_sm_record_of_dummysr(xapi):
    (ref,) = xapi.SM.get_by_name_label("Dummy")
    sm = xapi.SM.get_record(ref)
    assert sm["type"] == "dummy" and sm["vendor"] == "smtap"
    assert sm["driver_filename"] == settings.host_path("/opt/xensource/sm/DummySR")
    assert "VDI_ACTIVATE" in sm["capabilities"] and sm["features"]["VDI_CREATE"] == "1"
    assert "dummy" in xapi.SR.get_supported_types()


def test_errors_are_xapi_error_descriptions(xapi):
    assert failure(xapi.VDI.get_record, "OpaqueRef:nope") == ["HANDLE_INVALID", "VDI",
                                                              "OpaqueRef:nope"]
    assert failure(xapi.SR.get_by_uuid, "nope") == ["UUID_INVALID", "SR", "nope"]
    assert failure(xapi.VDI.frobnicate) == ["MESSAGE_METHOD_UNKNOWN", "VDI.frobnicate"]
    assert failure(xapi.Nonsense.get_all) == ["MESSAGE_METHOD_UNKNOWN", "Nonsense.get_all"]
    assert failure(xapi.VDI.get_record) == ["MESSAGE_PARAMETER_COUNT_MISMATCH",
                                            "VDI.get_record", "2", "1"]
    host = xapi.host.get_all()[0]
    assert failure(xapi.SR.create, host, {}, "0", "x", "", "nope", "", False, {}) == [
        "SR_UNKNOWN_DRIVER", "nope"]
    assert xapi.SR.get_all() == []   # the refused create left nothing behind
    assert failure(xapi.VDI.get_all_records_where, 'field "SR" = ')[0] == "INVALID_VALUE"
    # A bad session (raw: XenAPI.Session would log in again on SESSION_INVALID).
    assert raw_call("VDI.get_all", "OpaqueRef:bogus") == {
        "Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:bogus"]}
    assert raw_call("session.login_with_password", "alice", "pw")["ErrorDescription"][0] == \
        "SESSION_AUTHENTICATION_FAILED"


@pytest.mark.parametrize("body", [
    b"this is not XML",
    b"<methodCall><methodName>VDI.get_all</methodName><params><param>",
    b"<methodResponse><params><param><value>x</value></param></params></methodResponse>",
    b"<methodCall><methodName>VDI.get_all</methodName><params><param><value><int>x</int>"
    b"</value></param></params></methodCall>",
])
def test_malformed_requests_get_a_failure_and_the_daemon_keeps_serving(xapi, body):
    (result,), _ = xmlrpc.client.loads(raw_post(body))
    assert result["Status"] == "Failure"
    assert result["ErrorDescription"][0] == "XMLRPC_UNMARSHAL_FAILURE"
    assert xapi.host.get_all()   # still serving
    # A connection that sends half a request and hangs up does not hurt either.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(settings.xapi_socket())
    s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n<methodCall>")
    s.close()
    assert xapi.host.get_all()


def test_wire_envelope_and_int64_as_strings(xapi):
    sr = new_sr(xapi)
    vdi = new_vdi(xapi, sr, 3 * GiB)
    session = raw_call("session.login_with_password", "root", "", "1.0", "raw")
    assert session["Status"] == "Success"
    text = raw_post(xmlrpc.client.dumps((session["Value"], vdi), "VDI.get_virtual_size"))
    assert "<name>Status</name>" in text and "<i4>" not in text and "<int>" not in text
    assert raw_call("VDI.get_virtual_size", session["Value"], vdi) == {
        "Status": "Success", "Value": str(3 * GiB)}
    assert raw_call("session.logout", session["Value"])["Status"] == "Success"
    assert raw_call("VDI.get_all", session["Value"])["ErrorDescription"][0] == "SESSION_INVALID"


def test_field_accessors_maps_and_privileged_setters(xapi):
    sr = new_sr(xapi)
    vdi = new_vdi(xapi, sr)
    assert xapi.VDI.get_other_config(vdi) == {"made-by": "tests"}
    xapi.VDI.add_to_other_config(vdi, "k", "v")
    assert failure(xapi.VDI.add_to_other_config, vdi, "k", "w")[0] == "MAP_DUPLICATE_KEY"
    xapi.VDI.remove_from_other_config(vdi, "made-by")
    assert xapi.VDI.get_record(vdi)["other_config"] == {"k": "v"}
    xapi.VDI.set_name_label(vdi, "renamed")
    assert xapi.VDI.get_by_name_label("renamed") == [vdi]
    xapi.SR.add_to_other_config(sr, "dirty", "")
    assert xapi.SR.get_other_config(sr) == {"dirty": ""}
    # Only the SR's SM session (given to its driver) may report sizes and introduce VDIs.
    for call, args in [(xapi.VDI.set_virtual_size, (vdi, "1")),
                       (xapi.VDI.set_physical_utilisation, (vdi, "1")),
                       (xapi.VDI.set_read_only, (vdi, True)),
                       (xapi.VDI.set_sm_config, (vdi, {})),
                       (xapi.VDI.add_to_sm_config, (vdi, "a", "b")),
                       (xapi.VDI.db_forget, (vdi,)),
                       (xapi.SR.set_physical_size, (sr, "1")),
                       (xapi.SR.set_physical_utilisation, (sr, "1")),
                       (xapi.SR.set_virtual_allocation, (sr, "1")),
                       (xapi.VDI.db_introduce, ("u", "l", "d", sr, "user", False, False, {},
                                                "loc", {}, {}, True, "0", "0", "", False,
                                                "19700101T00:00:00Z", "", False))]:
        assert failure(call, *args)[0] == "RBAC_PERMISSION_DENIED"
    assert xapi.VDI.get_virtual_size(vdi) == str(GiB)
    assert xapi.VDI.get_record(vdi)["name_label"] == "renamed"
    assert failure(xapi.VDI.set_virtual_size, vdi)[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
    assert failure(xapi.VDI.set_location, vdi, "x")[0] == "MESSAGE_METHOD_UNKNOWN"


def test_dummysr_end_to_end(xapi):
    host = xapi.host.get_all()[0]
    dom0 = xapi.host.get_control_domain(host)
    sr = new_sr(xapi, "dummy sr")
    (pbd,) = xapi.SR.get_PBDs(sr)
    assert xapi.PBD.get_record(pbd)["currently_attached"] is True
    assert xapi.PBD.get_host(pbd) == host and xapi.host.get_PBDs(host) == [pbd]
    vdi = new_vdi(xapi, sr, GiB, "data")
    rec = xapi.VDI.get_record(vdi)
    assert (rec["SR"], rec["virtual_size"], rec["name_label"]) == (sr, str(GiB), "data")
    assert rec["other_config"] == {"made-by": "tests"}   # set by the toolstack after create
    snap = xapi.VDI.snapshot(vdi, {})
    assert xapi.VDI.get_is_a_snapshot(snap) is True
    assert xapi.VDI.get_snapshot_of(snap) == vdi and xapi.VDI.get_snapshots(vdi) == [snap]
    clone = xapi.VDI.clone(vdi, {})
    assert xapi.VDI.get_is_a_snapshot(clone) is False
    xapi.VDI.resize(vdi, str(2 * GiB))
    assert xapi.VDI.get_virtual_size(vdi) == str(2 * GiB)
    assert sorted(xapi.SR.get_VDIs(sr)) == sorted([vdi, snap, clone])

    vbd = xapi.VBD.create({"VM": dom0, "VDI": vdi, "userdevice": "0", "bootable": False,
                           "mode": "RW", "type": "Disk", "unpluggable": True, "empty": False,
                           "other_config": {}, "qos_algorithm_type": "",
                           "qos_algorithm_params": {}})
    assert xapi.VM.get_VBDs(dom0) == [vbd] and xapi.VDI.get_VBDs(vdi) == [vbd]
    xapi.VBD.plug(vbd)
    assert xapi.VBD.get_currently_attached(vbd) is True
    # DummySR marks the host's activation in sm_config (vdi_activate [rw] reached it);
    # the toolstack, as XAPI, whether this host reads it through the page cache.
    host_uuid = xapi.host.get_uuid(host)
    assert xapi.VDI.get_sm_config(vdi) == {
        "host_%s" % host: "RW", "read-caching-enabled-on-" + host_uuid: "false",
        "read-caching-reason-" + host_uuid: ""}
    assert failure(xapi.VDI.destroy, vdi) == ["VDI_IN_USE", vdi, "destroy"]
    assert failure(xapi.VBD.plug, vbd)[0] == "DEVICE_ALREADY_ATTACHED"
    assert failure(xapi.VBD.destroy, vbd)[0] == "OPERATION_NOT_ALLOWED"
    xapi.VBD.unplug(vbd)
    assert xapi.VBD.get_currently_attached(vbd) is False
    assert xapi.VDI.get_sm_config(vdi) == {}
    xapi.VBD.destroy(vbd)

    assert failure(xapi.SR.destroy, sr) == ["SR_HAS_PBD", sr]
    xapi.PBD.unplug(pbd)
    assert xapi.PBD.get_currently_attached(pbd) is False
    assert failure(xapi.VDI.create, {"SR": sr, "virtual_size": "1"}) == ["SR_HAS_NO_PBDS", sr]
    assert failure(xapi.SR.destroy, sr) == ["SR_NOT_EMPTY"]   # DummySR refuses: fault 39
    assert xapi.SR.get_record(sr)["name_label"] == "dummy sr"
    xapi.PBD.plug(pbd)
    for v in (vdi, snap, clone):
        xapi.VDI.destroy(v)
    assert xapi.SR.get_VDIs(sr) == []
    xapi.PBD.unplug(pbd)
    xapi.SR.destroy(sr)
    assert xapi.SR.get_all() == [] and xapi.PBD.get_all() == []


def test_sr_introduce_pbd_create_and_forget(xapi):
    host = xapi.host.get_all()[0]
    sr = xapi.SR.introduce("8e0a5bb8-79f3-4d40-9d8c-3d8bd6cf8e44", "intro", "", "dummy",
                           "user", False, {})
    assert xapi.SR.get_uuid(sr) == "8e0a5bb8-79f3-4d40-9d8c-3d8bd6cf8e44"
    pbd = xapi.PBD.create({"host": host, "SR": sr, "device_config": {"k": "v"}})
    assert failure(xapi.PBD.create, {"host": host, "SR": sr, "device_config": {}})[0] == \
        "PBD_EXISTS"
    xapi.PBD.plug(pbd)
    vdi = new_vdi(xapi, sr)
    assert failure(xapi.SR.forget, sr) == ["SR_HAS_PBD", sr]
    xapi.PBD.unplug(pbd)
    xapi.SR.forget(sr)
    assert failure(xapi.VDI.get_record, vdi)[0] == "HANDLE_INVALID"
    assert xapi.SR.get_all() == [] and xapi.PBD.get_all() == []


def test_sessions_tasks_messages_secrets(xapi, host):
    task = xapi.task.create("t", "d")
    assert xapi.task.get_status(task) == "pending"
    msg = xapi.message.create("NAME", "3", "SR", "uuid", "body")
    assert xapi.message.get_record(msg)["priority"] == "3"
    secret = xapi.secret.create({"value": "s3cret"})
    assert xapi.secret.get_value(secret) == "s3cret"
    # Sessions are in the database: a restart does not log anybody out.
    session = host.session()
    host.restart()
    assert session.xenapi.task.get_name_label(task) == "t"
    assert session._session in [s for s in raw_call("session.get_all", session._session)["Value"]]
    session.xenapi.session.logout()
