"""Host plugins (/etc/xapi.d/plugins/smtap-*): XAPI's XenAPIPlugin.dispatch convention.

XAPI runs a plugin with argv[1] = methodCall(fn, [session_ref, {args}]) and parses its
stdout as one methodResponse whose value is {"Status": "Success", "Value": str} or
{"Status": "Failure", "ErrorDescription": [...]}. The upstream helper is not on PyPI,
so this is a compatible one: plugin functions are fn(session, args) -> str, with
session a XenAPI session reusing session_ref on the local socket.
"""
import sys
import xmlrpc.client

from smtap.sm import command
from smtap.sm import log
from smtap.sm import xapi


def success_message(value):
    return xmlrpc.client.dumps(({"Status": "Success", "Value": value},), "", True)


def failure_message(description):
    return xmlrpc.client.dumps(({"Status": "Failure", "ErrorDescription": description},),
                               "", True)


def respond(functions, argv):
    """argv (without the program name) -> the response text."""
    if len(argv) != 1:
        return failure_message(["XENAPI_PLUGIN_FAILURE", "", "BadRequest",
                                "expected exactly one argument, got %d" % len(argv)])
    try:
        params, fn = xmlrpc.client.loads(argv[0])
        session_ref, args = params[0], params[1] if len(params) > 1 else {}
    except Exception as e:
        return failure_message(["XENAPI_PLUGIN_FAILURE", "", type(e).__name__, str(e)])
    if fn not in functions:
        return failure_message(["UNKNOWN_XENAPI_PLUGIN_FUNCTION", fn])
    args = args if isinstance(args, dict) else {}
    log.set_context("plugin:%s" % fn, args.get("sr_uuid"), args.get("vdi_uuid"))
    log.info("%s %s", fn, args)
    try:
        value = functions[fn](xapi.session(session_ref), args)
    except xapi.Failure as e:
        log.error("%s failed: %s", fn, e.details)
        return failure_message([str(d) for d in e.details])
    except Exception as e:
        log.exception("%s failed", fn)
        return failure_message(["XENAPI_PLUGIN_FAILURE", fn, type(e).__name__, str(e)])
    return success_message("" if value is None else str(value))


def require(args, *keys):
    """args[key] for each key; ValueError naming the missing ones."""
    missing = [k for k in keys if not args.get(k)]
    if missing:
        raise ValueError("missing argument(s) %s" % ", ".join(missing))
    return [args[k] for k in keys]


def dispatch(functions, argv=None):
    """The plugin's main: answer the call; only the response reaches stdout."""
    argv = sys.argv[1:] if argv is None else argv
    with command.StdoutGuard() as guard:
        log.setup()
        guard.write_response(respond(functions, argv))
    return 0
