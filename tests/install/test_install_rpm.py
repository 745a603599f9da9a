"""`make rpm` (real rpmbuild), its contents, and a real `rpm --root` install."""
import fnmatch
import glob
import os
import re
import signal
import time

import pytest

from lib.checkout import PY36, TOP, VENV_BIN, VENV_PYTHON, VERSION
from lib.install import (ALL_SR_TYPES, RPM_SR_TYPES, SHARED_DIRS, STOCK_SM_PLUGINS,
                         UPSTREAM_PATHS, driver_info, host_env, read_sm_plugins, rpm_install,
                         stock_host)
from lib.procs import run
from lib.runlock import PY36_BUILDS

pytestmark = [pytest.mark.rpm, PY36_BUILDS]

RAMSR = os.path.join(TOP, "sm", "drivers", "ramSR.py")
NEED_RAMSR = pytest.mark.skipif(not os.path.exists(RAMSR),
                                reason="sm/drivers/ramSR.py does not exist yet")


def rpm_query(rpm_file, *args):
    return run(["rpm", "-qp"] + list(args) + [rpm_file]).stdout


def test_rpm_metadata(built_rpm):
    name, version, arch = rpm_query(built_rpm, "--qf", "%{NAME} %{VERSION} %{ARCH}").split()
    assert (name, version) == ("smtap", VERSION)
    assert arch != "noarch"  # it carries libsmtap-aio.so.1
    requires = set(r.split()[0] for r in rpm_query(built_rpm, "--requires").splitlines())
    assert {"python3", "libaio", "xapi-core"} <= requires
    # What no XCP-ng 8.3 repository ships (el7 names them python36-*): never required.
    assert not [r for r in requires if "cffi" in r or "lxml" in r], requires
    scripts = rpm_query(built_rpm, "--scripts")
    assert "smtap-sm-plugins --write" in scripts and "xe-toolstack-restart" in scripts


def test_rpm_paths_do_not_clash_with_sm_or_blktap(built_rpm):
    paths = rpm_query(built_rpm, "-l").splitlines()
    assert not set(UPSTREAM_PATHS) & set(paths)
    assert not set(SHARED_DIRS) & set(paths), "owns a directory of another package"
    allowed_files = {"/etc/xapi.conf.d/smtap.conf", "/etc/logrotate.d/smtap", "/var/log/smtap"}
    strays = [p for p in paths
              if not (p == "/opt/smtap" or p.startswith("/opt/smtap/")
                      or p.startswith("/etc/xapi.d/plugins/smtap-")
                      or p.startswith("/usr/share/doc/smtap")
                      or p.startswith("/usr/share/licenses/smtap")
                      or p in allowed_files
                      or (p.startswith("/opt/xensource/sm/") and p.endswith("SR")))]
    assert not strays, strays
    srs = [os.path.basename(p)[:-2] for p in paths if p.startswith("/opt/xensource/sm/")]
    assert srs == [t for t in RPM_SR_TYPES if t in ALL_SR_TYPES]
    assert not set(t.lower() for t in srs) & set(STOCK_SM_PLUGINS)
    # No dev toolstack, no dev commands.
    assert not [p for p in paths if "/toolstack" in p]
    commands = set(os.path.basename(p) for p in paths if p.startswith("/opt/smtap/bin/"))
    assert commands == {"smtap-sm-plugins", "tap-ctl", "tapdisk", "vhd-util", "td-util",
                        "smtap-gc", "qcow2-util"}
    # The libaio batch library built in %build, byte-code compiled in %install.
    assert "/opt/smtap/lib/smtap/tapdisk/libsmtap-aio.so.1" in paths
    assert [p for p in paths if p.endswith(".pyc")]


def test_rpm_installs_into_an_empty_root(built_rpm, tmp_path):
    root = rpm_install(built_rpm, tmp_path / "root")
    out = run(["rpm", "--root", root, "--dbpath", "/var/lib/rpm", "-q", "smtap"]).stdout
    assert out.startswith("smtap-%s-" % VERSION)
    # rpm -V: every file as packaged.
    run(["rpm", "--root", root, "--dbpath", "/var/lib/rpm", "-V", "--nodeps", "smtap"])
    with open(os.path.join(root, "opt/smtap/bin/tap-ctl")) as f:
        assert f.readline() == "#!/usr/bin/python3\n"
    # The drop-in is not carried (%ghost: the scriptlets compute it, test_install_scriptlets).
    assert not os.path.exists(os.path.join(root, "etc/xapi.conf.d/smtap.conf"))
    # The installed commands run from that root (with an interpreter that has the deps).
    env = host_env(root)
    out = run([VENV_PYTHON, os.path.join(root, "opt/smtap/bin/tap-ctl"), "list"], env=env)
    assert out.stdout == ""
    # %post's work on a host whose xapi.conf has its own list: that list is kept.
    with open(os.path.join(root, "etc/xapi.conf"), "w") as f:
        f.write("sm-plugins = ext nfs lvm\n")
    run([VENV_PYTHON, os.path.join(root, "opt/smtap/bin/smtap-sm-plugins"), "--write"], env=env)
    assert read_sm_plugins(os.path.join(root, "etc/xapi.conf.d/smtap.conf")) == \
        ["ext", "nfs", "lvm"] + [t for t in RPM_SR_TYPES if t in ALL_SR_TYPES]
    run([VENV_PYTHON, os.path.join(root, "opt/smtap/bin/smtap-sm-plugins"), "--check"], env=env)


@NEED_RAMSR
def test_installed_ramsr_answers_driver_info(built_rpm, tmp_path):
    root = rpm_install(built_rpm, tmp_path / "root")
    info = driver_info(os.path.join(root, "opt/xensource/sm/ramSR"), root)
    assert info["driver_version"] == VERSION
    assert info["required_api_version"] and "VDI_CREATE" in info["capabilities"]


@NEED_RAMSR
@pytest.mark.skipif(not os.path.exists(os.path.join(TOP, "toolstack", "server.py")),
                    reason="the local toolstack (toolstack/server.py) does not exist yet")
def test_local_toolstack_registers_type_ram(built_rpm_local_python, tmp_path):
    """smtap-xapi with SMTAP_ROOT=<rpm root>: discovery runs the installed ramSR through
    the installed sm-plugins drop-in, and an SM record of type ram appears."""
    from smtap.toolstack import client

    root = rpm_install(built_rpm_local_python, tmp_path / "root")
    env = host_env(root)
    stock_host(root)                   # a stock 8.3 host's config, and what %post does
    run([os.path.join(root, "opt/smtap/bin/smtap-sm-plugins"), "--write"], env=env)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    run([os.path.join(VENV_BIN, "smtap-xapi"), "--daemon"], env=env, timeout=30)
    pid_file = os.path.join(root, "var/lib/smtap/smtap-xapi.pid")
    try:
        session = client.session(os.path.join(root, "var/lib/xcp/xapi"))
        session.xenapi.login_with_password("root", "", "1.0", "smtap-tests")
        deadline = time.monotonic() + 30
        while True:
            records = session.xenapi.SM.get_all_records()
            types = {r["type"]: r for r in records.values()}
            if "ram" in types or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "ram" in types, sorted(types)
        assert types["ram"]["driver_filename"].endswith("/opt/xensource/sm/ramSR")
        assert types["ram"]["version"] == VERSION
    finally:
        if os.path.exists(pid_file):
            with open(pid_file) as f:
                os.kill(int(f.read()), signal.SIGTERM)


# --- built for dom0: Python 3.6 byte-code, el7's glibc -------------------------------
NEED_PY36 = pytest.mark.skipif(not os.access(PY36, os.X_OK), reason="no .venv36 (make py36)")
# objdump -T: "0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.14) memcpy"
SYMBOL_VERSION = re.compile(r"\(?\b(GLIBC|LIBAIO)_([0-9][0-9.]*)\)?\s+\S+$")


def needed_versions(path):
    out = run(["objdump", "-T", path]).stdout
    found = set()
    for line in out.splitlines():
        m = SYMBOL_VERSION.search(line)
        if m and "*UND*" in line:
            found.add((m.group(1), tuple(int(p) for p in m.group(2).split("."))))
    return found


@NEED_PY36
def test_rpm_is_built_for_dom0(built_rpm, tmp_path):
    """Every .pyc has Python 3.6's magic (asked of 3.6 itself), every module has one,
    and no ELF object of the package needs a symbol version above GLIBC_2.17."""
    root = rpm_install(built_rpm, tmp_path / "root")
    magic = run([PY36, "-c", "import importlib.util, sys; "
                 "sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"]).stdout
    pycs, modules, elves = [], [], []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                head = f.read(4)
            if name.endswith(".pyc"):
                pycs.append((path, head.hex()))
            elif name.endswith(".py") and "/opt/smtap/lib/" in path:
                modules.append(path)
            elif head == b"\x7fELF":
                elves.append(path)
    assert pycs and modules
    assert [p for p, m in pycs if m != magic or ".cpython-36." not in p] == []
    for path in modules:
        cached = os.path.join(os.path.dirname(path), "__pycache__",
                              os.path.basename(path)[:-3] + ".cpython-36.pyc")
        assert os.path.exists(cached), path
    assert [os.path.basename(p) for p in elves] == ["libsmtap-aio.so.1"]
    for path in elves:
        versions = needed_versions(path)
        assert ("LIBAIO", (0, 4)) in versions                # io_getevents: seen at all
        too_new = [v for v in versions if v[0] == "GLIBC" and v[1] > (2, 17)
                   or v[0] == "LIBAIO" and v[1] > (0, 4)]
        assert not too_new, (path, too_new)


# What the unit tier may skip under %check: modules the RPM does not carry, Python 3.8's ast.
UNIT_SKIPS_IN_CHECK = ("smtap.toolstack", "Python 3.8", "shared/reference")


@NEED_PY36
def test_check_runs_the_unit_tier_on_python36(built_rpm):
    """%check runs all of tests/unit with the build's Python 3.6 (make py36's pytest for
    it) against the installed library, and it passes."""
    topdir = os.path.dirname(os.path.dirname(os.path.dirname(built_rpm)))
    with open(os.path.join(topdir, "make-rpm.log")) as f:
        log = f.read()
    assert "+ cd tests" in log and " -m pytest -q -rs -p no:cacheprovider unit" in log, log[-3000:]
    m = re.search(r"^(\d+) passed(?:, (\d+) skipped)? in ", log, re.M)
    assert m, log[-3000:]
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)
    assert all(any(s in skip for s in UNIT_SKIPS_IN_CHECK) for skip in skips), skips
    collected = run(VENV_PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                    os.path.join(TOP, "tests", "unit"), cwd=TOP).stdout
    (total,) = re.findall(r"^(\d+) tests? collected", collected, re.M)
    assert int(m.group(1)) + int(m.group(2) or 0) == int(total), (m.group(0), total)


NEWER_GLIBC = "#define _GNU_SOURCE\n#include <sys/mman.h>\n" \
    "int smtap_test_newer(void) { return memfd_create(\"x\", 0); }  /* GLIBC_2.27 */\n"


@NEED_PY36
def test_check_refuses_other_bytecode_and_newer_glibc(tmp_path):
    """%check fails a build whose byte-code is not 3.6's (built with the venv's Python)
    and whose library needs GLIBC_2.27 (memfd_create linked in), and names both."""
    newer = tmp_path / "newer.c"
    newer.write_text(NEWER_GLIBC)
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nexec gcc "$@" %s\n' % newer)
    cc.chmod(0o755)
    env = dict(os.environ, CC=str(cc))
    out = run(["make", "-s", "-C", TOP, "rpm", "RPMTOP=%s" % (tmp_path / "top"),
               "RPM_BUILD_PYTHON=%s" % VENV_PYTHON], env=env, check=False, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "error: Bad exit status" in log and "%check" in log, log[-3000:]
    assert re.search(r"check-dom0-build: \S+\.cpython-3\d+\.pyc: not Python 3\.6 byte-code",
                     log), log[-3000:]
    assert "libsmtap-aio.so.1: needs GLIBC_2.27, dom0 has GLIBC_2.17" in log, log[-3000:]
    assert not glob.glob(str(tmp_path / "top" / "RPMS" / "*" / "*.rpm"))


# --- the RPM carries exactly what the README lists -----------------------------------
def readme_install_table():
    """[(path patterns, names)] of the README's "What it installs" table: the backticked
    paths of the first column; the backticked names before the first ':' of the second."""
    with open(os.path.join(TOP, "README.md")) as f:
        text = f.read()
    section = text.split("### What it installs", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 2 or cells[0] in ("path", "---"):
            continue
        if cells[1].startswith("made at run time"):
            continue                        # not in the package
        head = cells[1].split(":", 1)[0] if ":" in cells[1] else ""
        rows.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", head)))
    return rows


def covers(pattern, path):
    """A pattern ending in / is a directory and its tree; * is any run of characters."""
    if pattern.endswith("/"):
        return path == pattern[:-1] or path.startswith(pattern)
    return fnmatch.fnmatchcase(path, pattern)


def test_rpm_carries_exactly_what_the_readme_lists(built_rpm):
    rows = readme_install_table()
    patterns = [p for paths, _ in rows for p in paths]
    assert len(rows) >= 6 and "/opt/smtap/bin/" in patterns, rows
    entries = run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]",
                   built_rpm]).stdout.splitlines()
    paths = [e.split(" ", 1)[1] for e in entries]
    files = [e.split(" ", 1)[1] for e in entries if not e.startswith("d")]
    # Every file is listed; every listed path is carried (directories included).
    assert [f for f in files if not any(covers(p, f) for p in patterns)] == []
    assert [p for p in patterns if not any(covers(p, f) for f in paths)] == []
    # The names a row lists are exactly what the package has there.
    carried = {
        "/opt/smtap/bin/": {os.path.basename(f) for f in files if f.startswith("/opt/smtap/bin/")},
        "/etc/xapi.d/plugins/smtap-*": {os.path.basename(f) for f in files
                                        if f.startswith("/etc/xapi.d/plugins/")},
        "/opt/smtap/lib/smtap/": {"smtap." + f.split("/")[5] for f in files
                                  if re.match(r"/opt/smtap/lib/smtap/\w+/__init__\.py$", f)},
    }
    for paths_, names in rows:
        for p in paths_:
            if p in carried:
                assert set(names) == carried[p], (p, names, carried[p])
                del carried[p]
    assert carried == {}, "README rows without their names: %s" % sorted(carried)
