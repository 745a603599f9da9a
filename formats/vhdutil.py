"""vhd-util: upstream's command line over smtap.formats.vhd, with its output.

    vhd-util COMMAND [OPTIONS]     (--debug anywhere: log to syslog, never to stdout)

Exit status = the errno of the failure. Where upstream prints a message on stdout
(which the storage layer parses) it is printed the same; every failure also gets one
line on stderr saying what went wrong.
"""
import errno
import fnmatch
import getopt
import glob
import os
import stat
import sys

from smtap.errtext import one_line
from smtap.formats import vhd as V
from smtap.formats import vhdcheck, vhdresize

PROG = "vhd-util"


class Usage(Exception):
    """Bad arguments: the subcommand's usage on stderr, exit EINVAL (-h: on stdout, 0)."""

    def __init__(self, help=False):
        super(Usage, self).__init__("usage")
        self.help = help


class Failed(Exception):
    """Exit with errno after `stdout` (upstream's message) and one line on stderr."""

    def __init__(self, err, message, stdout=None):
        super(Failed, self).__init__(message)
        self.errno, self.message, self.stdout = err, message, stdout


class Ctx(object):
    def __init__(self, out, err, prog=PROG):
        self.out, self.err = out, err
        self.debug = False
        self.prog = prog

    def say(self, text):
        self.out.write(text)

    def raw(self, data):
        self.out.flush()
        buf = getattr(self.out, "buffer", None)
        if buf is not None:
            buf.write(data)
            buf.flush()
        else:
            self.out.write(data.decode("latin-1"))

    def log(self, text):
        if self.debug:
            try:
                import syslog
                syslog.syslog(syslog.LOG_INFO, "%s: %s" % (self.prog, text))
            except Exception:       # noqa: BLE001 - logging never fails a command
                pass


def _errmsg(e):
    return e.strerror or str(e)


def _num(text):
    try:
        return int(text, 10)
    except ValueError:
        raise Usage()


def _opts(args, spec, numbers=""):
    """getopt (GNU: options anywhere) -> ({letter: argument or True}, operands); the
    arguments of the letters in `numbers` as integers; -h: the usage."""
    try:
        opts, rest = getopt.gnu_getopt(args, spec)
    except getopt.GetoptError:
        raise Usage()
    found = {}
    for o, a in opts:
        if o == "-h":
            raise Usage(help=True)
        takes = spec[spec.index(o[1]) + 1:spec.index(o[1]) + 2] == ":"
        found[o[1]] = _num(a) if o[1] in numbers else (a if takes else True)
    return found, rest


def _open(ctx, name, fmt="error opening %s: %d\n", **kw):
    try:
        return V.VHD(name, **kw)
    except V.VHDError as e:
        raise Failed(e.errno, _errmsg(e), (fmt % (name, -e.errno)) if fmt else None)


# -- create / snapshot ------------------------------------------------------------------
def cmd_create(ctx, args):
    o, rest = _opts(args, "n:s:S:rh", numbers="sS")
    name, size, msize, fixed = o.get("n"), o.get("s", 0), o.get("S", 0), "r" in o
    if not ("s" in o or "S" in o) or not name or rest:
        raise Usage()
    if msize and msize < size:
        raise Failed(errno.EINVAL, "-S must be at least -s",
                     "Error: <-S size> must be greater than <-s size>\n")
    _call(V.create, name, size << 20, fixed=fixed, meta_size=msize << 20)
    return 0


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except V.VHDError as e:
        raise Failed(e.errno, _errmsg(e))
    except OSError as e:
        raise Failed(e.errno or errno.EIO, "%s" % (e.strerror or e))


def cmd_snapshot(ctx, args):
    o, rest = _opts(args, "n:p:S:l:meh", numbers="Sl")
    name, parent = o.get("n"), o.get("p")
    if not name or not parent or rest:
        raise Usage()
    try:
        V.snapshot(name, parent, parent_raw="m" in o, meta_size=o.get("S", 0) << 20,
                   check_empty="e" not in o, limit=o.get("l", 0))
    except V.VHDError as e:
        if e.errno == errno.ENOSPC:
            raise Failed(e.errno, _errmsg(e), _errmsg(e) + "\n")
        raise Failed(e.errno, _errmsg(e))
    return 0


# -- query ------------------------------------------------------------------------------
def report(say, ok, fn, failed):
    """say(ok % fn()), or say(failed) (% -errno where it has a %d) when fn raises:
    returns (errno or 0, reason)."""
    try:
        say(ok % fn())
        return 0, None
    except V.VHDError as e:
        say(failed % -e.errno if "%d" in failed else failed)
        return e.errno, _errmsg(e)


def cmd_query(ctx, args):
    want, rest = _opts(args, "n:vspfdSmaubh")
    name, resolve, backup = want.get("n"), "u" not in want, "b" in want
    if not name or rest:
        raise Usage()
    img = _open(ctx, name, ignore_disabled=True, use_backup=backup)
    results = []
    with img:
        if "v" in want:
            ctx.say("%d\n" % (img.size >> 20))
        if "s" in want:
            results.append(report(ctx.say, "%d\n", img.phys_size,
                                  "failed to get physical size: %d\n"))
        if "p" in want:
            if img.type != V.HD_TYPE_DIFF:
                ctx.say("%s has no parent\n" % name)
            else:
                results.append(report(ctx.say, "%s\n", lambda: img.parent_path(resolve=resolve),
                                      "query failed\n"))
        if "f" in want:
            results.append(report(ctx.say, "hidden: %d\n", img.hidden,
                                  "error checking 'hidden' field: %d\n"))
        if "m" in want:
            marker = img.marker() if img.has_batmap() else 0
            ctx.say("marker: %d\n" % (marker - 256 if marker > 127 else marker))
        if "d" in want:
            results.append(report(ctx.say, "chain depth: %d\n", lambda: V.chain_depth(name),
                                  "error checking chain depth: %d\n"))
        if "a" in want:
            if not img.dynamic:
                ctx.say("error reading bat: %d\n" % -errno.EINVAL)
                results.append((errno.EINVAL, "a fixed VHD has no BAT"))
            else:
                ctx.say("%d\n" % img.allocated_blocks())
        if "S" in want:
            ctx.say("%d\n" % ((img.header.max_bat_size * img.block_size) >> 20
                              if img.dynamic else 0))
    failures = [r for r in results if r[0]]
    if failures:
        raise Failed(failures[0][0], "; ".join(why for _, why in failures))
    return 0


# -- set / modify / repair --------------------------------------------------------------
def cmd_set(ctx, args):
    o, rest = _opts(args, "n:f:v:h", numbers="v")
    name, field, value = o.get("n"), o.get("f"), o.get("v")
    if not name or not field or value is None or rest:
        raise Usage()
    if field not in ("hidden", "marker"):
        ctx.say("invalid field %s\n" % field)
        raise Usage()
    if not 0 <= value <= 255:
        ctx.say("invalid value %d\n" % value)
        raise Usage()
    img = _open(ctx, name, writable=True)
    with img:
        try:
            if field == "hidden":
                img.set_hidden(value)
            else:
                img.set_marker(value)
            img.flush()
        except V.VHDError as e:
            raise Failed(e.errno, _errmsg(e))
    return 0


def cmd_modify(ctx, args):
    o, rest = _opts(args, "n:s:p:mzh", numbers="s")
    name, newsize, parent, raw, zero = o.get("n"), o.get("s"), o.get("p"), "m" in o, "z" in o
    if not name or rest:
        raise Usage()
    _open(ctx, name, writable=True).close()     # a VHD we may write, or nothing is touched
    if zero:
        try:
            V.reset(name)
        except V.VHDError as e:
            raise Failed(e.errno, _errmsg(e), "failed to zero VHD: %d\n" % -e.errno)
    if newsize is not None:
        try:
            V.set_phys_size(name, newsize)
        except V.VHDError as e:
            raise Failed(e.errno, _errmsg(e), "failed to set physical size to %d: %d\n"
                         % (newsize, -e.errno))
    if parent is not None:
        try:
            V.set_parent(name, parent, parent_raw=raw)
        except (V.VHDError, OSError) as e:
            raise Failed(e.errno, _errmsg(e), "failed to set parent to '%s': %d\n"
                         % (parent, -e.errno))
    return 0


def cmd_repair(ctx, args):
    o, rest = _opts(args, "n:bh")
    name, backup = o.get("n"), "b" in o
    if not name or rest:
        raise Usage()
    _open(ctx, name, writable=True, use_backup=backup).close()
    try:
        V.repair(name, use_backup=backup)
    except V.VHDError as e:
        raise Failed(e.errno, _errmsg(e), "error writing footer: %d\n" % -e.errno)
    return 0


# -- resize / revert --------------------------------------------------------------------
def cmd_resize(ctx, args):
    o, rest = _opts(args, "n:s:j:fh", numbers="s")
    name, size, journal, fast = o.get("n"), o.get("s"), o.get("j"), "f" in o
    if size is None or not name or rest or bool(journal) == fast:
        raise Usage()
    _open(ctx, name).close()
    try:
        if fast:
            vhdresize.fast_resize(name, size << 20)
        else:
            vhdresize.resize(name, size << 20, journal, out=ctx.out)
    except (V.VHDError, OSError) as e:
        raise Failed(e.errno, _errmsg(e), "resize failed: %d\n" % -e.errno)
    return 0


def cmd_revert(ctx, args):
    o, rest = _opts(args, "n:j:h")
    name, journal = o.get("n"), o.get("j")
    if not name or not journal or rest:
        raise Usage()
    try:
        vhdresize.revert(name, journal)
    except (V.VHDError, OSError) as e:
        raise Failed(e.errno, _errmsg(e), "reverting journal failed: %d\n" % -e.errno)
    return 0


# -- coalesce / fill ----------------------------------------------------------------------
def cmd_coalesce(ctx, args):
    o, rest = _opts(args, "n:o:a:x:sph")
    name = o.get("n")
    if not name or rest:
        raise Usage()
    try:
        sectors = V.coalesce(name)
    except (V.VHDError, OSError) as e:
        raise Failed(e.errno, _errmsg(e), "error coalescing: %d\n" % -e.errno)
    ctx.say("Coalesced %d sectors" % sectors)
    return 0


def cmd_fill(ctx, args):
    o, rest = _opts(args, "n:h")
    name = o.get("n")
    if not name or rest:
        raise Usage()
    img = _open(ctx, name, writable=True)
    with img:
        try:
            for blk in range(img.blocks if img.dynamic else 0):
                if img.bat[blk] == V.DD_BLK_UNUSED:
                    base = blk * img.block_size
                    img.write(bytes(min(img.block_size, img.size - base)), base)
            img.flush()
        except V.VHDError as e:
            raise Failed(e.errno, _errmsg(e))
    return 0


# -- check / read -------------------------------------------------------------------------
def cmd_check(ctx, args):
    o, rest = _opts(args, "n:iItpbBh")
    name = o.get("n")
    o2 = vhdcheck.Options(ignore_footer="i" in o, ignore_parent_uuid="I" in o,
                          ignore_timestamps="t" in o, check_data="b" in o,
                          no_check_bat="B" in o, parents="p" in o)
    if not name or rest or (o2.check_data and o2.no_check_bat):
        raise Usage()
    err, why = vhdcheck.check(name, ctx.out, o2)
    if err:
        raise Failed(err, "%s: not a valid VHD: %s" % (name, why))
    return 0


def cmd_read(ctx, args):
    o, rest = _opts(args, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", numbers="tbmiejdcrR")
    name, count, hexa = o.get("n"), o.get("c", 1), "x" in o
    todo = [(k, None if v is True else v) for k, v in o.items() if k in "ptbBmieajdrR"]
    if not name or rest:
        raise Usage()
    try:
        img = V.VHD(name, ignore_disabled=True)
    except V.VHDError as e:
        ctx.say("Failed to open %s: %d\n" % (name, -e.errno))
        vhdcheck.dump_raw(name, ctx.out, hexa)
        raise Failed(e.errno, _errmsg(e))
    conv = (lambda n: "%#x" % n) if hexa else (lambda n: "%d" % n)
    order = "ptbBmieajdrR"
    with img:
        if not img.dynamic:
            ctx.say("Failed to get bat for %s: %d\n" % (name, -errno.EINVAL))
            raise Failed(errno.EINVAL, "%s: a fixed VHD has no BAT" % name)
        for what, arg in sorted(todo, key=lambda t: order.index(t[0])):
            _read_one(ctx, img, what, arg, count, conv, hexa)
    return 0


def _block_range(img, block, count, conv):
    if block + count > img.header.max_bat_size:
        raise Failed(errno.ERANGE, "block %s past end of file" % conv(block + count))


def _read_one(ctx, img, what, arg, count, conv, hexa):
    if what == "p":
        vhdcheck.print_headers(img, ctx.out, hexa)
    elif what == "B":
        total = img.size // img.block_size
        bm = bytearray(-(-total // 8))
        for i in range(min(total, img.blocks)):
            if img.bat[i] != V.DD_BLK_UNUSED:
                V.set_bit(bm, i)
        ctx.raw(bytes(bm))
    elif what == "t":
        if (arg + count) * V.SECTOR > img.size:
            raise Failed(errno.ERANGE, "sector %s past end of file" % conv(arg + count))
        for cur in range(arg, arg + count):
            blk, lsec = divmod(cur, img.spb)
            off = img.bat[blk]
            where = "not allocated" if off == V.DD_BLK_UNUSED else conv((off + lsec + 1) * V.SECTOR)
            ctx.say("logical sector %s: block number: %s, sector offset: %s, file offset: %s\n"
                    % (conv(cur), conv(blk), conv(lsec), where))
    elif what == "b":
        _block_range(img, arg, count, conv)
        for cur in range(arg, min(arg + count, arg + img.blocks)):
            if cur >= img.blocks:
                break
            off = img.bat[cur]
            ctx.say("block: %s: offset: %s\n" % (conv(cur), "not allocated" if off == V.DD_BLK_UNUSED
                                                  else conv(off * V.SECTOR)))
    elif what in ("m", "d"):
        _block_range(img, arg, count, conv)
        for cur in range(arg, arg + count):
            if cur >= img.blocks or img.bat[cur] == V.DD_BLK_UNUSED:
                ctx.say("block %s not allocated\n" % conv(cur))
                continue
            if what == "m":
                ctx.raw(bytes(img.read_bitmap(cur)))
            else:
                ctx.raw(img.io.pread(img.block_size, (img.bat[cur] + img.bm_secs) * V.SECTOR)
                        .ljust(img.block_size, b"\0"))
    elif what in ("i", "e"):
        if (arg + count) * V.SECTOR > img.size:
            ctx.say("sector %s past end of file\n" % conv(arg))
            raise Failed(errno.ERANGE, "sector past the end")
        present = []
        for off, n, have in img.extents(arg * V.SECTOR, count * V.SECTOR):
            present.extend([have] * (n // V.SECTOR))
        if what == "i":
            for i, bit in enumerate(present):
                blk, sec = divmod(arg + i, img.spb)
                ctx.say("block %s: sec: %s: %d\n" % (conv(blk), conv(sec), int(bit)))
        else:
            for off, n, have in img.extents(arg * V.SECTOR, count * V.SECTOR):
                if have:
                    ctx.say("%s %s\n" % (conv(off // V.SECTOR), conv(n // V.SECTOR)))
    elif what == "a":
        if img.batmap is None:
            ctx.say("failed to read batmap: %d\n" % -errno.EINVAL)
            raise Failed(errno.EINVAL, "no batmap")
        ctx.raw(img.io.pread(img.batmap.batmap_size * V.SECTOR, img.batmap.batmap_offset))
    elif what == "j":
        _block_range(img, arg, count, conv)
        for cur in range(arg, arg + count):
            ctx.err.write("batmap for block %s: %d\n" % (conv(cur), int(img.block_full(cur))))
    elif what in ("r", "R"):
        start, length = (arg * V.SECTOR, count * V.SECTOR) if what == "r" else (arg, count)
        if start + length > img.size:
            raise Failed(errno.ERANGE, "read past the virtual size")
        with V.Chain(img.path) as chain:
            pos = start
            while pos < start + length:
                n = min(V.DEFAULT_BLOCK_SIZE, start + length - pos)
                ctx.raw(chain.read(pos, n))
                pos += n


# -- key ----------------------------------------------------------------------------------
KEY_SIZES = (512, 256)


def _hex(text, size):
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise Failed(errno.EINVAL, "invalid hex string")
    if len(raw) != size:
        raise Failed(errno.EINVAL, "invalid size for hex string")
    return raw


def _read_key(keypath, vhd_path=None):
    if vhd_path is not None:
        base = os.path.basename(vhd_path).split(".vhd", 1)[0]
        if not any(os.path.basename(keypath).startswith("%s,aes-xts-plain,%d.key" % (base, n))
                   for n in KEY_SIZES):
            raise Failed(errno.EINVAL, "Invalid key name %s" % keypath)
    try:
        with open(keypath, "rb") as f:
            return f.read(64)
    except OSError as e:
        raise Failed(e.errno, "failed to open %s: %s" % (keypath, e.strerror))


def cmd_key(ctx, args):
    d, rest = _opts(args, "n:k:N:H:scCph")
    if rest:
        raise Usage()
    name, keypath, nonce, khash = d.get("n"), d.get("k"), d.get("N"), d.get("H")
    if "C" in d:
        if not keypath:
            raise Usage()
        n = _hex(nonce, 32) if nonce else bytes(32)
        ctx.say("%s\n" % V.keyhash_of(n, _read_key(keypath)).hex())
        return 0
    if not name:
        raise Usage()
    if "s" in d:
        if "c" in d or bool(keypath) == bool(khash):
            raise Usage()
    elif "c" in d:
        if not keypath or nonce or khash:
            raise Usage()
    elif "p" not in d:
        raise Usage()
    img = _open(ctx, name, fmt="", writable="s" in d)
    with img:
        try:
            if "s" in d:
                if not img.dynamic:
                    raise Failed(errno.EINVAL, "can't save key hashes for fixed vhds")
                if img.allocated_blocks():
                    raise Failed(errno.EINVAL, "can't save key hashes for non-empty vhds")
                n = _hex(nonce, 32) if nonce else bytes(32)
                h = _hex(khash, 32) if khash else V.keyhash_of(n, _read_key(keypath, name))
                img.set_keyhash(n, h)
                img.flush()
            elif "c" in d:
                kh = img.keyhash() if img.has_batmap() else None
                if not kh:
                    raise Failed(errno.EINVAL, "this vhd has no keyhash")
                if V.keyhash_of(kh[0], _read_key(keypath, name)) != kh[1]:
                    raise Failed(errno.EINVAL, "vhd hash doesn't match key hash")
            if "p" in d:
                kh = img.keyhash() if img.has_batmap() else None
                ctx.say("none\n" if not kh else "%s %s\n" % (kh[0].hex(), kh[1].hex()))
        except V.VHDError as e:
            raise Failed(e.errno, _errmsg(e))
    return 0


# -- scan ---------------------------------------------------------------------------------
def _braces(pattern):
    """GLOB_BRACE: a{b,c}d -> [abd, acd]."""
    start = pattern.find("{")
    end = pattern.find("}", start)
    if start < 0 or end < 0:
        return [pattern]
    out = []
    for alt in pattern[start + 1:end].split(","):
        out.extend(_braces(pattern[:start] + alt + pattern[end + 1:]))
    return out


class _Image(object):
    def __init__(self, name, size):
        self.name, self.size = name, size
        self.capacity = 0
        self.hidden = 0
        self.marker = 0
        self.keyhash = None
        self.parent = None
        self.error = 0
        self.message = None
        self.children = []
        self.parent_image = None


def _volume_name(src):
    """LVHD parent locators hold /dev/mapper/<vg--name>-<lv--name>: the LV name."""
    name = src.rsplit("/", 1)[-1]
    out, i = [], 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1:i + 2] == "-":
                out.append("-")
                i += 1
            else:
                out.append("/")
        else:
            out.append(name[i])
        i += 1
    conv = "".join(out)
    if "/" not in conv:
        raise V.VHDError(errno.EINVAL, "unrecognized volume name %s" % src)
    return conv.rsplit("/", 1)[1]


def _scan_one(path, name, fast, markers, volume):
    try:
        st = os.stat(path)
        size = st.st_size
        if stat.S_ISBLK(st.st_mode):
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
    except OSError as e:
        image = _Image(name, 0)
        image.error, image.message = -e.errno, "failure scanning target"
        return image
    image = _Image(name, size)
    try:
        img = V.VHD(path, ignore_disabled=True, fast=fast)
    except V.VHDError as e:
        image.error, image.message = -e.errno, "opening file"
        return image
    with img:
        image.capacity = img.size
        try:
            image.hidden = img.hidden()
        except V.VHDError as e:
            image.error, image.message = -e.errno, "checking 'hidden' field"
            return image
        if markers:
            try:
                image.marker = img.marker() if img.has_batmap() else 0
                image.keyhash = img.keyhash() if img.has_batmap() else None
            except V.VHDError as e:
                image.error, image.message = -e.errno, "checking markers"
                return image
        if img.type == V.HD_TYPE_DIFF:
            try:
                image.parent = _scan_parent(img, fast, volume)
                image.parent_raw = img.parent_is_raw
            except V.VHDError as e:
                image.error, image.message = -e.errno, "getting parent"
    return image


def _scan_parent(img, fast, volume):
    parent = None
    if fast or volume:
        try:
            parent = img.parent_name()
        except V.VHDError:
            parent = None
    elif not volume:
        try:
            return img.parent_path()
        except V.VHDError:
            pass
    if parent is None:
        loc = None
        for cand in img.header.locators:
            if cand.code == V.PLAT_CODE_MACX:
                loc = cand
                break
            if cand.code == V.PLAT_CODE_W2RU or (loc is None and cand.code != V.PLAT_CODE_NONE):
                loc = cand
        if loc is None:
            raise V.VHDError(errno.EINVAL, "no parent locator")
        parent = img.locator_name(loc)
    return _volume_name(parent) if volume else parent


def _print_image(ctx, image, flags, tab=0):
    pad = " " * tab
    if image.error:
        ctx.say("%svhd=%s scan-error=%d error-message='%s'\n"
                % (pad, image.name, image.error, image.message))
        return
    name, parent = image.name, image.parent or "none"
    if "v" not in flags:
        name = os.path.basename(name)
        if image.parent:
            parent = os.path.basename(image.parent)
    pmsg = " (not found in scan)" if "p" in flags and image.parent and not image.parent_image else ""
    if "M" not in flags:
        ctx.say("%svhd=%s capacity=%d size=%d hidden=%d parent=%s%s\n"
                % (pad, name, image.capacity, image.size, image.hidden, parent, pmsg))
    else:
        kh = image.keyhash[1].hex() if image.keyhash else ""
        ctx.say("%svhd=%s capacity=%d size=%d hidden=%d marker=%d keyhash=%s parent=%s%s\n"
                % (pad, name, image.capacity, image.size, image.hidden, image.marker, kh,
                   parent, pmsg))


def _print_tree(ctx, image, flags, depth, done):
    done.add(id(image))
    _print_image(ctx, image, flags, depth * 3)
    for hidden in (False, True):
        for child in image.children:
            if bool(child.hidden) == hidden and id(child) not in done:
                _print_tree(ctx, child, flags, depth + 1, done)


def cmd_scan(ctx, args):
    o, rest = _opts(args, "m:fcl:pavMh")
    pattern, vg = o.get("m"), o.get("l")
    flags = set(k for k in o if k not in "ml")
    if not pattern and not rest:
        raise Usage()
    if "p" in flags:
        flags.discard("f")
    targets = []                                    # (path, display name)
    if vg:
        from smtap import settings
        vgdir = settings.host_path("/dev/%s" % vg)
        names = sorted(os.listdir(vgdir)) if os.path.isdir(vgdir) else []
        for pat in ([pattern] if pattern else []) + rest:
            targets.extend((os.path.join(vgdir, n), n) for n in names if fnmatch.fnmatch(n, pat))
    else:
        if pattern:
            for pat in _braces(pattern):
                targets.extend((p, p) for p in sorted(glob.glob(pat)))
        targets.extend((p, p) for p in rest)
    seen, err, images, i = set(), 0, [], 0
    for path, _ in targets:
        seen.add(os.path.basename(path))
    while i < len(targets):
        path, name = targets[i]
        i += 1
        image = _scan_one(path, name, "f" in flags, "M" in flags, vg is not None)
        if "p" in flags and not image.error:
            image.name = os.path.realpath(path) if vg is None else name
            images.append(image)
        else:
            _print_image(ctx, image, flags)
        if image.error:
            err = err or -image.error
            if "c" not in flags:
                break
        if "a" in flags and image.parent and not image.error:
            ppath = image.parent
            if vg is not None:
                ppath = os.path.join(os.path.dirname(path), image.parent)
            elif not ppath.startswith("/"):
                ppath = os.path.join(os.path.dirname(path), ppath)
            if os.path.basename(ppath) not in seen:
                seen.add(os.path.basename(ppath))
                targets.append((ppath, os.path.basename(ppath) if vg is not None else ppath))
    if "p" in flags:
        images.sort(key=lambda im: im.name)
        by_name = {im.name: im for im in images}
        for im in images:
            if im.parent:
                parent = by_name.get(im.parent)
                if parent is not None:
                    im.parent_image = parent
                    parent.children.append(im)
        done = set()
        for pick in (lambda im: not im.parent_image and im.hidden,
                     lambda im: not im.parent_image, lambda im: True):
            for im in images:
                if id(im) not in done and pick(im):
                    _print_tree(ctx, im, flags, 0, done)
    if err and "c" not in flags:
        raise Failed(err, "scan failed: %s" % os.strerror(err))
    return 0


# -- dispatch -----------------------------------------------------------------------------
USAGE = {
    "create": "options: <-n name> <-s size (MB)> [-r reserve] [-h help] [<-S size (MB) for "
              "metadata preallocation (see vhd-util resize)>]",
    "snapshot": "options: <-n name> <-p parent name> [-l snapshot depth limit] [-m "
                "parent_is_raw] [-S size (MB) for metadata preallocation (see vhd-util "
                "resize)] [-e link to supplied parent name even if it's empty] [-h help]",
    "query": "options: <-n name> [-v print virtual size (in MB)] [-s print physical "
             "utilization (bytes)] [-p print parent] [-f print fields] [-m print marker] "
             "[-d print chain depth] [-S print max virtual size (MB) for fast resize] "
             "[-a print allocated block count] [-u don't resolve parent path] [-b don't "
             "trust the footer, use the back-up one instead] [-h help]",
    "read": "options: -n name [-p print headers] [-t sec translate] [-b blk bat entry] "
            "[-B bat as a bitmap] [-m blk bitmap] [-i sec test bitmap] [-e sec extents] "
            "[-a batmap] [-j blk test batmap] [-d blk data] [-c num units] [-r sec read] "
            "[-R byte read] [-x hex] [-h help]",
    "set": "options: <-n name> <-f field> <-v value> [-h help]",
    "repair": "options: <-n name> <-b use the back-up footer> [-h help]",
    "resize": "options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]",
    "fill": "options: <-n name> [-h help]",
    "coalesce": "options: <-n name> [-s sparse] [-p progress] [-h help]",
    "modify": "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-s NEW_SIZE set size] "
              "[-z zero (kill data)] [-h help]",
    "scan": "usage: [OPTIONS] FILES options: [-m match filter] [-f fast] [-c continue on "
            "failure] [-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] "
            "[-h help] [-M show markers]",
    "check": "options: -n <file> [-i ignore missing primary footers] [-I ignore parent uuids] "
             "[-t ignore timestamps] [-B do not check BAT for overlapping (precludes -b)] "
             "[-p check parents] [-b check bitmaps] [-h help]",
    "revert": "options: <-n name> <-j journal> [-h help]",
    "key": "usage: -C -k KEYPATH [-N NONCE] | -s -n NAME <-k KEYPATH | -H HASH> [-N NONCE] "
           "| -c -n NAME -k KEYPATH | -p -n NAME [-h help]",
}

COMMANDS = {"create": cmd_create, "snapshot": cmd_snapshot, "query": cmd_query,
            "read": cmd_read, "set": cmd_set, "repair": cmd_repair, "resize": cmd_resize,
            "fill": cmd_fill, "coalesce": cmd_coalesce, "modify": cmd_modify,
            "scan": cmd_scan, "check": cmd_check, "revert": cmd_revert, "key": cmd_key}
ORDER = ("create snapshot query read set repair resize fill coalesce modify scan check "
         "revert key").split()


def run(argv, out=None, err=None):
    """Run vhd-util with argv (without the program name); returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    ctx = Ctx(out, err)
    args = [a for a in argv if a != "--debug"]
    ctx.debug = len(args) != len(argv)
    if not args or args[0] not in COMMANDS:
        if args:
            err.write("invalid COMMAND %s\n" % args[0])
        err.write("usage: %s COMMAND [OPTIONS]\nCOMMAND := { %s }\n" % (PROG, " | ".join(ORDER)))
        return errno.EINVAL
    return run_command(ctx, args[0], COMMANDS[args[0]], args[1:], USAGE[args[0]])


def run_command(ctx, cmd, fn, args, usage):
    """fn(ctx, args) with vhd-util's conventions: Usage -> the usage (stderr, EINVAL; -h:
    stdout, 0), Failed -> its stdout message and one stderr line, exit its errno (also
    qcow2-util's)."""
    out, err = ctx.out, ctx.err
    try:
        return fn(ctx, args)
    except Usage as e:
        (out if e.help else err).write(usage + "\n")
        return 0 if e.help else errno.EINVAL
    except Failed as e:
        if e.stdout:
            out.write(e.stdout)
        err.write("%s %s: %s\n" % (ctx.prog, cmd, one_line(e.message)))
        ctx.log("%s: %s" % (cmd, e.message))
        return e.errno or errno.EIO
    except OSError as e:
        err.write("%s %s: %s\n" % (ctx.prog, cmd, one_line(e.strerror or e)))
        return e.errno or errno.EIO
    finally:
        try:
            out.flush()
        except (BrokenPipeError, ValueError):
            pass


def guarded(prog, runner, argv=None):
    """runner(argv) -> exit status; a broken pipe or a bug is one line, never a traceback."""
    try:
        return runner(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        return errno.EPIPE
    except KeyboardInterrupt:
        return errno.EINTR
    except Exception as e:      # noqa: BLE001 - one line, never a traceback
        sys.stderr.write("%s: internal error: %s: %s\n" % (prog, type(e).__name__, one_line(e)))
        return errno.EIO


def main(argv=None):
    return guarded(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
