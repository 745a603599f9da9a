"""allowed_operations and current_operations of SRs, VDIs and VBDs, as XAPI fills them
(xapi_sr_operations.ml, xapi_vdi.ml, xapi_vbd_helpers.ml): what is allowed follows the
driver's capabilities and the object's state, and nothing is while an operation runs;
an operation runs under a task, recorded as {task: operation} while it lasts.

allowed_operations is computed whenever a record is read, so it cannot go stale.
"""
import contextlib

from smtap.toolstack import objects
from smtap.toolstack.objects import now

SR_OPS = ("scan", "destroy", "forget", "plug", "unplug", "update", "vdi_create",
          "vdi_introduce", "vdi_destroy", "vdi_resize", "vdi_clone", "vdi_snapshot",
          "vdi_mirror", "vdi_enable_cbt", "vdi_disable_cbt", "vdi_data_destroy",
          "vdi_list_changed_blocks", "vdi_set_on_boot", "pbd_create", "pbd_destroy")
# The capability an operation needs (vdi_clone needs none: XAPI copies when it must).
SR_CAPS = {"vdi_create": "VDI_CREATE", "vdi_destroy": "VDI_DELETE", "vdi_resize": "VDI_RESIZE",
           "vdi_introduce": "VDI_INTRODUCE", "update": "SR_UPDATE",
           "vdi_snapshot": "VDI_SNAPSHOT", "vdi_mirror": "VDI_MIRROR",
           "vdi_enable_cbt": "VDI_CONFIG_CBT", "vdi_disable_cbt": "VDI_CONFIG_CBT",
           "vdi_data_destroy": "VDI_CONFIG_CBT", "vdi_list_changed_blocks": "VDI_CONFIG_CBT",
           "vdi_set_on_boot": "VDI_RESET_ON_BOOT"}

VDI_OPS = ("clone", "copy", "resize", "resize_online", "snapshot", "mirror", "destroy",
           "forget", "update", "generate_config", "enable_cbt", "disable_cbt",
           "data_destroy", "list_changed_blocks", "set_on_boot")
VDI_CAPS = {"resize": "VDI_RESIZE", "resize_online": "VDI_RESIZE_ONLINE",
            "snapshot": "VDI_SNAPSHOT", "mirror": "VDI_MIRROR", "destroy": "VDI_DELETE",
            "update": "VDI_UPDATE", "generate_config": "VDI_GENERATE_CONFIG",
            "enable_cbt": "VDI_CONFIG_CBT", "disable_cbt": "VDI_CONFIG_CBT",
            "data_destroy": "VDI_CONFIG_CBT", "list_changed_blocks": "VDI_CONFIG_CBT",
            "set_on_boot": "VDI_RESET_ON_BOOT"}
# What a VDI a VBD has attached may not do.
VDI_NOT_WHILE_ATTACHED = ("destroy", "forget", "resize", "data_destroy")


def capabilities(store, sr_ref):
    """The capability names of the SR's driver (without /N feature versions)."""
    sr = store.db.get("SR", sr_ref)
    found = store.find("SM", type=sr["type"]) if sr else []
    return set(c.split("/")[0] for c in found[0][1].get("capabilities", [])) if found else set()


def sr_allowed(store, ref, rec):
    if rec.get("current_operations"):
        return []
    caps = capabilities(store, ref)
    ops = [op for op in SR_OPS if op not in SR_CAPS or SR_CAPS[op] in caps]
    pbds = store.find("PBD", SR=ref)
    forbidden = set()
    if any(p["currently_attached"] for _, p in pbds):
        forbidden |= {"destroy", "forget"}
    if not pbds:
        forbidden.add("destroy")
    if store.find("VDI", SR=ref):
        forbidden.add("destroy")
    return [op for op in ops if op not in forbidden]


def vdi_allowed(store, ref, rec):
    if rec.get("current_operations") or not rec.get("managed", True):
        return []
    caps = capabilities(store, rec.get("SR"))
    ops = [op for op in VDI_OPS if op not in VDI_CAPS or VDI_CAPS[op] in caps]
    if any(v["currently_attached"] for _, v in store.find("VBD", VDI=ref)):
        ops = [op for op in ops if op not in VDI_NOT_WHILE_ATTACHED]
    return ops


def vbd_allowed(store, ref, rec):
    if rec.get("current_operations"):
        return []
    vm = store.db.get("VM", rec.get("VM"))
    if vm and vm.get("power_state") not in ("Running", None):
        return ["attach"] + (["pause", "unpause"] if vm["power_state"] == "Paused" else [])
    if rec.get("currently_attached"):
        return ["unplug", "unplug_force", "pause", "unpause"]
    return ["attach", "plug"]


objects.COMPUTED.update({("SR", "allowed_operations"): sr_allowed,
                         ("VDI", "allowed_operations"): vdi_allowed,
                         ("VBD", "allowed_operations"): vbd_allowed})


@contextlib.contextmanager
def running(ctx, *objects):
    """Run an operation under a task: each (class, ref, operation) shows it in its
    current_operations while it lasts."""
    store = ctx.store
    label = "%s.%s" % (objects[0][0], objects[0][2])
    task = store.create("task", {"name_label": label, "created": now(), "status": "pending",
                                 "resident_on": ctx.ts.host})
    marked = []
    try:
        for cls, ref, op in objects:
            with store.transaction():
                if store.exists(cls, ref):
                    ops = dict(store.get(cls, ref).get("current_operations") or {})
                    ops[task] = op
                    store.update(cls, ref, {"current_operations": ops})
                    marked.append((cls, ref))
        yield task
    finally:
        for cls, ref in marked:
            with store.transaction():
                if store.exists(cls, ref):
                    ops = dict(store.get(cls, ref).get("current_operations") or {})
                    ops.pop(task, None)
                    store.update(cls, ref, {"current_operations": ops})
        store.destroy("task", task)
