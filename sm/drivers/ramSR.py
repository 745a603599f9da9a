"""ramSR: VDIs in RAM, served by the engine's ram driver.

device-config:size (bytes, or with a KiB/MiB/GiB/TiB suffix) is the SR's RAM budget:
the VDIs' virtual sizes add up to at most that (vdi_create, resize, snapshot and clone
past it fail with SRNoSpace). sr_attach mounts a tmpfs of that size at
<sr-mount>/<sr_uuid> holding each VDI as a sparse file <uuid>.ram (and a <uuid>.json
sidecar remembering its seed). An active VDI is served by a tapdisk mapping that file's
own pages ("ram:<file>?shared=1"): writes land in the file, so a snapshot or clone
(copied while the VDI is paused) sees every acknowledged write.

Lifetime of the data, by design:
  - survives vdi_deactivate/vdi_activate (and VBD unplug/plug) while the SR is attached;
  - dropped by sr_detach (the tmpfs is unmounted) and by a host reboot (tmpfs under
    /run). The VDIs themselves stay in XAPI: the next sr_attach brings each one back
    with its seed (sm-config:seed=<raw image>) or zeros.
  - VDI_RESET_ON_BOOT/2: with on-boot=reset, vdi_epoch_begin (VM start) returns the VDI
    to its seed or zeros.
RAM use: the data is held once (the tmpfs pages, which the tapdisks map), so the SR
holds at most its budget; sr_create and sr_attach refuse a budget above MemAvailable.
"""
import json
import os
import sys

from smtap import mounts
from smtap import settings
from smtap import sparse
from smtap.version import VERSION
from smtap.sm import command
from smtap.sm import dirsr
from smtap.sm import errors
from smtap.sm import log
from smtap.sm import units
from smtap.sm import vdilink

DRIVER_INFO = {
    "name": "RAM",
    "description": "SR keeping its VDIs in RAM (tmpfs + tapdisk ram driver); "
                   "contents are dropped by SR detach and host reboot",
    "vendor": "smtap",
    "copyright": "(C) smtap contributors",
    "driver_version": VERSION,
    "required_api_version": "1.0",
    "capabilities": ["SR_PROBE", "SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH",
                     "VDI_DETACH", "VDI_ACTIVATE", "VDI_DEACTIVATE", "VDI_SNAPSHOT",
                     "VDI_CLONE", "VDI_RESIZE", "VDI_INTRODUCE", "VDI_RESET_ON_BOOT/2"],
    "configuration": [
        {"key": "size", "description": "the SR's RAM budget: bytes, or with a KiB/MiB/GiB/TiB "
                                       "suffix (at most the host's MemAvailable)"},
    ],
}

MOUNT_SOURCE = "smtap-ram"
MARGIN = 1 << 20        # tmpfs room beyond the budget: sidecars and the SR's own record
SR_RECORD = ".sr.json"


def _run(argv):
    import subprocess  # here: only SR attach/detach run commands
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode:
        raise OSError("%s failed (%d): %s" % (" ".join(argv), proc.returncode,
                                              proc.stderr.strip()))


def ram_mounts():
    """{mount point: sr_uuid} of the ram SRs mounted under sr_mount_dir()."""
    base = settings.sr_mount_dir()
    return dict((point, os.path.basename(point)) for source, point, fstype in mounts.entries()
                if source == MOUNT_SOURCE and fstype == "tmpfs"
                and os.path.dirname(point) == base)


class RamSR(dirsr.DirSR):
    EXT = ".ram"

    def load(self, sr_uuid):
        self.budget = None
        if self.dconf.get("size"):
            self.budget = units.parse_size(self.dconf["size"], "device-config:size")
        self.path = os.path.join(settings.sr_mount_dir(), sr_uuid) if sr_uuid else None

    def require_budget(self):
        self.require_config("size")

    def check_memory(self):
        available = units.mem_available()
        if self.budget > available:
            errors.raise_error(
                "SRNoSpace", "a ram SR of %s (%d bytes) may hold that much in RAM, but the "
                "host has %s (%d bytes) available"
                % (units.human(self.budget), self.budget, units.human(available), available))

    def mounted(self):
        return self.path in ram_mounts()

    # -- SR commands ------------------------------------------------------------------
    def create(self, size):
        self.require_budget()
        self.check_memory()      # nothing to format: the storage is made by sr_attach

    def attach(self):
        self.require_budget()
        options = "size=%d,mode=0700" % (self.budget + MARGIN)
        if self.mounted():       # attached already: follow a changed budget
            _run(["mount", "-o", "remount," + options, self.path])
        else:
            self.check_memory()
            os.makedirs(self.path, exist_ok=True)
            _run(["mount", "-t", "tmpfs", "-o", options, MOUNT_SOURCE, self.path])
            log.info("ram SR %s: tmpfs of %d bytes at %s", self.uuid, self.budget, self.path)
        with open(os.path.join(self.path, SR_RECORD), "w") as f:
            json.dump({"uuid": self.uuid, "budget": self.budget}, f)
        self.restore_vdis()

    def restore_vdis(self):
        """After a reboot or a detach the tmpfs is empty but XAPI still has the VDIs:
        bring each back with its seed, or zeros."""
        for ref, record in self.db_vdis().items():
            v = self.VDI_CLASS(self, record["uuid"])
            v.ref = ref
            v.load_db_record(record)
            if os.path.exists(v.file) or v.size <= 0:
                continue
            log.info("restoring VDI %s (%d bytes, seed %s)", v.uuid, v.size,
                     v.sm_config.get("seed"))
            try:
                v.make_file(v.size)
            except Exception as e:
                log.warning("VDI %s: %s; restored as zeros", v.uuid, e)
                v.remove_files()
                v.sm_config.pop("seed", None)
                v.make_file(v.size)

    def detach(self):
        if not self.mounted():
            return
        active = vdilink.active_vdis(self.uuid)
        if active:
            errors.raise_error("SRInUse", "VDIs still active on this host: %s"
                               % ", ".join(active))
        _run(["umount", self.path])
        os.rmdir(self.path)
        log.info("ram SR %s detached: its VDIs' contents are dropped", self.uuid)

    def delete(self):
        if self.db_vdis():
            errors.raise_error("SRNotEmpty", "destroy the VDIs first")
        self.detach()

    def probe(self):
        # Here, not at import: only probe escapes. Not xml.sax.saxutils: it imports
        # urllib.request.
        from html import escape
        items = []
        for point, sr_uuid in sorted(ram_mounts().items()):
            try:
                with open(os.path.join(point, SR_RECORD)) as f:
                    budget = json.load(f)["budget"]
            except (OSError, ValueError, KeyError):
                continue
            items.append("<SR><UUID>%s</UUID><Size>%d</Size></SR>" % (escape(sr_uuid), budget))
        return "<SRlist>%s</SRlist>" % "".join(items)

    def physical_size(self):
        return self.budget

    def reserve(self, extra):
        """The budget bounds the sum of virtual sizes (callers hold the SR lock)."""
        self.require_budget()
        used, _ = self.usage()
        if used + extra > self.budget:
            errors.raise_error(
                "SRNoSpace", "%d more bytes asked, %d of the SR's %d-byte budget already "
                "reserved (%d free)" % (extra, used, self.budget, max(0, self.budget - used)))


class RamVDI(dirsr.DirVDI):
    O_DIRECT = False             # the data is in memory: O_DIRECT buys nothing
    O_DIRECT_REASON = "SR_NOT_SUPPORTED"

    @property
    def sidecar(self):
        return os.path.join(self.sr.path, self.location + ".json")

    def extra_files(self):
        return [self.sidecar]

    def tapdisk_params(self, writable):
        self.require_file()
        return "ram:%s?shared=1" % self.file

    def load_storage(self):
        dirsr.DirVDI.load_storage(self)
        try:
            with open(self.sidecar) as f:
                seed = json.load(f).get("seed")
        except (OSError, ValueError):
            return
        if seed:
            self.sm_config["seed"] = seed

    # -- create / seed / reset --------------------------------------------------------------
    def create(self, size):
        seed = self.sm_config.get("seed")
        if seed:
            seed_size = self.seed_size(seed)
            if size == 0:
                size = seed_size
            elif seed_size > size:
                errors.raise_error("VDISize", "the seed %s is %d bytes, more than the VDI's %d"
                                   % (seed, seed_size, size))
        return dirsr.DirVDI.create(self, size)

    @staticmethod
    def seed_size(seed):
        if not os.path.isabs(seed) or not os.path.isfile(seed):
            errors.raise_error("InvalidArg", "sm-config:seed=%s is not a raw image file "
                               "(an absolute path on the host)" % seed)
        return os.path.getsize(seed)

    def make_file(self, size):
        seed = self.sm_config.get("seed")
        if seed:
            self.seed_size(seed)
            sparse.copy(seed, self.file, size)
        else:
            dirsr.DirVDI.make_file(self, size)
        with open(self.sidecar, "w") as f:
            json.dump({"seed": seed or None}, f)

    def epoch_begin(self):
        if self.sr.request.vdi_on_boot != "reset":
            return
        self.require_file()
        if self.is_active():
            errors.raise_error("VDIInUse", "VDI %s is active: cannot reset it" % self.uuid)
        seed = self.sm_config.get("seed")
        if seed:
            self.seed_size(seed)
            sparse.copy(seed, self.file, self.size)
        else:
            os.truncate(self.file, 0)      # frees the RAM
            os.truncate(self.file, self.size)
        log.info("VDI %s reset to %s", self.uuid, seed or "zeros")

    # -- copies --------------------------------------------------------------------------------
    def snapshot(self, driver_params):
        return self.copy_to_new(is_snapshot=True)

    def clone(self, driver_params):
        return self.copy_to_new(is_snapshot=False)

    def copy_extra_files(self, new):
        with open(new.sidecar, "w") as f:
            json.dump({"seed": self.sm_config.get("seed")}, f)


RamSR.VDI_CLASS = RamVDI


def main():
    return command.run(RamSR, DRIVER_INFO)


if __name__ == "__main__":
    sys.exit(main())
