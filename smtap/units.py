"""Sizes and yes/no values as users write them, for every layer.

One size parser for the engine (ram:...?size=64M), SM (device-config:size=2G) and xe
(virtual-size=2GiB), so all accept the same spellings: "1073741824", "512MiB", "2G",
"64M"; K/M/G/T are binary whether or not an "iB" follows.

One boolean parser too; what each interface accepts is its vocabulary, as upstream
defines it: XAPI's wire and SMAPI args say "true"/"false", xe also takes t/f/1/0
(XAPI's cli), the engine's options take 1/0, yes/no, true/false, on/off. Anything else
is refused, never read as false.
"""
import re

_UNITS = {"": 1, "B": 1,
          "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
          "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text, what="size", minimum=1):
    """Bytes, or a number with a K/M/G/T suffix (KiB, MiB... binary either way), at
    least `minimum`. ValueError naming `what` and the offending text otherwise."""
    m = _SIZE.match(str(text))
    unit = m and _UNITS.get(m.group(2).upper())
    if not unit:
        raise ValueError("%s must be a number of bytes, optionally with a KiB/MiB/GiB/TiB "
                         "suffix; got %s" % (what, text))
    value = int(m.group(1)) * unit
    if value < minimum:
        raise ValueError("%s must be %s; got %s" % (
            what, "positive" if minimum == 1 else "at least %d" % minimum, text))
    return value


def _words(true, false):
    return dict([(w, True) for w in true.split()] + [(w, False) for w in false.split()])


XAPI_BOOL = _words("true", "false")                   # XAPI's wire, SMAPI args, SRmaster
XE_BOOL = _words("true t 1", "false f 0")             # xe's parameters (XAPI's cli)
OPTION_BOOL = _words("1 yes true on", "0 no false off")   # the engine's ?k=v options
YES_NO = _words("yes", "no")                          # XAPI's guest metrics' feature keys


def parse_bool(text, what="value", words=OPTION_BOOL):
    """True or False for one of `words` (case-insensitive); ValueError naming `what` and
    the accepted spellings otherwise."""
    value = words.get(str(text).strip().lower())
    if value is None:
        raise ValueError("%s must be one of %s; got %r" % (
            what, "/".join(w for w in words if words[w]) + " or " +
            "/".join(w for w in words if not words[w]), text))
    return value


def flag(text, words=XAPI_BOOL, default=None):
    """True or False for one of `words`, `default` for anything else (a map key that is
    missing, empty or "unspecified")."""
    if text is None:
        return default
    return words.get(str(text).strip().lower(), default)


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
