"""SRs that keep each VDI as one file, <location><EXT>, in a directory (sr.path): what
ramSR (a tmpfs) and FileSR (any directory) share. How a file gives its sizes and how a
new one is made depends on its format, looked up by extension in FORMATS: raw (a
sparse file: its length is the virtual size, the blocks it holds its utilisation), VHD
or qcow2 (sizes from their metadata, smtap.formats). ramSR creates raw files (EXT);
FileSR VHDs or qcow2 images (raw ones on request).
"""
import errno
import os
import re

from smtap.sm import errors
from smtap.sm import log
from smtap import sparse
from smtap.sm import sr
from smtap.sm import poolpause
from smtap.sm import tapvdi

SECTOR = 512
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def round_up(size, unit=SECTOR):
    return (size + unit - 1) // unit * unit


class RawFormat(object):
    """A raw sparse file: its length is the virtual size."""
    exts = (".raw", ".ram")     # FileSR's, ramSR's (on tmpfs)
    disk_type = "aio"           # the engine's disk type that serves it

    @staticmethod
    def sizes(path):
        """(virtual size, physical utilisation) in bytes."""
        st = os.stat(path)
        return st.st_size, st.st_blocks * 512

    @staticmethod
    def create(path, size):
        with open(path, "xb") as f:
            f.truncate(size)


def _new(path, make, size):
    """make(path, size) for a file that must not exist yet."""
    if os.path.lexists(path):
        raise OSError(errno.EEXIST, "%s exists" % path)
    make(path, size)


class VhdFormat(object):
    """A VHD: the virtual size from its footer (the backup at offset 0 is valid while a
    tapdisk has it open), the utilisation as `vhd-util query -s` reports it."""
    exts = (".vhd",)
    disk_type = "vhd"

    @staticmethod
    def sizes(path):
        from smtap.formats import vhd
        with vhd.VHD(path) as img:
            return img.size, img.phys_size()

    @staticmethod
    def create(path, size):
        from smtap.formats import vhd
        _new(path, vhd.create, size)


class Qcow2Format(object):
    """A qcow2 image: the virtual size from its header, the utilisation as `qcow2-util
    query -s` reports it (the end of the last cluster in use)."""
    exts = (".qcow2",)
    disk_type = "qcow2"

    @staticmethod
    def sizes(path):
        from smtap.formats import qcow2
        with qcow2.Image(path) as img:
            return img.size, img.end_offset()

    @staticmethod
    def create(path, size):
        from smtap.formats import qcow2ops
        _new(path, qcow2ops.create, size)


FORMATS = {ext: f for f in (RawFormat, VhdFormat, Qcow2Format) for ext in f.exts}


def file_format(path):
    """The format of a VDI file, by its extension."""
    return FORMATS[os.path.splitext(path)[1]]


def file_sizes(path):
    """(virtual size, physical utilisation) of a VDI file of any format in FORMATS."""
    return file_format(path).sizes(path)


class DirSR(sr.SR):
    EXT = ".raw"
    path = None          # the directory holding the VDI files; set by load()

    def check_path(self):
        if not self.path or not os.path.isdir(self.path):
            errors.raise_error("SRUnavailable", "%s is not there (is the SR attached?)"
                               % self.path)

    def locations(self):
        return sorted(n[:-len(self.EXT)] for n in os.listdir(self.path)
                      if n.endswith(self.EXT) and len(n) > len(self.EXT))

    def list_vdis(self):
        found = []
        for location in self.locations():
            v = self.VDI_CLASS(self, location if _UUID.match(location) else None)
            v.location = location
            v.load_storage()
            found.append(v)
        return found

    def usage(self):
        """(sum of virtual sizes, bytes allocated) of the VDI files."""
        virtual = allocated = 0
        for location in self.locations():
            size, used = file_sizes(os.path.join(self.path, location + self.EXT))
            virtual += size
            allocated += used
        return virtual, allocated

    def physical_size(self):
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize

    def reserve(self, extra):
        """Check there is room for `extra` more bytes of virtual size (thin: always)."""

    def scan(self):
        self.check_path()
        self.reconcile(self.list_vdis())
        self.update()

    def update(self):
        self.check_path()
        virtual, allocated = self.usage()
        self.db_set_sizes(physical_size=self.physical_size(), physical_utilisation=allocated,
                          virtual_allocation=virtual)


class DirVDI(tapvdi.TapdiskVDI):

    @property
    def file(self):
        return os.path.join(self.sr.path, self.location + self.sr.EXT)

    def load(self, vdi_uuid):
        if self.sr.request.session_ref:
            self.load_db_record()
        self.load_storage()

    def load_storage(self):
        """Sizes from the file (the truth), when it is there."""
        try:
            self.size, self.utilisation = file_sizes(self.file)
        except OSError:
            return

    def require_file(self):
        self.sr.check_path()
        if not os.path.isfile(self.file):
            errors.raise_error("VDIMissing", "%s is not there" % self.file)

    def extra_files(self):
        """Files besides self.file that belong to the VDI (sidecars)."""
        return []

    # -- create / introduce / delete ------------------------------------------------------
    def create(self, size):
        self.sr.check_path()
        size = round_up(size)
        if size <= 0:
            errors.raise_error("VDISize", "a VDI needs a size > 0")
        if os.path.lexists(self.file):
            errors.raise_error("VDIExists", self.file)
        self.sr.reserve(size)
        try:
            self.make_file(size)
            self.load_storage()
            self.db_introduce()
        except BaseException:
            self.remove_files()
            raise
        self.sr.update()    # as upstream: the SR's allocation follows each VDI change
        return self

    def make_file(self, size):
        """Write the new VDI's file(s): an empty one of the SR's format by default."""
        file_format(self.file).create(self.file, size)

    def introduce(self):
        """Adopt a file already in the SR, named by vdi_location."""
        if not self.location or "/" in self.location or self.location.startswith("."):
            errors.raise_error("InvalidArg", "vdi_location must be a file name in the SR, got %s"
                               % self.location)
        self.require_file()
        for record in self.sr.db_vdis().values():
            if record["location"] == self.location:
                errors.raise_error("VDIExists", "VDI %s already has location %s"
                                   % (record["uuid"], self.location))
        self.load_storage()
        self.db_introduce()
        return self

    def delete(self):
        self.sr.check_path()
        if self.is_active():
            errors.raise_error("VDIInUse", "VDI %s is active; deactivate it first" % self.uuid)
        self.remove_files()
        self.db_forget()
        self.sr.update()

    def remove_files(self):
        for path in [self.file] + self.extra_files():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- resize -----------------------------------------------------------------------------
    def resize(self, size):
        self.require_file()
        size = round_up(size)
        if size < self.size:
            errors.raise_error("VDISize", "shrinking %d -> %d bytes is not supported"
                               % (self.size, size))
        if self.is_active():
            errors.raise_error("VDIInUse", "VDI %s is active: resize it while detached"
                               % self.uuid)
        if size > self.size:
            self.sr.reserve(size - self.size)
            os.truncate(self.file, size)
            log.info("VDI %s resized %d -> %d", self.uuid, self.size, size)
        self.load_storage()
        self.db_update()
        self.sr.update()
        return self

    # -- copies -----------------------------------------------------------------------------
    def copy_to_new(self, is_snapshot):
        """A new VDI holding this one's current data (its tapdisks paused meanwhile)."""
        self.require_file()
        self.sr.reserve(self.size)
        new = self.sr.new_vdi()
        new.copy_fields(self)
        try:
            with poolpause.Paused(self):
                sparse.copy(self.file, new.file, self.size)
            self.copy_extra_files(new)
            new.load_storage()
            if is_snapshot:
                new.mark_snapshot_of(self)
            new.db_introduce()
        except BaseException:
            new.remove_files()
            raise
        self.sr.update()
        return new

    def copy_extra_files(self, new):
        pass
