"""SR: create/introduce/forget/destroy/scan/probe, as XAPI sequences them."""
import logging

from smtap.toolstack import errors, operations, smapi
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import (ApiClass, Field, BOOL, INT, MAP, REF, SET, RW, SM_ONLY,
                                     call)

log = logging.getLogger("smtap.xapi.sr")

SR = ApiClass("SR", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("VDIs", SET, reverse=("VDI", "SR")), Field("PBDs", SET, reverse=("PBD", "SR")),
    Field("virtual_allocation", INT, setter=SM_ONLY),
    Field("physical_utilisation", INT, setter=SM_ONLY),
    Field("physical_size", INT, setter=SM_ONLY),
    Field("type"), Field("content_type"), Field("shared", BOOL, setter=RW),
    Field("other_config", MAP, setter=RW), Field("tags", SET, setter=RW),
    Field("sm_config", MAP, setter=SM_ONLY), Field("blobs", MAP),
    Field("local_cache_enabled", BOOL), Field("introduced_by", REF), Field("clustered", BOOL),
    Field("is_tools_sr", BOOL),
], by_name_label=True, needs_drivers=True)


def attached_pbds(ctx, sr_ref):
    return [ref for ref, rec in ctx.store.find("PBD", SR=sr_ref) if rec["currently_attached"]]


def assert_attached(ctx, sr_ref):
    ctx.store.get("SR", sr_ref)
    if not attached_pbds(ctx, sr_ref):
        raise ApiError(errors.SR_HAS_NO_PBDS, sr_ref)


def assert_detached(ctx, sr_ref):
    ctx.store.get("SR", sr_ref)
    if attached_pbds(ctx, sr_ref):
        raise ApiError(errors.SR_HAS_PBD, sr_ref)


@SR.method
def create(ctx, host, device_config, physical_size, name_label, name_description, type,
           content_type, shared, sm_config=None):
    """Records first, then sr_create on the master; undone if anything fails."""
    ctx.ts.driver(type)
    ctx.store.get("host", host)
    with ctx.store.transaction():
        sr = ctx.store.create("SR", {
            "name_label": name_label, "name_description": name_description, "type": type,
            "content_type": content_type, "shared": shared, "sm_config": sm_config or {},
            "physical_size": physical_size})
        pbd = ctx.store.create("PBD", {"host": host, "SR": sr, "device_config": device_config})
    try:
        smapi.call(ctx, sr, "sr_create", [str(physical_size)], device_config=device_config)
        call(ctx, "PBD.plug", pbd)
    except Exception:
        forget_records(ctx, sr)
        raise
    return sr


@SR.method
def introduce(ctx, uuid, name_label, name_description, type, content_type, shared,
              sm_config=None):
    """Database only: an SR that already exists on its storage."""
    ctx.ts.driver(type)
    return ctx.store.create("SR", {
        "uuid": uuid, "name_label": name_label, "name_description": name_description,
        "type": type, "content_type": content_type, "shared": shared,
        "sm_config": sm_config or {}})


@SR.method
def forget(ctx, sr):
    assert_detached(ctx, sr)
    forget_records(ctx, sr)


@SR.method
def destroy(ctx, sr):
    """sr_attach, sr_delete, then forget; a refused delete is followed by sr_detach and
    leaves the SR as it was. As XAPI (Storage_access.destroy_sr): this host's PBD is
    marked currently_attached around sr_delete, as backends expect of an attached SR
    (upstream FileSR.delete runs the GC, which checks it)."""
    assert_detached(ctx, sr)
    pbds = [ref for ref, _ in ctx.store.find("PBD", SR=sr, host=ctx.ts.host)]
    with ctx.ts.lock("SR", sr), operations.running(ctx, ("SR", sr, "destroy")):
        smapi.call(ctx, sr, "sr_attach")
        try:
            for pbd in pbds:
                ctx.store.update("PBD", pbd, {"currently_attached": True})
            try:
                smapi.call(ctx, sr, "sr_delete")
            except ApiError:
                try:
                    smapi.call(ctx, sr, "sr_detach")
                except ApiError as e:
                    log.warning("sr_detach after a failed sr_delete: %s", e)
                raise
        finally:
            for pbd in pbds:
                if ctx.store.exists("PBD", pbd):
                    ctx.store.update("PBD", pbd, {"currently_attached": False})
    forget_records(ctx, sr)


def forget_records(ctx, sr):
    store = ctx.store
    with store.transaction():
        for vdi, _ in store.find("VDI", SR=sr):
            forget_vdi_records(ctx, vdi)
        for pbd, _ in store.find("PBD", SR=sr):
            store.destroy("PBD", pbd)
        store.destroy("SR", sr)
        ctx.ts.forget_sm_sessions(sr)


def forget_vdi_records(ctx, vdi):
    with ctx.store.transaction():
        for vbd, _ in ctx.store.find("VBD", VDI=vdi):
            ctx.store.destroy("VBD", vbd)
        ctx.store.destroy("VDI", vdi)


@SR.method
def scan(ctx, sr):
    assert_attached(ctx, sr)
    with operations.running(ctx, ("SR", sr, "scan")):
        smapi.call(ctx, sr, "sr_scan")
    update(ctx, sr)


@SR.method
def update(ctx, sr):
    driver = ctx.ts.driver(ctx.store.get("SR", sr)["type"])
    if smapi.has(driver, "sr_update"):
        with operations.running(ctx, ("SR", sr, "update")):
            smapi.call(ctx, sr, "sr_update")


@SR.method
def probe(ctx, host, device_config, type, sm_config=None):
    ctx.store.get("host", host)
    return smapi.probe(ctx, type, device_config, sm_config or {})


@SR.method
def get_supported_types(ctx):
    ctx.ts.wait_for_drivers()
    return sorted(ctx.ts.drivers)
