"""Sizes as users write them, for every layer: "1073741824", "512MiB", "2G", "64M".

One parser for the engine (ram:...?size=64M) and SM (device-config:size=2G), so both
accept the same spellings. K/M/G/T are binary whether or not an "iB" follows.
"""
import re

_UNITS = {"": 1, "B": 1,
          "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text, what="size"):
    """Bytes, or a number with a K/M/G/T suffix (KiB, MiB... binary either way), > 0.
    ValueError naming `what` and the offending text otherwise."""
    m = _SIZE.match(str(text))
    unit = m and _UNITS.get(m.group(2).upper())
    if not unit:
        raise ValueError("%s must be a number of bytes, optionally with a KiB/MiB/GiB/TiB "
                         "suffix; got %s" % (what, text))
    value = int(m.group(1)) * unit
    if value <= 0:
        raise ValueError("%s must be positive; got %s" % (what, text))
    return value


def human(size):
    """1610612736 -> "1.5 GiB" (for messages)."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            return "%.1f %s" % (size / float(unit), name)
    return "%d bytes" % size


def mem_available():
    """Bytes the kernel says it can give without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")
