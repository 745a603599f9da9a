"""Fault-injection hooks for tests: named flags under settings.testing_hooks_dir(),
set and cleared through the smtap-testing-hooks plugin (host.call_plugin). The tapdisk
glue consults them at the points where real failures hurt most (see HOOKS)."""
import os
import re

from smtap import settings
from smtap.sm import errors

HOOKS = {
    "activate-fail": "vdi_activate fails once the tapdisk runs and is linked (rollback)",
    "pause-fail": "the tapdisk-pause plugin's pause fails (callers must recover)",
    "gc-park": "the garbage collector stops at the phase this hook names (coalesce, "
               "coalesced, relink, leaf-coalesce, leaf-renamed) until it is cleared, so "
               "a test can kill -9 it there",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def _path(name):
    if not _NAME.match(name or ""):
        raise ValueError("bad hook name %s" % (name,))
    return os.path.join(settings.testing_hooks_dir(), name)


def set_hook(name, value="1"):
    if name not in HOOKS:
        raise ValueError("unknown hook %s; known: %s" % (name, ", ".join(sorted(HOOKS))))
    os.makedirs(settings.testing_hooks_dir(), exist_ok=True)
    with open(_path(name), "w") as f:
        f.write(value)


def clear_hook(name):
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False


def hooks():
    """{name: value} of the hooks set."""
    try:
        names = os.listdir(settings.testing_hooks_dir())
    except FileNotFoundError:
        return {}
    result = {}
    for name in sorted(names):
        if name in HOOKS:
            with open(_path(name)) as f:
                result[name] = f.read()
    return result


def value(name):
    """The hook's value if it is set, else None."""
    try:
        with open(_path(name)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def check(name, what):
    """Fail `what` with SMGeneral if hook `name` is set."""
    if os.path.exists(_path(name)):
        errors.raise_error("SMGeneral", "%s: testing hook %s is set" % (what, name))
