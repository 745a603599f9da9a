"""The mount table (/proc/self/mounts), read one way for the engine, SM and the tests."""
import re

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field):
    """/proc/mounts escapes space, tab, newline and backslash as \\ooo."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def entries():
    """[(source, mount point, fs type)] of every mount, in table order."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                found.append((_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return found
