"""Every XenAPI call the public upstream sm sources make (xapi-project/sm libs/sm and
drivers: SR.py, VDI.py, core/util.py, blktap2.py, cleanup.py, resetvdis.py, FileSR.py,
LVHDSR.py, DummySR.py), made the way they make it: from inside a driver run, with the
driver's own session, with their argument types. Each must exist here and answer with
XAPI's type (int64 as a decimal string, void as "") or XAPI's error."""
import json
import re
import time
import uuid

from smtap import settings
from lib.sizes import MiB
from lib.toolstack import dom0_vbd, new_sr, new_vdi

# (call, args, what it answers). {name} in an argument is an object of the test world;
# "$n" is what call n answered. Grouped by the upstream code that makes the call.
CALLS = [
    # SR.py: from_uuid, _db_update, block_setscheduler, forget_vdi
    ("SR.get_by_uuid", ["{sr_uuid}"], "ref"),                                   # 0
    ("SR.get_type", ["{sr}"], "str"),
    ("SM.get_all_records_where", ['field "type" = "test"'], "records"),
    ("SM.get_driver_filename", ["{sm}"], "str"),
    ("PBD.get_all_records_where",
     ['field "SR" = "{sr}" andfield "host" = "{host}"'], "records"),
    ("PBD.get_device_config", ["{pbd}"], "map"),                                # 5
    ("SR.set_virtual_allocation", ["{sr}", "0"], "void"),
    ("SR.set_physical_size", ["{sr}", "1073741824"], "void"),
    ("SR.set_physical_utilisation", ["{sr}", "0"], "void"),
    ("SR.get_other_config", ["{sr}"], "map"),
    ("SR.add_to_sm_config", ["{sr}", "LUNperVDI", "true"], "void"),             # 10
    ("host.get_other_config", ["{host}"], "map"),
    # core/util.py
    ("SR.get_record", ["{sr}"], "record"),
    ("secret.create", [{"value": "s3cret"}], "ref"),
    ("secret.get_uuid", ["$13"], "str"),
    ("secret.get_by_uuid", ["$14"], "ref"),                                     # 15
    ("secret.get_value", ["$15"], "str"),
    ("pool.get_all", [], "set"),
    ("pool.get_master", ["{pool}"], "ref"),
    ("VM.get_all_records_where", ['field "uuid" = "{dom0_uuid}"'], "records"),
    ("host.get_by_uuid", ["{host_uuid}"], "ref"),                               # 20
    ("VDI.get_sm_config", ["{vdi}"], "map"),
    ("host.get_all_records", [], "records"),
    ("host_metrics.get_record", ["{metrics}"], "record"),
    ("PBD.get_all_records", [], "records"),
    ("PBD.remove_from_other_config", ["{pbd}", "mpath-x"], "void"),            # 25
    ("SR.get_sm_config", ["{sr}"], "map"),
    ("SR.get_all_records", [], "records"),
    ("VDI.get_all_records_where", ['field "SR" = "{sr}"'], "records"),
    ("SR.get_VDIs", ["{sr}"], "set"),
    ("VDI.get_record", ["{vdi}"], "record"),                                    # 30
    ("SR.get_PBDs", ["{sr}"], "set"),
    ("SR.add_to_other_config", ["{sr}", "LVHDRT_x", "active"], "void"),
    ("SR.remove_from_other_config", ["{sr}", "LVHDRT_x"], "void"),
    ("SR.get_all_records_where", ['field "type" = "cslg"'], "records"),
    ("pool.get_all_records", [], "records"),                                    # 35
    # VDI.py
    ("VDI.get_by_uuid", ["{vdi_uuid}"], "ref"),
    ("VDI.get_SR", ["{vdi}"], "ref"),
    ("SR.get_uuid", ["{sr}"], "str"),
    ("VDI.db_introduce", ["{new_uuid}", "base copy", "", "{sr}", "user", False, True, {},
                          "{new_uuid}", {}, {"vhd-parent": "x"}, True, "1048576", "512",
                          "OpaqueRef:NULL", False, {"DateTime": "19700101T00:00:00Z"},
                          "OpaqueRef:NULL", False], "ref"),
    ("VDI.remove_from_sm_config", ["$39", "vhd-parent"], "void"),               # 40
    ("VDI.add_to_sm_config", ["$39", "vhd-parent", "y"], "void"),
    ("VDI.set_virtual_size", ["$39", "2097152"], "void"),
    ("VDI.set_physical_utilisation", ["$39", "1024"], "void"),
    ("VDI.set_read_only", ["$39", False], "void"),
    ("VDI.set_cbt_enabled", ["$39", False], "void"),                           # 45
    ("VDI.get_is_a_snapshot", ["$39"], "bool"),
    ("VDI.get_uuid", ["$39"], "str"),
    ("VDI.get_other_config", ["$39"], "map"),
    ("VDI.add_to_other_config", ["$39", "leaf-coalesce", "false"], "void"),
    ("VDI.remove_from_other_config", ["$39", "leaf-coalesce"], "void"),        # 50
    ("VDI.get_virtual_size", ["$39"], "int64"),
    ("message.create", ["VDI_CBT_RESIZE_FAILED", "3", "VDI", "{vdi_uuid}", "body"], "ref"),
    # FileSR.py, LVHDSR.py
    ("SR.get_virtual_allocation", ["{sr}"], "int64"),
    ("VDI.set_managed", ["$39", False], "void"),
    ("VDI.set_sm_config", ["$39", {"vhd-parent": "z"}], "void"),               # 55
    ("message.create", ["sr_does_not_support_hardlinks", 2, "SR", "{sr_uuid}", "m"], "ref"),
    ("SR.get_name_label", ["{sr}"], "str"),
    ("SR.get_name_description", ["{sr}"], "str"),
    ("VDI.get_name_label", ["$39"], "str"),
    ("VDI.get_name_description", ["$39"], "str"),                              # 60
    ("VDI.get_snapshot_of", ["$39"], "ref"),
    ("VDI.get_snapshot_time", ["$39"], "datetime"),
    ("VDI.get_type", ["$39"], "str"),
    ("VDI.get_read_only", ["$39"], "bool"),
    ("VDI.get_metadata_of_pool", ["$39"], "ref"),                              # 65
    ("VDI.get_managed", ["$39"], "bool"),
    ("SR.set_sm_config", ["{sr}", {"allocation": "thin"}], "void"),
    # blktap2.py
    ("VBD.get_all_records_where", ['field "VDI" = "{vdi}"'], "records"),
    ("VM.get_record", ["{dom0}"], "record"),
    ("host.get_record", ["{host}"], "record"),                                 # 70
    # cleanup.py (the GC): its task, messages and the asynchronous SR.update
    ("task.create", ["Garbage Collection", "Garbage collection for SR x"], "ref"),
    ("task.set_other_config", ["$71", {"applies_to": "{sr}"}], "void"),
    ("task.set_progress", ["$71", 0.5], "void"),
    ("task.get_progress", ["$71"], "float"),
    ("task.set_status", ["$71", "success"], "void"),                           # 75
    ("task.get_status", ["$71"], "str"),
    ("task.destroy", ["$71"], "void"),
    ("VDI.get_on_boot", ["{vdi}"], "str"),
    ("VDI.get_allow_caching", ["{vdi}"], "bool"),
    ("SR.get_all_records_where", ['field "local_cache_enabled" = "true"'], "records"),  # 80
    ("message.create", ["SM_GC_NO_SPACE", 3, "SR", "{sr_uuid}", "no space"], "ref"),
    ("message.get_record", ["$81"], "record"),
    ("message.destroy", ["$81"], "void"),
    ("SR.remove_from_sm_config", ["{sr}", "LUNperVDI"], "void"),
    ("Async.SR.update", ["{sr}"], "ref"),                                      # 85
    ("task.get_status", ["$85"], "str"),
    ("VDI.db_forget", ["$39"], "void"),
    # XAPI's errors, for the argument types and objects upstream gets wrong now and then
    ("VDI.get_by_uuid", ["bogus"], "error UUID_INVALID VDI bogus"),
    ("host_metrics.get_record", ["OpaqueRef:nope"],
     "error HANDLE_INVALID host_metrics OpaqueRef:nope"),
    ("task.set_progress", ["{task}", "half"], "error FIELD_TYPE_ERROR value"),  # 90
    ("task.set_status", ["{task}", "finished"], "error FIELD_TYPE_ERROR status"),
    ("VDI.add_to_other_config", ["{vdi}", "cbt_enabled", True], "error FIELD_TYPE_ERROR value"),
]

REF = re.compile(r"^OpaqueRef:[0-9a-f-]+$")
CHECKS = {
    "ref": lambda v: isinstance(v, str) and (REF.match(v) or v == "OpaqueRef:NULL"),
    "str": lambda v: isinstance(v, str),
    "int64": lambda v: isinstance(v, str) and re.match(r"^-?\d+$", v),
    "void": lambda v: v == "",
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "map": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "set": lambda v: isinstance(v, list),
    "record": lambda v: isinstance(v, dict) and isinstance(v.get("uuid"), str),
    "records": lambda v: isinstance(v, dict) and all(
        REF.match(k) and isinstance(r, dict) and "uuid" in r for k, r in v.items()),
    "datetime": lambda v: isinstance(v, dict) and list(v) == ["DateTime"],
}


def fill(value, world):
    if isinstance(value, str):
        return value.format(**world) if "{" in value else value
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    return value


def test_upstream_calls_answer_as_xapi_does(test_host):
    x = test_host.session().xenapi
    host = x.host.get_all()[0]
    sr = new_sr(x, "audit", "test")
    vdi = new_vdi(x, sr, MiB, "v", other_config={})
    dom0 = x.host.get_control_domain(host)
    dom0_vbd(x, vdi, device="0", qos_algorithm_type="", qos_algorithm_params={})
    (sm,) = x.SM.get_all_records_where('field "type" = "test"')
    world = {"sr": sr, "sr_uuid": x.SR.get_uuid(sr), "host": host,
             "host_uuid": x.host.get_uuid(host), "pbd": x.SR.get_PBDs(sr)[0], "sm": sm,
             "pool": x.pool.get_all()[0], "dom0": dom0, "dom0_uuid": x.VM.get_uuid(dom0),
             "vdi": vdi, "vdi_uuid": x.VDI.get_uuid(vdi), "metrics": x.host.get_metrics(host),
             "new_uuid": str(uuid.uuid4()), "task": x.task.create("mine", "")}
    calls = [[name, [fill(a, world) for a in args]] for name, args, _ in CALLS]
    test_host.configure_driver(calls={"sr_scan": calls})
    x.SR.scan(sr)
    with open(settings.host_path("/var/lib/testsr/TestSR.results")) as f:
        results = json.load(f)
    assert [r["call"] for r in results] == [c[0] for c in CALLS]
    wrong = []
    for i, ((name, args, expected), got) in enumerate(zip(CALLS, results)):
        if expected.startswith("error "):
            ok = got.get("error") == expected.split()[1:]
        else:
            ok = "value" in got and CHECKS[expected](got["value"])
        if not ok:
            wrong.append("%d %s%r: expected %s, got %r" % (i, name, tuple(args), expected, got))
    assert not wrong, "\n".join(wrong)

    values = [r.get("value") for r in results]
    # what upstream reads in those records
    pool = values[35][world["pool"]]
    assert pool["restrictions"]["restrict_read_caching"] == "false"   # blktap2.vdi_attach
    assert pool["master"] == host
    assert values[23]["live"] is True                                  # util.get_online_hosts
    assert values[22][host]["metrics"] == world["metrics"]
    assert values[11]["multipathing"] == "false"                       # SR._mpathinit
    assert values[19][dom0]["resident_on"] == host                     # util.get_localhost_ref
    assert values[76] == "success" and values[74] == 0.5
    assert values[62] == {"DateTime": "19700101T00:00:00Z"}
    # the GC's Async.SR.update: a task that finishes with the call's outcome
    task = values[85]
    for _ in range(200):
        if x.task.get_status(task) != "pending":
            break
        time.sleep(0.05)
    rec = x.task.get_record(task)
    assert (rec["status"], rec["result"], rec["error_info"]) == ("success", "", [])
    assert rec["name_label"] == "Async.SR.update" and float(rec["progress"]) == 1.0
    assert "sr_update" in test_host.commands()
