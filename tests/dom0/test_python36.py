"""dom0 runs Python 3.6: the suite's dom0 code run for real on a Python 3.6 interpreter
(`make py36` builds .venv36/ with it and only what dom0 has beside the standard library:
XenAPI; no cffi, no lxml), not only checked by vermin (tests/test_vermin.py).

- every module under formats/, sm/, tapdisk/, smtap/ (and each host plugin's top level) imports;
- the engine installed with PYTHON=.venv36/bin/python: the installed tap-ctl creates ram
  and aio tapdisks (whose processes are checked to be that interpreter), real NBD
  clients write and read them back, pause/unpause, destroy;
- the SR drivers and host plugins installed for 3.6 under the local toolstack (3.11, a
  dev tool): the e2e flow (ram SR, VDI, dom0 plug on a loop device, a file system, a
  snapshot, unplug, destroy) and host.call_plugin;
- the RPM's host profile (make install-host) for 3.6: byte-compiled by 3.6 (%install),
  sr_get_driver_info (%check), smtap-sm-plugins --write/--check (%post);
- tests/sm with SMTAP_SM_PYTHON pointing at 3.6.

Skipped (with the reason) when no Python 3.6 is found or .venv36 cannot be made.
"""
import json
import os
import random
import re
import subprocess
import sys
import xmlrpc.client

import pytest
import XenAPI

from lib.checkout import PY36, TOP, VENV36, VENV_PYTHON
from lib.engine import nbd_size, nbd_uri, tap_state
from lib.fs import check_fs, make_fs, read_files, write_files
from lib.install import DRIVER_INFO_CALL, make_install
from lib.procs import run, sh
from lib.runlock import PY36_BUILDS
from lib.sizes import MiB
from lib.toolstack import E2EHost, traces
from smtap import names, settings
from smtap.toolstack import hostroot

pytestmark = PY36_BUILDS

# Dev-only commands (modern Python): an installed tree keeps them on the venv's 3.11.
TOOLSTACK_COMMANDS = ("xe", "smtap-xapi")
PAUSED = "0x2a"


# --- the interpreter ------------------------------------------------------------------
@pytest.fixture(scope="session")
def py36():
    """`make py36` once per session; the path of .venv36's python (skip if none)."""
    proc = subprocess.run(["make", "-s", "-C", TOP, "py36"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    if not os.path.exists(os.path.join(VENV36, ".stamp")):     # no 3.6, or pip failed
        pytest.skip("no .venv36: make py36 (exit %d): %s"
                    % (proc.returncode, proc.stdout.strip()[-2000:]))
    assert proc.returncode == 0, "make py36 failed:\n" + proc.stdout
    version = run(PY36, "-c", "import sys; print(sys.version_info[:2])").stdout.strip()
    assert version == "(3, 6)", version
    return PY36


def assert_runs_python36(pid):
    """The process is .venv36's interpreter: its executable and its argv[0]."""
    exe = os.path.realpath("/proc/%d/exe" % pid)
    assert exe == os.path.realpath(PY36), exe
    assert re.search(r"python3\.6m?$", exe), exe
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[0].decode() == PY36, argv


def aio_libraries_mapped(pid):
    """The libaio libraries (ours and the system's) the process has mapped."""
    with open("/proc/%d/maps" % pid) as f:
        return {os.path.basename(l.split()[-1]) for l in f if "aio" in l.split()[-1]}


def test_make_py36_is_idempotent_bare_and_succeeds_without_python36(py36):
    stamp = os.path.join(VENV36, ".stamp")
    before = os.path.getmtime(stamp)
    proc = run("make", "-s", "-C", TOP, "py36")
    assert proc.stdout == "" and proc.stderr == ""
    assert os.path.getmtime(stamp) == before
    # dom0 has neither (no XCP-ng 8.3 repository ships them): nor has .venv36.
    for module in ("cffi", "_cffi_backend", "lxml"):
        assert run(py36, "-c", "import " + module, check=False).returncode == 1, module
    run(py36, "-c", "import XenAPI")
    proc = run("make", "-s", "-C", TOP, "py36", "PY36_CANDIDATES=/nonexistent/python3.6 false")
    assert proc.stdout.count("\n") == 1 and "no Python 3.6" in proc.stdout, proc.stdout


# --- every dom0 module imports under 3.6 ----------------------------------------------
def dom0_modules():
    """smtap.<layer>.<module> for every .py under formats/, sm/, tapdisk/, smtap/ (not
    toolstack/)."""
    names = []
    for layer in ("formats", "sm", "tapdisk", "smtap"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(TOP, layer)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for f in sorted(filenames):
                if not f.endswith(".py") or f == "aio_build.py":    # a build script
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f[:-3]), TOP).split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                names.append(".".join(rel if layer == "smtap" else ["smtap"] + rel))
    return names


IMPORTER = r"""
import importlib, json, os, runpy, sys, traceback
todo = json.loads(sys.argv[1])
failed = {}
for name in todo["modules"]:
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc()
for path in todo["plugins"]:                 # top level only: imports and definitions
    try:
        runpy.run_path(path, run_name="dom0_import_check")
    except BaseException:
        failed[path] = traceback.format_exc()
import smtap
from smtap.tapdisk import native
native.aio_depth()                           # loads libsmtap-aio.so through ctypes
print(json.dumps({"failed": failed, "version": list(sys.version_info[:2]),
                  "smtap": smtap.__file__, "aio": native.LIBRARY}))
"""


def test_dom0_modules_import_under_python36(py36):
    modules = dom0_modules()
    for expected in ("smtap.settings", "smtap.sm.drivers.ramSR", "smtap.tapdisk.daemon",
                     "smtap.tapdisk.drivers.aio", "smtap.sm.xapiplugin", "smtap.formats.vhd"):
        assert expected in modules
    plugdir = os.path.join(TOP, "plugins")
    plugins = sorted(os.path.join(plugdir, p) for p in os.listdir(plugdir)
                     if p.startswith("smtap-"))
    assert plugins
    env = dict(os.environ, PYTHONPATH=TOP, PYTHONDONTWRITEBYTECODE="1")
    todo = json.dumps({"modules": modules, "plugins": plugins})
    proc = run(py36, "-c", IMPORTER, todo, check=False, env=env, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["version"] == [3, 6]
    assert out["smtap"] == os.path.join(TOP, "smtap", "__init__.py")
    assert out["aio"] == os.path.join(TOP, "tapdisk", "libsmtap-aio.so.1"), out["aio"]
    assert out["failed"] == {}, "\n".join(out["failed"].values())


# --- the engine under 3.6 -------------------------------------------------------------
def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def create_tap36(tap_ctl, params, *flags):
    """tap-ctl create (the installed one) of params: (device, pid, minor, NBD URI) of a
    VBD running on Python 3.6, listed as upstream lists it."""
    device = run(tap_ctl, "create", "-a", params, *flags).stdout.strip()
    assert os.path.exists(device), device
    (line,) = run(tap_ctl, "list").stdout.splitlines()
    m = re.match(r"pid=(\d+) minor=(\d+) state=0 args=(\S+)$", line)
    assert m and m.group(3) == params.split("?")[0], line      # the image, not its options
    pid, minor = int(m.group(1)), m.group(2)
    assert_runs_python36(pid)
    return device, pid, minor, nbd_uri(names.nbd_path(pid, int(minor)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind,flags", [("ram", []), ("aio", []), ("aio", ["-D"])],
                         ids=["ram", "aio-O_DIRECT", "aio-D"])
def test_engine_under_python36(py36, smtap_root, kind, flags):
    root = str(smtap_root)
    make_install(root, python=py36)
    tap_ctl = os.path.join(root, "opt", "smtap", "bin", "tap-ctl")
    assert file_bytes(tap_ctl).split(b"\n", 1)[0] == b"#!" + py36.encode()
    size = 8 * MiB
    rng = random.Random(kind + "".join(flags))
    seed = rng.getrandbits(8 * size).to_bytes(size, "little")
    img = os.path.join(root, "disk.img")
    with open(img, "wb") as f:
        f.write(seed)
    params = "%s:%s" % (kind, img) + ("?writeback=1" if kind == "ram" else "")

    device, pid, minor, uri = create_tap36(tap_ctl, params, *flags)
    assert nbd_size(uri) == size

    # Real clients: the seed reads back, then writes from nbdcopy and qemu-io.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", img, uri)
    data = bytearray(rng.getrandbits(8 * size).to_bytes(size, "little"))
    src = os.path.join(root, "src.img")
    with open(src, "wb") as f:
        f.write(data)
    run("nbdcopy", src, uri)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1048576 65536", uri)
    data[MiB:MiB + 65536] = b"\x5a" * 65536
    with open(src, "wb") as f:
        f.write(data)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    out = os.path.join(root, "out.img")
    run("nbdcopy", uri, out)
    assert file_bytes(out) == data
    mapped = aio_libraries_mapped(pid)
    if kind == "aio":       # the libaio path really ran, through ctypes on 3.6
        assert "libsmtap-aio.so.1" in mapped, mapped
        assert [n for n in mapped if n.startswith("libaio.so.1")], mapped

    # pause: images closed, the data on the file (ram writes back); unpause: served again.
    run(tap_ctl, "pause", "-p", pid, "-m", minor)
    assert run(tap_ctl, "list").stdout.split() == [
        "pid=%d" % pid, "minor=%s" % minor, "state=" + PAUSED, "args=%s:%s" % (kind, img)]
    assert file_bytes(img) == data
    run(tap_ctl, "unpause", "-p", pid, "-m", minor)
    assert "state=0 " in run(tap_ctl, "list").stdout
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1048576 65536", uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)

    run(tap_ctl, "destroy", "-p", pid, "-m", minor)
    assert hostroot.wait_dead(pid)
    assert run(tap_ctl, "list").stdout == ""
    assert not os.path.exists(device)
    assert hostroot.leftovers(root) == []


# --- the RPM's host profile under 3.6: %install's byte-compile, %check, %post ----------
def test_host_profile_under_python36(py36, smtap_root):
    root = str(smtap_root)
    make_install(root, target="install-host", python=py36)
    lib = os.path.join(root, "opt", "smtap", "lib")
    assert not os.path.exists(os.path.join(lib, "smtap", "toolstack"))
    run(py36, "-m", "compileall", "-q", "-d", "/opt/smtap/lib", lib)     # as %install does
    assert any(f.endswith(".cpython-36.pyc")
               for f in os.listdir(os.path.join(lib, "smtap", "sm", "drivers", "__pycache__")))

    # %check: the SR launcher answers sr_get_driver_info, run by its 3.6 shebang.
    launcher = os.path.join(root, "opt", "xensource", "sm", "ramSR")
    assert file_bytes(launcher).split(b"\n", 1)[0] == b"#!" + py36.encode()
    (info,), _ = xmlrpc.client.loads(run(launcher, DRIVER_INFO_CALL).stdout)
    assert info["driver_version"] and "VDI_SNAPSHOT" in info["capabilities"], info

    # %post: smtap-sm-plugins keeps the host's list and adds ours.
    with open(os.path.join(root, "etc", "xapi.conf"), "w") as f:
        f.write("sm-plugins = ext nfs lvm iso\n")
    helper = os.path.join(root, "opt", "smtap", "bin", "smtap-sm-plugins")
    run(helper, "--write")
    assert run(helper).stdout.split() == ["ext", "nfs", "lvm", "iso", "ram"]
    run(helper, "--check")
    with open(os.path.join(root, "etc", "xapi.conf.d", "zz-site.conf"), "w") as f:
        f.write("sm-plugins = ext\n")              # read after ours: drops ram
    proc = run(helper, "--check", check=False)
    assert proc.returncode == 1 and "ram" in proc.stderr, proc.stderr


# --- the SR drivers and host plugins under 3.6, on the local toolstack ----------------
class Host36(E2EHost):
    """The e2e host with its drivers, plugins and engine installed for .venv36's python;
    the dev toolstack (smtap-xapi, xe) stays on the venv's modern Python."""

    def install(self):
        make_install(self.root, python=PY36)
        bindir = os.path.join(self.root, "opt", "smtap", "bin")
        for name in TOOLSTACK_COMMANDS:
            path = os.path.join(bindir, name)
            with open(path) as f:
                first, rest = f.read().split("\n", 1)
            assert first == "#!" + PY36, first
            with open(path, "w") as f:
                f.write("#!%s\n%s" % (VENV_PYTHON, rest))

    def shebangs(self):
        """{installed script: its interpreter} for SR drivers, plugins and engine commands."""
        found = {}
        bindir = os.path.join(self.root, "opt", "smtap", "bin")
        for d in (settings.sm_dir(), settings.plugins_dir(), bindir):
            for name in os.listdir(d):
                path = os.path.join(d, name)
                if name in TOOLSTACK_COMMANDS or not os.path.isfile(path):
                    continue
                with open(path, "rb") as f:
                    head = f.readline()
                if head.startswith(b"#!"):
                    found[path] = head[2:].strip().decode()
        return found


@pytest.fixture
def host36(py36, smtap_root):
    h = Host36(smtap_root)
    try:
        h.install()
        yield h.start_all()
    finally:
        h.cleanup()


@pytest.mark.timeout(180)
def test_sr_drivers_and_plugins_under_python36(host36):
    h, x = host36, host36.x
    shebangs = h.shebangs()
    assert os.path.join(settings.sm_dir(), "ramSR") in shebangs
    assert os.path.join(settings.plugins_dir(), "smtap-tapdisk-pause") in shebangs
    assert set(shebangs.values()) == {PY36}, shebangs

    sr = h.sr_create("ram", size="128MiB")
    vdi = h.vdi_create(sr, "32MiB")
    vbd, dev = h.plug(vdi)
    assert re.fullmatch(r"/dev/loop\d+", dev), dev
    ((pid, _),) = h.tapdisks()
    assert pid == h.tapdisk_pid(sr, vdi)
    assert_runs_python36(pid)           # spawned by the 3.6 driver with its sys.executable

    point = os.path.join(h.root, "mnt", "fs")
    os.makedirs(point)
    make_fs(dev, point)
    files = write_files(point)
    sh("umount", point)
    sh("mount", dev, point)
    read_files(point, files)
    sh("umount", point)

    # The host plugins through host.call_plugin, run by 3.6.
    host = x.host.get_by_uuid(h.host_uuid)
    ids = {"sr_uuid": sr, "vdi_uuid": vdi}
    assert x.host.call_plugin(host, "smtap-on-slave", "is_open", ids) == "True"
    assert x.host.call_plugin(host, "smtap-tapdisk-pause", "pause", ids) == "True"
    assert tap_state(pid) == PAUSED
    assert x.host.call_plugin(host, "smtap-tapdisk-pause", "unpause", ids) == "True"
    assert tap_state(pid) == "0"
    with pytest.raises(XenAPI.Failure) as err:
        x.host.call_plugin(host, "smtap-tapdisk-pause", "frobnicate", ids)
    assert err.value.details == ["UNKNOWN_XENAPI_PLUGIN_FUNCTION", "frobnicate"]

    snap = h.xe_ok("vdi-snapshot", "uuid=" + vdi)          # paused by the plugin, while plugged
    assert h.xe_ok("vdi-param-get", "uuid=" + snap, "param-name=snapshot-of") == vdi
    sh("mount", dev, point)
    read_files(point, files)
    sh("umount", point)
    h.unplug(vbd)
    assert hostroot.wait_dead(pid)
    assert traces(h, sr, vdi) == []
    assert x.host.call_plugin(host, "smtap-on-slave", "is_open", ids) == "False"

    svbd, sdev = h.plug(snap, mode="RO")
    ((spid, _),) = h.tapdisks()
    assert_runs_python36(spid)
    check_fs(sdev, files)
    h.unplug(svbd)
    h.xe_ok("vdi-destroy", "uuid=" + snap)
    h.xe_ok("vdi-destroy", "uuid=" + vdi)
    h.destroy_sr(sr)
    for cls in ("vbd", "vdi", "pbd", "sr"):
        assert h.xe_ok(cls + "-list", "--minimal") == "", cls
    h.stop()
    assert hostroot.leftovers(h.root) == []


# --- tests/sm with its drivers on 3.6 -------------------------------------------------
@pytest.mark.timeout(300)
def test_sm_suite_under_python36(py36):
    env = {k: v for k, v in os.environ.items() if k != settings.ROOT_ENV}
    env.update(SMTAP_SM_PYTHON=py36, PYTHONPATH=TOP, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", os.path.join(TOP, "tests", "sm")],
                          cwd=TOP, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=280)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:]
    m = re.search(r"(\d+) passed", summary)
    assert m and int(m.group(1)) > 0 and "skipped" not in summary, summary


@pytest.mark.timeout(120)
def test_vhd_engine_under_python36(py36, smtap_root):
    """A VHD chain (made by the installed vhd-util, on 3.6) served by a 3.6 tapdisk on
    the libaio path: written and read back by real clients, paused (the trailing footer
    valid while paused, poisoned while open), destroyed; vhd-util check passes."""
    root = str(smtap_root)
    make_install(root, python=py36)
    bindir = os.path.join(root, "opt", "smtap", "bin")
    tap_ctl, vhd_util = os.path.join(bindir, "tap-ctl"), os.path.join(bindir, "vhd-util")
    assert file_bytes(vhd_util).split(b"\n", 1)[0] == b"#!" + py36.encode()
    base, leaf = os.path.join(root, "base.vhd"), os.path.join(root, "leaf.vhd")
    run(vhd_util, "create", "-n", base, "-s", 8)
    size = 8 * MiB
    rng = random.Random("vhd36")
    data = bytearray(rng.getrandbits(8 * size).to_bytes(size, "little"))
    src = os.path.join(root, "src.img")
    with open(src, "wb") as f:
        f.write(data)
    device, pid, minor, uri = create_tap36(tap_ctl, "vhd:" + base)
    run("nbdcopy", src, uri)
    mapped = aio_libraries_mapped(pid)
    assert "libsmtap-aio.so.1" in mapped, mapped    # the libaio path, from Python 3.6
    with open(base, "rb") as f:
        f.seek(-512, os.SEEK_END)
        assert f.read() == b"\xc7" * 512            # strict: poisoned while open
    # pause, snapshot, unpause onto the new leaf: the storage layer's snapshot
    run(tap_ctl, "pause", "-p", pid, "-m", minor)
    assert run(vhd_util, "check", "-n", base).stdout.strip().endswith("is valid")
    run(vhd_util, "snapshot", "-n", leaf, "-p", base)
    run(tap_ctl, "unpause", "-p", pid, "-m", minor, "-a", "vhd:" + leaf)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1048576 65536", uri)
    data[MiB:MiB + 65536] = b"\x5a" * 65536
    out = os.path.join(root, "out.img")
    run("nbdcopy", uri, out)
    assert file_bytes(out) == data
    run(tap_ctl, "destroy", "-p", pid, "-m", minor)
    assert hostroot.wait_dead(pid)
    assert not os.path.exists(device)
    for path in (base, leaf):
        assert run(vhd_util, "check", "-n", path).stdout.strip().endswith("is valid")
    assert run(vhd_util, "query", "-d", "-n", leaf).stdout.strip() == "chain depth: 2"
    assert hostroot.leftovers(root) == []
