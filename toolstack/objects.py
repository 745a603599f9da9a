"""The generic XenAPI object model.

A class is a declaration: its fields (type, default, whether and by whom settable) plus
its special methods. From the declaration come XAPI's generic messages: get_record,
get_all, get_all_records, get_all_records_where, get_by_uuid, get_by_name_label,
get_<field>, set_<field>, add_to_<map>/remove_from_<map>, add_<set>/remove_<set>.
Records live in the Store (SQLite) with XAPI's field names; reverse references
(SR.VDIs, VDI.VBDs, ...) are computed when a record is read.
"""
import inspect
import logging
import re
import time
import uuid as uuidlib
import xmlrpc.client

from smtap import units
from smtap.toolstack import dbfilter, errors
from smtap.toolstack.errors import ApiError, NULL_REF

log = logging.getLogger("smtap.xapi.objects")

STRING, INT, FLOAT, BOOL, REF, SET, MAP, DATETIME, RECORD = (
    "string", "int", "float", "bool", "ref", "set", "map", "datetime", "record")
EPOCH = "19700101T00:00:00Z"
DEFAULTS = {STRING: "", INT: 0, FLOAT: 0.0, BOOL: False, REF: NULL_REF, SET: [], MAP: {},
            DATETIME: EPOCH}

# Who may call a field's setters.
RW = "rw"        # any session
SM_ONLY = "sm"   # only the SM session of the object's SR (drivers reporting state)

CLASSES = {}
# (class, field) -> fn(store, ref, record): fields computed when read (operations.py)
COMPUTED = {}


def new_ref():
    return "OpaqueRef:" + str(uuidlib.uuid4())


class Field(object):
    def __init__(self, name, kind=STRING, default=None, setter=None, reverse=None, hidden=False,
                 choices=None):
        self.name = name
        self.choices = choices   # an enum: the values it may take
        self.kind = kind
        self.default = DEFAULTS[kind] if default is None else default
        self.setter = setter
        self.reverse = reverse   # (class, field): refs of that class pointing at this object
        self.hidden = hidden     # internal bookkeeping, never on the wire

    def coerce(self, value):
        """A wire value (int64 as a string, bool, DateTime...) as stored."""
        value = coerce(self.kind, value, self.name)
        if self.choices and value not in self.choices:
            raise ApiError(errors.FIELD_TYPE_ERROR, self.name)     # as XAPI's enums
        return value


def coerce(kind, value, name):
    """A wire value checked against its declared kind, as XAPI's server unmarshals it:
    FIELD_TYPE_ERROR(name) when it is not one. Strings are held to what XML can carry."""
    try:
        if kind in (STRING, REF):
            if not isinstance(value, str):      # an <int>, a <base64>, a struct...
                raise TypeError(name)
            return xml_text(value, name)
        if kind == INT:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError(name)
            number = int(value)
            if not -2 ** 63 <= number < 2 ** 63:
                raise ValueError(name)
            return number
        if kind == FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(name)
            return float(value)
        if kind == BOOL:
            if isinstance(value, bool):
                return value
            if not isinstance(value, str):
                raise ValueError(name)
            return units.parse_bool(value, name, units.XAPI_BOOL)
        if kind == DATETIME:
            if isinstance(value, xmlrpc.client.DateTime):
                return value.value
            if not isinstance(value, str):
                raise TypeError(name)
            return xml_text(value, name)
        if kind == SET:
            if not isinstance(value, (list, tuple)):
                raise TypeError(name)
            return [coerce(STRING, v, name) for v in value]
        if kind == MAP:
            if not isinstance(value, dict):
                raise TypeError(name)
            return {coerce(STRING, k, name): _map_value(v, name) for k, v in value.items()}
        if kind == RECORD:
            if not isinstance(value, dict):
                raise TypeError(name)
            return value
        return value
    except (TypeError, ValueError, OverflowError):
        raise ApiError(errors.FIELD_TYPE_ERROR, name)


def _map_value(value, name):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return coerce(STRING, value, name)


# Characters XML 1.0 cannot carry (XAPI: Encodings.UTF8_XML).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value, name=""):
    """As XAPI's database (ensure_utf8_xml): a string is kept up to its first character
    XML cannot carry, so nothing stored can break a reply."""
    bad = _NOT_XML.search(value)
    if bad is None:
        return value
    log.warning("%s: truncated at a character XML cannot carry (U+%04X at %d)",
                name, ord(bad.group()), bad.start())
    return value[:bad.start()]


# The kind of each message parameter, by name (a function's annotation overrides it):
# every parameter of every message is declared, so each is checked before it is used.
PARAM_KINDS = {
    REF: ("self", "host", "host_ref", "sr", "vdi", "SR", "metadata_of_pool", "snapshot_of",
          "base_vdi", "into_vdi"),
    STRING: ("uname", "pwd", "version", "originator", "plugin", "fn", "name", "cls",
             "obj_uuid", "body", "uuid", "name_label", "name_description", "type",
             "content_type", "label", "description", "location", "expr", "key"),
    MAP: ("args", "device_config", "sm_config", "driver_params", "other_config",
          "xenstore_data"),
    INT: ("physical_size", "size", "virtual_size", "physical_utilisation", "priority"),
    BOOL: ("shared", "sharable", "read_only", "managed", "is_a_snapshot", "cbt_enabled"),
    DATETIME: ("snapshot_time",),
    RECORD: ("record",),
}
_KIND_OF = dict((name, kind) for kind, names in PARAM_KINDS.items() for name in names)


class Method(object):
    """A message: fn(ctx, *args). `session` False for the login calls. `kinds`: the
    parameters' kinds (default: annotations, then PARAM_KINDS by name)."""

    def __init__(self, fn, session=True, kinds=None):
        self.fn = fn
        self.session = session
        params = list(inspect.signature(fn).parameters.values())[1:]
        self.max_args = len(params)
        self.min_args = len([p for p in params if p.default is inspect.Parameter.empty])
        self.names = [p.name for p in params]
        if kinds is None:
            kinds = [p.annotation if p.annotation is not inspect.Parameter.empty
                     else _KIND_OF[p.name] for p in params]     # KeyError: undeclared
        self.kinds = list(kinds)

    def check(self, args):
        """FIELD_TYPE_ERROR(name) for the first argument that is not of its kind."""
        for name, kind, value in zip(self.names, self.kinds, args):
            if kind == MAP and value is None:
                continue               # optional maps may be sent as nil
            coerce(kind, value, name)


def _generic(fn):
    """A generic message: `self` is the object's ref, every other parameter a string."""
    names = list(inspect.signature(fn).parameters)[1:]
    return Method(fn, kinds=[REF if n == "self" else STRING for n in names])


class ApiClass(object):
    def __init__(self, name, fields, by_name_label=False, needs_drivers=False):
        self.name = name
        self.needs_drivers = needs_drivers   # wait for start-up discovery and resync
        self.fields = {f.name: f for f in [Field("uuid")] + fields}
        self.methods = {}
        self._add_generic_methods(by_name_label)
        CLASSES[name] = self

    def method(self, fn=None, name=None, session=True):
        """Decorator registering a special method, named after the function."""
        def register(f):
            self.methods[name or f.__name__] = Method(f, session)
            return f
        return register(fn) if fn else register

    def visible(self):
        return [f for f in self.fields.values() if not f.hidden]

    def columns(self):
        """{database column name: field} of the fields a filter may name."""
        return {DB_NAMES.get(f.name, f.name): f for f in self.visible()}

    def defaults(self):
        return {f.name: _copy(f.default) for f in self.fields.values() if not f.reverse}

    def _add_generic_methods(self, by_name_label):
        cls = self
        m = self.methods

        def get_record(ctx, self):
            return ctx.store.export(cls.name, self)
        m["get_record"] = _generic(get_record)
        m["get_all"] = _generic(lambda ctx: [ref for ref, _ in ctx.store.all(cls.name)])

        def get_all_records(ctx):
            return ctx.store.export_all(cls.name)
        m["get_all_records"] = _generic(get_all_records)

        def get_all_records_where(ctx, expr):
            return ctx.store.where(cls.name, expr)
        m["get_all_records_where"] = _generic(get_all_records_where)

        def get_by_uuid(ctx, uuid):
            return ctx.store.ref_of_uuid(cls.name, uuid)
        m["get_by_uuid"] = _generic(get_by_uuid)
        if by_name_label:
            def get_by_name_label(ctx, label):
                return [ref for ref, rec in ctx.store.all(cls.name) if rec["name_label"] == label]
            m["get_by_name_label"] = _generic(get_by_name_label)
        for field in self.visible():
            self._add_field_methods(field)

    def _add_field_methods(self, field):
        cls, name, m = self, field.name, self.methods

        def get(ctx, self):
            return ctx.store.export(cls.name, self)[name]
        m["get_" + name] = _generic(get)
        if not field.setter:
            return

        def modify(ctx, ref, change):
            with ctx.store.transaction():
                rec = ctx.store.get(cls.name, ref)
                if field.setter == SM_ONLY:
                    ctx.require_sm_session(cls.sr_of(ref, rec))
                ctx.store.update(cls.name, ref, {name: change(rec[name])})

        def set_(ctx, self, value):
            modify(ctx, self, lambda old: field.coerce(value))
        m["set_" + name] = Method(set_, kinds=[REF, field.kind])
        if field.kind == MAP:
            def add_to(ctx, self, key, value):
                def change(old):
                    if key in old:
                        raise ApiError(errors.MAP_DUPLICATE_KEY, cls.name, name, self, key)
                    return dict(old, **{str(key): str(value)})
                modify(ctx, self, change)

            def remove_from(ctx, self, key):
                modify(ctx, self, lambda old: {k: v for k, v in old.items() if k != key})
            m["add_to_" + name] = _generic(add_to)
            m["remove_from_" + name] = _generic(remove_from)
        elif field.kind == SET:
            def add(ctx, self, value):
                modify(ctx, self, lambda old: old if value in old else old + [str(value)])

            def remove(ctx, self, value):
                modify(ctx, self, lambda old: [v for v in old if v != value])
            m["add_" + name] = _generic(add)
            m["remove_" + name] = _generic(remove)

    def sr_of(self, ref, rec):
        """The SR whose SM session may use this class's SM-only setters."""
        return ref if self.name == "SR" else rec.get("SR", NULL_REF)


def _copy(value):
    return type(value)(value) if isinstance(value, (list, dict)) else value


def wire_value(field, value):
    if field.kind == INT:
        return str(value)
    if field.kind == DATETIME:
        return xmlrpc.client.DateTime(value)
    if field.kind == MAP:
        return {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in value.items()}
    return value


class Store(object):
    """Typed access to the records of the generic classes, over db.Database."""

    def __init__(self, db):
        self.db = db
        self.transaction = db.transaction

    def create(self, cls, fields=None, ref=None):
        """A new record: declared defaults, then `fields` (coerced). Returns its ref."""
        klass = CLASSES[cls]
        rec = klass.defaults()
        for name, value in (fields or {}).items():
            if name in klass.fields and not klass.fields[name].reverse:
                rec[name] = klass.fields[name].coerce(value)
        rec["uuid"] = rec["uuid"] or str(uuidlib.uuid4())
        ref = ref or new_ref()
        with self.transaction():
            if self.db.ref_of_uuid(cls, rec["uuid"]):
                raise ApiError(errors.INVALID_VALUE, "uuid", rec["uuid"])
            self.db.insert(cls, ref, rec)
        return ref

    def get(self, cls, ref):
        rec = self.db.get(cls, ref)
        if rec is None:
            raise ApiError(errors.HANDLE_INVALID, cls, ref)
        return rec

    def exists(self, cls, ref):
        return self.db.get(cls, ref) is not None

    def update(self, cls, ref, changes):
        with self.transaction():
            rec = self.get(cls, ref)
            rec.update(changes)
            self.db.update(cls, ref, rec)
        return rec

    def destroy(self, cls, ref):
        self.db.delete(cls, ref)

    def all(self, cls):
        return self.db.all(cls)

    def find(self, cls, **match):
        """[(ref, record)] whose fields equal every given value."""
        return [(ref, rec) for ref, rec in self.db.all(cls)
                if all(rec.get(k) == v for k, v in match.items())]

    def ref_of_uuid(self, cls, uuid):
        ref = self.db.ref_of_uuid(cls, str(uuid))
        if not ref:
            raise ApiError(errors.UUID_INVALID, cls, uuid)
        return ref

    def export(self, cls, ref):
        return self._export(cls, [(ref, self.get(cls, ref))])[ref]

    def export_all(self, cls):
        return self._export(cls, self.db.all(cls))

    def where(self, cls, expr):
        """The wire records whose row matches a get_all_records_where expression: a
        malformed one is INVALID_VALUE [expr, message], an unknown column
        INTERNAL_ERROR [missing field, name, ""] once a row is compared (as XAPI)."""
        try:
            tree = dbfilter.parse(xml_text(str(expr)))
        except dbfilter.FilterSyntaxError as e:
            raise ApiError(errors.INVALID_VALUE, expr, str(e))
        columns = CLASSES[cls].columns()
        reverse = {}

        def matches(ref, rec):
            def column(name):
                if name == "_ref":
                    return ref
                field = columns.get(name)
                if field is None:
                    raise ApiError(errors.INTERNAL_ERROR, "missing field", name, "")
                if (cls, field.name) in COMPUTED:
                    value = COMPUTED[cls, field.name](self, ref, rec)
                elif field.reverse:
                    if field.name not in reverse:
                        reverse[field.name] = self._reverse_index(field)
                    value = reverse[field.name].get(ref, [])
                else:
                    value = rec.get(field.name, field.default)
                return db_text(field, value)
            return dbfilter.evaluate(tree, column)
        return self._export(cls, [(ref, rec) for ref, rec in self.db.all(cls)
                                  if matches(ref, rec)])

    def _reverse_index(self, field):
        """{ref: [refs of the other class pointing at it]} for a reverse field."""
        other, pointer = field.reverse
        index = {}
        for oref, orec in self.db.all(other):
            index.setdefault(orec.get(pointer), []).append(oref)
        return index

    def _export(self, cls, rows):
        """Wire records ({ref: record}), reverse references filled in."""
        klass = CLASSES[cls]
        reverse = {f.name: self._reverse_index(f) for f in klass.visible() if f.reverse}
        out = {}
        for ref, rec in rows:
            wire = {}
            for f in klass.visible():
                if (cls, f.name) in COMPUTED:
                    value = COMPUTED[cls, f.name](self, ref, rec)
                elif f.reverse:
                    value = reverse[f.name].get(ref, [])
                else:
                    value = rec.get(f.name, f.default)
                wire[f.name] = wire_value(f, value)
            out[ref] = wire
        return out


def to_wire(value):
    """A method's result as XAPI sends it: int64 as strings, void as ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {xml_text(str(k)): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, str):
        return xml_text(value)        # a record stored before strings were checked
    return value


# --- get_all_records_where: columns as XAPI's database stores them -------------------
# Fields in a datamodel namespace are stored as <namespace>__<name> (name/label ->
# name__label): a filter names those columns, not the wire names.
DB_NAMES = dict((n.replace("__", "_"), n) for n in (
    "name__label", "name__description", "API_version__major", "API_version__minor",
    "API_version__vendor", "API_version__vendor_implementation", "memory__static_max",
    "memory__dynamic_max", "memory__dynamic_min", "memory__static_min", "VCPUs__max",
    "VCPUs__at_startup", "qos__algorithm_type", "qos__algorithm_params",
    "qos__supported_algorithms"))


def db_text(field, value):
    """A field's value as the database's text (what a filter compares)."""
    if field.kind == BOOL:
        return "true" if value else "false"
    if field.kind == FLOAT:
        return "%.16g" % value
    if field.kind == SET:
        return dbfilter.stored_set(value)
    if field.kind == MAP:
        return dbfilter.stored_map(value)
    return str(value)


def record_fields(cls, record, required=()):
    """The constructor fields of a create(record) call; missing required ones refused."""
    if not isinstance(record, dict):
        raise ApiError(errors.FIELD_TYPE_ERROR, "record")
    for name in required:
        if name not in record:
            raise ApiError(errors.FIELD_TYPE_ERROR, name)
    fields = CLASSES[cls].fields
    return {k: fields[k].coerce(v) for k, v in record.items()
            if k in fields and not fields[k].reverse and not fields[k].hidden and k != "uuid"}


def now():
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())


def call(ctx, name, *args):
    """Run another class's message in this context (no import cycles between classes)."""
    cls, method = name.split(".", 1)
    return CLASSES[cls].methods[method].fn(ctx, *args)
