"""xe's generic commands of every class: <class>-list, -param-list, -param-get,
-param-set, -param-add, -param-remove, -param-clear, as XAPI's CLI runs them on the
fields cli_records declares: RW fields are set, MRW maps and SRW sets are edited."""
from smtap import units
from smtap.toolstack.cli_records import (Lookup, fields_of, format_record, render, text,
                                         CLASSES as CLI_CLASSES)


class CliError(Exception):
    """A refused command line: xe prints the message (and exits 1)."""

    def __init__(self, message, usage=False):
        Exception.__init__(self, message)
        self.usage = usage      # XAPI's param_error: followed by "For usage run: ..."


# RW fields that are not strings (xe parses them; enum names in any case, as XAPI).
BOOL_FIELDS = ("shared", "allow-caching", "bootable", "unpluggable", "is-a-template")
INT_FIELDS = ("user-version", "VCPUs-max", "VCPUs-at-startup")
SIZE_FIELDS = ("memory-static-max", "memory-dynamic-max", "memory-dynamic-min",
               "memory-static-min")
ENUMS = {"on-boot": ("persist", "reset"), "mode": ("RO", "RW"), "type": ("Disk", "CD", "Floppy"),
         "actions-after-shutdown": ("destroy", "restart"),
         "actions-after-reboot": ("destroy", "restart"),
         "actions-after-crash": ("destroy", "coredump_and_destroy", "restart",
                                 "coredump_and_restart", "preserve", "rename_restart"),
         "domain-type": ("hvm", "pv", "pv_in_pvh", "pvh", "unspecified")}


def cli_bool(name, value):
    try:
        return units.parse_bool(value, name, units.XE_BOOL)
    except ValueError:
        raise CliError("Failed to parse parameter '%s': expecting 'true' or 'false'" % name)


def parse_enum(name, value, choices):
    for choice in choices:
        if choice.lower() == value.lower():
            return choice
    raise CliError("Error: Failed to parse parameter '%s': expecting one of %s"
                   % (name, ", ".join(choices)))


def field(cls, name):
    """(cli name, source, qualifier) of a field; an unknown one is refused."""
    for f in fields_of(cls):
        if f[0] == name:
            return f
    raise CliError("Unknown field '%s'" % name)


def setter_value(name, value):
    if name in BOOL_FIELDS:
        return cli_bool(name, value)
    if name in INT_FIELDS:
        try:
            return str(int(value))
        except ValueError:
            raise CliError("Error: Failed to parse parameter '%s': expecting an integer"
                           % name)
    if name in SIZE_FIELDS:
        try:
            return str(units.parse_size(value, name, minimum=0))
        except ValueError:
            raise CliError("Error: Failed to parse field '%s': expecting an integer (possibly "
                           "with suffix)" % name)
    if name in ENUMS:
        return parse_enum(name, value, ENUMS[name])
    return value


def writable(cls, name, kinds):
    """The XenAPI field behind a CLI field that may be written this way."""
    _, source, qual = field(cls, name)
    if callable(source) or qual not in kinds:
        raise CliError("Error: Parameter '%s' is read-only" % name if qual[-2:] != "RW"
                       else "Error: Parameter '%s' cannot be changed this way" % name)
    return source


def api(x, cls):
    return getattr(x, cls)


def by_uuid(x, cls, uuid):
    return api(x, cls).get_by_uuid(uuid)


def list_command(cls):
    def run(x, args, out):
        look = Lookup(x)
        records = look.records(cls)
        wanted = args.get("params")
        all_names = [f[0] for f in fields_of(cls)]
        if wanted == "all" or "all" in args.flags:
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
        field(cls, name)
        look = Lookup(x)
        (_, _, shown, value), = render(cls, look.records(cls)[ref], look, [name])
        key = args.get("param-key")
        if key is not None:
            if not isinstance(value, dict) or key not in value:
                raise CliError("Key %s not found in map" % key)
            shown = text(value[key])
        out.write(shown + "\n")
    return run


def param_set_command(cls):
    """<name>=<value> for RW fields, <map>:<key>=<value> for entries of MRW maps."""
    def run(x, args, out):
        ref = by_uuid(x, cls, args.need("uuid"))
        calls = []
        for name, value in args.values.items():
            if name == "uuid":
                continue
            source = writable(cls, name, ("RW",))
            calls.append((getattr(api(x, cls), "set_" + source),
                          (ref, setter_value(name, value))))
        for name, entries in args.maps.items():
            source = writable(cls, name, ("MRW",))
            for key, value in entries.items():
                calls.append((getattr(api(x, cls), "remove_from_" + source), (ref, key)))
                calls.append((getattr(api(x, cls), "add_to_" + source), (ref, key, value)))
        if not calls:
            raise CliError("Required parameter not found: a parameter to set", usage=True)
        for fn, call_args in calls:
            fn(*call_args)
    return run


def named_field(x, cls, args, kinds):
    """(ref, cli name, XenAPI field, qualifier, the class's API) of the uuid= object's
    param-name= field; refused unless the field is of one of these kinds."""
    ref = by_uuid(x, cls, args.need("uuid"))
    name = args.need("param-name")
    _, source, qual = field(cls, name)
    writable(cls, name, kinds)
    return ref, name, source, qual, api(x, cls)


def param_add_command(cls):
    """param-name=<map> <key>=<value>..., or param-name=<set> param-key=<value>."""
    def run(x, args, out):
        ref, _, source, qual, calls = named_field(x, cls, args, ("MRW", "SRW"))
        if qual == "SRW":
            getattr(calls, "add_" + source)(ref, args.need("param-key"))
            return
        for key, value in args.values.items():
            if key not in ("uuid", "param-name"):
                getattr(calls, "add_to_" + source)(ref, key, value)
    return run


def param_remove_command(cls):
    def run(x, args, out):
        ref, _, source, qual, calls = named_field(x, cls, args, ("MRW", "SRW"))
        prefix = "remove_" if qual == "SRW" else "remove_from_"
        getattr(calls, prefix + source)(ref, args.need("param-key"))
    return run


def param_clear_command(cls):
    """A map or set emptied, a string field set to ""."""
    def run(x, args, out):
        ref, name, source, qual, calls = named_field(x, cls, args, ("RW", "MRW", "SRW"))
        if qual == "RW" and (name in BOOL_FIELDS or name in INT_FIELDS or name in ENUMS
                             or name in SIZE_FIELDS):
            raise CliError("Error: Parameter '%s' cannot be cleared" % name)
        getattr(calls, "set_" + source)(ref, {"MRW": {}, "SRW": []}.get(qual, ""))
    return run


# (suffix, factory, required, optional, help)
GENERIC = (
    ("list", list_command, [], ["params", "<field>=<value>"], "List the %s objects, "
     "those whose fields have the given values (params=all: every field)."),
    ("param-list", param_list_command, ["uuid"], [], "Show every field of a %s."),
    ("param-get", param_get_command, ["uuid", "param-name"], ["param-key"],
     "Show one field of a %s (param-key: one key of a map)."),
    ("param-set", param_set_command, ["uuid"], ["<field>=<value>", "<map>:<key>=<value>"],
     "Set writable fields of a %s, and entries of its writable maps."),
    ("param-add", param_add_command, ["uuid", "param-name"],
     ["<key>=<value>", "param-key"], "Add to a writable map (key=value pairs) or set "
     "(param-key) of a %s."),
    ("param-remove", param_remove_command, ["uuid", "param-name", "param-key"], [],
     "Remove a key from a writable map, or a value from a writable set, of a %s."),
    ("param-clear", param_clear_command, ["uuid", "param-name"], [],
     "Empty a writable map or set, or a writable string field, of a %s."),
)
