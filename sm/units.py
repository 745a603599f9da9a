"""Sizes and booleans in SMAPI requests: smtap.units' parsers, failing with an SR error."""
from smtap import units
from smtap.sm import errors

human = units.human
mem_available = units.mem_available


def parse_size(text, what="size"):
    """Bytes, or a number with a K/M/G/T suffix (KiB, MiB... binary either way).
    InvalidArg (code 1) with the offending text otherwise."""
    try:
        return units.parse_size(text, what)
    except ValueError as e:
        errors.raise_error("InvalidArg", str(e))


def parse_bool(text, what="value", words=units.XAPI_BOOL):
    """XAPI's "true"/"false" (any case); InvalidArg (code 1) naming `what` otherwise."""
    try:
        return units.parse_bool(text, what, words)
    except ValueError as e:
        errors.raise_error("InvalidArg", str(e))
