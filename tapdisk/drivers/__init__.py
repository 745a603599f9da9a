"""The registry of disk types.

Each module in this package is one disk type that registers itself with one line,
`@register`. Everything that needs the list of types (the engine, and SM's
Tapdisk.TYPES / VDI_PLUG_TYPE) reads it from here, never from a hand-kept list.
"""
import importlib
import os

_REGISTRY = {}
_loaded = False


def register(cls):
    """Class decorator: make a Driver subclass available under cls.name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError("disk type %r registered twice" % cls.name)
    _REGISTRY[cls.name] = cls
    return cls


def _module_names():
    """The disk-type modules beside this file. Not pkgutil: it imports inspect and
    typing, a few ms on every tapdisk's first open."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(fn[:-3] for fn in os.listdir(here)
                  if fn.endswith(".py") and fn != "__init__.py")


def _load():
    global _loaded
    if not _loaded:
        for name in _module_names():
            importlib.import_module(__name__ + "." + name)
        _loaded = True


def get(name):
    """The Driver class of a disk type; KeyError if there is none."""
    _load()
    return _REGISTRY[name]


def types():
    """{type name: Driver class} of every registered disk type."""
    _load()
    return dict(_REGISTRY)
