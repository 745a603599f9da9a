"""The RPM installed into an empty root, every launcher and plugin it carries run with a
bare Python 3.6: what dom0 has, the standard library and XenAPI, nothing else (no cffi,
no lxml, no pip). The list of what to run comes from the package itself, so commands
that land later (vhd-util, td-util) are run too.
"""
import os
import re
import shutil
import xmlrpc.client

import pytest

from lib.checkout import TOP
from lib.engine import nbd_uri
from lib.install import (DRIVER_INFO_CALL, STOCK_SM_PLUGINS, py36_prefix, rpm_install,
                         rpm_query_list, stock_host)
from lib.procs import run
from lib.runlock import PY36_BUILDS
from lib.sizes import MiB
from smtap import names
from smtap.toolstack import hostroot

pytestmark = [pytest.mark.rpm, PY36_BUILDS,
              pytest.mark.skipif(py36_prefix() is None, reason="no Python 3.6 (make py36)")]


@pytest.fixture(scope="session")
def bare36(tmp_path_factory):
    """A venv of Python 3.6 without pip, holding only XenAPI (as xapi-core's XenAPI.py)."""
    venv = str(tmp_path_factory.mktemp("bare36") / "py")
    run([os.path.join(py36_prefix(), "bin", "python3.6"), "-m", "venv", "--without-pip", venv])
    py = os.path.join(venv, "bin", "python")
    site = run([py, "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    xenapi = run([os.path.join(TOP, ".venv36", "bin", "python"), "-c",
                  "import os, XenAPI; print(os.path.dirname(XenAPI.__file__))"]).stdout.strip()
    shutil.copytree(xenapi, os.path.join(site, "XenAPI"))
    assert sorted(os.listdir(site)) == ["XenAPI"]
    for module in ("cffi", "_cffi_backend", "lxml", "pip"):
        assert run([py, "-c", "import " + module], check=False).returncode == 1, module
    run([py, "-c", "import XenAPI, ctypes, xml.etree.ElementTree"])
    return py


def launched(py, root, path, *args, check=True, timeout=60):
    """Run an installed script the way its shebang would, with the bare interpreter."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SMTAP_ROOT": str(root)}
    proc = run(py, path, *args, check=False, env=env, cwd="/", timeout=timeout)
    assert "Traceback" not in proc.stderr, "%s: %s" % (path, proc.stderr)
    if check:
        assert proc.returncode == 0, "%s %s: exit %d\n%s%s" % (
            path, args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def plugin_call(fn, args):
    return xmlrpc.client.dumps(("OpaqueRef:NULL", args), fn)


def test_every_launcher_and_plugin_answers_under_bare_python36(built_rpm, bare36, smtap_root):
    root = str(smtap_root)
    rpm_install(built_rpm, root)
    stock_host(root)
    files = rpm_query_list(built_rpm)
    commands = sorted(p for p in files if p.startswith("/opt/smtap/bin/"))
    drivers = sorted(p for p in files if p.startswith("/opt/xensource/sm/"))
    plugins = sorted(p for p in files if p.startswith("/etc/xapi.d/plugins/"))
    assert commands and drivers and plugins
    host = lambda p: os.path.join(root, p.lstrip("/"))      # noqa: E731

    # Every command answers --help: no traceback, something said (its usage at least),
    # and nothing started.
    for c in commands:
        proc = launched(bare36, root, host(c), "--help", check=False)
        assert (proc.stdout + proc.stderr).strip(), c
    assert hostroot.leftovers(root) == []

    # %post's command: the host's list plus ours.
    helper = host("/opt/smtap/bin/smtap-sm-plugins")
    launched(bare36, root, helper, "--write")
    assert launched(bare36, root, helper).stdout.split() == STOCK_SM_PLUGINS + ["linstor", "ram"]

    # The engine: tap-ctl spawns tapdisks on the same bare interpreter; ram and aio (libaio
    # through ctypes) serve real NBD clients.
    tap_ctl = host("/opt/smtap/bin/tap-ctl")
    runtime = run([bare36, "-c", "import sys; sys.path.insert(0, %r)\n"
                   "from smtap import settings; print(settings.runtime_dir())"
                   % host("/opt/smtap/lib")], env={"SMTAP_ROOT": root}).stdout.strip()
    assert runtime == host("/run/smtap/blktap-control")      # the host profile's
    img = os.path.join(root, "disk.img")
    with open(img, "wb") as f:
        f.write(os.urandom(4 * MiB))
    for params in ("ram:%s" % img, "aio:%s" % img):
        launched(bare36, root, tap_ctl, "create", "-a", params)
        (line,) = launched(bare36, root, tap_ctl, "list").stdout.splitlines()
        m = re.match(r"pid=(\d+) minor=(\d+) state=0 args=(\S+)$", line)
        assert m and m.group(3) == params, line
        pid, minor = int(m.group(1)), m.group(2)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            assert f.read().split(b"\0")[0].decode() == bare36
        sock = names.nbd_path(pid, int(minor), runtime)
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img,
             nbd_uri(sock)])
        if params.startswith("aio"):
            with open("/proc/%d/maps" % pid) as f:
                assert "libsmtap-aio.so.1" in f.read()
        launched(bare36, root, tap_ctl, "destroy", "-p", str(pid), "-m", minor)
        assert hostroot.wait_dead(pid)

    # Each SR launcher: sr_get_driver_info, as XAPI calls it.
    for d in drivers:
        (info,), _ = xmlrpc.client.loads(launched(bare36, root, host(d),
                                                  DRIVER_INFO_CALL).stdout)
        assert info["driver_version"] and info["capabilities"], d

    # Each host plugin: XAPI's calling convention; an unknown function is refused by
    # name, a known one that needs no XAPI answers.
    for p in plugins:
        out = launched(bare36, root, host(p), plugin_call("frobnicate", {})).stdout
        (result,), _ = xmlrpc.client.loads(out)
        assert result == {"Status": "Failure",
                          "ErrorDescription": ["UNKNOWN_XENAPI_PLUGIN_FUNCTION", "frobnicate"]}
    ids = {"sr_uuid": "0" * 8 + "-0000-0000-0000-" + "0" * 12, "vdi_uuid": "1" * 36}
    for name, fn, args, value in [("smtap-on-slave", "is_open", ids, "False"),
                                  ("smtap-tapdisk-pause", "pause", ids, "False"),
                                  ("smtap-testing-hooks", "list", {}, None)]:
        out = launched(bare36, root, host("/etc/xapi.d/plugins/" + name),
                       plugin_call(fn, args)).stdout
        (result,), _ = xmlrpc.client.loads(out)
        assert result["Status"] == "Success", (name, result)
        assert value is None or result["Value"] == value, (name, result)
    assert hostroot.leftovers(root) == []
