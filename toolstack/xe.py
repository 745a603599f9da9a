"""xe: XAPI's command line for the local toolstack, through the real XenAPI client.

    xe <command> [key=value ...] [map:key=value ...] [--minimal]

Output and errors as XAPI's CLI prints them; any error exits non-zero.
"""
import socket
import sys

import XenAPI

from smtap import settings, units
from smtap.toolstack import client
from smtap.toolstack.cli_records import (PREFIXES, Lookup, fields_of, format_record, render,
                                         text, CLASSES as CLI_CLASSES)

COMMANDS = {}
MAP_PARAMS = ("device-config", "sm-config", "driver-params", "args", "other-config")


class CliError(Exception):
    pass


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
                raise CliError("Syntax error: expected key=value, got '%s'" % arg)
            prefix, colon, mkey = key.partition(":")
            if colon and prefix in MAP_PARAMS:
                self.maps.setdefault(prefix, {})[mkey] = value
            else:
                self.values[key] = value

    def get(self, name, default=None):
        return self.values.get(name, default)

    def need(self, name):
        if name not in self.values:
            raise CliError("Required parameter not found: %s" % name)
        return self.values[name]

    def map(self, name):
        return dict(self.maps.get(name, {}))

    def flag(self, name, default=False):
        value = self.values.get(name)
        if value is None:
            return default
        try:
            return units.parse_bool(value, name, units.XE_BOOL)
        except ValueError:
            raise CliError("Failed to parse parameter '%s': expecting 'true' or 'false'" % name)

    def size(self, name, required=True):
        value = self.need(name) if required else self.values.get(name, "0")
        try:
            return str(units.parse_size(value, name, minimum=0))
        except ValueError:
            raise CliError("Failed to parse parameter '%s': expecting an integer "
                           "(possibly with suffix)" % name)


def command(name):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def by_uuid(x, cls, uuid):
    return getattr(x, cls).get_by_uuid(uuid)


def this_host(x, args):
    """host-uuid=, or the pool master (this host)."""
    uuid = args.get("host-uuid")
    return by_uuid(x, "host", uuid) if uuid else x.pool.get_master(x.pool.get_all()[0])


# --- generic list / param commands ------------------------------------------------------
def list_command(cls):
    def run(x, args, out):
        look = Lookup(x)
        records = look.records(cls)
        wanted = args.get("params")
        all_names = [f[0] for f in fields_of(cls)]
        if wanted == "all":
            names = all_names
        elif wanted:
            names = [n.strip() for n in wanted.split(",") if n.strip()]
            unknown = [n for n in names if n not in all_names]
            if unknown:
                raise CliError("Unknown field '%s'" % unknown[0])
        else:
            names = CLI_CLASSES[cls]["default"]
        filters = {k: v for k, v in args.values.items() if k != "params"}
        for k in filters:
            if k not in all_names:
                raise CliError("Unknown field '%s'" % k)
        rows = []
        for rec in records.values():
            full = {n: t for n, _, t, _ in render(cls, rec, look)}
            if all(full[k] == v for k, v in filters.items()):
                rows.append(render(cls, rec, look, names))
        print_table(rows, "minimal" in args.flags, out)
    return run


def print_table(rows, minimal, out):
    if minimal:
        out.write(",".join(r[0][2].replace("\\", "\\\\").replace(",", "\\,")
                           for r in rows if r) + "\n")
        return
    for r in rows:
        out.write(format_record(r) + "\n\n")


def param_list_command(cls):
    def run(x, args, out):
        ref = by_uuid(x, cls, args.need("uuid"))
        look = Lookup(x)
        out.write(format_record(render(cls, look.records(cls)[ref], look)) + "\n\n")
    return run


def param_get_command(cls):
    def run(x, args, out):
        name = args.need("param-name")
        ref = by_uuid(x, cls, args.need("uuid"))
        if name not in [f[0] for f in fields_of(cls)]:
            raise CliError("Unknown field '%s'" % name)
        look = Lookup(x)
        (_, _, shown, value), = render(cls, look.records(cls)[ref], look, [name])
        key = args.get("param-key")
        if key is not None:
            if not isinstance(value, dict) or key not in value:
                raise CliError("Key %s not found in map" % key)
            shown = text(value[key])
        out.write(shown + "\n")
    return run


for _prefix, _cls in PREFIXES.items():
    COMMANDS[_prefix + "-list"] = list_command(_cls)
    COMMANDS[_prefix + "-param-list"] = param_list_command(_cls)
    COMMANDS[_prefix + "-param-get"] = param_get_command(_cls)


def uuid_of(x, cls, ref, out):
    out.write(getattr(x, cls).get_uuid(ref) + "\n")


# --- SR ---------------------------------------------------------------------------------
@command("sr-create")
def sr_create(x, args, out):
    name, sr_type = args.need("name-label"), args.need("type")
    sr = x.SR.create(this_host(x, args), args.map("device-config"),
                     args.size("physical-size", required=False), name,
                     args.get("name-description", ""), sr_type, args.get("content-type", ""),
                     args.flag("shared"), args.map("sm-config"))
    uuid_of(x, "SR", sr, out)


@command("sr-introduce")
def sr_introduce(x, args, out):
    sr = x.SR.introduce(args.need("uuid"), args.need("name-label"),
                        args.get("name-description", ""), args.need("type"),
                        args.get("content-type", ""), args.flag("shared"), args.map("sm-config"))
    uuid_of(x, "SR", sr, out)


@command("sr-probe")
def sr_probe(x, args, out):
    out.write(x.SR.probe(this_host(x, args), args.map("device-config"), args.need("type"),
                         args.map("sm-config")) + "\n")


def sr_action(method):
    def run(x, args, out):
        getattr(x.SR, method)(by_uuid(x, "SR", args.need("uuid")))
    return run


for _name in ("scan", "destroy", "forget"):
    COMMANDS["sr-" + _name] = sr_action(_name)


# --- PBD --------------------------------------------------------------------------------
@command("pbd-create")
def pbd_create(x, args, out):
    pbd = x.PBD.create({"host": by_uuid(x, "host", args.need("host-uuid")),
                        "SR": by_uuid(x, "SR", args.need("sr-uuid")),
                        "device_config": args.map("device-config"), "other_config": {}})
    uuid_of(x, "PBD", pbd, out)


def simple_action(cls, method):
    def run(x, args, out):
        getattr(getattr(x, cls), method)(by_uuid(x, cls, args.need("uuid")))
    return run


for _cls, _methods in (("PBD", ("plug", "unplug", "destroy")),
                       ("VBD", ("plug", "destroy")), ("VDI", ("destroy", "forget"))):
    for _m in _methods:
        COMMANDS["%s-%s" % (_cls.lower(), _m)] = simple_action(_cls, _m)


# --- VDI --------------------------------------------------------------------------------
@command("vdi-create")
def vdi_create(x, args, out):
    size, sr_uuid, label = args.size("virtual-size"), args.need("sr-uuid"), args.need("name-label")
    vdi = x.VDI.create({
        "name_label": label, "name_description": args.get("name-description", ""),
        "SR": by_uuid(x, "SR", sr_uuid), "virtual_size": size,
        "type": args.get("type", "user"), "sharable": args.flag("sharable"),
        "read_only": args.flag("read-only"), "other_config": {}, "xenstore_data": {},
        "sm_config": args.map("sm-config"), "tags": []})
    uuid_of(x, "VDI", vdi, out)


@command("vdi-snapshot")
def vdi_snapshot(x, args, out):
    vdi = by_uuid(x, "VDI", args.need("uuid"))
    uuid_of(x, "VDI", x.VDI.snapshot(vdi, args.map("driver-params")), out)


@command("vdi-clone")
def vdi_clone(x, args, out):
    new = x.VDI.clone(by_uuid(x, "VDI", args.need("uuid")), args.map("driver-params"))
    if args.get("new-name-label") is not None:
        x.VDI.set_name_label(new, args.get("new-name-label"))
    if args.get("new-name-description") is not None:
        x.VDI.set_name_description(new, args.get("new-name-description"))
    uuid_of(x, "VDI", new, out)


@command("vdi-resize")
def vdi_resize(x, args, out):
    x.VDI.resize(by_uuid(x, "VDI", args.need("uuid")), args.size("disk-size"))


# --- VBD --------------------------------------------------------------------------------
@command("vbd-create")
def vbd_create(x, args, out):
    vdi_uuid = args.get("vdi-uuid")
    vbd = x.VBD.create({
        "VM": by_uuid(x, "VM", args.need("vm-uuid")),
        "VDI": by_uuid(x, "VDI", vdi_uuid) if vdi_uuid else "OpaqueRef:NULL",
        "userdevice": args.need("device"), "bootable": args.flag("bootable"),
        "mode": args.get("mode", "RW"), "type": args.get("type", "Disk"),
        "unpluggable": args.flag("unpluggable", True), "empty": not vdi_uuid,
        "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    uuid_of(x, "VBD", vbd, out)


@command("vbd-unplug")
def vbd_unplug(x, args, out):
    """As XAPI's CLI: force=true is VBD.unplug_force."""
    vbd = by_uuid(x, "VBD", args.need("uuid"))
    (x.VBD.unplug_force if args.flag("force") else x.VBD.unplug)(vbd)


# --- host -------------------------------------------------------------------------------
@command("host-call-plugin")
def host_call_plugin(x, args, out):
    result = x.host.call_plugin(by_uuid(x, "host", args.need("host-uuid")),
                                args.need("plugin"), args.need("fn"), args.map("args"))
    out.write(str(result) + "\n")


@command("help")
def help_(x, args, out):
    out.write("Commands:\n" + "".join("  %s\n" % c for c in sorted(COMMANDS)))


def print_failure(details, err):
    """As XAPI's CLI: the error code, then its parameters."""
    details = list(details) or ["INTERNAL_ERROR"]
    err.write("Error code: %s\n" % details[0])
    err.write("Error parameters: %s\n" % ", ".join(str(d) for d in details[1:]))


def main(argv=None, out=None, err=None):
    argv = sys.argv[1:] if argv is None else argv
    out, err = out or sys.stdout, err or sys.stderr
    if not argv:
        err.write("Usage: xe <command> [key=value ...] [--minimal]\nFor usage run: 'xe help'\n")
        return 1
    name = argv[0]
    fn = COMMANDS.get(name)
    if fn is None:
        err.write("Unknown command: %s\nFor usage run: 'xe help'\n" % name)
        return 1
    try:
        args = Args(argv[1:])
        if name == "help":
            fn(None, args, out)
            return 0
        session = client.login(settings.xapi_socket(), originator="xe")
    except CliError as e:
        err.write("%s\n" % e)
        return 1
    except (OSError, socket.error) as e:
        err.write("Error: cannot connect to the toolstack at %s: %s\n"
                  % (settings.xapi_socket(), e))
        return 1
    try:
        fn(session.xenapi, args, out)
        return 0
    except CliError as e:
        err.write("%s\n" % e)
        return 1
    except XenAPI.Failure as e:
        print_failure(e.details, err)
        return 1
    finally:
        try:
            session.xenapi.session.logout()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
