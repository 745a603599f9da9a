"""VDI.snapshot / VDI.clone finished by the toolstack as XAPI does (storage_smapiv1.ml and
xapi_vdi.ml snapshot_and_clone), whatever the driver introduced: here, as upstream
DummySR does, a VDI with no name and no snapshot fields."""
import time

import pytest

from lib.sizes import GiB

EPOCH = "19700101T00:00:00Z"


@pytest.fixture
def world(test_host):
    test_host.configure_driver(bare_copies=True)
    x = test_host.session().xenapi
    host = x.host.get_all()[0]
    sr = x.SR.create(host, {}, "0", "copies", "", "test", "user", False, {})
    src = x.VDI.create({"SR": sr, "virtual_size": str(GiB), "name_label": "the disk",
                        "name_description": "its words", "type": "system", "sharable": True,
                        "read_only": False, "other_config": {"a": "b"},
                        "xenstore_data": {"vm-data/x": "y"}, "sm_config": {},
                        "tags": ["mine"]})
    x.VDI.set_on_boot(src, "reset")
    x.VDI.set_allow_caching(src, True)
    return test_host, x, src


def copied_fields(x, src, new):
    a, b = x.VDI.get_record(src), x.VDI.get_record(new)
    for key in ("name_label", "name_description", "type", "sharable", "other_config",
                "xenstore_data", "on_boot", "allow_caching"):
        assert b[key] == a[key], key
    assert b["tags"] == []                     # XAPI does not copy tags
    return b


def recent(stamp):
    return stamp.value != EPOCH and stamp.value[:4] == time.strftime("%Y", time.gmtime())


def test_snapshot(world):
    host, x, src = world
    snap = x.VDI.snapshot(src, {"type": "internal", "base_mirror": "m1"})
    rec = copied_fields(x, src, snap)
    assert rec["is_a_snapshot"] is True and rec["snapshot_of"] == src
    assert recent(rec["snapshot_time"])
    assert x.VDI.get_snapshots(src) == [snap]
    assert rec["sm_config"].get("base_mirror") == "m1"
    # the driver's vdi_update comes after the storage layer's stamps, on the new VDI
    update = host.last_call("vdi_update")
    assert update["params"]["vdi_ref"] == snap
    assert host.last_call("vdi_snapshot")["params"]["driver_params"]["type"] == "internal"


def test_clone(world):
    host, x, src = world
    clone = x.VDI.clone(src, {})
    rec = copied_fields(x, src, clone)
    assert rec["is_a_snapshot"] is False and rec["snapshot_of"] == "OpaqueRef:NULL"
    assert recent(rec["snapshot_time"])        # storage_smapiv1 stamps clones too
    assert host.last_call("vdi_update")["params"]["vdi_ref"] == clone
