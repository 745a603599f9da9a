"""pool and host: this one host (its dom0 is a VM: vm.py), and host plugins."""
import os
import socket
import xml.parsers.expat
import xmlrpc.client

from smtap import settings
from smtap.toolstack import errors, smapi
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import (ApiClass, Field, BOOL, DATETIME, FLOAT, INT, MAP, REF,
                                     SET, RW, now)

# What a license allows, as XAPI reports it in pool.restrictions (Features.to_assoc_list):
# XCP-ng restricts nothing. Upstream blktap2 reads restrict_read_caching in vdi_attach.
RESTRICTIONS = dict(("restrict_" + name, "false") for name in (
    "vswitch_controller", "lab", "stage", "storagelink", "storagelink_site_recovery",
    "web_selfservice", "web_selfservice_manager", "hotfix_apply", "export_resource_data",
    "read_caching", "cifs", "health_check", "xcm", "vm_memory_introspection",
    "batch_hotfix_apply", "management_on_vlan", "ws_proxy", "vlan", "qos",
    "pool_attached_storage", "netapp", "equalogic", "pooling", "xen_motion", "dmc", "rbac",
    "ad", "nested_virt", "live_patching", "set_vcpus_number_live", "pvs_proxy",
    "igmp_snooping", "rpu", "pool_size", "cbt", "usb_passthrough", "network_sriov",
    "corosync", "zstd_export", "pool_secret_rotation", "certificate_verification",
    "updates", "internal_repo_access", "vtpm"))

pool = ApiClass("pool", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("master", REF), Field("default_SR", REF, setter=RW),
    Field("suspend_image_SR", REF, setter=RW), Field("crash_dump_SR", REF, setter=RW),
    Field("other_config", MAP, setter=RW), Field("tags", SET, setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("ha_enabled", BOOL), Field("ha_configuration", MAP), Field("ha_statefiles", SET),
    Field("blobs", MAP), Field("gui_config", MAP, setter=RW), Field("wlb_enabled", BOOL),
    Field("redo_log_enabled", BOOL), Field("redo_log_vdi", REF),
    Field("restrictions", MAP, default=RESTRICTIONS), Field("metadata_VDIs", SET),
    Field("cpu_info", MAP),
])

host = ApiClass("host", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("API_version_major", INT, 2), Field("API_version_minor", INT, 21),
    Field("API_version_vendor", default="XenSource"),
    Field("API_version_vendor_implementation", MAP),
    Field("enabled", BOOL, True), Field("software_version", MAP),
    Field("other_config", MAP, setter=RW), Field("capabilities", SET),
    Field("cpu_configuration", MAP), Field("sched_policy", default="credit"),
    Field("supported_bootloaders", SET), Field("resident_VMs", SET, reverse=("VM", "resident_on")),
    Field("logging", MAP, setter=RW), Field("PIFs", SET),
    Field("suspend_image_sr", REF, setter=RW), Field("crash_dump_sr", REF, setter=RW),
    Field("PBDs", SET, reverse=("PBD", "host")), Field("host_CPUs", SET),
    Field("hostname"), Field("address"), Field("metrics", REF),
    Field("control_domain", REF), Field("tags", SET, setter=RW),
    Field("iscsi_iqn"), Field("multipathing", BOOL), Field("edition", default="xcp-ng"),
    Field("license_params", MAP), Field("memory_overhead", INT),
], by_name_label=True)

host_metrics = ApiClass("host_metrics", [
    Field("memory_total", INT), Field("memory_free", INT), Field("live", BOOL, True),
    Field("last_updated", DATETIME), Field("other_config", MAP, setter=RW),
])

def bootstrap(ts, host_uuid, dom0_uuid):
    """This host, its dom0 and the pool: found by the inventory's uuids or created."""
    store = ts.store
    name = socket.gethostname()
    with store.transaction():
        found = store.db.ref_of_uuid("host", host_uuid)
        iqn = "iqn.2024-01.org.xcp-ng:%s" % host_uuid[:8]
        ts.host = found or store.create("host", {
            "uuid": host_uuid, "name_label": name, "hostname": name, "address": "127.0.0.1",
            "software_version": {"product_brand": "smtap", "platform_name": "XCP"},
            "API_version_vendor_implementation": {}, "iscsi_iqn": iqn,
            # what upstream sm reads there (SR._mpathinit, BaseISCSI)
            "other_config": {"iscsi_iqn": iqn, "multipathing": "false",
                             "multipathhandle": "dmp"}})
        if not store.exists("host_metrics", store.get("host", ts.host)["metrics"]):
            total = _memory_total()
            metrics = store.create("host_metrics", {
                "memory_total": total, "memory_free": total, "live": True,
                "last_updated": now()})
            store.update("host", ts.host, {"metrics": metrics})
        found = store.db.ref_of_uuid("VM", dom0_uuid)
        ts.dom0 = found or store.create("VM", {
            "uuid": dom0_uuid, "name_label": "Control domain on host: %s" % name,
            "power_state": "Running", "is_control_domain": True, "resident_on": ts.host,
            "domid": 0, "domain_type": "pv"})
        store.update("host", ts.host, {"control_domain": ts.dom0})
        pools = store.all("pool")
        ts.pool = pools[0][0] if pools else store.create("pool", {"master": ts.host})


def _memory_total():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


@host.method
def call_plugin(ctx, host_ref, plugin, fn, args):
    """Run a plugin as XAPI does: argv[1] = methodCall(fn, [session, args])."""
    ctx.store.get("host", host_ref)
    path = os.path.join(settings.plugins_dir(), os.path.basename(str(plugin)))
    if not plugin or plugin != os.path.basename(plugin) or not os.access(path, os.X_OK):
        raise ApiError(errors.XENAPI_MISSING_PLUGIN, plugin)
    if not isinstance(args, dict):
        raise ApiError(errors.FIELD_TYPE_ERROR, "args")
    rc, out, err = smapi.run(path, smapi.method_call(fn, [ctx.session_ref, args]))
    try:
        (result,), _ = xmlrpc.client.loads(out)
    except (xmlrpc.client.Fault, xml.parsers.expat.ExpatError, ValueError) as e:
        raise ApiError(errors.XENAPI_PLUGIN_FAILURE, "unparsable response (exit %d)" % rc,
                       str(e), out + err)
    if not isinstance(result, dict) or "Status" not in result:
        raise ApiError(errors.XENAPI_PLUGIN_FAILURE, "missing Status", out, err)
    if result["Status"] == "Success":
        return result.get("Value", "")
    raise ApiError(*(result.get("ErrorDescription") or [errors.XENAPI_PLUGIN_FAILURE]))
