"""Arguments are checked as XAPI's server unmarshals them: a wrongly typed argument is
FIELD_TYPE_ERROR(name), an unknown ref HANDLE_INVALID, a wrong count
MESSAGE_PARAMETER_COUNT_MISMATCH; never INTERNAL_ERROR. Strings are held to what XML
can carry, so no accepted value breaks a later reply (XAPI keeps a string up to its
first character XML cannot carry; a <base64> is not a string).

Failed before: ~30% of wrongly typed calls answered INTERNAL_ERROR, and
VDI.set_name_label(b"\\x00") was stored and broke every listing, across restarts."""
import json
import os
import sqlite3
import xmlrpc.client

import pytest

from smtap import settings
from smtap.toolstack import classes  # noqa: F401  (registers every class)
from smtap.toolstack.objects import CLASSES
from lib.toolstack import failure, new_sr, new_vdi, raw_post

WRONG = [12345, True, 3.5, {"k": "v"}, ["x"], b"\x00bytes", xmlrpc.client.DateTime(0), None]
BAD_BYTES = [bytes([c]) for c in range(32) if c not in (9, 10, 13)]


def envelope(method, *params):
    body = xmlrpc.client.dumps(params, method, allow_none=True)
    (result,), _ = xmlrpc.client.loads(raw_post(body.encode()))
    return result


def test_every_method_with_wrongly_typed_arguments(xapi):
    session = xapi._session if hasattr(xapi, "_session") else None
    session = envelope("session.login_with_password", "root", "", "1.0", "t")["Value"]
    seen = {}
    calls = 0
    for cls_name, klass in sorted(CLASSES.items()):
        for name, m in sorted(klass.methods.items()):
            method = "%s.%s" % (cls_name, name)
            if name in ("logout", "local_logout"):
                continue
            lead = [session] if m.session else []
            n = m.max_args
            argsets = [["OpaqueRef:nothing"] * i + [w] + ["OpaqueRef:nothing"] * (n - i - 1)
                       for i in range(n) for w in WRONG]
            argsets += [[w] * n for w in WRONG if n]
            argsets.append(["OpaqueRef:nothing"] * (n + 1))       # one too many
            for args in argsets:
                result = envelope(method, *(lead + args))
                calls += 1
                if result["Status"] != "Success":
                    code = result["ErrorDescription"][0]
                    assert code != "INTERNAL_ERROR", (method, args, result)
                    seen[code] = seen.get(code, 0) + 1
    assert calls > 3000
    for code in ("FIELD_TYPE_ERROR", "HANDLE_INVALID", "MESSAGE_PARAMETER_COUNT_MISMATCH"):
        assert seen.get(code), seen
    # the session itself wrongly typed
    for w in WRONG:
        assert envelope("VDI.get_all", w)["ErrorDescription"][0] == "SESSION_INVALID"


def test_records_with_wrongly_typed_fields(xapi):
    x = xapi
    sr = new_sr(x)
    vdi = new_vdi(x, sr)
    dom0 = x.host.get_control_domain(x.host.get_all()[0])
    for record, field in (({"SR": {"a": "b"}, "virtual_size": "1"}, "SR"),
                          ({"SR": sr, "virtual_size": "many"}, "virtual_size"),
                          ({"SR": sr, "virtual_size": "1", "sharable": "maybe"}, "sharable"),
                          ({"SR": sr, "virtual_size": "1", "other_config": ["x"]}, "other_config")):
        assert failure(x.VDI.create, record) == ["FIELD_TYPE_ERROR", field]
    assert failure(x.VBD.create, {"VM": ["x"], "VDI": vdi}) == ["FIELD_TYPE_ERROR", "VM"]
    assert failure(x.VBD.create, {"VM": dom0, "VDI": 5}) == ["FIELD_TYPE_ERROR", "VDI"]
    assert failure(x.PBD.create, {"host": {}, "SR": sr, "device_config": {}}) == \
        ["FIELD_TYPE_ERROR", "host"]
    assert failure(x.VDI.set_virtual_size, vdi, str(2 ** 64))[0] == "FIELD_TYPE_ERROR"
    assert failure(x.VDI.set_on_boot, vdi, "sometimes") == ["FIELD_TYPE_ERROR", "on_boot"]


SETTERS = [
    ("set_name_label", lambda b: [b]), ("set_name_description", lambda b: [b]),
    ("set_other_config", lambda b: [{"k": b}]), ("add_to_other_config", lambda b: ["k", b]),
    ("add_to_other_config", lambda b: [b, "v"]),
    ("set_xenstore_data", lambda b: [{"k": b}]), ("add_to_xenstore_data", lambda b: ["k", b]),
    ("set_tags", lambda b: [[b]]), ("add_tags", lambda b: [b]), ("set_on_boot", lambda b: [b]),
]


def test_string_setters_refuse_what_xml_cannot_carry(xapi, host):
    x = xapi
    sr = new_sr(x)
    vdi = new_vdi(x, sr)
    before = x.VDI.get_record(vdi)
    for setter, args in SETTERS:
        for b in BAD_BYTES + [b"ok" + BAD_BYTES[0], b"plain"]:
            err = failure(getattr(x.VDI, setter), vdi, *args(b))
            assert err[0] == "FIELD_TYPE_ERROR", (setter, b, err)
    for b in BAD_BYTES:
        assert failure(x.SR.set_name_label, sr, b)[0] == "FIELD_TYPE_ERROR"
        assert failure(x.VDI.create, {"SR": sr, "virtual_size": "1", "name_label": b})[0] \
            == "FIELD_TYPE_ERROR"
    assert x.VDI.get_record(vdi) == before          # nothing was stored
    assert len(x.VDI.get_all_records()) == 1 and len(x.SR.get_all_records()) == 1
    x.VDI.set_name_label(vdi, "caf\u00e9 \U0001f600 tab\tok")   # what XML can carry: kept
    assert x.VDI.get_name_label(vdi) == "caf\u00e9 \U0001f600 tab\tok"


def test_a_stored_control_byte_never_breaks_a_reply(xapi, host):
    """A database written before the check (or by hand): replies carry the string up to
    the character, as XAPI's database keeps it, and listings parse, across restarts."""
    x = xapi
    sr = new_sr(x)
    vdi = new_vdi(x, sr, name="good")
    uuid = x.VDI.get_uuid(vdi)
    host.stop()
    db = sqlite3.connect(os.path.join(settings.state_dir(), "xapi.db"))
    (data,) = db.execute("SELECT data FROM objects WHERE uuid = ?", (uuid,)).fetchone()
    rec = json.loads(data)
    rec["name_label"], rec["tags"], rec["other_config"] = "bad\x00tail", ["t\x01"], {"k\x02": "v"}
    db.execute("UPDATE objects SET data = ? WHERE uuid = ?", (json.dumps(rec), uuid))
    db.commit()
    db.close()
    host.start()
    x = host.session().xenapi
    records = x.VDI.get_all_records()
    assert records[vdi]["name_label"] == "bad" and records[vdi]["tags"] == ["t"]
    assert records[vdi]["other_config"] == {"k": "v"}
    assert x.SR.get_all_records()[sr]["VDIs"] == [vdi]
