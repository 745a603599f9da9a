"""VDI: driver-backed create/destroy/snapshot/clone/resize/introduce, and the
SM-only database calls (db_introduce, db_forget, size setters) drivers report with."""
import uuid as uuidlib

from smtap.errtext import value_text
from smtap.toolstack import errors, operations, smapi, vdi_copy
from smtap.toolstack.classes import vbd as vbd_module
from smtap.toolstack.classes.sr import assert_attached, forget_vdi_records
from smtap.toolstack.errors import ApiError, NULL_REF
from smtap.toolstack.objects import (ApiClass, Field, BOOL, DATETIME, EPOCH, INT, MAP, REF, SET,
                                     RW, SM_ONLY, now, record_fields)

VDI = ApiClass("VDI", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP), Field("SR", REF),
    Field("VBDs", SET, reverse=("VBD", "VDI")), Field("crash_dumps", SET),
    Field("virtual_size", INT, setter=SM_ONLY), Field("physical_utilisation", INT, setter=SM_ONLY),
    Field("type", default="user"), Field("sharable", BOOL, setter=RW),
    Field("read_only", BOOL, setter=SM_ONLY), Field("other_config", MAP, setter=RW),
    Field("storage_lock", BOOL), Field("location"), Field("managed", BOOL, True, setter=SM_ONLY),
    Field("missing", BOOL, setter=SM_ONLY), Field("parent", REF),
    Field("xenstore_data", MAP, setter=RW), Field("sm_config", MAP, setter=SM_ONLY),
    Field("is_a_snapshot", BOOL, setter=SM_ONLY), Field("snapshot_of", REF, setter=SM_ONLY),
    Field("snapshots", SET, reverse=("VDI", "snapshot_of")),
    Field("snapshot_time", DATETIME, setter=SM_ONLY), Field("tags", SET, setter=RW),
    Field("allow_caching", BOOL, setter=RW), Field("on_boot", default="persist", setter=RW,
                                                 choices=("persist", "reset")),
    Field("metadata_of_pool", REF, setter=SM_ONLY), Field("metadata_latest", BOOL),
    Field("is_tools_iso", BOOL), Field("cbt_enabled", BOOL, setter=SM_ONLY),
    Field("attach", MAP, hidden=True),   # this host's attachment and its journal (vbd.py)
], by_name_label=True, needs_drivers=True)


def _ref_arg(ref):
    return "" if ref in ("", NULL_REF, None) else ref


def from_result(ctx, result):
    """The record a driver introduced for a {uuid, location} result."""
    if not isinstance(result, dict) or "uuid" not in result:
        raise ApiError(errors.SR_BACKEND_FAILURE, "driver result has no uuid",
                       value_text(result), "")
    return ctx.store.ref_of_uuid("VDI", result["uuid"])


def attached_vbds(ctx, vdi):
    return [ref for ref, rec in ctx.store.find("VBD", VDI=vdi) if rec["currently_attached"]]


@VDI.method
def create(ctx, record):
    fields = record_fields("VDI", record, ["SR", "virtual_size"])
    sr = fields["SR"]
    assert_attached(ctx, sr)
    size = VDI.fields["virtual_size"].coerce(fields["virtual_size"])
    read_only = VDI.fields["read_only"].coerce(fields.get("read_only", False))
    args = [size, fields.get("name_label", ""), fields.get("name_description", ""),
            "", "false", EPOCH, "", "true" if read_only else "false"]
    with operations.running(ctx, ("SR", sr, "vdi_create")):
        result = smapi.call(ctx, sr, "vdi_create", args,
                            vdi_sm_config=dict(fields.get("sm_config") or {}),
                            vdi_type=fields.get("type", "user"))
    ref = from_result(ctx, result)
    # What the driver does not know about, XAPI sets itself.
    extra = {k: fields[k] for k in ("other_config", "xenstore_data", "tags", "sharable")
             if k in fields}
    if extra:
        ctx.store.update("VDI", ref, {k: VDI.fields[k].coerce(v) for k, v in extra.items()})
    return ref


@VDI.method
def destroy(ctx, self):
    vdi = ctx.store.get("VDI", self)
    if attached_vbds(ctx, self):
        raise ApiError(errors.VDI_IN_USE, self, "destroy")
    assert_attached(ctx, vdi["SR"])
    with ctx.ts.lock("VDI", self):
        vbd_module.undo_stale(ctx, vdi["SR"], self)     # what a crashed plug left
    with operations.running(ctx, ("VDI", self, "destroy"), ("SR", vdi["SR"], "vdi_destroy")):
        smapi.call(ctx, vdi["SR"], "vdi_delete", vdi_ref=self)
    if ctx.store.exists("VDI", self):
        forget_vdi_records(ctx, self)


# What the toolstack, not the driver, decides about a snapshot or clone (xapi_vdi.ml
# snapshot_and_clone): copied from the source over whatever the driver introduced.
COPIED_ON_COPY = ("name_label", "name_description", "type", "sharable", "other_config",
                  "xenstore_data", "on_boot", "allow_caching")
# sm-config keys of driver_params kept on the new VDI (storage_smapiv1.ml)
SM_CONFIG_PRESERVED = ("base_mirror",)


def _copy(ctx, vdi_ref, command, driver_params):
    """vdi_snapshot / vdi_clone, then the new VDI finished as XAPI does: the storage
    layer stamps its name, snapshot_time, is_a_snapshot and content_id and runs
    vdi_update; then the fields XAPI controls are copied from the source, and a
    snapshot records what it is a snapshot of."""
    store = ctx.store
    src = store.get("VDI", vdi_ref)
    sr = src["SR"]
    assert_attached(ctx, sr)
    params = dict(driver_params or {})
    snapshot = command == "vdi_snapshot"
    op = "snapshot" if snapshot else "clone"
    with operations.running(ctx, ("VDI", vdi_ref, op), ("SR", sr, "vdi_" + op)):
        result = smapi.call(ctx, sr, command, vdi_ref=vdi_ref, driver_params=params)
    ref = from_result(ctx, result)
    new = store.get("VDI", ref)
    content_id = src["other_config"].get("content_id") or str(uuidlib.uuid4())
    store.update("VDI", ref, {
        "name_label": src["name_label"], "name_description": src["name_description"],
        "snapshot_time": now(), "is_a_snapshot": snapshot,
        "other_config": dict(new["other_config"], content_id=content_id),
        "sm_config": dict(new["sm_config"], **{k: str(params[k]) for k in SM_CONFIG_PRESERVED
                                               if k in params})})
    driver = ctx.ts.driver(store.get("SR", sr)["type"])
    if smapi.has(driver, "vdi_update"):
        smapi.call(ctx, sr, "vdi_update", vdi_ref=ref)
    src = store.get("VDI", vdi_ref)
    changes = {k: _copy_value(src[k]) for k in COPIED_ON_COPY}
    if snapshot:
        changes.update(is_a_snapshot=True, snapshot_of=vdi_ref)
    store.update("VDI", ref, changes)
    return ref


def _copy_value(value):
    return dict(value) if isinstance(value, dict) else value


@VDI.method
def snapshot(ctx, vdi, driver_params=None):
    return _copy(ctx, vdi, "vdi_snapshot", driver_params)


@VDI.method
def clone(ctx, vdi, driver_params=None):
    return _copy(ctx, vdi, "vdi_clone", driver_params)


@VDI.method
def copy(ctx, vdi, sr, base_vdi="", into_vdi=""):
    """As XAPI (xapi_vdi.ml copy): into `into_vdi`, or a new VDI in `sr` made like the
    source; the data copied from one NBD export to the other while both are attached
    on this host (nbdcopy); a VDI made here is destroyed again if the copy fails."""
    src = ctx.store.get("VDI", vdi)
    assert_attached(ctx, src["SR"])
    into = _ref_arg(into_vdi)
    made = None
    if into:
        dst = into
        ctx.store.get("VDI", dst)
    else:
        dst = made = create(ctx, {
            "SR": sr, "virtual_size": src["virtual_size"], "name_label": src["name_label"],
            "name_description": src["name_description"], "type": src["type"],
            "sharable": src["sharable"], "read_only": False,
            "other_config": dict(src["other_config"]), "tags": list(src["tags"]),
            "xenstore_data": dict(src["xenstore_data"]), "sm_config": {}})
        ctx.store.update("VDI", dst, {"on_boot": src["on_boot"],
                                      "allow_caching": src["allow_caching"]})
    try:
        target = ctx.store.get("VDI", dst)
        if target["read_only"]:
            raise ApiError(errors.VDI_READONLY, dst)
        if target["virtual_size"] < src["virtual_size"]:
            raise ApiError(errors.VDI_TOO_SMALL, dst, src["virtual_size"])
        with operations.running(ctx, ("VDI", vdi, "copy")):
            vdi_copy.copy_data(ctx, vdi, dst)
    except BaseException:
        if made:
            try:
                destroy(ctx, made)
            except ApiError as e:
                vdi_copy.log.warning("destroying the copy %s after a failure: %s", made, e)
        raise
    return dst


@VDI.method
def resize(ctx, vdi, size):
    rec = ctx.store.get("VDI", vdi)
    assert_attached(ctx, rec["SR"])
    size = VDI.fields["virtual_size"].coerce(size)
    with operations.running(ctx, ("VDI", vdi, "resize"), ("SR", rec["SR"], "vdi_resize")):
        smapi.call(ctx, rec["SR"], "vdi_resize", [size], vdi_ref=vdi)


@VDI.method
def update(ctx, vdi):
    rec = ctx.store.get("VDI", vdi)
    with operations.running(ctx, ("VDI", vdi, "update")):
        smapi.call(ctx, rec["SR"], "vdi_update", vdi_ref=vdi)


@VDI.method
def introduce(ctx, uuid, name_label, name_description, SR, type, sharable, read_only,
              other_config, location, xenstore_data, sm_config, managed=True,
              virtual_size="0", physical_utilisation="0", metadata_of_pool="",
              is_a_snapshot=False, snapshot_time=EPOCH, snapshot_of=""):
    """vdi_introduce: the driver checks `location` and db_introduces the record."""
    assert_attached(ctx, SR)
    with operations.running(ctx, ("SR", SR, "vdi_introduce")):
        result = smapi.call(ctx, SR, "vdi_introduce", vdi_location=location,
                            vdi_sm_config=dict(sm_config or {}), new_uuid=uuid)
    ref = from_result(ctx, result)
    changes = {"other_config": other_config or {}, "xenstore_data": xenstore_data or {}}
    if name_label:
        changes["name_label"] = name_label
    if name_description:
        changes["name_description"] = name_description
    ctx.store.update("VDI", ref, {k: VDI.fields[k].coerce(v) for k, v in changes.items()})
    return ref


@VDI.method
def forget(ctx, vdi):
    ctx.store.get("VDI", vdi)
    if attached_vbds(ctx, vdi):
        raise ApiError(errors.VDI_IN_USE, vdi, "forget")
    forget_vdi_records(ctx, vdi)


@VDI.method
def db_introduce(ctx, uuid, name_label, name_description, SR, type, sharable, read_only,
                 other_config, location, xenstore_data, sm_config, managed=True,
                 virtual_size="0", physical_utilisation="0", metadata_of_pool="",
                 is_a_snapshot=False, snapshot_time=EPOCH, snapshot_of="", cbt_enabled=False):
    ctx.require_sm_session(SR)
    ctx.store.get("SR", SR)
    return ctx.store.create("VDI", {
        "uuid": uuid, "name_label": name_label, "name_description": name_description,
        "SR": SR, "type": type, "sharable": sharable, "read_only": read_only,
        "other_config": other_config, "location": location, "xenstore_data": xenstore_data,
        "sm_config": sm_config, "managed": managed, "virtual_size": virtual_size,
        "physical_utilisation": physical_utilisation,
        "metadata_of_pool": _ref_arg(metadata_of_pool) or NULL_REF,
        "is_a_snapshot": is_a_snapshot, "snapshot_time": snapshot_time,
        "snapshot_of": _ref_arg(snapshot_of) or NULL_REF, "cbt_enabled": cbt_enabled})


@VDI.method
def db_forget(ctx, vdi):
    ctx.require_sm_session(ctx.store.get("VDI", vdi)["SR"])
    forget_vdi_records(ctx, vdi)
