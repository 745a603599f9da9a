"""Helpers shared by the test directories (importable as `testlib`: tests/ is on sys.path)."""
import os
import random


def mounts_under(root):
    """Mount points below root, deepest first."""
    root = str(root).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted((p for p in points if p.startswith(root)), key=len, reverse=True)


def short_root():
    """A new, short directory under /tmp. A VDI's NBD link
    <root>/run/blktap-control/nbd/<sr>/<vdi> is 97 bytes plus the root, and unix socket
    paths (NBD clients connect to it) stop at 107: pytest's tmp_path is far too long."""
    for _ in range(1000):
        root = "/tmp/d%04x" % random.randrange(1 << 16)
        try:
            os.mkdir(root)
            return root
        except FileExistsError:
            continue
    raise RuntimeError("no free short root under /tmp")
