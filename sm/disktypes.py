"""The engine's disk types as SM sees them, read from the engine's registry so that a new
disk type shows up here without an edit: names() (upstream sm's Tapdisk.TYPES) and
plug_types() (its VDI_PLUG_TYPE: how XAPI plugs a VDI of each type). Read when asked,
not at import: the registry imports every disk driver, which most driver calls never
need."""
from smtap.tapdisk import drivers


def names():
    return sorted(drivers.types())


def plug_types():
    return dict((name, cls.plug_type) for name, cls in drivers.types().items())
