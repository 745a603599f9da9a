"""End-to-end fixtures: a simulated host (installed tree + smtap-xapi) per test, driven
through the installed `xe` like a person would, checked with the real XenAPI client and
the machine's own state (loop devices, mounts, processes). Whatever a test leaves behind
is removed afterwards, even on failure; tests assert that nothing was left."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from lib.fs import TOP
from smtap import names
from smtap.toolstack import errors, hostroot


def _toolstack_fixtures():
    # Not `import conftest`: every tests/*/conftest.py has that name.
    spec = importlib.util.spec_from_file_location(
        "e2e_toolstack_fixtures", os.path.join(TOP, "tests", "toolstack", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Host = _toolstack_fixtures().Host


class XeError(AssertionError):
    def __init__(self, args, res):
        # xe prints a documented error as its description, any other as its code
        m = re.search(r"^Error code: (\S+)", res.stderr, re.M)
        self.code = m.group(1) if m else errors.code_of_description(
            res.stderr.split("\n", 1)[0])
        self.stderr = res.stderr
        AssertionError.__init__(self, "xe %s failed (%d): %s" % (" ".join(args), res.returncode,
                                                                res.stderr.strip()))


class E2EHost(Host):
    """A started host: `xe` (the installed one) for actions, XenAPI for inspection."""

    def start_all(self):
        self.start()
        self.session_obj = self.session()
        self.x = self.session_obj.xenapi
        self.host_uuid = self.xe_ok("host-list", "--minimal")
        self.dom0 = self.xe_ok("vm-list", "is-control-domain=true", "--minimal")
        return self

    def xe(self, *args, check=False):
        """The installed xe (<root>/opt/smtap/bin/xe), as on a host."""
        res = subprocess.run([os.path.join(self.root, "opt", "smtap", "bin", "xe")] + list(args),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=120)
        if check and res.returncode != 0:
            raise XeError(args, res)
        return res

    def xe_fails(self, *args):
        """The error code of an xe command that must fail (and its whole stderr)."""
        res = self.xe(*args)
        assert res.returncode != 0, "xe %s succeeded: %s" % (" ".join(args), res.stdout)
        err = XeError(args, res)
        assert err.code, res.stderr
        return err.code, res.stderr

    # -- objects through xe ------------------------------------------------------------
    def sr_create(self, sr_type, tmp_path=None, size="256MiB"):
        if sr_type == "ram":
            config = "device-config:size=" + size
        else:
            config = "device-config:location=%s" % os.path.join(self.root, "srv", "files")
        return self.xe_ok("sr-create", "host-uuid=" + self.host_uuid, "type=" + sr_type,
                          "name-label=e2e-" + sr_type, config)

    def vdi_create(self, sr, size="64MiB", name="disk"):
        return self.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=" + name,
                          "virtual-size=" + size)

    def plug(self, vdi, mode="RW"):
        """vbd-create + vbd-plug for dom0: (vbd uuid, "/dev/loopN")."""
        vbd = self.xe_ok("vbd-create", "vm-uuid=" + self.dom0, "vdi-uuid=" + vdi,
                         "device=autodetect", "mode=" + mode)
        self.xe_ok("vbd-plug", "uuid=" + vbd)
        name = self.xe_ok("vbd-param-get", "uuid=" + vbd, "param-name=device")
        return vbd, "/dev/" + name

    def unplug(self, vbd):
        self.xe_ok("vbd-unplug", "uuid=" + vbd)
        self.xe_ok("vbd-destroy", "uuid=" + vbd)

    def destroy_sr(self, sr):
        for pbd in self.xe_ok("pbd-list", "sr-uuid=" + sr, "--minimal").split(","):
            if pbd:
                self.xe_ok("pbd-unplug", "uuid=" + pbd)
        self.xe_ok("sr-destroy", "uuid=" + sr)

    # -- engine state ------------------------------------------------------------------
    def link(self, sr, vdi):
        return names.link_path(sr, vdi)

    def nbd_uri(self, sr, vdi):
        return "nbd+unix:///%s?socket=%s" % (vdi, self.link(sr, vdi))

    def tapdisk_pid(self, sr, vdi):
        return names.parse_nbd(os.readlink(self.link(sr, vdi)))[0]

    def host_tags(self, vdi):
        ref = self.x.VDI.get_by_uuid(vdi)
        return sorted(k for k in self.x.VDI.get_sm_config(ref) if k.startswith("host_"))

    def tapdisks(self):
        return [p for p in hostroot.processes_under(self.root) if "smtap.tapdisk.daemon" in p[1]]

    def nbdfuse_mounts(self):
        return [m for m in hostroot.mounts_under(self.root) if m[1].startswith("fuse")]

    def cleanup(self):
        try:
            self.session_obj.xenapi.session.logout()
        except Exception:
            pass
        self.stop()
        hostroot.cleanup(self.root)   # unmount, free loop devices, then kill what is left


@pytest.fixture
def smtap_root(monkeypatch):
    """A short root (the VDI links must fit a unix socket path), removed afterwards with
    anything that still runs or is mounted under it."""
    root = hostroot.short_root("/tmp/e")
    monkeypatch.setenv("SMTAP_ROOT", root)
    monkeypatch.setenv("PATH", os.path.join(TOP, ".venv", "bin") + os.pathsep
                       + os.environ.get("PATH", ""))
    yield root
    hostroot.cleanup(root)
    if not hostroot.mounts_under(root):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def e2e(smtap_root):
    h = E2EHost(smtap_root)
    h.session_obj = None
    h.install()
    try:
        yield h.start_all()
    finally:
        h.cleanup()


@pytest.fixture
def mnt(smtap_root):
    """A mount point under the root; unmounted afterwards if a test left it mounted."""
    point = os.path.join(smtap_root, "mnt", "fs")
    os.makedirs(point)
    yield point
    if any(m[0] == point for m in hostroot.mounts_under(smtap_root)):
        if subprocess.run(["umount", point]).returncode:
            subprocess.run(["umount", "-l", point])
