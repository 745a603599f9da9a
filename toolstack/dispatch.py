"""One XenAPI message: find the method, check the session and the argument count, run it,
and wrap the outcome in XAPI's Status/Value or Status/ErrorDescription envelope.
`Async.<class>.<message>` runs the message in the background and answers with a task
(status, progress, result, error_info), as XAPI does: upstream sm's GC calls
Async.SR.update and polls task.get_status."""
import logging
import threading

from smtap.toolstack import classes  # noqa: F401  (registers every class)
from smtap.errtext import describe, value_text
from smtap.toolstack import errors
from smtap.toolstack.context import Context
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import CLASSES, now, to_wire, xml_text
from smtap.toolstack.smapi import encode

log = logging.getLogger("smtap.xapi.dispatch")


def success(value):
    return {"Status": "Success", "Value": to_wire(value)}


def failure(*description):
    # a parameter may echo what the caller sent (a ref, a name): held to what XML carries
    return {"Status": "Failure", "ErrorDescription": [xml_text(value_text(d))
                                                      for d in description]}


def dispatch(ts, method, params):
    try:
        return success(_call(ts, method, list(params)))
    except ApiError as e:
        log.info("%s: %s", method, e)
        return failure(*e.description)
    except Exception as e:
        log.exception("%s failed", method)
        return failure(errors.INTERNAL_ERROR, describe(e))


def _call(ts, method, params):
    cls_name, _, name = str(method).partition(".")
    background = cls_name == "Async"
    if background:
        cls_name, _, name = name.partition(".")
    klass = CLASSES.get(cls_name)
    m = klass.methods.get(name) if klass else None
    if m is None:
        raise ApiError(errors.MESSAGE_METHOD_UNKNOWN, method)
    first = 1 if m.session else 0
    if not m.min_args + first <= len(params) <= m.max_args + first:
        raise ApiError(errors.MESSAGE_PARAMETER_COUNT_MISMATCH, method,
                       m.max_args + first, len(params))
    m.check(params[first:])
    ctx = Context(ts)
    if m.session:
        ref = params[0]
        session = ts.store.db.get("session", ref) if isinstance(ref, str) else None
        if session is None:
            raise ApiError(errors.SESSION_INVALID, ref)
        ctx = Context(ts, ref, session)
    # Storage calls wait for start-up (discovery, resync), but not the drivers' own calls
    # back: the resync runs drivers, and they report through these classes.
    if background:
        return _in_background(ctx, "Async.%s.%s" % (cls_name, name), klass, m, params[first:])
    if klass.needs_drivers and ctx.session.get("originator") != "SM":
        ts.wait_ready()
    return m.fn(ctx, *params[first:])


def _in_background(ctx, label, klass, m, args):
    """The task of an Async call; the call itself runs in a thread."""
    store = ctx.store
    task = store.create("task", {"name_label": label, "created": now(),
                                 "resident_on": ctx.ts.host, "status": "pending"})

    def run():
        try:
            if klass.needs_drivers and ctx.session.get("originator") != "SM":
                ctx.ts.wait_ready()
            value = m.fn(ctx, *args)
            done = {"status": "success", "progress": 1.0,
                    # the result's XML-RPC <value> (XAPI's task.result), void ""
                    "result": "" if value is None else encode(to_wire(value))}
        except ApiError as e:
            done = {"status": "failure", "error_info": e.description}
        except Exception as e:
            log.exception("%s failed", label)
            done = {"status": "failure", "error_info": [errors.INTERNAL_ERROR, describe(e)]}
        done["finished"] = now()
        if store.exists("task", task):     # the caller may have destroyed it meanwhile
            store.update("task", task, done)
    threading.Thread(target=run, name=label, daemon=True).start()
    return task
