"""VBD: plug/unplug -> vdi_attach + vdi_activate / vdi_deactivate + vdi_detach, once
per VDI however many VBDs use it (the datapath: connect, disconnect), plus dom0's block
device for the VDI; a guest's VBDs are plugged into its qemu (domains.py), at VM start
or hot.

Every step can be cut short (kill -9 of the toolstack or of a driver) and is journalled
in the VDI's hidden `attach` map first: "attaching" before vdi_attach, "detaching"
before the device goes, "attached" (with the VBD) in one transaction at the end. A
VDI whose journal is not "attached", or whose device is gone, is undone step by step
(each step is idempotent) by the next plug, unplug or destroy, and at start-up
(resync), as XAPI resynchronises what is really attached after a restart.
"""
import logging
import re

from smtap import units
from smtap.errtext import value_text
from smtap.toolstack import dom0_device, errors, faults, operations, smapi
from smtap.toolstack.classes.sr import assert_attached
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import (ApiClass, Field, BOOL, INT, MAP, REF, SET, RW,
                                     record_fields)

log = logging.getLogger("smtap.xapi.vbd")

MODES = ("RW", "RO")
TYPES = ("Disk", "CD", "Floppy")

VBD = ApiClass("VBD", [
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("VM", REF), Field("VDI", REF), Field("device"), Field("userdevice", setter=RW),
    Field("bootable", BOOL, setter=RW), Field("mode", default="RW", setter=RW, choices=MODES),
    Field("type", default="Disk", setter=RW, choices=TYPES),
    Field("unpluggable", BOOL, True, setter=RW),
    Field("storage_lock", BOOL), Field("empty", BOOL), Field("other_config", MAP, setter=RW),
    Field("currently_attached", BOOL), Field("status_code", INT), Field("status_detail"),
    Field("runtime_properties", MAP), Field("qos_algorithm_type", setter=RW),
    Field("qos_algorithm_params", MAP, setter=RW), Field("qos_supported_algorithms", SET),
    Field("metrics", REF),
], by_name_label=False, needs_drivers=True)

ATTACHING, ATTACHED, DETACHING = "attaching", "attached", "detaching"


@VBD.method
def create(ctx, record):
    fields = record_fields("VBD", record, ["VM"])
    store = ctx.store
    store.get("VM", fields["VM"])
    empty = VBD.fields["empty"].coerce(fields.get("empty", False))
    if not empty:
        store.get("VDI", fields.get("VDI", ""))
    fields["currently_attached"] = False
    with store.transaction():
        fields["userdevice"] = _userdevice(ctx, fields["VM"], fields.get("userdevice", ""))
        return store.create("VBD", fields)


_DEVICE = re.compile(r"^(?:(?P<n>\d+)|(?:xvd|sd)(?P<x>[a-z]+)\d*|hd(?P<h>[a-z])\d*)$")
MAX_DEVICES = 255


def disk_number(device):
    """The disk number a userdevice names (0, xvda, sda, hda are all disk 0), or None."""
    m = _DEVICE.match(device)
    if not m:
        return None
    if m.group("n") is not None:
        return int(m.group("n"))
    letters = m.group("x") or m.group("h")
    number = 0
    for c in letters:
        number = number * 26 + ord(c) - ord("a") + 1
    return number - 1


def _userdevice(ctx, vm, device):
    """As XAPI's VBD.create: "autodetect" becomes the lowest free disk number, a name
    that is no device is INVALID_DEVICE, one the VM already uses DEVICE_ALREADY_EXISTS."""
    used = set(disk_number(rec["userdevice"]) for _, rec in ctx.store.find("VBD", VM=vm))
    if device == "autodetect":
        free = [n for n in range(MAX_DEVICES) if n not in used]
        if not free:
            raise ApiError(errors.INVALID_DEVICE, device)
        return str(free[0])
    number = disk_number(device)
    if number is None or number >= MAX_DEVICES:
        raise ApiError(errors.INVALID_DEVICE, device)
    if number in used:
        raise ApiError(errors.DEVICE_ALREADY_EXISTS, device)
    return device


@VBD.method
def destroy(ctx, self):
    if ctx.store.get("VBD", self)["currently_attached"]:
        raise ApiError(errors.OPERATION_NOT_ALLOWED, "VBD is currently attached")
    ctx.store.destroy("VBD", self)


def _users(ctx, vdi, but):
    return [(ref, rec) for ref, rec in ctx.store.find("VBD", VDI=vdi)
            if rec["currently_attached"] and ref != but]


def assert_attachable(ctx, vdi, vdi_rec, vbd, mode):
    """XAPI's rules (xapi_vbd_helpers): a VDI that is not sharable takes one RW VBD or
    any number of RO ones; a read-only VDI takes no RW VBD."""
    users = _users(ctx, vdi, vbd)
    writer = any(rec["mode"] == "RW" for _, rec in users)
    if not vdi_rec["sharable"] and (writer or (mode == "RW" and users)):
        raise ApiError(errors.VDI_IN_USE, vdi, "plug")
    if mode == "RW" and vdi_rec["read_only"]:
        raise ApiError(errors.VDI_READONLY, vdi)
    # One attachment per VDI on this host: its mode is the first VBD's (XAPI's
    # datapath automaton refuses an attached-RO -> RW transition too).
    writable = units.parse_bool(vdi_rec["attach"].get("writable", "true"), "writable",
                                units.XAPI_BOOL)
    if mode == "RW" and users and not writable:
        raise ApiError(errors.VDI_IN_USE, vdi, "attached read-only on this host")


@VBD.method
def plug(ctx, self):
    vbd = ctx.store.get("VBD", self)
    if ctx.store.get("VM", vbd["VM"])["is_control_domain"] is not True:
        from smtap.toolstack import domains
        return domains.hotplug(ctx, self)
    if vbd["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_ATTACHED, self)
    connect(ctx, self, dom0=True)


def connect(ctx, self, dom0):
    """The VBD's datapath: the VDI attached and active on this host (once for all its
    VBDs), and for dom0 its block device; the VBD marked attached."""
    store = ctx.store
    vbd = store.get("VBD", self)
    vdi = vbd["VDI"]
    sr = store.get("VDI", vdi)["SR"]
    assert_attached(ctx, sr)
    with ctx.ts.lock("VDI", vdi), operations.running(ctx, ("VBD", self, "plug")):
        vdi_rec = store.get("VDI", vdi)
        assert_attachable(ctx, vdi, vdi_rec, self, vbd["mode"])
        info = vdi_rec["attach"]
        if not _users(ctx, vdi, self):
            undo_stale(ctx, sr, vdi)
            info = attach(ctx, sr, vdi, vbd["mode"] == "RW", device=dom0)
        with store.transaction():
            store.update("VDI", vdi, {"attach": dict(info, state=ATTACHED)})
            store.update("VBD", self, {"currently_attached": True,
                                       "device": info.get("device", "") if dom0 else ""})


def unplug(ctx, self, force=False):
    vbd = ctx.store.get("VBD", self)
    if ctx.store.get("VM", vbd["VM"])["is_control_domain"] is not True:
        from smtap.toolstack import domains
        return domains.hotunplug(ctx, self, force)
    if not vbd["currently_attached"]:
        raise ApiError(errors.DEVICE_ALREADY_DETACHED, self)
    disconnect(ctx, self, force)


def disconnect(ctx, self, force=False):
    """The VBD's datapath goes: the VDI detached once its last VBD goes."""
    store = ctx.store
    vdi = store.get("VBD", self)["VDI"]
    with ctx.ts.lock("VDI", vdi), operations.running(
            ctx, ("VBD", self, "unplug_force" if force else "unplug")):
        if _users(ctx, vdi, self):
            store.update("VBD", self, {"currently_attached": False, "device": ""})
        else:
            detach(ctx, store.get("VDI", vdi)["SR"], vdi, force=force, vbd=self)


VBD.method(lambda ctx, self: unplug(ctx, self), name="unplug")
VBD.method(lambda ctx, self: unplug(ctx, self, force=True), name="unplug_force")


def attach(ctx, sr, vdi, writable, device=True):
    """vdi_attach + vdi_activate, then (device) the block device; the attach info. A
    failure undoes what was done (what a crash cuts short, undo_stale undoes later)."""
    rw = ["true" if writable else "false"]
    driver = ctx.ts.driver(ctx.store.get("SR", sr)["type"])
    ctx.store.update("VDI", vdi, {"attach": {"state": ATTACHING, "writable": rw[0]}})
    try:
        result = smapi.call(ctx, sr, "vdi_attach", rw, vdi_ref=vdi)
        faults.point("plug-attached")
        if not isinstance(result, dict) or "params_nbd" not in result:
            raise ApiError(errors.SR_BACKEND_FAILURE, "vdi_attach returned no params_nbd",
                           value_text(result), "")
        info = {"params_nbd": str(result["params_nbd"]),
                "params": str(result.get("params", "")), "writable": rw[0]}
        _record_read_caching(ctx, vdi, result)
        if smapi.has(driver, "vdi_activate"):
            smapi.call(ctx, sr, "vdi_activate", rw, vdi_ref=vdi)
        faults.point("plug-activated")
        if not device:
            return info
        vdi_uuid = ctx.store.get("VDI", vdi)["uuid"]
        try:
            info.update(dom0_device.create(vdi_uuid, info["params_nbd"], info["params"],
                                           writable))
        except dom0_device.Busy as e:
            raise ApiError(errors.VDI_IN_USE, vdi, "a previous dom0 device is in use: %s" % e)
        except Exception as e:
            raise ApiError(errors.INTERNAL_ERROR, "dom0 block device: %s" % e)
        faults.point("plug-device")
        return info
    except BaseException:
        try:
            undo(ctx, sr, vdi, force=True)
        except Exception as e:         # the journal stays: the next plug or resync retries
            log.warning("undoing the failed plug of %s: %s", vdi, e)
        raise


def _read_caching_keys(ctx):
    host_uuid = ctx.store.get("host", ctx.ts.host)["uuid"]
    return "read-caching-enabled-on-" + host_uuid, "read-caching-reason-" + host_uuid


def _record_read_caching(ctx, vdi, result):
    """As XAPI after vdi_attach: whether this host reads the VDI through the page cache
    (the driver's o_direct, true when absent) and why not, in the VDI's sm-config."""
    on_key, reason_key = _read_caching_keys(ctx)
    o_direct = result.get("o_direct", True)
    with ctx.store.transaction():
        sm_config = dict(ctx.store.get("VDI", vdi)["sm_config"])
        sm_config.pop(reason_key, None)
        sm_config[on_key] = "false" if o_direct else "true"
        if o_direct:
            sm_config[reason_key] = str(result.get("o_direct_reason", ""))
        ctx.store.update("VDI", vdi, {"sm_config": sm_config})


def _forget_read_caching(ctx, vdi):
    keys = _read_caching_keys(ctx)
    with ctx.store.transaction():
        sm_config = ctx.store.get("VDI", vdi)["sm_config"]
        if any(k in sm_config for k in keys):
            ctx.store.update("VDI", vdi, {"sm_config": {k: v for k, v in sm_config.items()
                                                        if k not in keys}})


def detach(ctx, sr, vdi, force=False, vbd=None):
    """The last user goes: the dom0 device (refused while in use, unless forced), then
    vdi_deactivate + vdi_detach, then the records."""
    uuid = ctx.store.get("VDI", vdi)["uuid"]
    if not force:
        busy = dom0_device.users(uuid)
        if busy:
            raise ApiError(errors.DEVICE_DETACH_REJECTED, "VBD", vbd or vdi,
                           "device in use: %s" % "; ".join(busy))
    info = ctx.store.get("VDI", vdi)["attach"]
    ctx.store.update("VDI", vdi, {"attach": dict(info, state=DETACHING)})
    try:
        undo(ctx, sr, vdi, force=force, strict=True)
    except dom0_device.Busy as e:      # opened between the check and the teardown
        raise ApiError(errors.DEVICE_DETACH_REJECTED, "VBD", vbd or vdi,
                       "device in use: %s" % e)


def undo(ctx, sr, vdi, force=False, strict=False):
    """Every step of a plug, last first; each is idempotent. Clears the journal and
    detaches the VDI's VBDs once all went. strict: driver failures are raised (an unplug
    says it failed); otherwise logged (undoing a failed plug or a crash)."""
    store = ctx.store
    dom0_device.remove(store.get("VDI", vdi)["uuid"], force=force)
    faults.point("unplug-device-gone")
    driver = ctx.ts.driver(store.get("SR", sr)["type"])
    for command in ("vdi_deactivate", "vdi_detach"):
        if not smapi.has(driver, command):
            continue
        try:
            smapi.call(ctx, sr, command, vdi_ref=vdi)
        except ApiError as e:
            if strict:
                raise
            log.warning("%s of %s while undoing: %s", command, vdi, e)
        if command == "vdi_deactivate":
            faults.point("unplug-deactivated")
    with store.transaction():
        _forget_read_caching(ctx, vdi)
        store.update("VDI", vdi, {"attach": {}})
        for ref, _ in store.find("VBD", VDI=vdi, currently_attached=True):
            store.update("VBD", ref, {"currently_attached": False, "device": ""})


def stale(ctx, vdi):
    """The journal says a plug or unplug was cut short (no VBD uses the VDI)."""
    rec = ctx.store.get("VDI", vdi)
    return bool(rec["attach"]) and not _users(ctx, vdi, None)


def undo_stale(ctx, sr, vdi):
    """What a crashed plug or unplug left of a VDI no VBD uses."""
    if stale(ctx, vdi):
        log.info("VDI %s: undoing a plug or unplug cut short (%s)", vdi,
                 ctx.store.get("VDI", vdi)["attach"].get("state", "?"))
        try:
            undo(ctx, sr, vdi)
        except dom0_device.Busy as e:
            raise ApiError(errors.VDI_IN_USE, vdi, "a previous dom0 device is in use: %s" % e)


def resync(ctx):
    """At start-up: make the records and what is really attached agree, VDI by VDI."""
    store = ctx.store
    for vdi, rec in store.all("VDI"):
        users = _users(ctx, vdi, None)
        info = rec.get("attach") or {}
        if not info and not users:
            continue
        with ctx.ts.lock("VDI", vdi):
            try:
                _resync_vdi(ctx, vdi, rec, info, users)
            except Exception as e:
                log.warning("resync of VDI %s: %s", vdi, e)


def _resync_vdi(ctx, vdi, rec, info, users):
    state = info.get("state", ATTACHED if info else "")
    if users and state == ATTACHED:
        if not info.get("blockdev"):
            return                     # no dom0 device was made (DummySR): nothing to check
        devs = dom0_device.current(rec["uuid"])
        if dom0_device.healthy(rec["uuid"]):
            device = devs[0].rsplit("/", 1)[-1]
            if device != info.get("device"):
                with ctx.store.transaction():
                    ctx.store.update("VDI", vdi, {"attach": dict(info, device=device,
                                                                 blockdev=devs[0])})
                    for ref, _ in users:
                        ctx.store.update("VBD", ref, {"device": device})
            return
    if dom0_device.users(rec["uuid"]):
        log.warning("VDI %s: its dom0 device is in use, left as it is", vdi)
        return
    log.info("VDI %s: %s with %d VBD(s) attached: undoing", vdi, state or "no journal",
             len(users))
    undo(ctx, rec["SR"], vdi)
