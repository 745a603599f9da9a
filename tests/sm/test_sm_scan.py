"""Scan reconciliation by location, through the SR base class."""
import json
import os

from lib.drivers.listing_driver import storage_file
from lib.sm import SR_REF, helper_driver, params_for, run_driver, xapi_call


def scan(xapi, storage, command="sr_scan"):
    path = storage_file(xapi.sr_uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(storage, f)
    reply = run_driver(helper_driver("listing_driver.py")
                       + [xapi_call(command, params_for(command, xapi.sr_uuid))])
    assert reply.returncode == 0 and reply.fault is None, (reply.fault, reply.stderr)
    return {r["location"]: (ref, r) for ref, r in xapi.vdis.items()}


def test_scan_introduces_updates_and_forgets(xapi):
    db = scan(xapi, {"a": {"size": 100, "utilisation": 10},
                     "b": {"size": 200, "utilisation": 20, "sm_config": {"vdi_type": "vhd"}}})
    assert set(db) == {"a", "b"}
    assert db["b"][1]["virtual_size"] == "200" and db["b"][1]["sm_config"] == {"vdi_type": "vhd"}
    assert db["a"][1]["SR"] == SR_REF
    ref_a, uuid_a = db["a"][0], db["a"][1]["uuid"]
    introduced = len(xapi.called("VDI.db_introduce"))

    db = scan(xapi, {"a": {"size": 150, "utilisation": 15, "read_only": True,
                           "sm_config": {"k": "v"}},
                     "c": {"size": 300, "utilisation": 30}})
    assert set(db) == {"a", "c"}  # b forgotten, c introduced
    assert len(xapi.called("VDI.db_introduce")) == introduced + 1
    ref, rec = db["a"]
    assert (ref, rec["uuid"]) == (ref_a, uuid_a)  # same record, updated in place
    assert rec["virtual_size"] == "150" and rec["physical_utilisation"] == "15"
    assert rec["read_only"] is True and rec["sm_config"] == {"k": "v"}

    setters = len([c for c in xapi.calls if ".set_" in c[0]])
    scan(xapi, {"a": {"size": 150, "utilisation": 15, "read_only": True,
                      "sm_config": {"k": "v"}}, "c": {"size": 300, "utilisation": 30}})
    assert len([c for c in xapi.calls if ".set_" in c[0]]) == setters  # nothing changed


def test_update_records_sr_sizes(xapi):
    scan(xapi, {}, command="sr_update")
    assert xapi.srs[SR_REF]["physical_size"] == str(1 << 40)
    assert xapi.srs[SR_REF]["physical_utilisation"] == "12345"
