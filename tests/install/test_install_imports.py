"""No import of the suite can resolve to the host's sm (or blktap, or XAPI plugin) code."""
import ast
import os
import sys

import pytest

from lib.checkout import TOP, VENV_PYTHON
from lib.install import ALL_SR_TYPES, RPM_SR_TYPES, driver_info, host_env, make_install
from lib.procs import run

# Top-level modules of the host's sm (flat in /opt/xensource/sm, or the sm 3.x package)
# and of XAPI's plugin helpers.
HOST_MODULES = """sm SR VDI SRCommand util blktap2 lock cleanup lvutil vhdutil xs_errors
    XenAPIPlugin journaler fjournaler lvhdutil lvmcache lvmanager refcounter resetvdis
    scsiutil devscan iscsilib mpathutil nfs ipc flock sysdevice trim_util cifutils
    constants metadata srmetadata xmlrpc_ext kernel cbtutil FileSR DummySR LVHDSR EXTSR
    NFSSR ISOSR udevSR tapdisk""".split()
# What dom0 code may import at top level: the standard library, its own package, and
# XenAPI (xapi-core's); dom0 has no cffi, no lxml.
ALLOWED_THIRD_PARTY = {"smtap", "XenAPI"}


def py_files(dest):
    lib = os.path.join(dest, "opt/smtap/lib")
    for dirpath, _, names in os.walk(lib):
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(dirpath, n)
    plugins = os.path.join(dest, "etc/xapi.d/plugins")
    for n in os.listdir(plugins):
        yield os.path.join(plugins, n)


def absolute_imports(path):
    with open(path) as f:
        module = ast.parse(f.read(), path)
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def test_static_no_import_of_host_modules(tmp_path):
    dest = make_install(tmp_path / "d")
    bad = []
    for path in py_files(dest):
        for line, top in absolute_imports(path):
            if top in HOST_MODULES:
                bad.append("%s:%d imports %s" % (os.path.relpath(path, dest), line, top))
    assert not bad, bad


def test_static_rpm_code_imports_only_stdlib_and_required_packages(tmp_path):
    dest = make_install(tmp_path / "d", target="install-host")
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in py_files(dest):
        for line, top in absolute_imports(path):
            if top not in stdlib and top not in ALLOWED_THIRD_PARTY:
                bad.append("%s:%d imports %s" % (os.path.relpath(path, dest), line, top))
    assert not bad, bad


IMPORT_ALL = '''\
"""Test-only: import every module of the installed library (not toolstack)."""
import os
import pkgutil
import sys

HOST = %r


def main():
    import smtap
    names = []
    for info in pkgutil.walk_packages(smtap.__path__, "smtap."):
        if info.name.startswith("smtap.toolstack") or info.name.endswith("aio_build"):
            continue
        __import__(info.name)
        names.append(info.name)
    for name, module in sorted(sys.modules.items()):
        if name.split(".")[0] in HOST:
            print("HOST MODULE LOADED: %%s from %%s" %% (name, getattr(module, "__file__", "?")))
            return 1
        path = getattr(module, "__file__", None)  # None: a built-in module
        if name.split(".")[0] == "smtap" and path and not path.startswith(%r):
            print("smtap module from elsewhere: %%s %%s" %% (name, path))
            return 1
    print("\\n".join(names))
    return 0
'''

FAKE = ("import os, sys\nsys.stderr.write('HOST MODULE %s IMPORTED\\n')\n"
        "sys.stderr.flush()\nos._exit(99)\n")


def fake_host_modules(directory):
    """The host's sm as it is on dom0: flat modules and an `sm` package, each of which
    kills the process if imported."""
    os.makedirs(directory, exist_ok=True)
    for name in HOST_MODULES:
        if name in ("sm", "tapdisk"):
            os.makedirs(os.path.join(directory, name), exist_ok=True)
            target = os.path.join(directory, name, "__init__.py")
        else:
            target = os.path.join(directory, name + ".py")
        with open(target, "w") as f:
            f.write(FAKE % name)


def test_runtime_installed_launchers_never_load_host_modules(tmp_path):
    """A host tree with the host's sm modules beside our SR launchers (sys.path[0] of
    a script) and on PYTHONPATH (site-packages): our launchers load only our code."""
    dest = make_install(tmp_path / "d", target="install-host")
    lib = os.path.join(dest, "opt/smtap/lib")
    smdir = os.path.join(dest, "opt/xensource/sm")
    fake_host_modules(smdir)
    fake_host_modules(str(tmp_path / "site-packages"))
    with open(os.path.join(lib, "smtap", "_importall_test.py"), "w") as f:
        f.write(IMPORT_ALL % (HOST_MODULES, os.path.join(lib, "smtap") + "/"))
    launcher = os.path.join(smdir, "importallSR")
    with open(os.path.join(TOP, "bin", "launcher.in")) as f:
        text = f.read()
    with open(launcher, "w") as f:
        f.write(text.replace("@PYTHON@", VENV_PYTHON).replace("@LIBREL@", "../../smtap/lib")
                .replace("@MODULE@", "smtap._importall_test"))
    os.chmod(launcher, 0o755)
    env = host_env(tmp_path / "root", PYTHONPATH=str(tmp_path / "site-packages"))
    (tmp_path / "root").mkdir()
    out = run([launcher], env=env, cwd=smdir, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    imported = out.stdout.split()
    assert "smtap.sm.sr" in imported and "smtap.tapdisk.daemon" in imported, imported
    # The real launchers too, with the same fake host around them.
    out = run([os.path.join(dest, "opt/smtap/bin/tap-ctl"), "list"], env=env, cwd=smdir,
              check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    types = [t for t in RPM_SR_TYPES if t in ALL_SR_TYPES]
    if not types:
        pytest.skip("no RPM SR driver (sm/drivers/ramSR.py) yet: only tap-ctl was run")
    for t in types:
        info = driver_info(os.path.join(smdir, t + "SR"), tmp_path / "root", env=env)
        assert info["driver_version"]
