"""FileSR: VDIs as raw sparse files <uuid>.raw in a directory, served by the engine's
aio driver.

device-config:location is the directory (absolute). sr_create makes it when missing;
sr_attach wants it there. Snapshot and clone need an image format with a parent chain
(VHD): until that lands they are not advertised, so they answer 38 (not supported)
rather than copying whole disks.
"""
import os
import sys

from smtap.version import VERSION
from smtap.sm import command
from smtap.sm import dirsr
from smtap.sm import errors
from smtap.sm import log

DRIVER_INFO = {
    "name": "Local Path",
    "description": "SR keeping VDIs as raw sparse files in a local directory",
    "vendor": "smtap",
    "copyright": "(C) smtap contributors",
    "driver_version": VERSION,
    "required_api_version": "1.0",
    "capabilities": ["SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH",
                     "VDI_ACTIVATE", "VDI_DEACTIVATE", "VDI_RESIZE", "VDI_INTRODUCE",
                     "THIN_PROVISIONING"],
    "configuration": [
        {"key": "location", "description": "absolute path of the directory holding the VDIs"},
    ],
}


class FileSR(dirsr.DirSR):
    EXT = ".raw"

    def load(self, sr_uuid):
        self.path = self.dconf.get("location")
        if not self.path:
            errors.raise_error("ConfigLocationMissing", "device-config:location is required")
        if not os.path.isabs(self.path):
            errors.raise_error("InvalidArg", "device-config:location must be an absolute path, "
                               "got %s" % self.path)
        self.path = os.path.normpath(self.path)

    def create(self, size):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            errors.raise_error("InvalidArg", "%s exists and is not a directory" % self.path)
        self.refuse_shared_directory("SRExists")
        if not os.path.isdir(self.path):
            os.makedirs(self.path, 0o755)
            log.info("made %s", self.path)

    def attach(self):
        self.check_path()
        self.refuse_shared_directory("SRUnavailable")

    def refuse_shared_directory(self, error):
        """Two SRs on one directory would each claim the other's VDI files."""
        mine = os.path.realpath(self.path)
        for pbd in self.xenapi.PBD.get_all_records().values():
            other = pbd["device_config"].get("location")
            if pbd["SR"] == self.ref or not other or os.path.realpath(other) != mine:
                continue
            sr = self.xenapi.SR.get_record(pbd["SR"])
            errors.raise_error(error, "%s is the directory of SR %s (%s)"
                               % (self.path, sr["uuid"], sr["name_label"]))

    def detach(self):
        pass     # nothing mounted; active VDIs are XAPI's to unplug first

    def delete(self):
        self.check_path()
        if self.locations() or self.db_vdis():
            errors.raise_error("SRNotEmpty", "destroy the VDIs first")
        # The directory may be the user's: leave it (and anything else in it).


class FileVDI(dirsr.DirVDI):
    # No VDI_SNAPSHOT / VDI_CLONE: the dispatcher answers them with 38 (not supported).
    def tapdisk_params(self, writable):
        self.require_file()
        return "aio:%s" % self.file


FileSR.VDI_CLASS = FileVDI


def main():
    return command.run(FileSR, DRIVER_INFO)


if __name__ == "__main__":
    sys.exit(main())
