"""Build tapdisk/libsmtap-aio.so.1 from smtap_aio.c (the I/O queue) and smtap_nbd.c (the
NBD loop's common case): tapdisk/native.py loads it with ctypes.

A plain shared library, no Python extension: the one object serves every interpreter
(dom0's 3.6 and the development venv's), and needs no Python headers or cffi to build.

    python3 tapdisk/aio_build.py [--if-needed]

--if-needed rebuilds only when the library is missing or older than its sources.
CC (default gcc) and CFLAGS come from the environment.
"""
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ("smtap_aio.c", "smtap_nbd.c")]
HEADERS = [os.path.join(HERE, "smtap_aio.h")]
# Versioned like a shared library, and so no Python module name: import machinery and
# pkgutil would take a "*.so" in a package for an extension module.
LIBRARY = "libsmtap-aio.so.1"


def target():
    return os.path.join(HERE, LIBRARY)


def needed():
    out = target()
    if not os.path.exists(out):
        return True
    return os.path.getmtime(out) < max(os.path.getmtime(p) for p in SOURCES + HEADERS + [__file__])


def build():
    out = target()
    tmp = out + ".tmp"
    cmd = (shlex.split(os.environ.get("CC", "gcc")) + ["-shared", "-fPIC", "-O2", "-Wall"]
           + shlex.split(os.environ.get("CFLAGS", "")) + SOURCES + ["-o", tmp, "-laio"])
    subprocess.check_call(cmd)
    os.rename(tmp, out)
    return out


def main(argv):
    if "--if-needed" in argv and not needed():
        return 0
    print("built", build())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
