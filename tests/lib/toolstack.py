"""A simulated host: a tree installed into a host root (make install) and its toolstack
(smtap-xapi) started there, driven with the real XenAPI client and xe. Host is the
toolstack tests' host; DriverHost adds the XenAPI steps of the SR driver tests,
E2EHost the installed xe's steps of the end-to-end tests and the engine state they
check; records made through XenAPI (new_sr, new_vdi, dom0_vbd); raw HTTP to the daemon."""
import json
import os
import re
import signal
import subprocess
import xmlrpc.client

import pytest
import XenAPI

from lib import engine, hosts, vdis
from lib.checkout import TOP, VENV_PYTHON
from lib.install import install_dev_tree
from lib.procs import run
from lib.sizes import GiB
from smtap import names, settings
from smtap.toolstack import client, errors, hostroot

START_TIMEOUT = 20
TESTSR = os.path.join(TOP, "tests", "lib", "drivers", "testsr.py")


def failure(fn, *args):
    """The ErrorDescription of a XenAPI call that must fail."""
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


class XeError(AssertionError):
    """A failed xe command: its error code (None if xe printed none we know) and stderr."""

    def __init__(self, args, res):
        # xe prints a documented error as its description, any other as its code
        m = re.search(r"^Error code: (\S+)", res.stderr, re.M)
        self.code = m.group(1) if m else errors.code_of_description(
            res.stderr.split("\n", 1)[0])
        self.stderr = res.stderr
        AssertionError.__init__(self, "xe %s failed (%d):\n%s%s" % (
            " ".join(args), res.returncode, res.stdout, res.stderr.strip()))


class Host(object):
    """One simulated host: an installed root and its toolstack daemon."""
    xe_path = "xe"          # the checkout's (PATH); E2EHost: the installed one

    def __init__(self, root):
        self.root = str(root)
        self.proc = None
        self.log = os.path.join(self.root, "smtap-xapi.out")
        self.session_obj = self.x = None

    def path(self, host_path):
        return settings.host_path(host_path)

    def install(self):
        install_dev_tree(self.root)

    def write(self, host_path, text, mode=0o644):
        path = settings.host_path(host_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def conf(self, name, text):
        """A drop-in under /etc/xapi.conf.d (None: the main xapi.conf)."""
        target = "/etc/xapi.conf" if name is None else "/etc/xapi.conf.d/%s" % name
        return self.write(target, text)

    # -- the test driver (tests/lib/drivers/testsr.py) ---------------------------------
    def add_driver(self, name="TestSR", **config):
        """The test driver installed as <name>, configured by a JSON file it reads each
        call."""
        self.write("/opt/xensource/sm/%s" % name,
                   "#!%s\nimport runpy\nrunpy.run_path(%r, {'DRIVER_NAME': %r}, '__main__')\n"
                   % (VENV_PYTHON, TESTSR, name), 0o755)
        self.configure_driver(name, **config)

    def configure_driver(self, name="TestSR", **config):
        self.write("/var/lib/testsr/%s.json" % name, json.dumps(config))

    def driver_calls(self, name="TestSR"):
        try:
            with open(settings.host_path("/var/lib/testsr/%s.calls" % name)) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def last_call(self, command, name="TestSR"):
        """The last recorded call of `command` to the test driver."""
        calls = [c for c in self.driver_calls(name) if c["command"] == command]
        assert calls, "%s was never called; calls: %s" % (
            command, [c["command"] for c in self.driver_calls(name)])
        return calls[-1]

    def commands(self, name="TestSR"):
        return [c["command"] for c in self.driver_calls(name)]

    # -- the daemon --------------------------------------------------------------------
    def start(self):
        out = open(self.log, "a")
        self.proc = subprocess.Popen(["smtap-xapi"], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        if not hostroot.wait_for_socket(settings.xapi_socket(), START_TIMEOUT):
            self.stop()
            raise RuntimeError("smtap-xapi did not start:\n" + self.output())
        return self

    def output(self):
        with open(self.log) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def session(self):
        return client.login(settings.xapi_socket(), originator="tests")

    def start_session(self):
        """Start the daemon and log in: self.session_obj, self.x (its xenapi)."""
        self.start()
        self.session_obj = self.session()
        self.x = self.session_obj.xenapi
        return self

    # -- xe ------------------------------------------------------------------------------
    def xe(self, *args, check=False):
        res = run(self.xe_path, *args, check=False, timeout=120)
        if check and res.returncode != 0:
            raise XeError(args, res)
        return res

    def xe_ok(self, *args):
        return self.xe(*args, check=True).stdout.strip()

    def xe_fails(self, *args):
        """The error code of an xe command that must fail (and its whole stderr)."""
        res = self.xe(*args)
        assert res.returncode != 0, "xe %s succeeded: %s" % (" ".join(args), res.stdout)
        err = XeError(args, res)
        assert err.code, res.stderr
        return err.code, res.stderr

    def cleanup(self):
        """Log out, stop the daemon, then remove whatever of the root is left (mounts,
        loop devices, processes)."""
        if self.session_obj is not None:
            try:
                self.session_obj.xenapi.session.logout()
            except Exception:
                pass
        self.stop()
        hostroot.cleanup(self.root)


class DriverHost(Host):
    """A started host plus XenAPI helpers for SR driver tests."""

    def start_session(self):
        Host.start_session(self)
        self.host_ref = self.x.host.get_all()[0]
        self.dom0 = self.x.host.get_control_domain(self.host_ref)
        return self

    def sr_create(self, sr_type, device_config, name="sr"):
        return self.x.SR.create(self.host_ref, device_config, "0", name, "", sr_type,
                                "user", False, {})

    def vdi_create(self, sr, size, sm_config=None, name="disk"):
        return new_vdi(self.x, sr, size, name, other_config={}, sm_config=sm_config or {})

    def plug(self, vdi, mode="RW"):
        vbd = dom0_vbd(self.x, vdi, mode, qos_algorithm_type="", qos_algorithm_params={})
        self.x.VBD.plug(vbd)
        return vbd

    def unplug(self, vbd):
        self.x.VBD.unplug(vbd)
        self.x.VBD.destroy(vbd)

    def pbd(self, sr):
        return self.x.SR.get_PBDs(sr)[0]

    def call_plugin(self, plugin, fn, args):
        return self.x.host.call_plugin(self.host_ref, plugin, fn, args)


class E2EHost(Host):
    """A started host: `xe` (the installed one) for actions, XenAPI for inspection."""

    @property
    def xe_path(self):
        return os.path.join(self.root, "opt", "smtap", "bin", "xe")

    def start_all(self):
        self.start_session()
        self.host_uuid = self.xe_ok("host-list", "--minimal")
        self.dom0 = self.xe_ok("vm-list", "is-control-domain=true", "--minimal")
        return self

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

    # -- engine state (sr, vdi: uuids) ---------------------------------------------------
    def link(self, sr, vdi):
        return names.link_path(sr, vdi)

    def nbd_uri(self, sr, vdi):
        return engine.nbd_uri(self.link(sr, vdi), vdi)

    def tapdisk_pid(self, sr, vdi):
        return engine.linked_tapdisk(self.link(sr, vdi))[0]

    def host_tags(self, vdi):
        return vdis.host_tags(self.x, self.x.VDI.get_by_uuid(vdi))

    def tapdisks(self):
        return hosts.tapdisks_under(self.root)

    def nbdfuse_mounts(self):
        return hosts.nbdfuse_mounts(self.root)


def traces(host, sr, vdi):
    """What a plugged VDI leaves on this host besides the toolstack itself, once the SR's
    garbage collector (file SR) is done."""
    from smtap.sm import gcctl
    gcctl.wait_idle(sr)
    xapi_pid = host.proc.pid if host.proc else None
    found = []
    found += ["process %d: %s" % p for p in hostroot.processes_under(host.root) if p[0] != xapi_pid]
    found += ["loop %s -> %s" % d for d in hostroot.loops_under(host.root)]
    found += ["mount %s (%s)" % m[:2] for m in hostroot.mounts_under(host.root)
              if m[1] != "tmpfs"]           # the ram SR's own tmpfs stays while it is plugged
    found += ["runtime %s" % e for e in hostroot.runtime_entries(host.root)]
    if os.path.lexists(host.link(sr, vdi)):
        found.append("link " + host.link(sr, vdi))
    if host.xe_ok("vdi-list", "uuid=" + vdi, "--minimal"):     # still a record
        found += ["tag %s" % t for t in host.host_tags(vdi)]
    return found


# -- records through XenAPI (x: a session's xenapi) -------------------------------------
def new_sr(x, name="sr", sr_type="dummy"):
    """An SR of sr_type (DummySR's by default) on the host, no device config."""
    host = x.host.get_all()[0]
    return x.SR.create(host, {}, "0", name, "", sr_type, "user", False, {})


def new_vdi(x, sr, size=GiB, name="disk", **fields):
    """VDI.create with a user VDI's record (fields: others, or instead)."""
    record = {"SR": sr, "virtual_size": str(size), "name_label": name, "type": "user",
              "sharable": False, "read_only": False, "other_config": {"made-by": "tests"},
              "sm_config": {}}
    record.update(fields)
    return x.VDI.create(record)


def dom0_vbd(x, vdi, mode="RW", device="autodetect", **fields):
    """VBD.create of a disk VBD for dom0 (not plugged)."""
    dom0 = x.host.get_control_domain(x.host.get_all()[0])
    record = {"VM": dom0, "VDI": vdi, "userdevice": device, "mode": mode, "type": "Disk",
              "bootable": False, "empty": False, "unpluggable": True, "other_config": {}}
    record.update(fields)
    return x.VBD.create(record)


# -- raw HTTP to the daemon ------------------------------------------------------------
def raw_post(body):
    """POST bytes to the daemon as any HTTP client would; the response body."""
    conn = client._UnixConnection(settings.xapi_socket())
    conn.request("POST", "/", body, {"Content-Type": "text/xml"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200
    return data.decode()


def raw_call(method, *params):
    (result,), _ = xmlrpc.client.loads(raw_post(xmlrpc.client.dumps(params, method)))
    return result
