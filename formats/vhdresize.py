"""Growing a VHD's virtual size: fast (the BAT already has room: see `query -S`) or
journalled (the BAT and what follows it may have to grow over the first data blocks,
which then move to the end of the file).

A journalled resize first writes the journal: every byte range of the image it will
overwrite, with its original contents, and the original file size (checksummed, then
fsynced). Then both footers are poisoned ("v_poison": libvhd refuses to open the image)
until the new footer is written, and the journal removed. After a crash at any point,
`revert` restores the original image exactly; a journal that was never completed means
the image was never touched.
"""
import errno
import os
import struct
import time
import zlib

from smtap.formats import vhd as V

JOURNAL_MAGIC = b"SMTAPVJ1"
_JHEAD = struct.Struct(">8s16sQI")      # magic, image uuid, original size, extent count
_JEXTENT = struct.Struct(">QQ")         # offset, length (then the bytes)
# Test hook: SMTAP_VHD_HOOK=<point>[#<n>]:<file> creates <file> and sleeps at the n-th
# (default first) time the resize reaches <point>, so a test can kill -9 it there.
HOOK_ENV = "SMTAP_VHD_HOOK"
# Upstream's failure points (vhd-util exits EINVAL there) under their names.
UPSTREAM_FAIL = {"begin": "VHD_UTIL_TEST_FAIL_RESIZE_BEGIN",
                 "moved": "VHD_UTIL_TEST_FAIL_RESIZE_DATA_MOVED",
                 "metadata": "VHD_UTIL_TEST_FAIL_RESIZE_METADATA_MOVED",
                 "end": "VHD_UTIL_TEST_FAIL_RESIZE_END"}
_hits = {}


def _hook(point, out=None):
    name = UPSTREAM_FAIL.get(point)
    if name and os.environ.get(name):
        if out is not None:
            out.write("Failing at %s\n" % name)
            out.flush()
        os._exit(errno.EINVAL)
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    where, _, path = spec.partition(":")
    want, _, nth = where.partition("#")
    if want != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(nth or 1):
        return
    with open(path, "w") as f:
        f.write("%d\n" % os.getpid())
    while True:                         # until the test kills us
        time.sleep(1)
        if os.environ.get("SMTAP_VHD_HOOK_CONTINUE") and os.path.exists(path + ".go"):
            return


def fast_resize(path, size):
    """resize -f: grow within the BAT's reserved entries."""
    with V.VHD(path, writable=True) as img:
        _check_creator(img)
        if not img.dynamic:
            raise V.VHDError(errno.EINVAL, "%s: fast resize needs a dynamic VHD" % path)
        new = -(-size // img.block_size) * img.block_size
        if new < img.size:
            raise V.VHDError(errno.EINVAL, "%s: size (%d) < curr size (%d)" % (path, new, img.size))
        if new == img.size:
            return
        if new // img.block_size > img.header.max_bat_size:
            raise V.VHDError(errno.EINVAL, "not enough metadata space reserved for fast resize "
                             "(BAT size %d, need %d)" % (img.header.max_bat_size,
                                                         new // img.block_size))
        _set_size(img, new)
        img.write_footer()
        img.io.flush()


def _set_size(img, size):
    img.footer.curr_size = size
    img.footer.geometry = V.chs(size)


def _check_creator(img):
    if not img.footer.from_tapdisk():
        raise V.VHDError(errno.EINVAL, "%s not created by xen; resize not supported" % img.path)


class _Plan(object):
    """Where the metadata of the grown image goes and which blocks are in its way."""

    def __init__(self, img, size):
        h = img.header
        self.size = -(-size // img.block_size) * img.block_size
        self.entries = max(h.max_bat_size, self.size // img.block_size)
        self.bat_bytes = V.bytes_padded(self.entries * 4)
        pos = h.table_offset + self.bat_bytes
        self.batmap_header = self.batmap_offset = None
        self.map_bytes = 0
        if img.batmap is not None:
            self.batmap_header = pos
            self.batmap_offset = pos + V.SECTOR
            self.map_bytes = max(V.secs_round_up_no_zero((self.entries + 7) >> 3) * V.SECTOR,
                                 img.batmap.batmap_size * V.SECTOR)
            pos = self.batmap_offset + self.map_bytes
        self.locators = []                  # (index, new offset)
        for i, loc in enumerate(h.locators):
            if loc.code != V.PLAT_CODE_NONE:
                self.locators.append((i, pos))
                pos += loc.size()
        self.end = pos
        per = (img.spb + img.bm_secs) * V.SECTOR
        self.moves = sorted((img.bat[b] * V.SECTOR, b) for b in range(img.blocks)
                            if img.bat[b] != V.DD_BLK_UNUSED and img.bat[b] * V.SECTOR < self.end)
        self.touched = max([self.end] + [off + per for off, _ in self.moves])


def resize(path, size, journal, out=None):
    """resize -j: grow to `size` bytes, journalled. Shrinking is not supported (ENOSYS).
    A failure after the journal is written reverts the image from it."""
    img = V.VHD(path, writable=True)
    try:
        _check_creator(img)
        if size < img.size:
            raise V.VHDError(errno.ENOSYS, "%s: shrinking is not supported" % path)
        if (-(-size // img.block_size) * img.block_size if img.dynamic else size) == img.size:
            return
        orig = img.io.size()
        plan = _Plan(img, size) if img.dynamic else None
        extents = [(0, min(plan.touched, orig))] if plan else []
        if not extents or extents[0][1] < orig - V.SECTOR:
            extents.append((orig - V.SECTOR, V.SECTOR))
        _write_journal(journal, img, orig, extents)
    except Exception:
        img.close()
        raise
    try:
        _hook("journal", out)
        _poison(img)
        _hook("begin", out)
        if plan is None:
            _grow_fixed(img, size)
        else:
            _grow_dynamic(img, plan, out)
        _hook("end", out)
        img.write_footer()
        img.io.flush()
        _hook("footer", out)
    except Exception:
        img.dirty = img.strict = False      # no footer from close(): the journal decides
        img.close()
        revert(path, journal)
        raise
    img.dirty = False
    img.close()
    _remove(journal)


def _write_journal(journal, img, orig, extents):
    parts = [_JHEAD.pack(JOURNAL_MAGIC, img.footer.uuid, orig, len(extents))]
    for off, length in extents:
        data = img.io.pread(length, off)
        if len(data) != length:
            raise V.VHDError(errno.EIO, "%s: short read journalling %d bytes at %d"
                             % (img.path, length, off))
        parts.append(_JEXTENT.pack(off, length))
        parts.append(data)
    body = b"".join(parts)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        V.pwrite_all(fd, body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(journal)


def _read_journal(journal):
    with open(journal, "rb") as f:
        raw = f.read()
    if len(raw) < _JHEAD.size + 4 or struct.unpack(">I", raw[-4:])[0] != zlib.crc32(raw[:-4]) & 0xFFFFFFFF:
        return None
    magic, uuid, orig, count = _JHEAD.unpack_from(raw, 0)
    if magic != JOURNAL_MAGIC:
        return None
    pos, extents = _JHEAD.size, []
    for _ in range(count):
        off, length = _JEXTENT.unpack_from(raw, pos)
        pos += _JEXTENT.size
        extents.append((off, raw[pos:pos + length]))
        pos += length
    return uuid, orig, extents


def _poison(img):
    raw = img.footer.pack(cookie=V.POISON_COOKIE)
    poisoned = V.Footer.unpack(raw)
    raw = poisoned.seal()
    if img.dynamic:
        img.io.pwrite(raw, 0)
    img.io.pwrite(raw, img.io.size() - V.SECTOR)
    img.io.flush()


def _grow_fixed(img, size):
    old = img.footer.curr_size
    img.io.truncate(size + V.SECTOR)            # the new bytes read as zeros
    img.io.pwrite(bytes(min(V.SECTOR, size - old)), old)   # where the old footer was
    _set_size(img, size)
    img.file_size = size + V.SECTOR


def _grow_dynamic(img, plan, out):
    per = (img.spb + img.bm_secs) * V.SECTOR
    for off, blk in plan.moves:
        data = img.io.pread(per, off).ljust(per, b"\0")
        eod = max(img.end_of_data(), plan.end)  # past the grown metadata too
        sec = eod // V.SECTOR
        gap = -(sec + img.bm_secs) % (V.PAGE // V.SECTOR)
        img.io.pwrite(bytes(gap * V.SECTOR) + data, eod)
        img.io.flush()
        img.bat[blk] = sec + gap
        img._eod = None
        _hook("moved", out)
    h = img.header
    old_locs = [(i, h.locators[i].data_offset, h.locators[i].size()) for i, _ in plan.locators]
    loc_data = {i: img.io.pread(size, off) for i, off, size in old_locs}
    old_map = bytes(img.batmap_map) if img.batmap is not None else None
    h.max_bat_size = plan.entries
    img.write_bat()
    if img.batmap is not None:
        bh = img.batmap
        bh.batmap_offset, bh.batmap_size = plan.batmap_offset, plan.map_bytes // V.SECTOR
        img.io.pwrite(bytes(plan.map_bytes), plan.batmap_offset)
    for i, new_off in plan.locators:
        img.io.pwrite(loc_data[i], new_off)
        h.locators[i].data_offset = new_off
    h.store_locators()
    _set_size(img, plan.size)
    if img.batmap is not None:
        img.batmap_map = bytearray(old_map.ljust(img.batmap_map_bytes(), b"\0"))
        img.write_batmap()
    img.write_header()
    img.io.flush()
    img._eod = None
    _hook("metadata", out)


def revert(path, journal):
    """Undo an interrupted journalled resize from its journal, then remove the journal."""
    if not os.path.exists(journal):
        raise V.VHDError(errno.ENOENT, "%s: no such journal" % journal)
    entry = _read_journal(journal)
    fio = V.PosixFile(path, writable=True)
    try:
        backup = V.Footer.unpack(fio.pread(V.SECTOR, 0))
        trailing = V.Footer.unpack(fio.pread(V.SECTOR, max(0, fio.size() - V.SECTOR)))
        if entry is None:
            # The journal was never completed: nothing of the image was written yet.
            if any(f.cookie == V.POISON_COOKIE for f in (backup, trailing)):
                raise V.VHDError(errno.EINVAL, "%s: damaged journal %s for a poisoned image"
                                 % (path, journal))
        else:
            uuid, orig, extents = entry
            if uuid not in (backup.uuid, trailing.uuid):
                raise V.VHDError(errno.EINVAL, "%s: journal %s belongs to another image"
                                 % (path, journal))
            for off, data in extents:
                fio.pwrite(data, off)
            fio.truncate(orig)
            fio.flush()
    finally:
        fio.close()
    _remove(journal)


def _remove(journal):
    os.unlink(journal)
    _fsync_dir(journal)


def _fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

