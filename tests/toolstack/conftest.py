"""Toolstack fixtures: a simulated host (installed tree + smtap-xapi) per test."""
import json
import os
import signal
import subprocess

import pytest

from smtap import settings
from smtap.toolstack import client, hostroot

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_PYTHON = os.path.join(TOP, ".venv", "bin", "python3")
START_TIMEOUT = 20


class Host(object):
    """One simulated host: an installed root and its toolstack daemon."""

    def __init__(self, root):
        self.root = str(root)
        self.proc = None
        self.log = os.path.join(self.root, "smtap-xapi.out")

    def path(self, host_path):
        return settings.host_path(host_path)

    def install(self):
        subprocess.run(["make", "-s", "-C", TOP, "install", "DESTDIR=" + self.root,
                        "PYTHON=" + VENV_PYTHON], check=True, stdout=subprocess.DEVNULL)

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

    def add_driver(self, name="TestSR", **config):
        """A test driver (see tests/lib/drivers/testsr.py), configured by a JSON file it
        reads each call."""
        self.write("/opt/xensource/sm/%s" % name,
                   "#!%s\nimport runpy\nrunpy.run_path(%r, {'DRIVER_NAME': %r}, '__main__')\n"
                   % (VENV_PYTHON, os.path.join(TOP, "tests", "lib", "drivers", "testsr.py"),
                      name),
                   0o755)
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

    def xe(self, *args, check=False):
        res = subprocess.run(["xe"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError("xe %s failed (%d):\n%s%s"
                                 % (" ".join(args), res.returncode, res.stdout, res.stderr))
        return res

    def xe_ok(self, *args):
        return self.xe(*args, check=True).stdout.strip()

    def cleanup(self):
        self.stop()
        for pid in (pid for pid, _ in hostroot.processes_under(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def host(smtap_root):
    """An installed, not yet started host; stopped (and leftovers killed) afterwards."""
    h = Host(smtap_root)
    h.install()
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def test_host(host):
    """A started host with the test driver (type "test") whitelisted by a drop-in."""
    host.add_driver()
    host.conf("zz-tests.conf", "sm-plugins = dummy test\n")
    return host.start()


@pytest.fixture
def xapi(host):
    """A XenAPI session (the real client) to a started host running DummySR."""
    host.start()
    session = host.session()
    yield session.xenapi
    try:
        session.xenapi.session.logout()
    except Exception:
        pass

