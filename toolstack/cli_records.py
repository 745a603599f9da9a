"""How `xe` shows each class: XAPI CLI field names, qualifiers and default list fields.

A field is (cli name, source, qualifier): the source is a XenAPI field name or a
function (record, lookup) -> value; references show as the other object's uuid.
"""
import xmlrpc.client

NULL_REF = "OpaqueRef:NULL"
NOT_IN_DB = "<not in database>"


class Lookup(object):
    """Other objects' records, fetched once per class per command."""

    def __init__(self, xenapi):
        self.xenapi = xenapi
        self.cache = {}

    def records(self, cls):
        if cls not in self.cache:
            self.cache[cls] = getattr(self.xenapi, cls).get_all_records()
        return self.cache[cls]

    def field(self, cls, ref, name):
        rec = self.records(cls).get(ref)
        return rec[name] if rec else NOT_IN_DB


def ref_uuid(cls, name):
    return lambda rec, look: look.field(cls, rec[name], "uuid")


def ref_label(cls, name):
    return lambda rec, look: look.field(cls, rec[name], "name_label")


def set_uuids(cls, name):
    return lambda rec, look: [look.field(cls, r, "uuid") for r in rec[name]]


def guest_metrics(name):
    """A field of the VM's guest metrics (what its agent reported), empty without."""
    def get(rec, look):
        gm = look.records("VM_guest_metrics").get(rec["guest_metrics"])
        if gm is None:
            return {} if name == "os_version" else "false"
        return gm[name]
    return get


def sr_host(rec, look):
    if rec["shared"]:
        return "<shared>"
    pbds = rec["PBDs"]
    if not pbds:
        return NOT_IN_DB
    host = look.field("PBD", pbds[0], "host")
    return look.field("host", host, "name_label")


def text(value):
    """A value as the CLI prints it: maps "k: v; ...", sets "a; b", bools lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "; ".join("%s: %s" % (k, text(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(text(v) for v in value)
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    return str(value)


NAME = [("uuid", "uuid", "RO"), ("name-label", "name_label", "RW"),
        ("name-description", "name_description", "RW")]
OPS = [("allowed-operations", "allowed_operations", "SRO"),
       ("current-operations", "current_operations", "SRO")]

CLASSES = {
    "SR": {
        "fields": NAME + [("host", sr_host, "RO")] + OPS + [
            ("VDIs", set_uuids("VDI", "VDIs"), "SRO"), ("PBDs", set_uuids("PBD", "PBDs"), "SRO"),
            ("virtual-allocation", "virtual_allocation", "RO"),
            ("physical-utilisation", "physical_utilisation", "RO"),
            ("physical-size", "physical_size", "RO"), ("type", "type", "RO"),
            ("content-type", "content_type", "RO"), ("shared", "shared", "RW"),
            ("introduced-by", "introduced_by", "RO"),
            ("is-tools-sr", "is_tools_sr", "RO"), ("other-config", "other_config", "MRW"),
            ("sm-config", "sm_config", "MRO"), ("blobs", "blobs", "RO"),
            ("local-cache-enabled", "local_cache_enabled", "RO"), ("tags", "tags", "SRW"),
            ("clustered", "clustered", "RO")],
        "default": ["uuid", "name-label", "name-description", "host", "type", "content-type"],
    },
    "PBD": {
        "fields": [("uuid", "uuid", "RO"), ("host", ref_uuid("host", "host"), "RO"),
                   ("host-uuid", ref_uuid("host", "host"), "RO"),
                   ("host-name-label", ref_label("host", "host"), "RO"),
                   ("sr-uuid", ref_uuid("SR", "SR"), "RO"),
                   ("sr-name-label", ref_label("SR", "SR"), "RO"),
                   ("device-config", "device_config", "MRO"),
                   ("currently-attached", "currently_attached", "RO"),
                   ("other-config", "other_config", "MRW")],
        "default": ["uuid", "host-uuid", "sr-uuid", "device-config", "currently-attached"],
    },
    "VDI": {
        "fields": NAME + [
            ("is-a-snapshot", "is_a_snapshot", "RO"),
            ("snapshot-of", ref_uuid("VDI", "snapshot_of"), "RO"),
            ("snapshots", set_uuids("VDI", "snapshots"), "SRO"),
            ("snapshot-time", "snapshot_time", "RO")] + OPS + [
            ("sr-uuid", ref_uuid("SR", "SR"), "RO"), ("sr-name-label", ref_label("SR", "SR"), "RO"),
            ("vbd-uuids", set_uuids("VBD", "VBDs"), "SRO"),
            ("crashdump-uuids", "crash_dumps", "SRO"),
            ("virtual-size", "virtual_size", "RO"),
            ("physical-utilisation", "physical_utilisation", "RO"),
            ("location", "location", "RO"), ("type", "type", "RO"),
            ("sharable", "sharable", "RO"), ("read-only", "read_only", "RO"),
            ("storage-lock", "storage_lock", "RO"), ("managed", "managed", "RO"),
            ("parent", ref_uuid("VDI", "parent"), "RO"), ("missing", "missing", "RO"),
            ("is-tools-iso", "is_tools_iso", "RO"), ("other-config", "other_config", "MRW"),
            ("xenstore-data", "xenstore_data", "MRO"), ("sm-config", "sm_config", "MRO"),
            ("on-boot", "on_boot", "RW"), ("allow-caching", "allow_caching", "RW"),
            ("metadata-latest", "metadata_latest", "RO"),
            ("metadata-of-pool", "metadata_of_pool", "RO"), ("tags", "tags", "SRW"),
            ("cbt-enabled", "cbt_enabled", "RO")],
        "default": ["uuid", "name-label", "name-description", "sr-uuid", "virtual-size",
                    "sharable", "read-only"],
    },
    "VBD": {
        "fields": [("uuid", "uuid", "RO"), ("vm-uuid", ref_uuid("VM", "VM"), "RO"),
                   ("vm-name-label", ref_label("VM", "VM"), "RO"),
                   ("vdi-uuid", ref_uuid("VDI", "VDI"), "RO"),
                   ("vdi-name-label", ref_label("VDI", "VDI"), "RO")] + OPS + [
                   ("empty", "empty", "RO"), ("device", "device", "RO"),
                   ("userdevice", "userdevice", "RW"), ("bootable", "bootable", "RW"),
                   ("mode", "mode", "RW"), ("type", "type", "RW"),
                   ("unpluggable", "unpluggable", "RW"),
                   ("currently-attached", "currently_attached", "RO"),
                   ("storage-lock", "storage_lock", "RO"), ("status-code", "status_code", "RO"),
                   ("status-detail", "status_detail", "RO"),
                   ("qos_algorithm_type", "qos_algorithm_type", "RW"),
                   ("qos_algorithm_params", "qos_algorithm_params", "MRW"),
                   ("qos_supported_algorithms", "qos_supported_algorithms", "SRO"),
                   ("other-config", "other_config", "MRW")],
        "default": ["uuid", "vm-uuid", "vm-name-label", "vdi-uuid", "empty", "device"],
    },
    "SM": {
        "fields": [("uuid", "uuid", "RO"), ("name-label", "name_label", "RO"),
                   ("name-description", "name_description", "RO"), ("type", "type", "RO"),
                   ("vendor", "vendor", "RO"), ("copyright", "copyright", "RO"),
                   ("required-api-version", "required_api_version", "RO"),
                   ("capabilities", "capabilities", "SRO"), ("features", "features", "MRO"),
                   ("configuration", "configuration", "MRO"),
                   ("driver-filename", "driver_filename", "RO"),
                   ("required-cluster-stack", "required_cluster_stack", "SRO"),
                   ("supported-image-formats", "supported_image_formats", "SRO")],
        "default": ["uuid", "name-label", "type", "vendor", "copyright",
                    "required-api-version"],
    },
    "host": {
        "fields": NAME + OPS + [
            ("enabled", "enabled", "RO"), ("API-version-major", "API_version_major", "RO"),
            ("API-version-minor", "API_version_minor", "RO"),
            ("API-version-vendor", "API_version_vendor", "RO"),
            ("logging", "logging", "MRW"), ("software-version", "software_version", "MRO"),
            ("capabilities", "capabilities", "SRO"), ("other-config", "other_config", "MRW"),
            ("hostname", "hostname", "RO"), ("address", "address", "RO"),
            ("resident-vms", set_uuids("VM", "resident_VMs"), "SRO"),
            ("control-domain-uuid", ref_uuid("VM", "control_domain"), "RO"),
            ("tags", "tags", "SRW")],
        "default": ["uuid", "name-label", "name-description"],
    },
    "pool": {
        "fields": NAME + [
            ("master", ref_uuid("host", "master"), "RO"),
            ("default-SR", ref_uuid("SR", "default_SR"), "RO"),
            ("ha-enabled", "ha_enabled", "RO"), ("other-config", "other_config", "MRW"),
            ("restrictions", "restrictions", "MRO"), ("tags", "tags", "SRW")],
        "default": ["uuid", "name-label", "name-description", "master", "default-SR"],
    },
    "VM": {
        "fields": NAME + [
            ("user-version", "user_version", "RW"), ("is-a-template", "is_a_template", "RW"),
            ("is-default-template", "is_default_template", "RO"),
            ("is-a-snapshot", "is_a_snapshot", "RO"),
            ("snapshot-of", ref_uuid("VM", "snapshot_of"), "RO"),
            ("snapshots", set_uuids("VM", "snapshots"), "SRO"),
            ("snapshot-time", "snapshot_time", "RO")] + OPS + [
            ("is-control-domain", "is_control_domain", "RO"),
            ("power-state", lambda rec, look: rec["power_state"].lower(), "RO"),
            ("resident-on", ref_uuid("host", "resident_on"), "RO"),
            ("dom-id", "domid", "RO"), ("domain-type", "domain_type", "RW"),
            ("memory-static-max", "memory_static_max", "RW"),
            ("memory-dynamic-max", "memory_dynamic_max", "RW"),
            ("memory-dynamic-min", "memory_dynamic_min", "RW"),
            ("memory-static-min", "memory_static_min", "RW"),
            ("VCPUs-max", "VCPUs_max", "RW"), ("VCPUs-at-startup", "VCPUs_at_startup", "RW"),
            ("actions-after-shutdown", "actions_after_shutdown", "RW"),
            ("actions-after-reboot", "actions_after_reboot", "RW"),
            ("actions-after-crash", "actions_after_crash", "RW"),
            ("PV-kernel", "PV_kernel", "RW"), ("PV-ramdisk", "PV_ramdisk", "RW"),
            ("PV-args", "PV_args", "RW"), ("platform", "platform", "MRW"),
            ("xenstore-data", "xenstore_data", "MRW"),
            ("blocked-operations", "blocked_operations", "MRW"),
            ("os-version", guest_metrics("os_version"), "MRO"),
            ("PV-drivers-detected", guest_metrics("PV_drivers_detected"), "RO"),
            ("other-config", "other_config", "MRW"), ("tags", "tags", "SRW")],
        "default": ["uuid", "name-label", "power-state"],
    },
}

# The CLI's class prefixes (sr-list, vm-list, ...).
PREFIXES = {"sr": "SR", "pbd": "PBD", "vdi": "VDI", "vbd": "VBD", "sm": "SM", "host": "host",
            "vm": "VM", "template": "VM", "snapshot": "VM", "pool": "pool"}


def fields_of(cls):
    return CLASSES[cls]["fields"]


def render(cls, rec, look, names=None):
    """[(cli name, qualifier, text)] of one record: `names` in that order, or all."""
    fields = {f[0]: f for f in fields_of(cls)}
    out = []
    for name in names or [f[0] for f in fields_of(cls)]:
        _, source, qual = fields[name]
        value = source(rec, look) if callable(source) else rec.get(source, "")
        if value == NULL_REF:
            value = NOT_IN_DB
        out.append((name, qual, text(value), value))
    return out


def format_record(rows):
    """XAPI's multi-line record: first key padded right, others right-aligned."""
    return format_table([("%s (%3s)" % (name, qual), shown) for name, qual, shown, _ in rows])


def format_table(pairs):
    """XAPI's CLI table (Cli_printer.PTable): keys aligned on the widest + 4, the first
    padded on the right, the others on the left."""
    width = 4 + max(len(k) for k, _ in pairs)
    lines = [(k.ljust(width) if i == 0 else k.rjust(width)) + ": " + v
             for i, (k, v) in enumerate(pairs)]
    return "\n".join(lines) + "\n"
