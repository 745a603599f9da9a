"""pool, host and VM: this one host, its dom0, and host plugins."""
import os
import socket
import xml.parsers.expat
import xmlrpc.client

from smtap import settings
from smtap.toolstack import errors, smapi
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import ApiClass, Field, BOOL, INT, MAP, REF, SET, RW

pool = ApiClass("pool", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("master", REF), Field("default_SR", REF, setter=RW),
    Field("suspend_image_SR", REF, setter=RW), Field("crash_dump_SR", REF, setter=RW),
    Field("other_config", MAP, setter=RW), Field("tags", SET, setter=RW),
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
], by_name_label=True)

VM = ApiClass("VM", [
    Field("name_label", setter=RW), Field("name_description", setter=RW),
    Field("allowed_operations", SET), Field("current_operations", MAP),
    Field("power_state", default="Halted"), Field("user_version", INT, 1),
    Field("is_a_template", BOOL), Field("is_default_template", BOOL),
    Field("resident_on", REF), Field("affinity", REF, setter=RW),
    Field("memory_static_max", INT), Field("memory_dynamic_max", INT),
    Field("memory_dynamic_min", INT), Field("memory_static_min", INT),
    Field("VCPUs_max", INT, 1), Field("VCPUs_at_startup", INT, 1),
    Field("VBDs", SET, reverse=("VBD", "VM")), Field("is_control_domain", BOOL),
    Field("domid", INT, -1), Field("other_config", MAP, setter=RW),
    Field("tags", SET, setter=RW), Field("is_a_snapshot", BOOL), Field("snapshot_of", REF),
], by_name_label=True)


def bootstrap(ts, host_uuid, dom0_uuid):
    """This host, its dom0 and the pool: found by the inventory's uuids or created."""
    store = ts.store
    name = socket.gethostname()
    with store.transaction():
        found = store.db.ref_of_uuid("host", host_uuid)
        ts.host = found or store.create("host", {
            "uuid": host_uuid, "name_label": name, "hostname": name, "address": "127.0.0.1",
            "software_version": {"product_brand": "smtap", "platform_name": "XCP"},
            "API_version_vendor_implementation": {}})
        found = store.db.ref_of_uuid("VM", dom0_uuid)
        ts.dom0 = found or store.create("VM", {
            "uuid": dom0_uuid, "name_label": "Control domain on host: %s" % name,
            "power_state": "Running", "is_control_domain": True, "resident_on": ts.host,
            "domid": 0})
        store.update("host", ts.host, {"control_domain": ts.dom0})
        pools = store.all("pool")
        ts.pool = pools[0][0] if pools else store.create("pool", {"master": ts.host})


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
