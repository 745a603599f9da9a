"""VBD: dom0 plug/unplug -> vdi_attach + vdi_activate / vdi_deactivate + vdi_detach,
once per VDI however many VBDs use it, plus dom0's block device for the VDI."""
import logging

from smtap.toolstack import errors, smapi
from smtap.toolstack import dom0_device
from smtap.toolstack.classes.sr import assert_attached
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import (ApiClass, Field, BOOL, INT, MAP, REF, SET, RW,
                                     record_fields)

log = logging.getLogger("smtap.xapi.vbd")

VBD = ApiClass("VBD", [
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("VM", REF), Field("VDI", REF), Field("device"), Field("userdevice", setter=RW),
    Field("bootable", BOOL, setter=RW), Field("mode", default="RW", setter=RW),
    Field("type", default="Disk", setter=RW), Field("unpluggable", BOOL, True, setter=RW),
    Field("storage_lock", BOOL), Field("empty", BOOL), Field("other_config", MAP, setter=RW),
    Field("currently_attached", BOOL), Field("status_code", INT), Field("status_detail"),
    Field("runtime_properties", MAP), Field("qos_algorithm_type", setter=RW),
    Field("qos_algorithm_params", MAP, setter=RW), Field("qos_supported_algorithms", SET),
    Field("metrics", REF),
])

MODES = ("RW", "RO")


@VBD.method
def create(ctx, record):
    fields = record_fields("VBD", record, ["VM"])
    store = ctx.store
    store.get("VM", fields["VM"])
    empty = VBD.fields["empty"].coerce(fields.get("empty", False))
    if not empty:
        store.get("VDI", fields.get("VDI", ""))
    if fields.get("mode", "RW") not in MODES:
        raise ApiError(errors.INVALID_VALUE, "mode", fields["mode"])
    fields["currently_attached"] = False
    return store.create("VBD", fields)


@VBD.method
def destroy(ctx, self):
    if ctx.store.get("VBD", self)["currently_attached"]:
        raise ApiError(errors.OPERATION_NOT_ALLOWED, "VBD is currently attached")
    ctx.store.destroy("VBD", self)


def _users(ctx, vdi, but):
    return [ref for ref, rec in ctx.store.find("VBD", VDI=vdi)
            if rec["currently_attached"] and ref != but]


@VBD.method
def plug(ctx, self):
    store = ctx.store
    vbd = store.get("VBD", self)
    if store.get("VM", vbd["VM"])["is_control_domain"] is not True:
        raise ApiError(errors.OPERATION_NOT_ALLOWED, "only dom0 VBDs can be plugged here")
    if vbd["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_ATTACHED, self)
    vdi = vbd["VDI"]
    sr = store.get("VDI", vdi)["SR"]
    assert_attached(ctx, sr)
    with ctx.ts.lock("VDI", vdi):
        if not _users(ctx, vdi, self):
            attach(ctx, sr, vdi, vbd["mode"] == "RW")
        device = store.get("VDI", vdi)["attach"].get("device", "")
        store.update("VBD", self, {"currently_attached": True, "device": device})


@VBD.method
def unplug(ctx, self):
    store = ctx.store
    vbd = store.get("VBD", self)
    if not vbd["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_DETACHED, self)
    vdi = vbd["VDI"]
    with ctx.ts.lock("VDI", vdi):
        if not _users(ctx, vdi, self):
            detach(ctx, store.get("VDI", vdi)["SR"], vdi)
        store.update("VBD", self, {"currently_attached": False, "device": ""})


VBD.method(unplug, name="unplug_force")


def attach(ctx, sr, vdi, writable):
    """vdi_attach + vdi_activate, then the block device; a failure undoes what was done."""
    rw = ["true" if writable else "false"]
    driver = ctx.ts.driver(ctx.store.get("SR", sr)["type"])
    result = smapi.call(ctx, sr, "vdi_attach", rw, vdi_ref=vdi)
    if not isinstance(result, dict) or "params_nbd" not in result:
        _undo(ctx, sr, vdi, activated=False)
        raise ApiError(errors.SR_BACKEND_FAILURE, "vdi_attach returned no params_nbd",
                       str(result), "")
    info = {"params_nbd": str(result["params_nbd"]), "params": str(result.get("params", ""))}
    try:
        if smapi.has(driver, "vdi_activate"):
            smapi.call(ctx, sr, "vdi_activate", rw, vdi_ref=vdi)
    except ApiError:
        _undo(ctx, sr, vdi, activated=False)
        raise
    try:
        vdi_uuid = ctx.store.get("VDI", vdi)["uuid"]
        info.update(dom0_device.create(vdi_uuid, info["params_nbd"], info["params"], writable))
    except Exception as e:
        _undo(ctx, sr, vdi, activated=True)
        raise ApiError(errors.INTERNAL_ERROR, "dom0 block device: %s" % e)
    ctx.store.update("VDI", vdi, {"attach": info})


def detach(ctx, sr, vdi):
    info = ctx.store.get("VDI", vdi)["attach"]
    dom0_device.remove(info)
    ctx.store.update("VDI", vdi, {"attach": {}})
    driver = ctx.ts.driver(ctx.store.get("SR", sr)["type"])
    if smapi.has(driver, "vdi_deactivate"):
        smapi.call(ctx, sr, "vdi_deactivate", vdi_ref=vdi)
    smapi.call(ctx, sr, "vdi_detach", vdi_ref=vdi)


def _undo(ctx, sr, vdi, activated):
    driver = ctx.ts.driver(ctx.store.get("SR", sr)["type"])
    calls = (["vdi_deactivate"] if activated else []) + ["vdi_detach"]
    for command in calls:
        if smapi.has(driver, command):
            try:
                smapi.call(ctx, sr, command, vdi_ref=vdi)
            except ApiError as e:
                log.warning("%s while undoing a failed plug: %s", command, e)
