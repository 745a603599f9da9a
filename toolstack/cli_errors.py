"""How `xe` prints a failure, as XAPI's CLI does (xapi-cli-server cli_util.ml
server_error, xapi_cli.ml exception_handler): an error of the datamodel as its
description, then one "name: value" line per parameter, a reference shown as its
object's uuid (and name); any other error (SR_BACKEND_FAILURE_<n>) as its code and
parameters. A failure that is no XenAPI error at all is an INTERNAL_ERROR: its text,
never a Python class name."""
import xmlrpc.client

from smtap.errtext import describe
from smtap.toolstack import errors
from smtap.toolstack.errors import DOCS, NULL_REF

USAGE = "For usage run: 'xe help'"
# Where a reference may point, most likely first (XAPI looks refs up in its Ref_index).
REF_CLASSES = ("SR", "VDI", "PBD", "VBD", "host", "VM", "pool", "task", "SM", "message",
               "secret", "host_metrics")


def ref_text(xenapi, value):
    """A reference as XAPI's CLI shows it: "<uuid> (<name>)", or the value itself."""
    if xenapi is None or not value.startswith("OpaqueRef:") or value == NULL_REF:
        return value
    for cls in REF_CLASSES:
        try:
            rec = getattr(xenapi, cls).get_record(value)
        except Exception:
            continue
        if "name_label" in rec:
            return "%s (%s)" % (rec["uuid"], rec["name_label"])
        return rec["uuid"]
    return value


def failure_lines(details, xenapi=None):
    """The lines xe prints for a XenAPI failure's ErrorDescription."""
    details = [str(d) for d in details] or [errors.INTERNAL_ERROR]
    code, params = details[0], [ref_text(xenapi, p) for p in details[1:]]
    if code == errors.SESSION_AUTHENTICATION_FAILED:
        return ["Authentication failed", USAGE]
    if code not in DOCS:
        return ["Error code: %s" % code, "Error parameters: %s" % ", ".join(params)]
    names, description = DOCS[code]
    lines = [description]
    for i in range(max(len(names), len(params))):
        name = names[i] if i < len(names) else "<extra>"
        lines.append("%s: %s" % (name, params[i] if i < len(params) else "<unknown>"))
    return lines


def internal_error_lines(e):
    """An unexpected failure (a protocol error, a bug): INTERNAL_ERROR with its text."""
    if isinstance(e, xmlrpc.client.ProtocolError):      # e.g. a request over the limit
        text = "%s %s" % (e.errcode, e.errmsg)
    elif isinstance(e, xmlrpc.client.Fault):
        text = e.faultString
    else:
        text = describe(e)
    return failure_lines([errors.INTERNAL_ERROR, text])
