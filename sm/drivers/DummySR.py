"""DummySR: the template SR driver. Copy it to start a new SR type.

A dummy SR keeps its VDIs in XAPI's database only: there is no storage. It checks
that every call carries exactly the keys smapi-v1.md lists (strict_keys=True), which
makes it the toolstack's conformance target. vdi_attach answers where an NBD export
*would* be (nbd:unix:<runtime_dir>/nbd/<sr>/<vdi>) but starts nothing, so nothing
can read that socket.

A driver module is DRIVER_INFO, an SR class, a VDI class and main().
"""
import sys

from smtap import names
from smtap.version import VERSION
from smtap.sm import command
from smtap.sm import errors
from smtap.sm import sr
from smtap.sm import vdi

DRIVER_INFO = {
    "name": "Dummy",
    "description": "SR driver keeping VDIs in the XAPI database only (template, tests)",
    "vendor": "smtap",
    "copyright": "(C) smtap contributors",
    "driver_version": VERSION,
    "required_api_version": "1.0",
    # What XAPI may ask for; a command whose capability is missing answers 38.
    "capabilities": ["SR_PROBE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH",
                     "VDI_ACTIVATE", "VDI_DEACTIVATE", "VDI_SNAPSHOT", "VDI_CLONE",
                     "VDI_RESIZE", "VDI_INTRODUCE", "VDI_UPDATE", "VDI_GENERATE_CONFIG"],
    # device-config keys the SR takes: [{"key": ..., "description": ...}]
    "configuration": [],
}


class DummySR(sr.SR):
    def load(self, sr_uuid):
        pass  # no device-config to check: a real driver validates self.dconf here

    def create(self, size):
        pass  # a real driver formats the storage

    def delete(self):
        if self.db_vdis():
            errors.raise_error("SRNotEmpty", "destroy the VDIs first")

    def attach(self):
        pass

    def detach(self):
        pass

    def scan(self):
        pass  # XAPI's records are the only copy: nothing to reconcile

    def probe(self):
        return "<SRlist></SRlist>"  # a dummy SR cannot be discovered


class DummyVDI(vdi.VDI):
    def load(self, vdi_uuid):
        # A real driver reads its own metadata. vdi_attach_from_config runs without
        # XAPI (no session): then only the uuid and location are known.
        if self.sr.request.session_ref:
            self.load_db_record()

    def create(self, size):
        self.size = size
        self.db_introduce()
        return self

    def introduce(self):
        self.db_introduce()
        return self

    def delete(self):
        self.db_forget()

    def attach(self, writable):
        return {"params_nbd": names.params_nbd(self.sr.uuid, self.uuid)}

    def attach_from_config(self):
        return self.attach(True)

    def detach(self):
        pass

    def activate(self, writable):
        self.db_set_host_mode(writable)

    def deactivate(self):
        self.db_clear_host_mode()

    def snapshot(self, driver_params):
        snap = self._copy()
        snap.is_a_snapshot = True
        snap.snapshot_of = self.ref
        snap.snapshot_time = vdi.timestamp()
        snap.db_introduce()
        return snap

    def clone(self, driver_params):
        copy = self._copy()
        copy.db_introduce()
        return copy

    def _copy(self):
        new = self.sr.new_vdi()
        new.copy_fields(self)
        return new

    def resize(self, size):
        if size < self.size:
            errors.raise_error("VDISize", "shrinking %d -> %d is not supported" % (self.size, size))
        self.size = size
        self.db_update()
        return self


DummySR.VDI_CLASS = DummyVDI


def main():
    return command.run(DummySR, DRIVER_INFO, strict_keys=True)


if __name__ == "__main__":
    sys.exit(main())
