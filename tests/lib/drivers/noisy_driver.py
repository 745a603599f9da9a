"""A driver that misbehaves on purpose: prints to stdout, lets a child write to fd 1,
and fails each command with an unexpected exception (see test_sm_dispatch.py)."""
import os
import sys

from smtap.sm import command, errors
from smtap.sm.drivers import DummySR

INFO = dict(DummySR.DRIVER_INFO, name="Noisy")


class NoisySR(DummySR.DummySR):
    def load(self, sr_uuid):
        if self.dconf.get("fail_load"):
            raise ValueError("load boom")

    def attach(self):
        print("stray print")
        sys.stdout.flush()
        os.system("echo child output")
        os.write(1, b"raw write to fd 1\n")

    def scan(self):
        raise RuntimeError("scan boom")

    def probe(self):
        return 42  # not a string


class NoisyVDI(DummySR.DummyVDI):
    def load(self, vdi_uuid):
        pass  # no XAPI needed

    def create(self, size):
        raise RuntimeError("create boom")

    def delete(self):
        raise RuntimeError("delete boom")

    def attach(self, writable):
        raise RuntimeError("attach boom")

    def activate(self, writable):
        raise RuntimeError("activate boom")

    def snapshot(self, driver_params):
        raise RuntimeError("snapshot boom")

    def clone(self, driver_params):
        raise RuntimeError("clone boom")

    def resize(self, size):
        raise RuntimeError("resize boom")

    def update(self):
        errors.raise_error("SRNoSpace", "need 1 GiB more")


NoisySR.VDI_CLASS = NoisyVDI

if __name__ == "__main__":
    sys.exit(command.run(NoisySR, INFO))
