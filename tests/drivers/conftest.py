"""Driver fixtures: a simulated host (installed tree + smtap-xapi) per test, driven with
the real XenAPI client; whatever a test leaves (tapdisks, tmpfs mounts) goes with it."""
import importlib.util
import os

import pytest

from smtap.toolstack.hostroot import cleanup

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))


def _toolstack_fixtures():
    # Not `import conftest`: every tests/*/conftest.py has that name.
    spec = importlib.util.spec_from_file_location(
        "toolstack_fixtures", os.path.join(TOP, "tests", "toolstack", "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Host = _toolstack_fixtures().Host


class DriverHost(Host):
    """A started host plus XenAPI helpers for SR driver tests."""

    def start_session(self):
        self.start()
        self.session_obj = self.session()
        self.x = self.session_obj.xenapi
        self.host_ref = self.x.host.get_all()[0]
        self.dom0 = self.x.host.get_control_domain(self.host_ref)
        return self

    def sr_create(self, sr_type, device_config, name="sr"):
        return self.x.SR.create(self.host_ref, device_config, "0", name, "", sr_type,
                                "user", False, {})

    def vdi_create(self, sr, size, sm_config=None, name="disk"):
        return self.x.VDI.create({"SR": sr, "virtual_size": str(size), "name_label": name,
                                  "type": "user", "sharable": False, "read_only": False,
                                  "other_config": {}, "sm_config": sm_config or {}})

    def plug(self, vdi, mode="RW"):
        vbd = self.x.VBD.create({"VM": self.dom0, "VDI": vdi, "userdevice": "autodetect",
                                 "bootable": False, "mode": mode, "type": "Disk",
                                 "empty": False, "other_config": {},
                                 "qos_algorithm_type": "", "qos_algorithm_params": {}})
        self.x.VBD.plug(vbd)
        return vbd

    def unplug(self, vbd):
        self.x.VBD.unplug(vbd)
        self.x.VBD.destroy(vbd)

    def pbd(self, sr):
        return self.x.SR.get_PBDs(sr)[0]

    def call_plugin(self, plugin, fn, args):
        return self.x.host.call_plugin(self.host_ref, plugin, fn, args)

    def cleanup(self):
        try:
            self.session_obj.xenapi.session.logout()
        except Exception:
            pass
        Host.cleanup(self)       # the toolstack and every process under the root
        cleanup(self.root)


@pytest.fixture
def dhost(smtap_root):
    h = DriverHost(smtap_root)
    h.session_obj = None
    h.install()
    try:
        yield h.start_session()
    finally:
        h.cleanup()


@pytest.fixture
def ram_sr(dhost):
    """A 64 MiB ram SR, plugged."""
    return dhost.sr_create("ram", {"size": "64MiB"})
