"""A test SR driver (installed as <Name>SR by the fixtures): records every call and
answers like a minimal driver, with behaviour set by /var/lib/testsr/<Name>.json:
caps (capability list), faults ({command: [code, message]}), exit ({command: status}),
garbage ({command: stdout text}), sleep ({command: seconds}), nbd (the socket path
vdi_attach names; default: one that does not exist), bare_copies (snapshots and clones
introduced with no name and no snapshot fields, as upstream DummySR does), attach_result
(what vdi_attach answers), calls ({command: [[xenapi call,
[args]], ...]}: made with the driver's own session during that command, each outcome
recorded in <Name>.results as {"value": ...} or {"error": [code, params...]})."""
import fcntl
import json
import os
import sys
import time
import uuid
import xmlrpc.client

from smtap import settings
from smtap.toolstack import client

NAME = globals().get("DRIVER_NAME") or os.path.basename(sys.argv[0])
STATE = settings.host_path("/var/lib/testsr")
ALL_CAPS = ["SR_PROBE", "SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH",
            "VDI_ACTIVATE", "VDI_DEACTIVATE", "VDI_CLONE", "VDI_SNAPSHOT", "VDI_RESIZE",
            "VDI_INTRODUCE", "VDI_UPDATE", "VDI_RESET_ON_BOOT/2"]
EPOCH = "19700101T00:00:00Z"


def record(entry):
    with open(os.path.join(STATE, NAME + ".calls"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry) + "\n")


def xenapi(params):
    s = client.session()
    s._session = params["session_ref"]
    return s.xenapi


def introduce(x, params, label, size, **extra):
    new = extra.pop("uuid", None) or str(uuid.uuid4())
    fields = dict(name_description="", type="user", sharable=False, read_only=False,
                  other_config={}, location=new, xenstore_data={}, sm_config={}, managed=True,
                  physical_utilisation="0", metadata_of_pool="", is_a_snapshot=False,
                  snapshot_time=EPOCH, snapshot_of="", cbt_enabled=False)
    fields.update(extra)
    x.VDI.db_introduce(new, label, fields["name_description"], params["sr_ref"], fields["type"],
                       fields["sharable"], fields["read_only"], fields["other_config"],
                       fields["location"], fields["xenstore_data"], fields["sm_config"],
                       fields["managed"], str(size), fields["physical_utilisation"],
                       fields["metadata_of_pool"], fields["is_a_snapshot"],
                       fields["snapshot_time"], fields["snapshot_of"], fields["cbt_enabled"])
    return {"uuid": new, "location": fields["location"]}


def plain(value):
    """A XenAPI value as JSON (DateTime as {"DateTime": text})."""
    if isinstance(value, xmlrpc.client.DateTime):
        return {"DateTime": value.value}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def run_calls(params, calls):
    """Each call as a driver makes it (args: JSON, {"DateTime": t} for a DateTime, "$<n>"
    for the value call n returned)."""
    import XenAPI
    x = xenapi(params)
    results = []

    def arg(a):
        if isinstance(a, dict) and list(a) == ["DateTime"]:
            return xmlrpc.client.DateTime(a["DateTime"])
        if isinstance(a, str) and a[:1] == "$" and a[1:].isdigit():
            return results[int(a[1:])].get("value")
        return a
    for name, args in calls:
        args = [arg(a) for a in args]
        fn = x
        for part in name.split("."):
            fn = getattr(fn, part)
        try:
            results.append({"call": name, "value": plain(fn(*args))})
        except XenAPI.Failure as e:
            results.append({"call": name, "error": e.details})
    with open(os.path.join(STATE, NAME + ".results"), "w") as f:
        json.dump(results, f)


def answer(command, params, config):
    args = params.get("args", [])
    if command == "sr_get_driver_info":
        return {"name": "Test", "description": "test driver", "vendor": "tests",
                "copyright": "none", "driver_version": "1.2", "required_api_version": "1.0",
                "capabilities": config.get("caps", ALL_CAPS),
                "configuration": [{"key": "path", "description": "where it lives"}]}
    if command in ("sr_create", "sr_attach", "sr_detach", "sr_scan", "sr_update",
                   "vdi_activate", "vdi_deactivate", "vdi_detach", "vdi_update"):
        return None
    x = xenapi(params)
    if command == "sr_delete":
        if x.VDI.get_all_records_where('field "SR" = "%s"' % params["sr_ref"]):
            raise xmlrpc.client.Fault(39, "SR is not empty")
        return None
    if command == "sr_probe":
        return "<SRlist><SR><UUID>%s</UUID></SR></SRlist>" % params["device_config"].get(
            "path", "")
    if command == "vdi_create":
        return introduce(x, params, args[1], args[0], name_description=args[2],
                         read_only=args[7] == "true", sm_config=params["vdi_sm_config"],
                         type=params["vdi_type"])
    if command == "vdi_introduce":
        return introduce(x, params, "introduced", 0, uuid=params["new_uuid"],
                         location=params["vdi_location"])
    if command == "vdi_delete":
        x.VDI.db_forget(params["vdi_ref"])
        return None
    if command in ("vdi_snapshot", "vdi_clone") and config.get("bare_copies"):
        # as upstream DummySR: a new VDI with no name and no snapshot fields
        return introduce(x, params, "", 0)
    if command in ("vdi_snapshot", "vdi_clone"):
        src = x.VDI.get_record(params["vdi_ref"])
        snap = command == "vdi_snapshot"
        return introduce(x, params, src["name_label"], src["virtual_size"],
                         is_a_snapshot=snap, snapshot_of=params["vdi_ref"] if snap else "")
    if command == "vdi_resize":
        x.VDI.set_virtual_size(params["vdi_ref"], args[0])
        return {"uuid": params["vdi_uuid"], "location": params["vdi_location"]}
    if command == "vdi_attach" and "attach_result" in config:
        return config["attach_result"]
    if command == "vdi_attach":
        return {"params_nbd": "nbd:unix:%s:exportname=%s" % (
                    config.get("nbd", "%s/nbd/%s" % (STATE, params["vdi_uuid"])),
                    params["vdi_uuid"]),
                "params": "/dev/sm/backend/%s" % params["vdi_uuid"], "o_direct": True,
                "xenstore_data": {}}
    raise xmlrpc.client.Fault(38, "not implemented: " + command)


def main():
    with open(os.path.join(STATE, NAME + ".json")) as f:
        config = json.load(f)
    if len(sys.argv) != 2:
        print(xmlrpc.client.dumps(xmlrpc.client.Fault(143, "bad argv"), methodresponse=True))
        return 0
    (params,), command = xmlrpc.client.loads(sys.argv[1])
    record({"command": command, "params": params, "argv": sys.argv[1:],
            "originator": os.environ.get("ORIGINATOR"),
            "root": os.environ.get(settings.ROOT_ENV)})
    time.sleep(config.get("sleep", {}).get(command, 0))
    if command in config.get("garbage", {}):
        sys.stdout.write(config["garbage"][command])
        return config.get("exit", {}).get(command, 0)
    if command in config.get("exit", {}):
        sys.stderr.write("testsr: dying in %s\n" % command)
        return config["exit"][command]
    if command in config.get("calls", {}):
        run_calls(params, config["calls"][command])
    try:
        if command in config.get("faults", {}):
            code, message = config["faults"][command]
            raise xmlrpc.client.Fault(code, message)
        response = xmlrpc.client.dumps((answer(command, params, config),), methodresponse=True,
                                       allow_none=True)
    except xmlrpc.client.Fault as fault:
        sys.stderr.write("testsr: %s failed\n" % command)
        response = xmlrpc.client.dumps(fault, methodresponse=True)
    sys.stdout.write(response)
    return 0


if __name__ == "__main__":
    sys.exit(main())
