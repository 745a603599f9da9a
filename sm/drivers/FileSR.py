"""FileSR: VDIs as files in a directory, thin VHDs (<uuid>.vhd, served by the engine's
vhd driver) or qcow2 images (<uuid>.qcow2, the qcow2 driver), raw sparse files
(<uuid>.raw, aio) with sm-config:type=raw.

The format of a new VDI, as XCP-ng's: sm-config:image-format=vhd|qcow2 (or type=) if
given, else the first of device-config:preferred-image-formats (default "vhd,qcow2")
that holds its size: a VDI over 2040 GiB is qcow2 (up to 16381 GiB). Both formats
live side by side in one SR; a chain is of one format. DRIVER_INFO's
supported_image_formats tells XAPI (SM.supported_image_formats).

device-config:location is the directory (absolute). sr_create makes it when missing;
sr_attach wants it there.

Snapshot and clone are upstream FileSR's (sm/vhdchain.py): the VDI keeps its uuid and
file, its data goes to a new hidden base (a "base copy" record, managed=false), the VDI
and the snapshot (or clone) become that base's children (sm-config:vhd-parent). A VDI
active anywhere is paused on every host holding it for the few file operations, then
unpaused onto its new leaf. Chains stop at depth 30 (SnapshotChainTooLong, 109); a full
file system rolls back (SRNoSpace, 44). The garbage collector (sm/gc.py, one process per
SR, started after snapshot, clone, delete, attach and scan) deletes bases nothing needs
and merges the others, so chains stay short; sr_detach and sr_delete abort it.
"""
import os
import sys
import time

from smtap.version import VERSION
from smtap.sm import command
from smtap.sm import dirsr
from smtap.sm import errors
from smtap.sm import log
from smtap.sm import poolpause
from smtap.sm import vhdchain
from smtap.sm.tapvdi import TapdiskVDI

DRIVER_INFO = {
    "name": "Local Path VHD",
    "description": "SR keeping VDIs as VHD (or raw) files in a local directory",
    "vendor": "smtap",
    "copyright": "(C) smtap contributors",
    "driver_version": VERSION,
    "required_api_version": "1.0",
    "capabilities": ["SR_SCAN", "SR_UPDATE", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH",
                     "VDI_DETACH", "VDI_ACTIVATE", "VDI_DEACTIVATE", "VDI_SNAPSHOT",
                     "VDI_CLONE", "VDI_RESIZE", "VDI_RESET_ON_BOOT/2", "VDI_INTRODUCE",
                     "VDI_UPDATE", "THIN_PROVISIONING"],
    "configuration": [
        {"key": "location", "description": "absolute path of the directory holding the VDIs"},
        {"key": "preferred-image-formats", "description": "the formats of new VDIs, in order "
         "of preference, the first that holds the size wins (default: vhd,qcow2)"},
    ],
    "supported_image_formats": ["vhd", "qcow2", "raw"],
}

# format -> file name extension
EXTS = {"vhd": vhdchain.VHD_EXT, "qcow2": vhdchain.QCOW2_EXT, "raw": vhdchain.RAW_EXT}
COW = ("vhd", "qcow2")
PREFERRED_KEY = "preferred-image-formats"       # device-config
DEFAULT_PREFERRED = "vhd,qcow2"
FORMAT_KEY = "image-format"                     # sm-config
RESIZE_JOURNAL = ".journal-"        # upstream FileSR's JOURNAL_FILE_PREFIX
BASE_LABEL = "base copy"
ACTIVATING, RELINKING = "activating", "relinking"
RELINK_WAIT = 60                    # seconds activate waits for the GC to relink a chain


def _gc():
    from smtap.sm import gc         # here: only replays of its journals need it
    return gc


def _gcctl():
    from smtap.sm import gcctl      # here: only the calls that start or stop it need it
    return gcctl


class FileSR(dirsr.DirSR):
    EXT = vhdchain.VHD_EXT

    def load(self, sr_uuid):
        self.path = self.dconf.get("location")
        if not self.path:
            errors.raise_error("ConfigLocationMissing", "device-config:location is required")
        if not os.path.isabs(self.path):
            errors.raise_error("InvalidArg", "device-config:location must be an absolute path, "
                               "got %s" % self.path)
        self.path = os.path.normpath(self.path)

    def preferred_formats(self):
        """device-config:preferred-image-formats as a list (refused clearly when bad)."""
        text = self.dconf.get(PREFERRED_KEY, DEFAULT_PREFERRED)
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        if not names or [n for n in names if n not in COW]:
            errors.raise_error("InvalidArg", "device-config:%s=%s: a comma-separated list of "
                               "%s" % (PREFERRED_KEY, text, ", ".join(COW)))
        return names

    def create(self, size):
        self.preferred_formats()
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            errors.raise_error("InvalidArg", "%s exists and is not a directory" % self.path)
        self.refuse_shared_directory("SRExists")
        if not os.path.isdir(self.path):
            os.makedirs(self.path, 0o755)
            log.info("made %s", self.path)

    def attach(self):
        self.preferred_formats()
        self.check_path()
        self.refuse_shared_directory("SRUnavailable")
        self.replay()
        self.kick_gc()

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
        # Nothing mounted; active VDIs are XAPI's to unplug first. The GC stops within
        # seconds, mid-coalesce if need be (its journals make that safe).
        self.stop_gc()

    def delete(self):
        self.check_path()
        self.stop_gc()
        images = self.images()
        if [i for i in images.values() if not i.hidden] or \
                [r for r in self.db_vdis().values() if r["managed"]]:
            errors.raise_error("SRNotEmpty", "destroy the VDIs first")
        # What is left is ours to remove (bases, journals); the directory may be the
        # user's: it stays, with anything else in it.
        for image in images.values():
            os.unlink(image.path)
        for name in os.listdir(self.path):
            if name.startswith(RESIZE_JOURNAL) or name.split("_", 1)[0] in \
                    ("coalesce", "relink", "leaf", vhdchain.JRN_CLONE):
                os.unlink(os.path.join(self.path, name))

    def stop_gc(self):
        try:
            _gcctl().abort(self.uuid)
        except _gcctl().AbortTimeout as e:
            errors.raise_error("SRInUse", str(e))

    def kick_gc(self):
        if self.request.session_ref:
            _gcctl().kick(self)

    # -- contents -------------------------------------------------------------------------
    def images(self):
        """{uuid: vhdchain.Image} of the directory, trees linked."""
        self.check_path()
        return vhdchain.scan(self.path)

    def locations(self):
        return sorted(self.images())

    def list_vdis(self):
        """Every image as a VDI, hidden bases as base copies; hidden leaves (garbage the GC
        deletes) are left out, as upstream."""
        found = []
        for uuid, image in sorted(self.images().items()):
            if image.error:
                errors.raise_error("SRScan", "%s: %s" % (image.path, image.error))
            if image.hidden and not image.children:
                log.info("scan: hidden leaf %s ignored (garbage)", uuid)
                continue
            v = self.VDI_CLASS(self, uuid if dirsr._UUID.match(uuid) else None)
            v.location = uuid
            v.from_image(image)
            found.append(v)
        return found

    def usage(self):
        """(virtual sizes of the visible VDIs, bytes every image file occupies)."""
        virtual = allocated = 0
        for image in self.images().values():
            if not image.hidden:
                virtual += image.virtual
            try:
                allocated += dirsr.file_sizes(image.path)[1]
            except OSError:
                pass
        return virtual, allocated

    def replay(self):
        """Undo what a crashed snapshot left (its clone journal) and finish or undo a
        crashed leaf-coalesce (its files renamed: no scan may see that), unpausing the
        VDIs; under the SR lock (no snapshot nor leaf-coalesce is running)."""
        replayed = vhdchain.replay_snapshots(self.path)
        if [n for n in os.listdir(self.path) if n.startswith(_gc().JRN_LEAF + "_")]:
            replayed += _gc().replay_leaf_journals(self.path)
        for uuid in replayed:
            if self.request.session_ref:
                try:
                    poolpause.unpause_all(self.VDI_CLASS(self, uuid))
                except Exception as e:
                    log.warning("unpause of %s after replay: %s", uuid, errors.describe(e))
        return replayed

    def scan(self):
        self.check_path()
        self.replay()
        self.sync_records()
        self.kick_gc()

    def sync_records(self):
        """XAPI's records made to match the files (the GC calls it after each change)."""
        self.reconcile(self.list_vdis())
        self.update()


class FileVDI(dirsr.DirVDI):
    fmt = "vhd"
    hidden = False
    parent = None        # the parent image's uuid (VHD)

    @property
    def file(self):
        return os.path.join(self.sr.path, self.location + EXTS[self.fmt])

    def load(self, vdi_uuid):
        if self.sr.request.session_ref:
            self.load_db_record()
        self.find_format()
        self.load_storage()

    def find_format(self):
        for fmt, ext in sorted(EXTS.items()):
            if os.path.exists(os.path.join(self.sr.path, self.location + ext)):
                self.fmt = fmt
                return
        wanted = self.sm_config.get(FORMAT_KEY) or self.sm_config.get("type")
        self.fmt = wanted if wanted in EXTS else "vhd"

    def load_storage(self):
        """Sizes, hidden flag and parent from the file (the truth), when it is there."""
        if not os.path.exists(self.file):
            return
        if self.fmt == "raw":
            image = vhdchain.Image(self.location, self.file, "raw")
            image.virtual = os.path.getsize(self.file)
        else:
            try:
                image = vhdchain.query(self.file)
            except OSError as e:
                errors.raise_error("VDILoad", "%s: %s" % (self.file, errors.describe(e)))
        self.from_image(image)

    def from_image(self, image):
        self.fmt = image.kind
        self.size = image.virtual
        try:
            self.utilisation = dirsr.file_sizes(image.path)[1]
        except OSError:
            self.utilisation = image.size
        self.hidden = image.hidden
        self.parent = image.parent
        if self.fmt == "raw":
            self.sm_config["type"] = "raw"
            self.sm_config.pop(FORMAT_KEY, None)
            return
        self.sm_config.pop("type", None)
        self.sm_config[FORMAT_KEY] = self.fmt
        if image.parent:
            self.sm_config["vhd-parent"] = image.parent
        else:
            self.sm_config.pop("vhd-parent", None)
        if image.hidden:
            self.managed = False
            self.read_only = True
            if not self.label:
                self.label = BASE_LABEL

    def db_update(self, record=None):
        if record is None:
            record = self.xenapi.VDI.get_record(self.ref)
        if "vhd-parent" in record["sm_config"] and not self.parent:
            self.xenapi.VDI.remove_from_sm_config(self.ref, "vhd-parent")
            record = dict(record, sm_config=dict((k, v) for k, v in record["sm_config"].items()
                                                 if k != "vhd-parent"))
        TapdiskVDI.db_update(self, record)

    def tapdisk_params(self, writable):
        self.require_file()
        return "%s:%s" % (dirsr.file_format(self.file).disk_type, self.file)

    # -- activation waits for a relink of its chain (the GC's relinking tag) ------------------
    def activate(self, writable):
        marked = self.sr.request.session_ref and self.mark_activating()
        try:
            TapdiskVDI.activate(self, writable)
        finally:
            if marked:
                self.xenapi.VDI.remove_from_sm_config(self.ref, ACTIVATING)

    def mark_activating(self):
        """Set "activating" once no relink is in progress (the GC does the converse)."""
        x, ref = self.xenapi, self.ref
        deadline = time.time() + RELINK_WAIT
        while True:
            x.VDI.remove_from_sm_config(ref, ACTIVATING)
            x.VDI.add_to_sm_config(ref, ACTIVATING, "True")
            if RELINKING not in x.VDI.get_sm_config(ref):
                return True
            x.VDI.remove_from_sm_config(ref, ACTIVATING)
            if time.time() > deadline:
                errors.raise_error("VDIUnavailable", "VDI %s stayed tagged relinking for %ds"
                                   % (self.uuid, RELINK_WAIT))
            time.sleep(0.5)

    # -- create / delete ------------------------------------------------------------------------
    def choose_format(self, size):
        """sm-config:image-format (or type) if given, else the first preferred format
        that holds size."""
        given = [(k, self.sm_config[k]) for k in (FORMAT_KEY, "type") if k in self.sm_config]
        if len(set(v for _, v in given)) > 1:
            errors.raise_error("VDIType", "sm-config:%s=%s and %s=%s disagree"
                               % (given[0] + given[1]))
        if given:
            key, fmt = given[0]
            if fmt not in EXTS or (key == FORMAT_KEY and fmt == "raw"):
                errors.raise_error("VDIType", "sm-config:%s=%s: must be %s" % (
                    key, fmt, " or ".join(COW + (("raw",) if key == "type" else ()))))
            return fmt
        for fmt in self.sr.preferred_formats():
            if size <= vhdchain.max_size(EXTS[fmt]):
                return fmt
        errors.raise_error("VDISize", "%d bytes: more than device-config:%s=%s holds (at most "
                           "%d MB)" % (size, PREFERRED_KEY, ",".join(self.sr.preferred_formats()),
                                       max(vhdchain.max_size(EXTS[f])
                                           for f in self.sr.preferred_formats()) >> 20))

    def create(self, size):
        fmt = self.choose_format(size)
        self.fmt = fmt
        if fmt in COW:
            rounded = vhdchain.round_size(size, EXTS[fmt])
            if rounded is None:
                errors.raise_error("VDISize", "a %s VDI must be between 1 MB and %d MB%s" % (
                    fmt, vhdchain.max_size(EXTS[fmt]) >> 20,
                    " (a bigger one is qcow2: sm-config:%s=qcow2)" % FORMAT_KEY
                    if fmt == "vhd" and size <= vhdchain.MAX_QCOW2_SIZE else ""))
            size = rounded
        self.sm_config = dict((k, v) for k, v in self.sm_config.items()
                              if k not in ("type", FORMAT_KEY))
        if fmt == "raw":
            self.sm_config["type"] = "raw"
        else:
            self.sm_config[FORMAT_KEY] = fmt
        try:
            dirsr.DirVDI.create(self, size)
        except OSError as e:
            self.no_space(e, "vdi_create")
            raise
        return self

    def introduce(self):
        self.find_format()
        return dirsr.DirVDI.introduce(self)

    def delete(self):
        self.sr.check_path()
        if not os.path.exists(self.file):
            if self.sr.request.session_ref:
                self.db_forget()
            return
        if self.is_active():
            errors.raise_error("VDIInUse", "VDI %s is active; deactivate it first" % self.uuid)
        image = self.sr.images().get(self.location)
        if image is not None and image.children:
            if image.hidden:
                errors.raise_error("VDIDelete", "%s is a base copy other VDIs depend on; the "
                                   "garbage collector removes it once they are gone" % self.uuid)
            # A visible VDI others hang from: its data stays, hidden, as their base.
            vhdchain.set_hidden(self.file)
            self.db_forget()
            self.load_storage()
            self.label, self.description = BASE_LABEL, ""
            self.db_introduce()
            log.info("VDI %s hidden: %d VDIs depend on it", self.uuid, len(image.children))
        else:
            os.unlink(self.file)
            self.db_forget()
        self.sr.update()
        self.sr.kick_gc()

    # -- snapshot / clone -----------------------------------------------------------------------
    def snapshot(self, driver_params):
        return self.copy_on_write(driver_params, is_snapshot=True)

    def clone(self, driver_params):
        return self.copy_on_write(driver_params, is_snapshot=False)

    def copy_on_write(self, driver_params, is_snapshot):
        failure = "VDISnapshot" if is_snapshot else "VDIClone"
        kind = (driver_params or {}).get("type") or "double"
        if kind not in ("double", "single", "internal"):
            errors.raise_error("InvalidArg", "driver_params type=%s: double, single or internal"
                               % kind)
        self.require_file()
        if self.fmt not in COW:
            errors.raise_error("Unimplemented", "snapshot of a raw VDI")
        if self.hidden:
            errors.raise_error(failure, "hidden VDI %s (a base copy)" % self.uuid)
        self.sr.replay()
        try:
            depth = vhdchain.depth(self.file)
        except OSError as e:
            errors.raise_error("VDIUnavailable", "chain depth of %s: %s"
                               % (self.file, errors.describe(e)))
        if depth >= vhdchain.MAX_CHAIN:
            errors.raise_error("SnapshotChainTooLong", "VDI %s: chain depth %d (at most %d)"
                               % (self.uuid, depth, vhdchain.MAX_CHAIN))
        base = self.sr.new_vdi()
        new = self.sr.new_vdi() if kind == "double" else None
        start = time.time()
        with poolpause.Paused(self):
            try:
                made = vhdchain.snapshot(self.sr.path, self.location, base.uuid,
                                         new.uuid if new else None)
            except OSError as e:
                self.no_space(e, "snapshot")
                errors.raise_error(failure, "%s of %s: %s"
                                   % (failure, self.uuid, errors.describe(e)))
            try:
                result = self.introduce_snapshot(made, base, new, is_snapshot)
            except BaseException:
                log.exception("records of the snapshot of %s", self.uuid)
                for v in (new, base):
                    if v is not None and v._ref:
                        v.db_forget()
                vhdchain.undo_snapshot(self.sr.path, self.location)
                raise
            vhdchain.snapshot_done(self.sr.path, self.location)
        log.info("snapshot of %s: base %s, new %s; pause-to-unpause %.3f s", self.uuid,
                 made.base, new.uuid if new else None, time.time() - start)
        self.sr.update()
        self.sr.kick_gc()
        return result

    def introduce_snapshot(self, made, base, new, is_snapshot):
        """The records of what snapshot() made; returns the VDI XAPI gets back."""
        if made.base:
            base.location = base.uuid
            base.vdi_type = self.vdi_type
            base.fmt = self.fmt             # a chain is of one format
            base.load_storage()
            base.db_introduce()
        if new is not None:
            new.copy_fields(self)
            new.location = new.uuid
            new.fmt = self.fmt
            new.load_storage()
            if is_snapshot:
                new.mark_snapshot_of(self)
            new.db_introduce()
        x = self.xenapi
        x.VDI.remove_from_sm_config(self.ref, "vhd-parent")
        x.VDI.add_to_sm_config(self.ref, "vhd-parent", made.leaf_parent)
        self.sm_config["vhd-parent"] = self.parent = made.leaf_parent
        return new or (base if made.base else self)

    def no_space(self, e, what):
        if vhdchain.is_enospc(e):
            errors.raise_error("SRNoSpace", "%s of VDI %s: the file system of %s is full "
                               "(nothing was changed)" % (what, self.uuid, self.sr.path))

    # -- resize / reset -------------------------------------------------------------------------
    def resize(self, size):
        if self.fmt == "raw":
            return dirsr.DirVDI.resize(self, size)
        self.require_file()
        rounded = vhdchain.round_size(size, EXTS[self.fmt])
        if rounded is None or rounded < self.size:
            errors.raise_error("VDISize", "%d -> %d bytes: %s VDIs grow only, up to %d MB%s" % (
                self.size, size, self.fmt, vhdchain.max_size(EXTS[self.fmt]) >> 20,
                " (past that: a qcow2 VDI, by migrating it)" if self.fmt == "vhd" else ""))
        if self.hidden:
            errors.raise_error("VDIUnavailable", "hidden VDI %s (a base copy)" % self.uuid)
        if rounded > self.size:
            journal = os.path.join(self.sr.path, RESIZE_JOURNAL + self.uuid)
            with poolpause.Paused(self):    # active: its tapdisks reopen it grown
                try:
                    vhdchain.grow(self.file, rounded, journal)
                except OSError as e:
                    self.no_space(e, "resize")
                    errors.raise_error("VDISize", "resize of %s: %s" % (self.uuid,
                                                                        errors.describe(e)))
            log.info("VDI %s resized %d -> %d", self.uuid, self.size, rounded)
        self.load_storage()
        self.db_update()
        self.sr.update()
        return self

    def epoch_begin(self):
        """on-boot=reset: the leaf forgets what was written since its parent (modify -z)."""
        if self.sr.request.vdi_on_boot != "reset":
            return
        self.require_file()
        if self.fmt not in COW or not self.parent:
            errors.raise_error("VDIType", "VDI %s has no parent to reset to (on-boot=reset "
                               "needs a VHD or qcow2 VDI with a snapshot)" % self.uuid)
        if self.is_active():
            errors.raise_error("VDIInUse", "VDI %s is active: cannot reset it" % self.uuid)
        vhdchain.reset(self.file)
        log.info("VDI %s reset to its parent %s", self.uuid, self.parent)

    def update(self):
        """After snapshot and clone (XAPI calls it on the new VDI): sizes and parent."""
        self.load_storage()
        self.db_update()


FileSR.VDI_CLASS = FileVDI


def main():
    return command.run(FileSR, DRIVER_INFO)


if __name__ == "__main__":
    sys.exit(main())
