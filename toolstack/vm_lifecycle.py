"""Which VM operations are allowed, as XAPI decides (xapi_vm_lifecycle.ml
check_operation_error): the power state first, then operations in progress, templates,
snapshots, the control domain, and the guest's features for the operations that need
its cooperation. allowed_operations is computed from the same rules when read."""
from smtap import units
from smtap.toolstack import errors, objects
from smtap.toolstack.errors import ApiError

HALTED, RUNNING, PAUSED, SUSPENDED = "Halted", "Running", "Paused", "Suspended"
ALL_STATES = (HALTED, PAUSED, SUSPENDED, RUNNING)

# operation -> the power states it may start from (allowed_power_states)
POWER_STATES = {
    "start": (HALTED,), "provision": (HALTED,), "make_into_template": (HALTED,),
    "unpause": (PAUSED,),
    "clean_shutdown": (RUNNING,), "clean_reboot": (RUNNING,), "pause": (RUNNING,),
    "hard_reboot": (PAUSED, RUNNING),
    "hard_shutdown": (PAUSED, SUSPENDED, RUNNING), "shutdown": (PAUSED, SUSPENDED, RUNNING),
    "destroy": (HALTED, SUSPENDED), "export": (HALTED, SUSPENDED),
    "snapshot": ALL_STATES, "revert": ALL_STATES,
}
COPIES = ("clone", "copy")      # Halted, and Suspended for snapshots
# In the order XAPI lists them in allowed_operations.
LISTED = ("snapshot", "copy", "clone", "revert", "start", "pause", "unpause",
          "clean_shutdown", "clean_reboot", "hard_shutdown", "hard_reboot", "destroy",
          "provision", "make_into_template")
TEMPLATE_OPS = ("clone", "copy", "export", "metadata_export", "provision",
                "changing_dynamic_range", "changing_static_range", "changing_memory_limits",
                "changing_shadow_memory", "changing_VCPUs")
SNAPSHOT_OPS = ("revert", "clone", "copy", "export", "destroy", "hard_shutdown",
                "metadata_export")
DOM0_OPS = ("data_source_op", "changing_memory_live", "awaiting_memory_live",
            "metadata_export", "changing_dynamic_range", "start")
# operations a guest must support, by the features its agent announces
FEATURES = {"clean_shutdown": ("feature-shutdown", "feature-poweroff"),
            "clean_reboot": ("feature-shutdown", "feature-reboot")}


def power_states(rec, op):
    if op in COPIES:
        return (HALTED, SUSPENDED) if rec.get("is_a_snapshot") else (HALTED,)
    return POWER_STATES.get(op, ALL_STATES)


def _concurrent(op, current):
    """is_allowed_concurrently: copies with copies, snapshots with snapshots; a hard
    shutdown or reboot may interrupt anything but another one."""
    for group in (COPIES + ("export",), ("snapshot", "checkpoint")):
        if op in group and all(o in group for o in current):
            return True
    if op == "hard_shutdown":
        return op not in current
    if op == "hard_reboot":
        return not any(o in ("hard_shutdown", "hard_reboot") for o in current)
    return False


def guest_features(store, rec):
    """(PV drivers detected, the `other` features) from the VM's guest metrics."""
    gm = store.db.get("VM_guest_metrics", rec.get("guest_metrics") or "")
    if not gm:
        return False, {}
    return bool(gm.get("PV_drivers_detected")), gm.get("other") or {}


def error(store, ref, rec, op, strict=True):
    """(code, params) of the first rule `op` breaks, or None."""
    state = rec.get("power_state", HALTED)
    if op in (rec.get("blocked_operations") or {}):
        return errors.OPERATION_NOT_ALLOWED, ["blocked: %s" % rec["blocked_operations"][op]]
    expected = power_states(rec, op)
    if state not in expected:
        return errors.VM_BAD_POWER_STATE, [ref, ", ".join(expected), state]
    current = list((rec.get("current_operations") or {}).values())
    if current and not _concurrent(op, current):
        return errors.OTHER_OPERATION_IN_PROGRESS, ["VM." + (
            current[0] if len(current) == 1 else "{%s}" % ",".join(current)), ref]
    if rec.get("is_a_template") and not rec.get("is_a_snapshot"):
        default = rec.get("is_default_template") or \
            units.flag((rec.get("other_config") or {}).get("default_template"), default=False)
        if not (op in TEMPLATE_OPS or (op == "destroy" and not default)):
            return errors.VM_IS_TEMPLATE, [ref, op]
    if rec.get("is_a_snapshot") and op not in SNAPSHOT_OPS:
        return errors.VM_IS_SNAPSHOT, [ref, op]
    if op == "provision" and not rec.get("is_a_template"):
        return errors.ONLY_PROVISION_TEMPLATE, []
    if rec.get("is_control_domain") and op not in DOM0_OPS:
        return errors.OPERATION_NOT_ALLOWED, ["Operations on domain 0 are not allowed"]
    if strict and op in FEATURES and state == RUNNING and rec.get("domain_type") == "hvm":
        drivers, other = guest_features(store, rec)
        if not drivers and not any(other.get(f) == "1" for f in FEATURES[op]):
            return errors.VM_LACKS_FEATURE, [ref]
    return None


def check(ctx, ref, op, strict=False):
    """Raise the error of a refused operation (strict=False: as XAPI before it acts,
    the guest's features are not required; the guest is simply asked)."""
    found = error(ctx.store, ref, ctx.store.get("VM", ref), op, strict)
    if found:
        raise ApiError(found[0], *found[1])


def allowed(store, ref, rec):
    return [op for op in LISTED if error(store, ref, rec, op) is None]


objects.COMPUTED[("VM", "allowed_operations")] = allowed
