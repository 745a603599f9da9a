"""What XAPI does around a driver call, that backends rely on: the PBD marked
currently_attached around sr_delete (Storage_access.destroy_sr), an attach result with an
empty params_nbd (upstream blktap2's when it starts no tapdisk), the read-caching keys
XAPI records after vdi_attach."""
import json

import pytest
import XenAPI

from smtap import settings

from lib.sizes import MiB
from lib.toolstack import dom0_vbd, failure, new_sr, new_vdi


@pytest.fixture
def x(test_host):
    return test_host.session().xenapi


def test_sr_destroy_marks_the_pbd_attached_around_sr_delete(test_host, x):
    sr = new_sr(x, "seq", "test")
    (pbd,) = x.SR.get_PBDs(sr)
    x.PBD.unplug(pbd)
    seen = [["PBD.get_currently_attached", [pbd]]]
    # a refused delete: detached again, the PBD back to not attached, the SR kept
    test_host.configure_driver(calls={"sr_delete": seen}, faults={"sr_delete": [39, "busy"]})
    assert failure(x.SR.destroy, sr)[0] == "SR_NOT_EMPTY"
    assert read_results(test_host) == [{"call": "PBD.get_currently_attached", "value": True}]
    assert x.PBD.get_currently_attached(pbd) is False
    assert test_host.commands()[-3:] == ["sr_attach", "sr_delete", "sr_detach"]
    test_host.configure_driver(calls={"sr_delete": seen})
    x.SR.destroy(sr)
    assert read_results(test_host) == [{"call": "PBD.get_currently_attached", "value": True}]
    assert x.SR.get_all() == [] and x.PBD.get_all() == []


def read_results(host):
    with open(settings.host_path("/var/lib/testsr/TestSR.results")) as f:
        return json.load(f)


def plug_one(x, sr):
    vdi = new_vdi(x, sr, MiB, "v", other_config={})
    vbd = dom0_vbd(x, vdi, device="0", qos_algorithm_type="", qos_algorithm_params={})
    x.VBD.plug(vbd)
    return vdi, vbd


@pytest.mark.parametrize("result,device", [
    ({"params_nbd": "", "params": "/dev/sm/phy/x/blockdev", "xenstore_data": {}}, "blockdev"),
    ({"params_nbd": "", "o_direct": False, "xenstore_data": {}}, ""),
])
def test_attach_with_an_empty_params_nbd(test_host, x, result, device):
    test_host.configure_driver(attach_result=result)
    vdi, vbd = plug_one(x, new_sr(x, "seq", "test"))
    assert x.VBD.get_currently_attached(vbd) is True
    assert x.VBD.get_device(vbd) == device
    x.VBD.unplug(vbd)
    assert test_host.commands()[-2:] == ["vdi_deactivate", "vdi_detach"]


def test_attach_without_params_nbd_is_a_backend_failure(test_host, x):
    test_host.configure_driver(attach_result={"params": "/dev/x"})
    with pytest.raises(XenAPI.Failure) as e:
        plug_one(x, new_sr(x, "seq", "test"))
    assert e.value.details[0] == "SR_BACKEND_FAILURE"


def test_read_caching_keys(test_host, x):
    host_uuid = x.host.get_uuid(x.host.get_all()[0])
    on, why = "read-caching-enabled-on-" + host_uuid, "read-caching-reason-" + host_uuid
    test_host.configure_driver(attach_result={
        "params_nbd": "", "o_direct": True, "o_direct_reason": "SR_NOT_SUPPORTED"})
    vdi, vbd = plug_one(x, new_sr(x, "seq", "test"))
    sm_config = x.VDI.get_sm_config(vdi)
    assert (sm_config[on], sm_config[why]) == ("false", "SR_NOT_SUPPORTED")
    x.VBD.unplug(vbd)
    assert on not in x.VDI.get_sm_config(vdi) and why not in x.VDI.get_sm_config(vdi)
