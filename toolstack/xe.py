"""xe: XAPI's command line for the local toolstack, through the real XenAPI client.

    xe [-s server] [-p port] [-u user] [-pw password] [-pwf file] [--compat]
       <command> [key=value ...] [map:key=value ...] [--minimal]

Output and errors as XAPI's CLI prints them; any error exits non-zero. The global
options are accepted as xe takes them; the toolstack is always this root's own.
"""
import re
import socket
import sys

import XenAPI

from smtap import settings, units
from smtap.toolstack import client
from smtap.toolstack.cli_errors import USAGE, failure_lines, internal_error_lines
from smtap.toolstack.cli_params import (GENERIC, CliError, by_uuid, cli_bool, list_command,
                                         parse_enum)
from smtap.toolstack.cli_records import PREFIXES, format_table

COMMANDS = {}     # name -> Command
MAX_TIB = (2 ** 63 - 1) >> 40
# xe's global options: those with a value, those without; and the parameters xe
# itself consumes (XAPI filters them from every command's parameters).
GLOBAL_VALUE_OPTIONS = ("-s", "-p", "-u", "-pw", "-pwf", "-h")
GLOBAL_FLAGS = ("--compat", "--nossl", "--debug", "--debug-on-fail", "--traceback")
GLOBAL_PARAMS = ("server", "port", "username", "password", "passwordfile")


class Command(object):
    def __init__(self, name, fn, reqd=(), optn=(), help=""):
        self.name, self.fn, self.reqd, self.optn, self.help = name, fn, list(reqd), \
            list(optn), help


def command(name, reqd=(), optn=(), help=""):
    def register(fn):
        COMMANDS[name] = Command(name, fn, reqd, optn, help)
        return fn
    return register


class Args(object):
    """key=value parameters, map:key=value parameters and --flags."""

    def __init__(self, argv):
        self.values, self.maps, self.flags = {}, {}, set()
        for arg in argv:
            if arg.startswith("--"):
                self.flags.add(arg[2:])
                continue
            key, sep, value = arg.partition("=")
            if not sep or not key:
                raise CliError("Syntax error: expected key=value, got '%s'" % arg, usage=True)
            mapname, colon, mkey = key.partition(":")
            if colon:
                self.maps.setdefault(mapname, {})[mkey] = value
            else:
                self.values[key] = value

    def get(self, name, default=None):
        return self.values.get(name, default)

    def need(self, name):
        if name not in self.values:
            raise CliError("Required parameter not found: %s" % name, usage=True)
        return self.values[name]

    def map(self, name):
        return dict(self.maps.get(name, {}))

    def flag(self, name, default=False):
        value = self.values.get(name)
        return default if value is None else cli_bool(name, value)

    def enum(self, name, choices, default):
        value = self.values.get(name)
        return default if value is None else parse_enum(name, value, choices)

    def size(self, name, required=True):
        """A number and a unit (smtap.units); an int64, or refused with XAPI's words
        (Record_util.bytes_of_string)."""
        value = self.need(name) if required else self.values.get(name, "0")
        try:
            size = units.parse_size(value, name, minimum=0)
        except ValueError:
            raise CliError("Error: Failed to parse field '%s': expecting an integer (possibly "
                           "with suffix)" % name)
        if size >= 2 ** 63:
            raise CliError("Error: Failed to parse field '%s': number too big (maximum = %d "
                           "TiB)" % (name, MAX_TIB))
        return str(size)


def split_globals(argv):
    """(xe's global options, the rest); a global option without its value is refused."""
    options, rest = {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in GLOBAL_VALUE_OPTIONS:
            if i + 1 >= len(argv):
                raise CliError("Syntax error: %s needs a value" % arg, usage=True)
            options[arg] = argv[i + 1]
            i += 2
            continue
        if arg in GLOBAL_FLAGS:
            options[arg] = True
        elif arg.partition("=")[0] in GLOBAL_PARAMS and "=" in arg:
            options[arg.partition("=")[0]] = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return options, rest


def this_host(x, args):
    """host-uuid=, or the pool master (this host)."""
    uuid = args.get("host-uuid")
    return by_uuid(x, "host", uuid) if uuid else x.pool.get_master(x.pool.get_all()[0])


def uuid_of(x, cls, ref, out):
    out.write(getattr(x, cls).get_uuid(ref) + "\n")


for _prefix, _cls in PREFIXES.items():
    for _suffix, _factory, _reqd, _optn, _help in GENERIC:
        command("%s-%s" % (_prefix, _suffix), _reqd, _optn, _help % _cls)(_factory(_cls))


# --- SR ---------------------------------------------------------------------------------
@command("sr-create", ["name-label", "type"], ["host-uuid", "physical-size", "content-type",
                                               "shared", "device-config:", "sm-config:",
                                               "name-description"],
         "Create an SR, and its PBD on this host, and plug it.")
def sr_create(x, args, out):
    sr = x.SR.create(this_host(x, args), args.map("device-config"),
                     args.size("physical-size", required=False), args.need("name-label"),
                     args.get("name-description", ""), args.need("type"),
                     args.get("content-type", ""), args.flag("shared"), args.map("sm-config"))
    uuid_of(x, "SR", sr, out)


@command("sr-introduce", ["name-label", "type", "uuid"],
         ["content-type", "shared", "sm-config:", "name-description"],
         "Introduce an SR that exists on its storage (no PBD, nothing attached).")
def sr_introduce(x, args, out):
    sr = x.SR.introduce(args.need("uuid"), args.need("name-label"),
                        args.get("name-description", ""), args.need("type"),
                        args.get("content-type", ""), args.flag("shared"), args.map("sm-config"))
    uuid_of(x, "SR", sr, out)


@command("sr-probe", ["type"], ["host-uuid", "device-config:", "sm-config:"],
         "Ask the SR type's driver what it finds with this device-config.")
def sr_probe(x, args, out):
    out.write(x.SR.probe(this_host(x, args), args.map("device-config"), args.need("type"),
                         args.map("sm-config")) + "\n")


def object_action(cls, method):
    def run(x, args, out):
        getattr(getattr(x, cls), method)(by_uuid(x, cls, args.need("uuid")))
    return run


for _cls, _method, _help in (
        ("SR", "scan", "Scan the SR: the driver reconciles the VDI records with its storage."),
        ("SR", "update", "Refresh the SR's sizes from its driver (sr_update)."),
        ("SR", "destroy", "Destroy an unplugged SR and its storage (sr_delete)."),
        ("SR", "forget", "Forget an unplugged SR's records, leaving its storage."),
        ("PBD", "plug", "Attach the SR on the PBD's host (sr_attach)."),
        ("PBD", "unplug", "Detach the SR on the PBD's host (sr_detach). The contents of an "
                          "SR kept in memory (type ram) go with it."),
        ("PBD", "destroy", "Destroy an unplugged PBD."),
        ("VBD", "plug", "Attach the VDI to dom0 (vdi_attach, vdi_activate), or to a "
                        "running VM (hotplug through its qemu)."),
        ("VBD", "destroy", "Destroy an unplugged VBD."),
        ("VDI", "destroy", "Destroy a VDI and its data (vdi_delete)."),
        ("VDI", "forget", "Forget a VDI's record, leaving its data.")):
    command("%s-%s" % (_cls.lower(), _method), ["uuid"], [], _help)(object_action(_cls, _method))


@command("pbd-create", ["host-uuid", "sr-uuid"], ["device-config:"],
         "Connect an SR to a host (unplugged).")
def pbd_create(x, args, out):
    pbd = x.PBD.create({"host": by_uuid(x, "host", args.need("host-uuid")),
                        "SR": by_uuid(x, "SR", args.need("sr-uuid")),
                        "device_config": args.map("device-config"), "other_config": {}})
    uuid_of(x, "PBD", pbd, out)


@command("pbd-unplug", ["uuid"], [], "Detach the SR on the PBD's host (sr_detach). The "
         "contents of an SR kept in memory (type ram) go with it: xe warns.")
def pbd_unplug(x, args, out):
    pbd = by_uuid(x, "PBD", args.need("uuid"))
    sr = x.PBD.get_SR(pbd)
    if x.SR.get_type(sr) == "ram":
        sys.stderr.write("Warning: SR %s is of type ram: unplugging its PBD drops every VDI's "
                         "contents.\n" % x.SR.get_uuid(sr))
    x.PBD.unplug(pbd)


# --- VDI --------------------------------------------------------------------------------
VDI_TYPES = ("user", "system", "suspend", "crashdump", "ha_statefile", "metadata",
             "redo_log", "rrd", "pvs_cache", "cbt_metadata")


@command("vdi-create", ["sr-uuid", "name-label", "virtual-size"],
         ["type", "sharable", "read-only", "name-description", "sm-config:", "other-config:",
          "xenstore-data:", "tags:"], "Create a VDI (vdi_create).")
def vdi_create(x, args, out):
    size = args.size("virtual-size")        # the command line first, then the toolstack
    vdi = x.VDI.create({
        "name_label": args.need("name-label"), "name_description": args.get("name-description", ""),
        "SR": by_uuid(x, "SR", args.need("sr-uuid")), "virtual_size": size,
        "type": args.enum("type", VDI_TYPES, "user"), "sharable": args.flag("sharable"),
        "read_only": args.flag("read-only"), "other_config": args.map("other-config"),
        "xenstore_data": args.map("xenstore-data"), "sm_config": args.map("sm-config"),
        "tags": list(args.map("tags"))})
    uuid_of(x, "VDI", vdi, out)


@command("vdi-introduce", ["uuid", "sr-uuid", "type", "location"],
         ["name-label", "name-description", "sharable", "read-only", "other-config:",
          "xenstore-data:", "sm-config:", "managed", "virtual-size", "physical-utilisation",
          "metadata-of-pool", "is-a-snapshot", "snapshot-time", "snapshot-of"],
         "Introduce a VDI that exists on its SR's storage (vdi_introduce).")
def vdi_introduce(x, args, out):
    snapshot_of = args.get("snapshot-of")
    vdi = x.VDI.introduce(
        args.need("uuid"), args.get("name-label", ""), args.get("name-description", ""),
        by_uuid(x, "SR", args.need("sr-uuid")), args.enum("type", VDI_TYPES, "user"),
        args.flag("sharable"), args.flag("read-only"), args.map("other-config"),
        args.need("location"), args.map("xenstore-data"), args.map("sm-config"),
        args.flag("managed", True), args.size("virtual-size", required=False),
        args.size("physical-utilisation", required=False), "OpaqueRef:NULL",
        args.flag("is-a-snapshot"), args.get("snapshot-time", "19700101T00:00:00Z"),
        by_uuid(x, "VDI", snapshot_of) if snapshot_of else "OpaqueRef:NULL")
    uuid_of(x, "VDI", vdi, out)


@command("vdi-copy", ["uuid"], ["sr-uuid", "into-vdi-uuid", "base-vdi-uuid"],
         "Copy a VDI's data into a new VDI of an SR (or into an existing VDI).")
def vdi_copy(x, args, out):
    vdi = by_uuid(x, "VDI", args.need("uuid"))
    into = args.get("into-vdi-uuid")
    sr = args.get("sr-uuid")
    if not into and not sr:
        raise CliError("Required parameter not found: sr-uuid", usage=True)
    new = x.VDI.copy(vdi, by_uuid(x, "SR", sr) if sr else "OpaqueRef:NULL",
                     "OpaqueRef:NULL", by_uuid(x, "VDI", into) if into else "OpaqueRef:NULL")
    uuid_of(x, "VDI", new, out)


@command("vdi-snapshot", ["uuid"], ["driver-params:"], "Snapshot a VDI (vdi_snapshot).")
def vdi_snapshot(x, args, out):
    vdi = by_uuid(x, "VDI", args.need("uuid"))
    uuid_of(x, "VDI", x.VDI.snapshot(vdi, args.map("driver-params")), out)


@command("vdi-clone", ["uuid"], ["driver-params:", "new-name-label", "new-name-description"],
         "Clone a VDI (vdi_clone).")
def vdi_clone(x, args, out):
    new = x.VDI.clone(by_uuid(x, "VDI", args.need("uuid")), args.map("driver-params"))
    if args.get("new-name-label") is not None:
        x.VDI.set_name_label(new, args.get("new-name-label"))
    if args.get("new-name-description") is not None:
        x.VDI.set_name_description(new, args.get("new-name-description"))
    uuid_of(x, "VDI", new, out)


@command("vdi-resize", ["uuid", "disk-size"], [], "Resize a VDI (vdi_resize).")
def vdi_resize(x, args, out):
    x.VDI.resize(by_uuid(x, "VDI", args.need("uuid")), args.size("disk-size"))


# --- VBD --------------------------------------------------------------------------------
@command("vbd-create", ["vm-uuid", "device"], ["vdi-uuid", "bootable", "type", "mode",
                                               "unpluggable"],
         "Create a VBD (device: a disk number, or autodetect).")
def vbd_create(x, args, out):
    vdi_uuid = args.get("vdi-uuid")
    vbd = x.VBD.create({
        "VM": by_uuid(x, "VM", args.need("vm-uuid")),
        "VDI": by_uuid(x, "VDI", vdi_uuid) if vdi_uuid else "OpaqueRef:NULL",
        "userdevice": args.need("device"), "bootable": args.flag("bootable"),
        "mode": args.enum("mode", ("RO", "RW"), "RW"),
        "type": args.enum("type", ("Disk", "CD", "Floppy"), "Disk"),
        "unpluggable": args.flag("unpluggable", True), "empty": not vdi_uuid,
        "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    uuid_of(x, "VBD", vbd, out)


@command("vbd-unplug", ["uuid"], ["force"],
         "Detach the VBD (vdi_deactivate, vdi_detach); force=true: even if its device is "
         "still open.")
def vbd_unplug(x, args, out):
    """As XAPI's CLI: force=true is VBD.unplug_force."""
    vbd = by_uuid(x, "VBD", args.need("uuid"))
    (x.VBD.unplug_force if args.flag("force") else x.VBD.unplug)(vbd)


# --- VM -----------------------------------------------------------------------------------
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def force(args):
    """--force, or force=true (xe turns one into the other)."""
    return "force" in args.flags or args.flag("force")


def named_vm(x, name, what="VM"):
    """A VM by uuid or by name-label (which must name exactly one)."""
    if UUID_RE.match(name):
        return by_uuid(x, "VM", name)
    found = x.VM.get_by_name_label(name)
    if len(found) != 1:
        raise CliError("%s '%s': %s" % (what, name, "no such VM" if not found else
                                        "%d VMs have that name: use its uuid" % len(found)))
    return found[0]


def the_vm(x, args):
    """uuid=, or vm= (a name-label or uuid)."""
    if args.get("uuid"):
        return by_uuid(x, "VM", args.get("uuid"))
    if args.get("vm"):
        return named_vm(x, args.get("vm"))
    raise CliError("Required parameter not found: uuid (or vm)", usage=True)


def filtered_list(defaults):
    """vm-list and its kin: XAPI's CLI shows templates and snapshots in their own lists."""
    generic = list_command("VM")

    def run(x, args, out):
        for key, value in defaults.items():
            args.values.setdefault(key, value)
        generic(x, args, out)
    return run


for _name, _defaults, _help in (
        ("vm-list", {"is-a-template": "false", "is-a-snapshot": "false"},
         "List the VMs (not templates nor snapshots; <field>=<value> filters, params=)."),
        ("template-list", {"is-a-template": "true", "is-a-snapshot": "false"},
         "List the templates (vm-install makes VMs of them)."),
        ("snapshot-list", {"is-a-snapshot": "true"}, "List the VM snapshots.")):
    command(_name, [], ["params", "<field>=<value>"], _help)(filtered_list(_defaults))

VM_SELECT = ["uuid", "vm"]


@command("vm-install", ["new-name-label"], ["template", "template-uuid", "sr-uuid"],
         "Make a VM of a template (template: its name-label or uuid).")
def vm_install(x, args, out):
    name = args.get("template-uuid") or args.get("template")
    if not name:
        raise CliError("Required parameter not found: template", usage=True)
    template = named_vm(x, name, "template")
    vm = x.VM.clone(template, args.need("new-name-label"))
    x.VM.provision(vm)
    x.VM.set_is_a_template(vm, False)
    uuid_of(x, "VM", vm, out)


def vm_action(method, flagged=None):
    """A lifecycle command: method, or flagged with --force."""
    def run(x, args, out):
        vm = the_vm(x, args)
        getattr(x.VM, flagged if flagged and force(args) else method)(vm)
    return run


for _name, _method, _flagged, _help in (
        ("vm-shutdown", "clean_shutdown", "hard_shutdown", "Shut a VM down: its guest is "
         "asked (the ACPI power button); --force: qemu is stopped at once."),
        ("vm-reboot", "clean_reboot", "hard_reboot", "Reboot a VM: its guest is asked (its "
         "agent); --force: qemu is stopped and the VM started again."),
        ("vm-pause", "pause", None, "Pause a running VM."),
        ("vm-unpause", "unpause", None, "Unpause a paused VM."),
        ("vm-destroy", "destroy", None, "Destroy a halted VM's record and its VBDs, leaving "
         "its VDIs."),
        ("snapshot-destroy", "destroy", None, "Destroy a snapshot's record, leaving its "
         "VDIs.")):
    command(_name, [], VM_SELECT + (["force"] if _flagged else []), _help)(
        vm_action(_method, _flagged))


@command("vm-start", [], VM_SELECT + ["paused", "force"],
         "Start a VM: its VBDs plugged (vdi_attach, vdi_activate), its qemu started.")
def vm_start(x, args, out):
    x.VM.start(the_vm(x, args), args.flag("paused"), force(args))


def uninstall(x, args, out):
    """The VM (or snapshot) and the VDIs of its disks (not CDs)."""
    vm = the_vm(x, args)
    vdis = []
    for vbd in x.VM.get_VBDs(vm):
        rec = x.VBD.get_record(vbd)
        if not rec["empty"] and rec["type"] == "Disk":
            vdis.append(rec["VDI"])
    if not force(args):
        sys.stderr.write("About to uninstall %s and destroy %d VDI(s). Type 'yes' to "
                         "continue\n" % (x.VM.get_uuid(vm), len(vdis)))
        if sys.stdin.readline().strip() != "yes":
            raise CliError("Aborted: nothing was destroyed (--force skips the question)")
    x.VM.destroy(vm)
    for vdi in vdis:
        x.VDI.destroy(vdi)


command("vm-uninstall", [], VM_SELECT + ["force"], "Destroy a halted VM and the VDIs of "
        "its disks.")(uninstall)
command("snapshot-uninstall", [], VM_SELECT + ["force"], "Destroy a snapshot and the VDIs "
        "of its disks.")(uninstall)


def vm_copy_command(method, with_sr=False):
    def run(x, args, out):
        vm = the_vm(x, args)
        name = args.need("new-name-label")
        if method == "copy":
            sr = args.get("sr-uuid")
            new = x.VM.copy(vm, name, by_uuid(x, "SR", sr) if sr else "OpaqueRef:NULL")
        else:
            new = getattr(x.VM, method)(vm, name)
        if args.get("new-name-description") is not None:
            x.VM.set_name_description(new, args.get("new-name-description"))
        uuid_of(x, "VM", new, out)
    return run


for _name, _method, _help in (
        ("vm-snapshot", "snapshot", "Snapshot a VM, running or not: each disk's VDI "
         "snapshotted by its SR driver (vdi_snapshot); prints the snapshot's uuid."),
        ("vm-clone", "clone", "Clone a halted VM: each disk's VDI cloned (vdi_clone)."),
        ("vm-copy", "copy", "Copy a halted VM: each disk's data copied into a new VDI "
         "(of sr-uuid, or of the VDI's own SR)."),
        ("snapshot-clone", "clone", "Make a template of a snapshot: each disk's VDI cloned."),
        ("snapshot-copy", "copy", "Make a template of a snapshot: each disk's data copied.")):
    command(_name, ["new-name-label"], VM_SELECT + ["new-name-description"] +
            (["sr-uuid"] if _method == "copy" else []), _help)(vm_copy_command(_method))


# --- host -------------------------------------------------------------------------------
@command("host-call-plugin", ["host-uuid", "plugin", "fn"], ["args:"],
         "Run a host plugin's function (/etc/xapi.d/plugins).")
def host_call_plugin(x, args, out):
    result = x.host.call_plugin(by_uuid(x, "host", args.need("host-uuid")),
                                args.need("plugin"), args.need("fn"), args.map("args"))
    out.write(str(result) + "\n")


@command("help", [], ["<command>"], "Show a command's parameters, or the list of commands.")
def help_(x, names, out):
    """As XAPI's cmd_help: a table per named command (the argv words, not key=value)."""
    names = [n for n in names if not n.startswith("-")]
    if not names:
        out.write("Usage: xe [-s server] [-p port] [-u user] [-pw password] <command> "
                  "[key=value ...]\n\nTo get help on a specific command: xe help <command>\n"
                  "\nCommands:\n" + "".join("  %s\n" % c for c in sorted(COMMANDS)))
        return
    for name in names:
        spec = COMMANDS.get(name)
        if spec is None:
            out.write("Unknown command '%s'\n" % name)
            continue
        out.write(format_table([("command name        ", spec.name),
                                ("reqd params     ", ", ".join(spec.reqd)),
                                ("optional params ", ", ".join(spec.optn)),
                                ("description     ", spec.help)]) + "\n")


def main(argv=None, out=None, err=None):
    argv = sys.argv[1:] if argv is None else argv
    out, err = out or sys.stdout, err or sys.stderr
    try:
        options, argv = split_globals(list(argv))
    except CliError as e:
        err.write("%s\n%s\n" % (e, USAGE))
        return 1
    if not argv:
        err.write("Usage: xe <command> [key=value ...] [--minimal]\n%s\n" % USAGE)
        return 1
    name, rest = argv[0], argv[1:]
    spec = COMMANDS.get(name)
    if spec is None:
        err.write("Unknown command: %s\n%s\n" % (name, USAGE))
        return 1
    session = None
    try:
        if name == "help":
            spec.fn(None, rest, out)
            return 0
        args = Args(rest)
        for key in spec.reqd:
            args.need(key)
        session = client.session(settings.xapi_socket())
        session.xenapi.login_with_password(options.get("-u", options.get("username", "root")),
                                           options.get("-pw", options.get("password", "")),
                                           "1.0", "xe")
        spec.fn(session.xenapi, args, out)
        return 0
    except CliError as e:
        err.write("%s\n" % e)
        if e.usage:
            err.write(USAGE + "\n")
    except XenAPI.Failure as e:
        xenapi = session.xenapi if session is not None and session._session else None
        err.write("".join(line + "\n" for line in failure_lines(e.details, xenapi)))
    except (OSError, socket.error) as e:
        if session is not None and session._session:
            err.write("".join(line + "\n" for line in internal_error_lines(e)))
        else:
            err.write("Error: cannot connect to the toolstack at %s: %s\n"
                      % (settings.xapi_socket(), e))
    except Exception as e:          # a protocol error, a bug: never a Python traceback
        err.write("".join(line + "\n" for line in internal_error_lines(e)))
    finally:
        if session is not None and session._session:
            try:
                session.xenapi.session.logout()
            except Exception:
                pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
