"""Running SMAPIv1 drivers exactly as XAPI does.

A driver is an executable run once per command with one argv element: an XML-RPC
methodCall in XAPI's own encoding. Its stdout is one methodResponse; a fault maps to
XAPI's errors (SR_BACKEND_FAILURE_<n> and a few named ones).
"""
import logging
import os
import subprocess
import time
import xml.parsers.expat
import xmlrpc.client
from xml.sax.saxutils import escape

from smtap import settings
from smtap.toolstack import errors
from smtap.toolstack.errors import ApiError

log = logging.getLogger("smtap.xapi.sm")

# Capability each command needs; XAPI never sends it to a driver without it.
GATES = {"vdi_activate": "VDI_ACTIVATE", "vdi_deactivate": "VDI_DEACTIVATE",
         "sr_probe": "SR_PROBE", "sr_update": "SR_UPDATE", "vdi_update": "VDI_UPDATE"}


# --- wire ------------------------------------------------------------------------------
def encode(value):
    """One <value> as XAPI's encoder writes it: bare strings, <value/> for ""."""
    if isinstance(value, bool):
        return "<value><boolean>%d</boolean></value>" % value
    if isinstance(value, int):
        return "<value><int>%d</int></value>" % value
    if isinstance(value, dict):
        members = "".join("<member><name>%s</name>%s</member>" % (escape(str(k)), encode(v))
                          for k, v in value.items())
        return "<value><struct>%s</struct></value>" % members
    if isinstance(value, (list, tuple)):
        return "<value><array><data>%s</data></array></value>" % "".join(encode(v) for v in value)
    text = "" if value is None else str(value)
    return "<value>%s</value>" % escape(text) if text else "<value/>"


def method_call(name, params):
    """A whole request: no prolog, no whitespace."""
    return "<methodCall><methodName>%s</methodName><params>%s</params></methodCall>" % (
        escape(name), "".join("<param>%s</param>" % encode(p) for p in params))


def driver_env():
    return {"ORIGINATOR": "SM", settings.ROOT_ENV: settings.root(),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}


def run(path, argv1, env=None):
    """Run an executable with one argv element: (exit code, stdout, stderr)."""
    try:
        proc = subprocess.run([path, argv1], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env or driver_env())
    except OSError as e:
        return 127, "", str(e)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def invoke(path, command, params, sr_ref="", vdi_ref=""):
    """Call a driver; its result, or an ApiError as XAPI raises it."""
    start = time.time()
    rc, out, err = run(path, method_call(command, [params]))
    log.info("%s %s: exit %d in %.2fs", os.path.basename(path), command, rc, time.time() - start)
    try:
        (value,), _ = xmlrpc.client.loads(out)
    except xmlrpc.client.Fault as fault:
        raise fault_error(fault.faultCode, fault.faultString, err, command, sr_ref, vdi_ref)
    except (xml.parsers.expat.ExpatError, ValueError, TypeError):
        if rc != 0:
            raise ApiError(errors.SR_BACKEND_FAILURE, "non-zero exit", out, err)
        raise ApiError(errors.SR_BACKEND_FAILURE, "unparsable driver response", out, err)
    if rc != 0:
        raise ApiError(errors.SR_BACKEND_FAILURE, "non-zero exit", out, err)
    return value


def fault_error(code, message, stderr, command, sr_ref, vdi_ref):
    """XAPI's mapping of SM fault codes."""
    try:
        code = int(code)
    except (TypeError, ValueError):
        code = 1200
    if code == 38:
        return ApiError(errors.SR_OPERATION_NOT_SUPPORTED, sr_ref)
    if code == 39:
        return ApiError(errors.SR_NOT_EMPTY)
    if code == 24:
        return ApiError(errors.VDI_IN_USE, vdi_ref, command)
    if code == 16:
        return ApiError(errors.SR_DEVICE_IN_USE)
    if code == 144:
        return ApiError(errors.VDI_MISSING, sr_ref, vdi_ref)
    return ApiError("%s_%d" % (errors.SR_BACKEND_FAILURE, code), "", message, stderr)


# --- calls built from the database ---------------------------------------------------
def has(driver, command):
    gate = GATES.get(command)
    return gate is None or gate in driver.capabilities


def call(ctx, sr_ref, command, args=(), vdi_ref=None, device_config=None, **extra):
    """Run `command` on the SR's driver with the keys XAPI sends for it."""
    ts, store = ctx.ts, ctx.store
    sr = store.get("SR", sr_ref)
    driver = ts.driver(sr["type"])
    if not has(driver, command):
        raise ApiError(errors.SR_OPERATION_NOT_SUPPORTED, sr_ref)
    if device_config is None:
        device_config = pbd_device_config(ctx, sr_ref)
    params = {
        "host_ref": ts.host, "command": command, "args": [str(a) for a in args],
        "device_config": dict(device_config, SRmaster="true"),
        "session_ref": ts.sm_session(sr_ref), "sr_ref": sr_ref, "sr_uuid": sr["uuid"],
    }
    if vdi_ref:
        vdi = store.get("VDI", vdi_ref)
        params.update(vdi_ref=vdi_ref, vdi_location=vdi["location"], vdi_uuid=vdi["uuid"],
                      vdi_on_boot=vdi["on_boot"],
                      vdi_allow_caching="true" if vdi["allow_caching"] else "false")
    params.update(extra)
    task = store.create("task", {"name_label": "SR.%s" % command, "status": "pending",
                                 "resident_on": ts.host})
    params["subtask_of"] = task
    try:
        return invoke(driver.path, command, params, sr_ref, vdi_ref or "")
    finally:
        store.destroy("task", task)


def probe(ctx, sr_type, device_config, sm_config):
    """sr_probe: no SR yet, so an untagged session and no sr_ref/sr_uuid."""
    ts = ctx.ts
    driver = ts.driver(sr_type)
    if not has(driver, "sr_probe"):
        raise ApiError(errors.SR_OPERATION_NOT_SUPPORTED, sr_type)
    session = ts.sm_session(None)
    params = {"host_ref": ts.host, "command": "sr_probe", "args": [],
              "device_config": dict(device_config, SRmaster="true"),
              "session_ref": session, "sr_sm_config": dict(sm_config)}
    try:
        with ts.lock("probe", sr_type):
            return invoke(driver.path, "sr_probe", params)
    finally:
        ctx.store.destroy("session", session)


def pbd_device_config(ctx, sr_ref):
    found = ctx.store.find("PBD", SR=sr_ref, host=ctx.ts.host)
    return found[0][1]["device_config"] if found else {}
