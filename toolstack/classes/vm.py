"""VM: dom0 and the guests, their lifecycle (start, shutdown, reboot, pause: as XAPI,
on qemu: domains.py) and their copies (snapshot, clone, copy: the VDIs' vdi_snapshot,
vdi_clone or data copy through the SR driver, which pauses a plugged VDI's tapdisk
meanwhile), and VM_guest_metrics (what a guest's agent reports)."""
import contextlib
import logging

from smtap.toolstack import domains, errors, operations, vm_lifecycle
from smtap.toolstack.errors import ApiError, NULL_REF
from smtap.toolstack.objects import (ApiClass, Field, BOOL, DATETIME, EPOCH, INT, MAP, REF,
                                     SET, STRING, RW, call, coerce, now, record_fields)
from smtap.toolstack.vm_lifecycle import HALTED

log = logging.getLogger("smtap.xapi.vm")

ACTIONS_SHUTDOWN = ("destroy", "restart")
ACTIONS_CRASH = ("destroy", "coredump_and_destroy", "restart", "coredump_and_restart",
                 "preserve", "rename_restart")
DOMAIN_TYPES = ("hvm", "pv", "pv_in_pvh", "pvh", "unspecified")
CLEAN_SHUTDOWN_TIMEOUT = 120

VM = ApiClass("VM", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("power_state", default=HALTED), Field("user_version", INT, 1, setter=RW),
    Field("is_a_template", BOOL), Field("is_default_template", BOOL),
    Field("resident_on", REF), Field("affinity", REF, setter=RW),
    Field("memory_static_max", INT, 256 << 20, setter=RW),
    Field("memory_dynamic_max", INT, 256 << 20, setter=RW),
    Field("memory_dynamic_min", INT, 256 << 20, setter=RW),
    Field("memory_static_min", INT, 64 << 20, setter=RW),
    Field("VCPUs_max", INT, 1, setter=RW), Field("VCPUs_at_startup", INT, 1, setter=RW),
    Field("actions_after_shutdown", default="destroy", setter=RW, choices=ACTIONS_SHUTDOWN),
    Field("actions_after_reboot", default="restart", setter=RW, choices=ACTIONS_SHUTDOWN),
    Field("actions_after_crash", default="restart", setter=RW, choices=ACTIONS_CRASH),
    Field("VBDs", SET, reverse=("VBD", "VM")), Field("is_control_domain", BOOL),
    Field("domid", INT, -1), Field("other_config", MAP, setter=RW),
    Field("tags", SET, setter=RW), Field("is_a_snapshot", BOOL), Field("snapshot_of", REF),
    Field("snapshots", SET, reverse=("VM", "snapshot_of")), Field("snapshot_time", DATETIME),
    Field("PV_kernel", setter=RW), Field("PV_ramdisk", setter=RW), Field("PV_args", setter=RW),
    Field("PV_bootloader", setter=RW), Field("PV_bootloader_args", setter=RW),
    Field("PV_legacy_args", setter=RW), Field("HVM_boot_policy", setter=RW),
    Field("HVM_boot_params", MAP, setter=RW), Field("platform", MAP, setter=RW),
    Field("xenstore_data", MAP, setter=RW), Field("blocked_operations", MAP, setter=RW),
    Field("domain_type", default="hvm", setter=RW, choices=DOMAIN_TYPES),
    Field("guest_metrics", REF),
    Field("run", MAP, hidden=True),     # the running domain's journal (domains.py)
], by_name_label=True, needs_drivers=True)

VM_guest_metrics = ApiClass("VM_guest_metrics", [
    Field("os_version", MAP), Field("PV_drivers_version", MAP),
    Field("PV_drivers_up_to_date", BOOL), Field("memory", MAP), Field("disks", MAP),
    Field("networks", MAP), Field("other", MAP), Field("last_updated", DATETIME),
    Field("other_config", MAP, setter=RW), Field("live", BOOL),
    Field("can_use_hotplug_vbd", default="unspecified"),
    Field("can_use_hotplug_vif", default="unspecified"), Field("PV_drivers_detected", BOOL),
])


@contextlib.contextmanager
def operation(ctx, vm, op):
    """Check op against XAPI's rules and show it in current_operations while it runs;
    the VM's lock is held for the check only (the body takes it when it needs it)."""
    with contextlib.ExitStack() as stack:
        with ctx.ts.lock("VM", vm):
            vm_lifecycle.check(ctx, vm, op)
            stack.enter_context(operations.running(ctx, ("VM", vm, op)))
        yield


@VM.method
def create(ctx, record):
    fields = record_fields("VM", record)
    for name in ("is_control_domain", "power_state", "domid", "resident_on", "run",
                 "guest_metrics", "is_a_snapshot", "snapshot_of"):
        fields.pop(name, None)
    return ctx.store.create("VM", fields)


@VM.method
def destroy(ctx, self):
    with ctx.ts.lock("VM", self):
        vm_lifecycle.check(ctx, self, "destroy")
        store = ctx.store
        with store.transaction():
            for ref, _ in store.find("VBD", VM=self):
                store.destroy("VBD", ref)
            gm = store.get("VM", self).get("guest_metrics")
            if gm and store.exists("VM_guest_metrics", gm):
                store.destroy("VM_guest_metrics", gm)
            store.destroy("VM", self)


@VM.method
def start(ctx, self, start_paused: BOOL = False, force: BOOL = False):
    paused = coerce(BOOL, start_paused, "start_paused")
    with operation(ctx, self, "start"), ctx.ts.lock("VM", self):
        domains.start(ctx, self, paused=paused)


@VM.method
def clean_shutdown(ctx, self):
    with operation(ctx, self, "clean_shutdown"):
        domains.clean_stop(ctx, self, domains.HALT, CLEAN_SHUTDOWN_TIMEOUT)


@VM.method
def hard_shutdown(ctx, self):
    with operation(ctx, self, "hard_shutdown"):
        domains.hard_stop(ctx, self, domains.HALT)


@VM.method
def shutdown(ctx, self):
    """As XAPI: a clean shutdown, and a hard one if the guest does not comply."""
    try:
        clean_shutdown(ctx, self)
    except ApiError as e:
        if e.code not in (errors.VM_SHUTDOWN_TIMEOUT, errors.VM_LACKS_FEATURE,
                          errors.VM_BAD_POWER_STATE):
            raise
        hard_shutdown(ctx, self)


@VM.method
def clean_reboot(ctx, self):
    with operation(ctx, self, "clean_reboot"):
        domains.clean_stop(ctx, self, domains.REBOOT, CLEAN_SHUTDOWN_TIMEOUT)


@VM.method
def hard_reboot(ctx, self):
    with operation(ctx, self, "hard_reboot"):
        domains.hard_stop(ctx, self, domains.REBOOT)


@VM.method
def pause(ctx, self):
    with operation(ctx, self, "pause"), ctx.ts.lock("VM", self):
        domains.pause(ctx, self, True)


@VM.method
def unpause(ctx, self):
    with operation(ctx, self, "unpause"), ctx.ts.lock("VM", self):
        domains.pause(ctx, self, False)


@VM.method
def set_is_a_template(ctx, self, value: BOOL):
    """As XAPI: a snapshot stays one; only a Halted VM becomes a template."""
    value = coerce(BOOL, value, "value")
    with ctx.ts.lock("VM", self):
        rec = ctx.store.get("VM", self)
        if not value and rec["is_a_snapshot"]:
            raise ApiError(errors.VM_IS_SNAPSHOT, self, "make_into_template")
        if value and rec["power_state"] != HALTED:
            raise ApiError(errors.VM_BAD_POWER_STATE, self, HALTED, rec["power_state"])
        if rec["is_control_domain"]:
            raise ApiError(errors.OPERATION_NOT_ALLOWED, "Operations on domain 0 are not "
                           "allowed")
        changes = {"is_a_template": value}
        if not value:
            changes["is_default_template"] = False
        ctx.store.update("VM", self, changes)


# --- copies -----------------------------------------------------------------------------
# What a copy takes from its source (xapi_vm_clone.ml copy_vm_record).
COPIED = ("name_description", "user_version", "affinity", "memory_static_max",
          "memory_dynamic_max", "memory_dynamic_min", "memory_static_min", "VCPUs_max",
          "VCPUs_at_startup", "actions_after_shutdown", "actions_after_reboot",
          "actions_after_crash", "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader",
          "PV_bootloader_args", "PV_legacy_args", "HVM_boot_policy", "HVM_boot_params",
          "platform", "xenstore_data", "tags", "domain_type")
VBD_COPIED = ("userdevice", "bootable", "mode", "type", "unpluggable", "other_config",
              "qos_algorithm_type", "qos_algorithm_params")


def _value(value):
    return type(value)(value) if isinstance(value, (list, dict)) else value


def _copy_disks(ctx, vm, disk_op, sr):
    """[(VBD record, new VDI)]: each disk's VDI snapshotted, cloned or copied (a CD
    keeps its VDI); on a failure the new VDIs are destroyed again."""
    store = ctx.store
    made, out = [], []
    vbds = sorted((rec for _, rec in store.find("VBD", VM=vm)),
                  key=lambda r: domains.vbd_module.disk_number(r["userdevice"]))
    try:
        for vbd in vbds:
            vdi = vbd["VDI"]
            if vbd["empty"] or vdi in ("", NULL_REF):
                new = NULL_REF
            elif vbd["type"] == "CD":
                new = vdi
            else:
                if disk_op == "snapshot":
                    new = call(ctx, "VDI.snapshot", vdi, {})
                elif disk_op == "clone":
                    new = call(ctx, "VDI.clone", vdi, {})
                else:
                    new = call(ctx, "VDI.copy", vdi, sr or store.get("VDI", vdi)["SR"], "", "")
                made.append(new)
            out.append((vbd, new))
    except BaseException:
        for new in made:
            try:
                call(ctx, "VDI.destroy", new)
            except ApiError as e:
                log.warning("destroying %s after a failed %s: %s", new, disk_op, e)
        raise
    return out


def _copy_vm(ctx, vm, new_name, disk_op, sr=None):
    store = ctx.store
    with operation(ctx, vm, disk_op):
        src = store.get("VM", vm)
        disks = _copy_disks(ctx, vm, disk_op, sr)
        snapshot = disk_op == "snapshot"
        other = dict((k, v) for k, v in src["other_config"].items() if k != "default_template")
        if src["is_a_template"] and "base_template_name" not in other:
            other["base_template_name"] = src["name_label"]
        fields = dict((k, _value(src[k])) for k in COPIED if k in src)
        fields.update(name_label=new_name, other_config=other, is_a_snapshot=snapshot,
                      is_a_template=snapshot or src["is_a_template"],
                      snapshot_of=vm if snapshot else NULL_REF,
                      snapshot_time=now() if snapshot else EPOCH)
        with store.transaction():
            new = store.create("VM", fields)
            for vbd, vdi in disks:
                rec = dict((k, _value(vbd[k])) for k in VBD_COPIED)
                rec.update(VM=new, VDI=vdi, empty=vdi == NULL_REF, currently_attached=False)
                store.create("VBD", rec)
    return new


@VM.method
def snapshot(ctx, self, new_name: STRING):
    return _copy_vm(ctx, self, new_name, "snapshot")


@VM.method
def clone(ctx, self, new_name: STRING):
    return _copy_vm(ctx, self, new_name, "clone")


@VM.method
def copy(ctx, self, new_name: STRING, sr: REF = ""):
    return _copy_vm(ctx, self, new_name, "copy", sr if sr not in ("", NULL_REF) else None)


@VM.method
def provision(ctx, self):
    """A template's disks as other-config:disks describes them: the built-in template
    has none, so there is nothing to make."""
    with operation(ctx, self, "provision"):
        pass
