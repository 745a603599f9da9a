"""Every tool the build, tests, benchmarks and demo run comes from the Makefile's
package list, and the README lists the same packages: a fresh Debian machine that
has only what `make build` installs runs the whole suite."""
import os
import re
import shutil

import pytest

from lib.checkout import TOP
from lib.procs import run

# Commands run by the suite (directly, or by a tool it runs: nbdinfo runs `file`).
TOOLS = [
    "nbdinfo", "nbdcopy", "nbdfuse", "nbdkit", "qemu-img", "qemu-io", "qemu-nbd",
    "qemu-storage-daemon", "fio",
    "file", "losetup", "mount", "umount", "blockdev", "fallocate", "prlimit",
    "fusermount3", "mkfs.ext4", "e2fsck", "rpm", "rpmbuild", "gcc", "objdump", "unshare",
    "logrotate", "runuser", "qemu-system-x86_64", "busybox", "cpio", "depmod",
]


def makefile_packages():
    with open(os.path.join(TOP, "Makefile")) as f:
        text = f.read()
    m = re.search(r"^DEB_PACKAGES :=((?:.*\\\n)*.*)$", text, re.M)
    return set(m.group(1).replace("\\\n", " ").split())


def readme_packages():
    with open(os.path.join(TOP, "README.md")) as f:
        text = f.read()
    section = text.split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    found = set()
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| package") and "---" not in line:
            found.update(p.strip() for p in line.split("|")[1].split(","))
    return found


def test_readme_lists_the_makefile_packages():
    assert readme_packages() == makefile_packages()


def _essential():
    out = run("dpkg-query", "-W", "-f", "${Package} ${Essential}\n", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith(" yes")}


def _owner(path):
    """The Debian package of a file (usrmerge: dpkg may know it as /sbin/x or /usr/sbin/x)."""
    real = os.path.realpath(path)
    for candidate in (real, re.sub(r"^/usr(?=/s?bin/)", "", real), path):
        proc = run("dpkg", "-S", candidate, check=False)
        if proc.returncode == 0:
            return proc.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_comes_from_a_listed_package(tool):
    path = shutil.which(tool)
    assert path, "%s is not installed: make build should have installed it" % tool
    owner = _owner(path)
    assert owner, "no Debian package owns %s" % path
    packages = makefile_packages()
    # Essential packages are on every Debian machine, minbase included; gcc's binary
    # belongs to gcc-12
    ok = owner in packages or owner in _essential() or \
        any(owner.startswith(p + "-") for p in packages)
    assert ok, "%s (%s) comes from %s, which is neither in DEB_PACKAGES nor essential" % (
        tool, path, owner)
