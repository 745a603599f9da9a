"""The command dispatcher, through a real driver process: argv in, stdout out."""
import os
import uuid
import xmlrpc.client

import pytest

from lib.checkout import TOP
from lib.sm import (helper_driver, install_driver, log_lines, params_for, run_driver,
                    vdi_create_args, xapi_call)

SR_UUID = str(uuid.uuid4())
VDI = ("OpaqueRef:vdi-1", str(uuid.uuid4()), "loc-1")


@pytest.fixture
def noisy(smtap_root):
    """Calls tests/lib/drivers/noisy_driver.py as XAPI would."""
    return noisy_call


def noisy_call(command, args=(), vdi=None, **extra):
    argv = helper_driver("noisy_driver.py") + [
        xapi_call(command, params_for(command, SR_UUID, args, vdi, **extra))]
    reply = run_driver(argv)
    assert reply.returncode == 0, reply.stderr
    return reply


@pytest.mark.parametrize("argv", [[], ["<methodCall/>", "extra"]])
def test_wrong_argv_count_is_bad_request(smtap_root, argv):
    path = install_driver("smtap.sm.drivers.DummySR", "DummySR")
    reply = run_driver([path] + argv)
    assert reply.returncode == 0
    assert reply.code == 143
    assert reply.message == ("Failed to parse the request [opterr=expected exactly one "
                             "argument (the XML-RPC call), got %d]" % len(argv))


def test_driver_info_needs_no_session(smtap_root):
    path = install_driver("smtap.sm.drivers.DummySR", "DummySR")
    call = xapi_call("sr_get_driver_info", params_for("sr_get_driver_info", None))
    assert "session_ref" not in call and "<value><struct></struct></value>" in call
    reply = run_driver([path, call])
    info = reply.value
    assert reply.fault is None, reply.message
    assert info["name"] == "Dummy" and info["vendor"] == "smtap"
    assert info["required_api_version"] == "1.0"
    with open(os.path.join(TOP, "VERSION")) as f:
        assert info["driver_version"] == f.read().strip()
    assert "VDI_CREATE" in info["capabilities"] and "SR_PROBE" in info["capabilities"]
    assert info["configuration"] == []
    assert set(info) == {"name", "description", "vendor", "copyright", "driver_version",
                         "required_api_version", "capabilities", "configuration"}


def test_standard_string_encoding_is_accepted_too(smtap_root):
    path = install_driver("smtap.sm.drivers.DummySR", "DummySR")
    call = xmlrpc.client.dumps((params_for("sr_get_driver_info", None),), "sr_get_driver_info")
    assert "<string>" in call
    assert run_driver([path, call]).value["name"] == "Dummy"


def test_unknown_command_is_unimplemented(smtap_root):
    path = install_driver("smtap.sm.drivers.DummySR", "DummySR")
    reply = run_driver([path, xapi_call("vdi_frobnicate", {"command": "vdi_frobnicate"})])
    assert reply.code == 38
    assert reply.message == ("The requested method is not supported/implemented "
                             "[opterr=vdi_frobnicate]")


def test_command_without_capability_is_unimplemented(noisy):
    reply = noisy("vdi_resize_online", ["1024"], VDI)
    assert reply.code == 38 and "vdi_resize_online" in reply.message
    assert noisy("vdi_enable_cbt", vdi=VDI).code == 38


def test_unparsable_request_is_bad_request(smtap_root):
    path = install_driver("smtap.sm.drivers.DummySR", "DummySR")
    reply = run_driver([path, "<methodCall><methodName>sr_scan"])
    assert reply.code == 143 and "unparsable" in reply.message


def test_only_the_response_reaches_stdout(noisy):
    reply = noisy("sr_attach")
    assert reply.fault is None and reply.value is None
    assert reply.stdout.startswith("<?xml") and reply.stdout.rstrip().endswith("</methodResponse>")
    for noise in ("stray print", "child output", "raw write to fd 1"):
        assert noise not in reply.stdout
        assert noise in reply.stderr


@pytest.mark.parametrize("command,args,code,description", [
    ("sr_scan", [], 40, "The SR scan failed"),
    ("vdi_create", vdi_create_args(1 << 20), 78, "VDI Creation failed"),
    ("vdi_delete", [], 80, "Failed to mark VDI hidden"),
    ("vdi_attach", ["true"], 46, "The VDI is not available"),
    ("vdi_activate", ["true"], 46, "The VDI is not available"),
    ("vdi_snapshot", [], 82, "Failed to snapshot VDI"),
    ("vdi_clone", [], 81, "Failed to clone VDI"),
    ("vdi_resize", ["2048"], 110, "VDI resize failed"),
])
def test_unexpected_exceptions_are_wrapped_per_command(noisy, command, args, code, description):
    vdi = None if command in ("sr_scan", "vdi_create") else VDI
    reply = noisy(command, args, vdi)
    boom = command.split("_")[1] + " boom"
    assert (reply.code, reply.message) == (code, "%s [opterr=%s]" % (description, boom))
    text = "\n".join(log_lines())
    assert "Traceback" in text and "RuntimeError: %s" % boom in text


def test_sr_errors_pass_through_with_opterr(noisy):
    reply = noisy("vdi_update", vdi=VDI)
    assert (reply.code, reply.message) == (44, "There is insufficient space [opterr=need 1 GiB more]")


def test_wrong_result_type_is_a_general_error(noisy):
    reply = noisy("sr_probe")
    assert reply.code == 202 and "must return a string" in reply.message


def test_exception_outside_a_command_is_generic(noisy):
    reply = noisy("sr_scan", device_config={"SRmaster": "true", "fail_load": "1"})
    assert (reply.code, reply.message) == (1200, "load boom")


def test_bad_size_argument(noisy):
    reply = noisy("vdi_resize", ["lots"], VDI)
    assert reply.code == 1 and "new_size must be an integer" in reply.message
    reply = noisy("vdi_create", vdi_create_args(-5))
    assert reply.code == 79


def test_missing_args_are_a_bad_request(noisy):
    reply = noisy("vdi_resize", [], VDI)
    assert reply.code == 143 and "vdi_resize needs 1 args" in reply.message
