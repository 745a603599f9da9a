"""Checking and dumping VHD metadata, with vhd-util's messages (check, read -p).

check(path, out) validates a file as `vhd-util check` does and writes its report to
`out`; dump(path, out) writes the `read -p` header summary. Neither writes the file.
"""
import errno
import os
import stat
import time
import uuid as uuidlib

from smtap.formats import vhd as V

TIMESTAMP_MAX_SLACK = 1800      # NFS clock skew vhd-util tolerates
MAX_CHS = (65535 << 16) | (16 << 8) | 255


class Options(object):
    def __init__(self, ignore_footer=False, ignore_parent_uuid=False,
                 ignore_timestamps=False, check_data=False, no_check_bat=False,
                 parents=False):
        self.ignore_footer = ignore_footer
        self.ignore_parent_uuid = ignore_parent_uuid
        self.ignore_timestamps = ignore_timestamps
        self.check_data = check_data
        self.no_check_bat = no_check_bat
        self.parents = parents


class Invalid(Exception):
    """A check failed: the message vhd-util prints, and the errno it exits with."""

    def __init__(self, message, err=errno.EINVAL):
        super(Invalid, self).__init__(message)
        self.message, self.errno = message, err


def _now():
    return V.vhd_time(time.time())


def validate_footer(f, opts):
    if f.cookie != V.HD_COOKIE:
        return "invalid cookie"
    if not f.checksum_ok():
        return "invalid checksum"
    if not f.features & V.HD_RESERVED:
        return "invalid 'reserved' feature"
    if f.features & ~(V.HD_TEMPORARY | V.HD_RESERVED):
        return "invalid extra features"
    if f.ff_version != V.HD_FF_VERSION:
        return "invalid file format version"
    if f.type not in (V.HD_TYPE_DYNAMIC, V.HD_TYPE_DIFF) and f.data_offset != 0xFFFFFFFFFFFFFFFF:
        return "invalid data offset"
    if not opts.ignore_timestamps and f.timestamp > _now() + TIMESTAMP_MAX_SLACK:
        return "creation time in future"
    if f.from_tapdisk() and f.crtr_ver > V.CREATOR_VERSION:
        return "unsupported tap creator version"
    # The largest CHS is qemu's (force_size) mark for "the size is curr_size": allowed.
    if V.chs(f.curr_size) < f.geometry and f.geometry != MAX_CHS:
        return "geometry too large"
    if f.type not in (V.HD_TYPE_FIXED, V.HD_TYPE_DYNAMIC, V.HD_TYPE_DIFF):
        return "invalid type"
    if f.saved not in (0, 1):
        return "invalid 'saved' state"
    if f.hidden not in (0, 1):
        return "invalid 'hidden' state"
    if any(f.reserved):
        return "invalid 'reserved' bits"
    if f.uuid == V.NULL_UUID:
        return "invalid (NULL) uuid"
    return None


def validate_header(h, eof):
    if h.cookie != V.DD_COOKIE:
        return "invalid cookie"
    if h.compute_checksum() != h.checksum:
        return "invalid checksum"
    if h.hdr_ver != V.DD_VERSION:
        return "invalid header version"
    if h.data_offset != 0xFFFFFFFFFFFFFFFF:
        return "invalid data offset"
    if (h.table_offset <= 0 or h.table_offset % 512
            or h.table_offset + h.max_bat_size * 4 > eof - V.SECTOR):
        return "invalid table offset"
    if bin(h.block_size).count("1") != 1:
        return "invalid block size"
    if h.res1 or any(h.res2):
        return "invalid reserved bits"
    return None


class _Checker(object):
    def __init__(self, path, opts, out):
        self.path, self.opts, self.out = path, opts, out
        self.primary_missing = False

    def say(self, line):
        self.out.write(line + "\n")

    def run(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            self.say("cannot stat %s: %d" % (self.path, e.errno))
            raise Invalid("cannot stat %s" % self.path, e.errno)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise Invalid("%s is not a regular file or block device" % self.path)
        try:
            fio = V.PosixFile(self.path)
        except OSError as e:
            raise Invalid("error opening %s" % self.path, e.errno)
        try:
            footer = self.check_footers(fio)
            if footer.type not in (V.HD_TYPE_DYNAMIC, V.HD_TYPE_DIFF):
                return
            eof = fio.size()
            h = V.Header.unpack(fio.pread(1024, footer.data_offset))
            msg = validate_header(h, eof)
            if msg:
                raise Invalid("header is invalid: %s" % msg)
        finally:
            fio.close()
        try:
            img = V.VHD(self.path, ignore_disabled=True, use_backup=self.primary_missing,
                        lax_batmap=True)
        except V.VHDError as e:
            raise Invalid("error opening %s: %s" % (self.path, e.strerror), e.errno)
        with img:
            self.check_differencing_header(img)
            self.check_bat(img)
            if img.has_batmap():
                self.check_batmap(img)
            if img.type == V.HD_TYPE_DIFF:
                self.check_parent_locators(img)

    def check_footers(self, fio):
        eof = fio.size()
        size = 511 if eof % 512 else 512
        if eof < size:
            raise Invalid("primary footer invalid: invalid cookie")
        primary = V.Footer.unpack(fio.pread(size, eof - size))
        msg = validate_footer(primary, self.opts)
        if msg:
            self.primary_missing = True
            if not self.opts.ignore_footer:
                raise Invalid("primary footer invalid: %s" % msg)
        elif primary.type == V.HD_TYPE_FIXED:
            return primary
        backup = V.Footer.unpack(fio.pread(512, 0))
        msg = validate_footer(backup, self.opts)
        if msg:
            raise Invalid("backup footer invalid: %s" % msg)
        if primary.pack() != backup.pack():
            if self.opts.ignore_footer:
                return backup
            if not (backup.hidden and backup.from_tapdisk() and backup.crtr_ver in
                    (V.version(0, 1), V.version(1, 1))
                    and primary.pack() == backup.pack(hidden=0)):
                raise Invalid("primary and backup footers do not match")
        return primary

    def check_differencing_header(self, img):
        h = img.header
        if img.type == V.HD_TYPE_DIFF:
            if not self.opts.ignore_timestamps and h.prt_ts > _now() + TIMESTAMP_MAX_SLACK:
                raise Invalid("differencing header is invalid: parent creation time in future")
            try:
                img.parent_name()
            except V.VHDError:
                raise Invalid("differencing header is invalid: invalid parent name")
        else:
            for what, bad in (("parent name", any(h.prt_name)),
                              ("parent locators", any(h.loc_raw)),
                              ("parent uuid", h.prt_uuid != V.NULL_UUID)):
                if bad:
                    raise Invalid("differencing header is invalid: invalid non-null %s" % what)
            if h.prt_ts:
                raise Invalid("differencing header is invalid: invalid non-zero parent timestamp")

    def check_bat(self, img):
        eof = img.io.size()
        if eof % 512:
            if eof % 512 != 511:
                raise Invalid("invalid file size: %#x" % eof)
            eof += 1
        eoh = img.end_of_headers() // V.SECTOR
        eof = (eof - V.SECTOR) // V.SECTOR
        per = img.spb + img.bm_secs
        blocks = img.size // img.block_size
        if blocks > img.header.max_bat_size:
            raise Invalid("VHD size (%d blocks) exceeds BAT size (%d)"
                          % (blocks, img.header.max_bat_size))
        used = []
        for i in range(min(blocks, img.blocks)):
            off = img.bat[i]
            if off == V.DD_BLK_UNUSED:
                continue
            if off < eoh:
                raise Invalid("block %d (offset %#x) clobbers headers" % (i, off))
            if off + per > eof and not (self.primary_missing and self.opts.ignore_footer
                                        and off + per == eof + 1):
                raise Invalid("block %d (offset %#x) clobbers footer" % (i, off))
            used.append((off, i))
        if not self.opts.no_check_bat:
            used.sort()
            for (aoff, a), (boff, b) in zip(used, used[1:]):
                if boff < aoff + per:
                    raise Invalid("block %d (offset %#x) clobbers block %d (offset %#x)"
                                  % (b, boff, a, aoff))
        if self.opts.check_data:
            for off, i in used:
                self.check_bitmap(img, i)

    def check_bitmap(self, img, blk):
        bm = img.read_bitmap(blk)
        data = img.io.pread(img.block_size, (img.bat[blk] + img.bm_secs) * V.SECTOR)
        for i in range(img.spb):
            sector = data[i * V.SECTOR:(i + 1) * V.SECTOR]
            if any(sector) and not V.test_bit(bm, i):
                raise Invalid("sector %#x of block %#x has data where bitmap is clear"
                              % (i, blk))

    def check_batmap(self, img):
        bh = img.batmap
        if bh.cookie != V.BATMAP_COOKIE:
            raise Invalid("batmap is invalid: invalid cookie")
        if bh.batmap_version > V.BATMAP_VERSION:
            raise Invalid("batmap is invalid: unsupported batmap version")
        if img.batmap_checksum() != bh.checksum:
            raise Invalid("batmap is invalid: invalid checksum")
        if not bh.batmap_size:
            raise Invalid("batmap is invalid: invalid size zero")
        if bh.batmap_size * V.SECTOR * 8 < img.header.max_bat_size:
            raise Invalid("batmap is invalid: batmap-BAT size mismatch")
        eof = img.io.size()
        if not bh.batmap_offset or bh.batmap_offset % 512:
            raise Invalid("batmap is invalid: invalid batmap offset")
        if bh.batmap_offset + bh.batmap_size * V.SECTOR > eof - V.SECTOR:
            raise Invalid("batmap is invalid: invalid batmap size")
        for i in range(min(img.size // img.block_size, img.blocks)):
            if img.block_full(i) and img.bat[i] == V.DD_BLK_UNUSED:
                raise Invalid("batmap shows unallocated block %d full" % i)

    def check_parent_locators(self, img):
        try:
            pname = img.parent_name()
        except V.VHDError as e:
            raise Invalid("error decoding parent name: %d" % -e.errno)
        seen, found = set(), 0
        eof = img.io.size()
        for i, loc in enumerate(img.header.locators):
            msg = self.validate_locator(loc, eof)
            if msg:
                raise Invalid("invalid parent locator %d: %s" % (i, msg))
            if loc.code == V.PLAT_CODE_NONE:
                continue
            if loc.code in seen:
                raise Invalid("duplicate platform code in locator %d: %#x" % (i, loc.code))
            seen.add(loc.code)
            if loc.code not in (V.PLAT_CODE_MACX, V.PLAT_CODE_W2RU, V.PLAT_CODE_W2KU):
                continue
            try:
                ppath = img.locator_name(loc)
            except V.VHDError as e:
                raise Invalid("error reading parent locator %d: %d" % (i, -e.errno))
            if os.path.basename(ppath) != pname:
                raise Invalid("parent locator %d name (%s) does not match header name (%s)"
                              % (i, os.path.basename(ppath), pname))
            try:
                location = img.find_parent(ppath)
            except V.VHDError as e:
                raise Invalid("error resolving %s: %d" % (ppath, -e.errno), e.errno)
            msg = self.validate_parent(img, location)
            if msg:
                raise Invalid("invalid parent %s: %s" % (location, msg))
            found += 1
        if not found:
            raise Invalid("could not find parent %s" % pname)

    @staticmethod
    def validate_locator(loc, eof):
        if loc.code not in V.PLAT_CODES:
            return "invalid platform code"
        if loc.code == V.PLAT_CODE_NONE:
            return "non-zero locator" if any(loc.pack()) else None
        if not loc.data_offset:
            return "invalid data offset"
        if not loc.data_space:
            return "invalid data space"
        if not loc.data_len:
            return "invalid data length"
        if loc.data_offset + loc.size() > eof - V.SECTOR:
            return "invalid size"
        if loc.res:
            return "invalid reserved bits"
        return None

    def validate_parent(self, img, location):
        if img.parent_is_raw or self.opts.ignore_parent_uuid:
            return None
        try:
            with V.VHD(location, ignore_disabled=True) as parent:
                if parent.footer.uuid != img.header.prt_uuid:
                    return "invalid parent uuid"
        except V.VHDError:
            return "error opening parent"
        return None


def check(path, out, opts=None):
    """vhd-util check: (0, None) after "<path> is valid", or (errno, reason) after the
    failing check's message, "<path> appears invalid; dumping metadata" and the dump."""
    opts = opts or Options()
    try:
        _Checker(path, opts, out).run()
    except Invalid as e:
        out.write(e.message + "\n")
        out.write("%s appears invalid; dumping metadata\n" % path)
        dump(path, out)
        return e.errno, e.message
    if opts.parents:
        return check_parents(path, out, opts)
    out.write("%s is valid\n" % path)
    return 0, None


def check_parents(path, out, opts):
    out.write("%s is valid\n" % path)
    cur = path
    for _ in range(4096):
        try:
            with V.VHD(cur, ignore_disabled=True) as img:
                if img.type != V.HD_TYPE_DIFF or img.parent_is_raw:
                    return 0, None
                cur = img.parent_path()
        except V.VHDError as e:
            out.write("error getting parent: %d\n" % -e.errno)
            out.write("error checking parents: %d\n" % -e.errno)
            return e.errno, "parent of %s: %s" % (cur, e.strerror)
        sub = Options(**vars(opts))
        sub.parents = False
        err, why = check(cur, out, sub)
        if err:
            out.write("error checking parents: %d\n" % -err)
            return err, "parent %s: %s" % (cur, why)
    return errno.ELOOP, "parent loop"


# -- read -p -----------------------------------------------------------------------------
def _time(ts):
    return time.ctime(ts + V.VHD_EPOCH)


def _cookie(raw):
    return raw.split(b"\0", 1)[0].decode("latin-1")


def print_footer(f, out, hexa=False):
    conv = _conv(hexa)
    w = out.write
    w("VHD Footer Summary:\n-------------------\n")
    w("Cookie              : %s\n" % _cookie(f.cookie))
    w("Features            : (0x%08x) %s%s\n" % (f.features,
                                                  "<TEMP>" if f.features & V.HD_TEMPORARY else "",
                                                  "<RESV>" if f.features & V.HD_RESERVED else ""))
    w("File format version : Major: %d, Minor: %d\n" % (f.ff_version >> 16, f.ff_version & 0xFFFF))
    w("Data offset         : %s\n" % conv(f.data_offset))
    w("Timestamp           : %s\n" % _time(f.timestamp))
    w("Creator Application : '%s'\n" % _cookie(f.crtr_app))
    w("Creator version     : Major: %d, Minor: %d\n" % (f.crtr_ver >> 16, f.crtr_ver & 0xFFFF))
    w("Creator OS          : %s\n" % {V.HD_CR_OS_WINDOWS: "Windows",
                                       V.HD_CR_OS_MACINTOSH: "Macintosh"}.get(f.crtr_os, "Unknown!"))
    w("Original disk size  : %s MB (%s Bytes)\n" % (conv(f.orig_size >> 20), conv(f.orig_size)))
    w("Current disk size   : %s MB (%s Bytes)\n" % (conv(f.curr_size >> 20), conv(f.curr_size)))
    c, h, s = f.geometry >> 16, (f.geometry >> 8) & 0xFF, f.geometry & 0xFF
    w("Geometry            : Cyl: %s, Hds: %s, Sctrs: %s\n" % (conv(c), conv(h), conv(s)))
    w("                    : = %s MB (%s Bytes)\n" % (conv((c * h * s) >> 11), conv((c * h * s) << 9)))
    names = ["None", "Reserved (deprecated)", "Fixed hard disk", "Dynamic hard disk",
             "Differencing hard disk", "Reserved (deprecated)", "Reserved (deprecated)"]
    w("Disk type           : %s\n" % (names[f.type] if f.type <= V.HD_TYPE_MAX else "Unknown type!\n"))
    cks = f.compute_checksum()
    w("Checksum            : 0x%x|0x%x (%s)\n" % (f.checksum, cks, "Good!" if cks == f.checksum else "Bad!"))
    w("UUID                : %s\n" % uuidlib.UUID(bytes=f.uuid))
    w("Saved state         : %s\n" % ("No" if f.saved == 0 else "Yes"))
    w("Hidden              : %d\n" % f.hidden)
    w("\n")


def print_header(footer, h, out, hexa=False):
    conv = _conv(hexa)
    w = out.write
    w("VHD Header Summary:\n-------------------\n")
    w("Cookie              : %s\n" % _cookie(h.cookie))
    w("Data offset (unusd) : %s\n" % conv(h.data_offset))
    w("Table offset        : %s\n" % conv(h.table_offset))
    w("Header version      : 0x%08x\n" % h.hdr_ver)
    w("Max BAT size        : %s\n" % conv(h.max_bat_size))
    w("Block size          : %s (%s MB)\n" % (conv(h.block_size), conv(h.block_size >> 20)))
    try:
        name = V.decode_parent_name(footer, h)
    except V.VHDError:
        name = "failed to read name"
    w("Parent name         : %s\n" % name)
    w("Parent UUID         : %s\n" % uuidlib.UUID(bytes=h.prt_uuid))
    w("Parent timestamp    : %s\n" % _time(h.prt_ts))
    cks = h.compute_checksum()
    w("Checksum            : 0x%x|0x%x (%s)\n" % (h.checksum, cks, "Good!" if cks == h.checksum else "Bad!"))
    w("\n")


def print_locators(img, out, hexa=False):
    conv = _conv(hexa)
    w = out.write
    w("VHD Parent Locators:\n--------------------\n")
    for i, loc in enumerate(img.header.locators):
        if loc.code == V.PLAT_CODE_NONE:
            continue
        w("locator:            : %d\n" % i)
        w("       code         : %s\n" % V.PLAT_CODES.get(loc.code, "UNKOWN"))
        w("       data_space   : %s\n" % conv(loc.data_space))
        w("       data_length  : %s\n" % conv(loc.data_len))
        w("       data_offset  : %s\n" % conv(loc.data_offset))
        try:
            w("       decoded name : %s\n" % img.locator_name(loc))
        except V.VHDError:
            w("failed to read parent name\n")
        w("\n")


def print_batmap(img, out, hexa=False):
    conv = _conv(hexa)
    bh = img.batmap
    w = out.write
    w("VHD Batmap Summary:\n-------------------\n")
    w("Batmap offset       : %s\n" % conv(bh.batmap_offset))
    w("Batmap size (secs)  : %s\n" % conv(bh.batmap_size))
    w("Batmap version      : 0x%08x\n" % bh.batmap_version)
    if bh.kh_cookie == 1:
        w("Batmap keyhash nonce: %s\n" % bh.kh_nonce.hex())
        w("Batmap keyhash hash : %s\n" % bh.kh_hash.hex())
    cks = img.batmap_checksum()
    w("Checksum            : 0x%x|0x%x (%s)\n" % (bh.checksum, cks, "Good!" if cks == bh.checksum else "Bad!"))
    w("\n")


def _conv(hexa):
    return (lambda n: "%#x" % n) if hexa else (lambda n: "%d" % n)


def print_headers(img, out, hexa=False):
    print_footer(img.footer, out, hexa)
    if img.dynamic:
        print_header(img.footer, img.header, out, hexa)
        if img.type == V.HD_TYPE_DIFF:
            print_locators(img, out, hexa)
        if img.batmap is not None:
            print_batmap(img, out, hexa)


def dump(path, out, hexa=False):
    """vhd-util read -p: the headers of a valid image, or of whatever the file holds."""
    try:
        img = V.VHD(path, ignore_disabled=True)
    except V.VHDError as e:
        out.write("Failed to open %s: %d\n" % (path, -e.errno))
        dump_raw(path, out, hexa)
        return e.errno
    with img:
        print_headers(img, out, hexa)
    return 0


def dump_raw(path, out, hexa=False):
    """The footer and header as found, valid or not (vhd-util's dump of a bad image)."""
    out.write("\n%s appears invalid; dumping headers\n\n" % path)
    try:
        fio = V.PosixFile(path)
    except OSError:
        return
    try:
        eof = fio.size()
        raw = fio.pread(512, max(0, eof - 512))
        footer = V.Footer.unpack(raw)
        if footer.cookie != V.HD_COOKIE or not footer.checksum_ok():
            backup = V.Footer.unpack(fio.pread(512, 0))
            if backup.cookie in (V.HD_COOKIE, V.POISON_COOKIE):
                footer = backup
        header = V.Header()
        if footer.dynamic and footer.data_offset < eof:
            header = V.Header.unpack(fio.pread(1024, footer.data_offset))
        print_footer(footer, out, hexa)
        print_header(footer, header, out, hexa)
    finally:
        fio.close()
