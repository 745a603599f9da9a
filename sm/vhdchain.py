"""The SM side of copy-on-write chains in a directory (upstream sm's vhdutil.py and
FileSR's chain code; XCP-ng's "cowutil" for qcow2), on smtap.formats in process: what
vhd-util or qcow2-util would print, without their process.

Files: <uuid>.vhd, <uuid>.qcow2 (or <uuid>.raw) per image; the extension says the
format (FORMATS: one object per copy-on-write format, the same operations), and a
chain is of one format. A child names its parent relative to its own directory (VHD:
locator "./<parent uuid>.vhd" and the parent's basename; qcow2: backing file
"<parent uuid>.qcow2"), so the directory can move. Hidden bases (VHD: footer flag;
qcow2: XCP-ng's "vate" header extension) are the shared parents snapshots and clones
leave; the garbage collector (sm/gc.py) merges and deletes them.

snapshot() is FileSR's sequence (file-sr.md): hard-link the leaf to the new base, make
the new leaf as <leaf>.vhd.new over it, rename it over the leaf (the VDI keeps its path
and uuid), make the second child, hide the base; journalled (clone_<leaf uuid>) so that
replay_snapshots() finishes or undoes one a crash interrupted.
"""
import errno
import glob
import io
import os

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check
from smtap.formats import qcow2ops
from smtap.formats import vhd as V
from smtap.formats import vhdcheck
from smtap.formats import vhdresize
from smtap.formats import vhdutil
from smtap.sm import journal as journallib
from smtap.sm import log

VHD_EXT = ".vhd"
QCOW2_EXT = ".qcow2"
RAW_EXT = ".raw"
COW_EXTS = (VHD_EXT, QCOW2_EXT)
EXTS = COW_EXTS + (RAW_EXT,)
BLOCK = V.DEFAULT_BLOCK_SIZE
MIN_VHD_SIZE = 2 << 20
MAX_VHD_SIZE = V.MAX_VHD_SIZE
MAX_QCOW2_SIZE = 16381 << 30       # XCP-ng's limit for every SR type (an EXT SR's files)
MAX_CHAIN = 30                     # upstream vhdutil.MAX_CHAIN_SIZE
JRN_CLONE = "clone"                # <base uuid>_<second child uuid or "">
TMP_RENAME_PREFIX = "OLD_"         # a leaf-coalesced leaf's old file, until deleted


def round_size(size, ext=VHD_EXT):
    """The size a new or grown image of that format gets, None if too big. VHD: upstream
    validate_and_round_vhd_size (at least 2 MiB, 2 MiB blocks); qcow2: whole MiB (the
    SR's sizes are in MB, as vhd-util's), up to MAX_QCOW2_SIZE."""
    if ext == QCOW2_EXT:
        if size < 0 or size > MAX_QCOW2_SIZE:
            return None
        return -(-max(size, 1) // (1 << 20)) << 20
    if size < 0 or size > MAX_VHD_SIZE:
        return None
    return -(-max(size, MIN_VHD_SIZE) // BLOCK) * BLOCK


def max_size(ext):
    return MAX_QCOW2_SIZE if ext == QCOW2_EXT else MAX_VHD_SIZE


def file_name(uuid, ext=VHD_EXT):
    return uuid + ext


def ext_of(path):
    """The copy-on-write extension of an image file (VHD's when it has none of ours)."""
    for ext in EXTS:
        if path.endswith(ext):
            return ext
    return VHD_EXT


def renamed(path, uuid):
    """The same image's file name for another uuid (same directory and format)."""
    return os.path.join(os.path.dirname(path), file_name(uuid, ext_of(path)))


def find_ext(directory, *uuids):
    """The extension of the first <uuid>.<cow ext> there (VHD's if none is)."""
    for uuid in uuids:
        for ext in COW_EXTS:
            if os.path.lexists(os.path.join(directory, file_name(uuid, ext))):
                return ext
    return VHD_EXT


class Image(object):
    """One image file of the SR, as a scan sees it."""

    def __init__(self, uuid, path, kind):
        self.uuid, self.path, self.kind = uuid, path, kind
        self.virtual = 0            # bytes
        self.size = 0               # file bytes (scan's size=)
        self.hidden = False
        self.parent = None          # the parent's uuid
        self.error = None           # why the scan could not read it
        self.children = []
        self.parent_image = None

    def __repr__(self):
        return "Image(%s%s%s)" % (self.uuid, " hidden" if self.hidden else "",
                                  " <- %s" % self.parent if self.parent else "")

    @property
    def raw(self):
        return self.kind == "raw"

    def depth(self):
        """Images in the chain, this one included (query -d)."""
        n, cur = 0, self
        while cur is not None and n < 4096:
            n += 1
            cur = cur.parent_image
        return n

    def leaves(self):
        """The leaves of the subtree under (and including) this image."""
        if not self.children:
            return [self]
        out = []
        for child in self.children:
            out.extend(child.leaves())
        return out


def run_vhd_util(*argv):
    """vhd-util in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    rc = vhdutil.run(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def uuid_of(name):
    """upstream extractUuid: the file name without its extension."""
    base = os.path.basename(name)
    for ext in EXTS:
        if base.endswith(ext):
            return base[:-len(ext)]
    return base


def _qcow2_scan(directory, images):
    """The qcow2 images of the directory into images (what `qcow2-util scan` reads)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + QCOW2_EXT))):
        uuid = uuid_of(path)
        try:
            images[uuid] = Qcow2.query(path)
        except OSError as e:
            image = Image(uuid, path, "qcow2")
            image.error = errors_text(e)
            images[uuid] = image


def errors_text(e):
    return getattr(e, "strerror", None) or str(e)


def scan(directory):
    """{uuid: Image} of every <x>.vhd and <x>.raw in the directory, linked into trees:
    `vhd-util scan -f -c -m '<dir>/*.vhd'` (backup footers: valid while a tapdisk holds
    a leaf) parsed as upstream's getAllVHDs does."""
    images = {}
    rc, out, err = run_vhd_util("scan", "-f", "-c", "-m", os.path.join(directory, "*" + VHD_EXT))
    for line in out.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        name = fields.get("vhd")
        if not name:
            continue
        image = Image(uuid_of(name), os.path.join(directory, os.path.basename(name)), "vhd")
        if "scan-error" in fields:
            image.error = line.partition("error-message=")[2].strip("'") or fields["scan-error"]
        else:
            image.virtual = int(fields["capacity"])
            image.size = int(fields["size"])
            image.hidden = fields["hidden"] == "1"
            if fields.get("parent", "none") != "none":
                image.parent = uuid_of(fields["parent"])
        images[image.uuid] = image
    if rc and not images:
        raise OSError(rc, "vhd-util scan of %s failed: %s" % (directory, err.strip()))
    _qcow2_scan(directory, images)
    for name in os.listdir(directory):
        if name.endswith(RAW_EXT) and len(name) > len(RAW_EXT):
            image = Image(uuid_of(name), os.path.join(directory, name), "raw")
            try:
                image.virtual = image.size = os.path.getsize(image.path)
            except OSError as e:
                image.error = e.strerror
            images.setdefault(image.uuid, image)
    for image in images.values():
        parent = images.get(image.parent) if image.parent else None
        if parent is not None:
            image.parent_image = parent
            parent.children.append(image)
    for image in images.values():
        image.children.sort(key=lambda c: c.uuid)
    return images


class Vhd(object):
    """The VHD operations (vhd-util's)."""
    ext, kind = VHD_EXT, "vhd"

    @staticmethod
    def query(path):
        """One VHD as a scan would show it (backup footer), or raise VHDError."""
        image = Image(uuid_of(path), path, "vhd")
        with V.VHD(path, use_backup=True, ignore_disabled=True) as img:
            image.virtual = img.size
            image.hidden = bool(img.hidden())
            image.size = img.file_size
            if img.type == V.HD_TYPE_DIFF:
                image.parent = uuid_of(img.parent_name() or img.parent_path(resolve=False))
        return image

    @staticmethod
    def depth(path):
        return V.chain_depth(path)

    @staticmethod
    def allocated(path):
        """Bytes of data the image holds (query -a x block size): what a coalesce copies."""
        with V.VHD(path, use_backup=True, ignore_disabled=True) as img:
            return img.allocated_blocks() * img.block_size if img.dynamic else img.size

    @staticmethod
    def check(path, fast=False, ignore_footer=False):
        """vhd-util check [-B] [-i]: None if valid, else the reason."""
        opts = vhdcheck.Options(ignore_footer=ignore_footer, no_check_bat=fast)
        err, why = vhdcheck.check(path, io.StringIO(), opts)
        return "%s (errno %d)" % (why, err) if err else None

    @staticmethod
    def repair(path):
        V.repair(path)

    @staticmethod
    def set_hidden(path, hidden=True):
        with V.VHD(path, writable=True) as img:
            if bool(img.hidden()) != bool(hidden):
                img.set_hidden(1 if hidden else 0)
                img.flush()

    @staticmethod
    def set_parent(path, parent):
        """modify -p: the locators become ./<parent>.vhd (relative: the SR can move)."""
        V.set_parent(path, os.path.normpath(parent))

    @staticmethod
    def grows_in_place(path, size):
        """Growing to size leaves every data block where it is (the BAT has room)."""
        with V.VHD(path) as img:
            return img.dynamic and -(-size // img.block_size) <= img.header.max_bat_size

    @classmethod
    def grow(cls, path, size, journal_file):
        """Virtual size up to `size`: fast when the BAT has room (query -S), else journalled
        (resize -j; data blocks may move: no tapdisk may hold the file meanwhile)."""
        with V.VHD(path) as img:
            if img.size >= size:
                return False
        if cls.grows_in_place(path, size):
            vhdresize.fast_resize(path, size)
        else:
            vhdresize.resize(path, size, journal_file)
        return True

    @staticmethod
    def coalesce(path, progress=None):
        """vhd-util coalesce -n path: sectors copied into the parent. progress(done
        blocks, blocks)."""
        return V.coalesce(path, progress=progress)

    @staticmethod
    def snapshot(path, parent):
        """A child of parent (empty parents skipped): the path of the parent it got."""
        return V.snapshot(path, parent)

    @staticmethod
    def reset(path):
        V.reset(path)


class Qcow2(object):
    """The qcow2 operations (qcow2-util's, which are vhd-util's for qcow2)."""
    ext, kind = QCOW2_EXT, "qcow2"

    @staticmethod
    def query(path):
        image = Image(uuid_of(path), path, "qcow2")
        with Q.Image(path) as img:
            image.virtual = img.size
            image.hidden = bool(img.hidden)
            image.size = img.file_size
            if img.backing_file is not None:
                image.parent = uuid_of(img.backing_file)
        return image

    @staticmethod
    def depth(path):
        return Q.chain_depth(path)

    @staticmethod
    def allocated(path):
        with Q.Image(path) as img:
            return img.allocated_clusters() * img.cluster_size

    @staticmethod
    def check(path, fast=False, ignore_footer=False):
        """qemu-img check's: None if there is no corruption (leaks are a repair's, not a
        reason to stop: they lose nothing), else the reason. An image left dirty by a
        crash is checked as it is (its next read-write open repairs it)."""
        try:
            res = qcow2check.check(path)
        except OSError as e:
            return errors_text(e)
        if res.corruptions or res.check_errors:
            return "%d corruptions, %d check errors" % (res.corruptions, res.check_errors)
        return None

    @staticmethod
    def repair(path):
        res = qcow2check.check(path, repair="all")
        if res.corruptions or res.check_errors:
            raise Q.QCow2Error(errno.EIO, "%s: %d errors left after the repair"
                               % (path, res.corruptions))

    @staticmethod
    def set_hidden(path, hidden=True):
        with Q.Image(path, writable=True) as img:
            if bool(img.hidden) != bool(hidden):
                img.set_hidden(1 if hidden else 0)

    @staticmethod
    def set_parent(path, parent):
        """rebase -u: the backing file named relative to the child (the SR can move)."""
        qcow2ops.set_parent(path, parent)

    @staticmethod
    def grows_in_place(path, size):
        """Always: a bigger L1 table is written elsewhere, then the header switched to it
        (one write); no data cluster moves."""
        return True

    @staticmethod
    def grow(path, size, journal_file):
        with Q.Image(path) as img:
            if img.size >= size:
                return False
        qcow2ops.resize(path, size)
        return True

    @staticmethod
    def coalesce(path, progress=None):
        """commit into the backing file: sectors written. progress as VHD's, in BLOCKs."""
        def step(done, total):
            progress(done // BLOCK, -(-total // BLOCK))
        return qcow2ops.commit(path, progress=step if progress else None) // 512

    @staticmethod
    def snapshot(path, parent):
        return qcow2ops.snapshot(path, parent)

    @staticmethod
    def reset(path):
        qcow2ops.reset(path)


FORMATS = {VHD_EXT: Vhd, QCOW2_EXT: Qcow2}


def fmt(path):
    """The operations of the image file's format (by extension)."""
    return FORMATS.get(ext_of(path), Vhd)


def query(path):
    """One image as a scan would show it, or raise OSError (VHDError, QCow2Error)."""
    return fmt(path).query(path)


def depth(path):
    return fmt(path).depth(path)


def allocated(path):
    return fmt(path).allocated(path)


def check(path, fast=False, ignore_footer=False):
    return fmt(path).check(path, fast=fast, ignore_footer=ignore_footer)


def repair(path):
    fmt(path).repair(path)


def set_hidden(path, hidden=True):
    fmt(path).set_hidden(path, hidden)


def set_parent(path, parent):
    fmt(path).set_parent(path, parent)


def grows_in_place(path, size):
    return fmt(path).grows_in_place(path, size)


def grow(path, size, journal_file):
    return fmt(path).grow(path, size, journal_file)


def coalesce(path, progress=None):
    return fmt(path).coalesce(path, progress=progress)


def reset(path):
    fmt(path).reset(path)


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- snapshot -------------------------------------------------------------------------------
class Snapshot(object):
    """What snapshot() made: the base's uuid (None when the leaf was empty and the new
    children hang from its parent), the leaf's and second child's parent uuids."""

    def __init__(self, base, leaf_parent, dest_parent):
        self.base, self.leaf_parent, self.dest_parent = base, leaf_parent, dest_parent


def snapshot(directory, leaf_uuid, base_uuid, dest_uuid=None):
    """FileSR's snapshot of <leaf_uuid>.vhd or .qcow2 (its tapdisks paused by the caller,
    the SR locked): the leaf's data goes to a hidden base <base_uuid> of the same format,
    the leaf (same path) and <dest_uuid> (if given) become its children. Any failure undoes everything
    (the original leaf file is back in place) and re-raises. The caller removes the
    clone journal (done()) once the records are made, or undoes with undo_snapshot()."""
    jrn = journallib.Journal(directory)
    ext = find_ext(directory, leaf_uuid)
    ops = FORMATS[ext]
    leaf = os.path.join(directory, file_name(leaf_uuid, ext))
    base = os.path.join(directory, file_name(base_uuid, ext))
    tmp = leaf + ".new"
    dest = os.path.join(directory, file_name(dest_uuid, ext)) if dest_uuid else None
    jrn.create(JRN_CLONE, leaf_uuid, "%s_%s" % (base_uuid, dest_uuid or ""))
    try:
        os.link(leaf, base)
        journallib.sync_dir(directory)
        used = ops.snapshot(tmp, base)      # may skip an empty base: then `used` is its parent
        fsync_file(tmp)
        os.rename(tmp, leaf)
        journallib.sync_dir(directory)
        if dest:
            ops.snapshot(dest, base)
            fsync_file(dest)
        base_used = os.path.realpath(used) == os.path.realpath(base)
        if base_used:
            set_hidden(base)
        else:                                # the leaf was empty: nothing to keep in a base
            os.unlink(base)
        journallib.sync_dir(directory)
    except BaseException:
        undo_snapshot(directory, leaf_uuid)
        raise
    parent = base_uuid if base_used else uuid_of(used)
    return Snapshot(base_uuid if base_used else None, parent, parent if dest else None)


def snapshot_done(directory, leaf_uuid):
    journallib.Journal(directory).remove(JRN_CLONE, leaf_uuid)


def undo_snapshot(directory, leaf_uuid):
    """Back to before the snapshot of leaf_uuid (its tapdisks still paused: the new leaf
    holds no write yet), from its clone journal; the journal is removed."""
    jrn = journallib.Journal(directory)
    value = jrn.get(JRN_CLONE, leaf_uuid)
    if value is None:
        return False
    base_uuid, _, dest_uuid = value.partition("_")
    ext = find_ext(directory, leaf_uuid, base_uuid)
    leaf = os.path.join(directory, file_name(leaf_uuid, ext))
    base = os.path.join(directory, file_name(base_uuid, ext))
    for path in [leaf + ".new"] + ([os.path.join(directory, file_name(dest_uuid, ext))]
                                   if dest_uuid else []):
        _unlink(path)
    if os.path.exists(base):
        if os.path.exists(leaf) and os.path.samefile(base, leaf):
            os.unlink(base)                 # linked, not renamed yet
        else:
            set_hidden(base, False)         # the original leaf: back in its place
            os.rename(base, leaf)
    # Without a base the leaf is either the original or a new child of the leaf's parent
    # (the original was empty and its base dropped): the same data either way.
    journallib.sync_dir(directory)
    jrn.remove(JRN_CLONE, leaf_uuid)
    log.info("snapshot of %s undone", leaf_uuid)
    return True


def replay_snapshots(directory):
    """Undo every snapshot a crash interrupted (their journals): the uuids of the leaves."""
    done = []
    for leaf_uuid in journallib.Journal(directory).get_all(JRN_CLONE):
        log.warning("replaying the interrupted snapshot of %s", leaf_uuid)
        undo_snapshot(directory, leaf_uuid)
        done.append(leaf_uuid)
    return done


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def is_enospc(e):
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
