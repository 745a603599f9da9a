"""PBD: an SR's connection from a host; plug -> sr_attach (+ scan), unplug -> sr_detach."""
import logging

from smtap.toolstack import errors, operations, smapi
from smtap.toolstack.classes import vbd as vbd_module
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import ApiClass, Field, BOOL, MAP, REF, RW, call, record_fields

log = logging.getLogger("smtap.xapi.pbd")

PBD = ApiClass("PBD", [
    Field("host", REF), Field("SR", REF), Field("device_config", MAP, setter=RW),
    Field("currently_attached", BOOL), Field("other_config", MAP, setter=RW),
], needs_drivers=True)


@PBD.method
def create(ctx, record):
    fields = record_fields("PBD", record, ["host", "SR", "device_config"])
    fields["currently_attached"] = False
    store = ctx.store
    with store.transaction():
        store.get("host", fields["host"])
        store.get("SR", fields["SR"])
        existing = store.find("PBD", SR=fields["SR"], host=fields["host"])
        if existing:
            raise ApiError(errors.PBD_EXISTS, fields["SR"], fields["host"], existing[0][0])
        return store.create("PBD", fields)


@PBD.method
def destroy(ctx, self):
    if ctx.store.get("PBD", self)["currently_attached"]:
        raise ApiError(errors.OPERATION_NOT_ALLOWED, "PBD is currently attached")
    ctx.store.destroy("PBD", self)


@PBD.method
def plug(ctx, self):
    pbd = ctx.store.get("PBD", self)
    sr = pbd["SR"]
    with ctx.ts.lock("SR", sr), operations.running(ctx, ("SR", sr, "plug")):
        if ctx.store.get("PBD", self)["currently_attached"]:
            return
        smapi.call(ctx, sr, "sr_attach", device_config=pbd["device_config"])
        ctx.store.update("PBD", self, {"currently_attached": True})
    # On the master an attach is followed by a scan; its failure does not undo the plug.
    try:
        call(ctx, "SR.scan", sr)
    except ApiError as e:
        log.warning("scan after plugging %s failed: %s", self, e)


@PBD.method
def unplug(ctx, self):
    pbd = ctx.store.get("PBD", self)
    sr = pbd["SR"]
    with ctx.ts.lock("SR", sr), operations.running(ctx, ("SR", sr, "unplug")):
        if not ctx.store.get("PBD", self)["currently_attached"]:
            return
        # As XAPI: a VDI some VBD still uses keeps the SR plugged; an attachment no VBD
        # holds any more (a crash between plug steps) is deactivated and detached.
        vdis = ctx.store.find("VDI", SR=sr)
        in_use = [vdi for vdi, _ in vdis
                  if any(rec["currently_attached"] for _, rec in ctx.store.find("VBD", VDI=vdi))]
        if in_use:
            raise ApiError(errors.VDI_IN_USE, *in_use)
        for vdi, rec in vdis:
            if rec.get("attach"):
                vbd_module.undo_stale(ctx, sr, vdi)
        smapi.call(ctx, sr, "sr_detach", device_config=pbd["device_config"])
        ctx.store.update("PBD", self, {"currently_attached": False})
