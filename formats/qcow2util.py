"""qcow2-util: the suite's qcow2 tool, next to vhd-util, with two faces.

vhd-util's (the file SR treats both formats alike): every subcommand takes -n FILE,
prints what vhd-util prints and exits with the errno of a failure:

    create   -n file -s MB [-r] [-S MB] [-c cluster bytes]   (-r: preallocation full)
    snapshot -n child -p parent [-m] [-e] [-l limit] [-S MB]
    query    -n file [-v] [-s] [-p] [-f] [-m] [-d] [-a] [-S] [-u] [-b]
             (-a: allocated clusters; -S: the size in MB the L1 table holds in place)
    set      -n file -f hidden -v 0|1
    modify   -n file [-p parent [-m]] [-z]
    resize   -n file -s MB (-j journal | -f)      (no journal is needed: accepted)
    coalesce -n child                             ("Coalesced N sectors")
    check    -n file [-i] [-p] [-b] [-B]          ("<file> is valid")
    repair   -n file                              (leaks freed, refcounts rebuilt)
    scan     -f -m 'glob' [-c] [-a] [-v] [-p]     (vhd=... capacity= size= hidden= parent=)
    read     -n file (-p | -B)                    (-B: one bit per cluster, MSB first)
    revert   -n file -j journal                   (nothing to revert: accepted)

qemu-img's, for the argv XCP-ng's SM runs qemu-img with (create -f qcow2 ..., rebase,
resize, check, commit, info, map): see qcow2img.py. A create, check or resize without
-n is qemu-img's.

--debug anywhere: log to syslog, never to stdout.
"""
import errno
import glob
import os
import sys

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2img, qcow2ops
from smtap.formats import vhdutil as VU          # the shared command-line plumbing
from smtap.formats.vhdutil import Failed, Usage, _opts

PROG = "qcow2-util"
MiB = 1 << 20


def _errmsg(e):
    return e.strerror or str(e)


def _failed(e, stdout=None):
    """Failed for an OSError: its errno, one stderr line, and stdout % -errno if given."""
    err = e.errno or errno.EIO
    return Failed(err, _errmsg(e), (stdout % -err if "%d" in stdout else stdout) if stdout else None)


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except OSError as e:
        raise _failed(e)


def _named(args, spec, numbers=""):
    """getopt for a subcommand that needs -n FILE: (options, the file)."""
    o, rest = _opts(args, spec, numbers=numbers)
    if not o.get("n") or rest:
        raise Usage()
    return o, o["n"]


def _open(name, fmt="error opening %s: %d\n", **kw):
    try:
        return Q.Image(name, **kw)
    except OSError as e:
        raise _failed(e, fmt.replace("%s", name.replace("%", "%%")) if fmt else None)


def _report(say, ok, fn, failed):
    """say(ok % fn()), or say(failed % -errno) when fn raises: (errno or 0, reason)."""
    try:
        say(ok % fn())
        return 0, None
    except OSError as e:
        err = e.errno or errno.EIO
        say(failed % -err if "%d" in failed else failed)
        return err, _errmsg(e)


# -- create / snapshot ----------------------------------------------------------------------
def cmd_create(ctx, args):
    o, rest = _opts(args, "n:s:S:c:rh", numbers="sSc")
    name, size, msize = o.get("n"), o.get("s", 0), o.get("S", 0)
    if "s" not in o or not name or rest:
        raise Usage()
    if msize and msize < size:
        raise Failed(errno.EINVAL, "-S must be at least -s",
                     "Error: <-S size> must be greater than <-s size>\n")
    _call(qcow2ops.create, name, size * MiB, cluster_size=o.get("c", 1 << Q.DEFAULT_CLUSTER_BITS),
          preallocation="full" if "r" in o else "off")
    return 0


def cmd_snapshot(ctx, args):
    o, rest = _opts(args, "n:p:S:l:c:meh", numbers="Slc")
    name, parent = o.get("n"), o.get("p")
    if not name or not parent or rest:
        raise Usage()
    try:
        qcow2ops.snapshot(name, parent, parent_raw="m" in o, check_empty="e" not in o,
                          limit=o.get("l", 0),
                          cluster_size=o.get("c", 1 << Q.DEFAULT_CLUSTER_BITS))
    except OSError as e:
        raise _failed(e, _errmsg(e) + "\n" if e.errno == errno.ENOSPC else None)
    return 0


# -- query ---------------------------------------------------------------------------------
def cmd_query(ctx, args):
    want, name = _named(args, "n:vspfdSmaubh")
    resolve = "u" not in want
    img = _open(name)
    results = []
    with img:
        if "v" in want:
            ctx.say("%d\n" % (img.size >> 20))
        if "s" in want:
            results.append(_report(ctx.say, "%d\n", img.end_offset,
                                   "failed to get physical size: %d\n"))
        if "p" in want:
            if img.backing_file is None:
                ctx.say("%s has no parent\n" % name)
            else:
                results.append(_report(ctx.say, "%s\n",
                                       lambda: _parent(img) if resolve else img.backing_file,
                                       "query failed\n"))
        if "f" in want:
            ctx.say("hidden: %d\n" % img.hidden)
        if "m" in want:
            ctx.say("marker: 0\n")
        if "d" in want:
            results.append(_report(ctx.say, "chain depth: %d\n", lambda: Q.chain_depth(name),
                                   "error checking chain depth: %d\n"))
        if "a" in want:
            results.append(_report(ctx.say, "%d\n", img.allocated_clusters,
                                   "error reading bat: %d\n"))
        if "S" in want:
            ctx.say("%d\n" % (min(img.l1_capacity(), Q.MAX_SIZE) >> 20))
    failures = [r for r in results if r[0]]
    if failures:
        raise Failed(failures[0][0], "; ".join(why for _, why in failures))
    return 0


def _parent(img):
    """The backing file's canonical path (ENOENT if it is not there)."""
    path = img.backing_path()
    if not os.path.exists(path):
        raise Q.QCow2Error(errno.ENOENT, "%s: parent %s not found" % (img.path, path))
    return os.path.realpath(path)


# -- set / modify / resize / repair / revert -------------------------------------------------
def cmd_set(ctx, args):
    o, name = _named(args, "n:f:v:h", numbers="v")
    field, value = o.get("f"), o.get("v")
    if not field or value is None:
        raise Usage()
    if field != "hidden":
        ctx.say("invalid field %s\n" % field)
        raise Usage()
    if value not in (0, 1):
        ctx.say("invalid value %d\n" % value)
        raise Usage()
    img = _open(name, writable=True)
    with img:
        _call(img.set_hidden, value)
    return 0


def cmd_modify(ctx, args):
    o, name = _named(args, "n:s:p:mzh", numbers="s")
    parent, raw, zero = o.get("p"), "m" in o, "z" in o
    if "s" in o:
        raise Failed(errno.EINVAL, "a qcow2 image's physical size follows its data: -s "
                     "is not supported")
    _open(name, writable=True).close()
    if zero:
        try:
            qcow2ops.reset(name)
        except OSError as e:
            raise _failed(e, "failed to zero VHD: %d\n")
    if parent is not None:
        try:
            qcow2ops.set_parent(name, parent, parent_raw=raw)
        except OSError as e:
            raise _failed(e, "failed to set parent to '%s': %%d\n" % parent)
    return 0


def cmd_resize(ctx, args):
    o, name = _named(args, "n:s:j:fh", numbers="s")
    size, journal, fast = o.get("s"), o.get("j"), "f" in o
    if size is None or bool(journal) == fast:
        raise Usage()
    _open(name).close()
    try:
        qcow2ops.resize(name, size * MiB)
    except OSError as e:
        raise _failed(e, "resize failed: %d\n")
    return 0


def cmd_revert(ctx, args):
    o, name = _named(args, "n:j:h")
    if not o.get("j"):
        raise Usage()
    _open(name).close()
    return 0


def cmd_repair(ctx, args):
    _, name = _named(args, "n:bh")
    _open(name, writable=True, repair_dirty=False).close()
    res = _call(qcow2check.check, name, repair="all")
    if res.corruptions or res.check_errors:
        raise Failed(errno.EIO, "%s: %d errors left after the repair" % (name, res.corruptions))
    return 0


# -- coalesce / check / read -----------------------------------------------------------------
def cmd_coalesce(ctx, args):
    _, name = _named(args, "n:o:a:x:sph")
    _open(name).close()
    try:
        done = qcow2ops.commit(name)
    except OSError as e:
        raise _failed(e, "error coalescing: %d\n")
    ctx.say("Coalesced %d sectors" % (done // 512))
    return 0


def cmd_check(ctx, args):
    o, name = _named(args, "n:iItpbBh")
    try:
        res = qcow2check.check(name)
    except OSError as e:
        err = e.errno or errno.EIO
        ctx.say("%s appears invalid; dumping metadata\n" % name)
        raise Failed(err, "%s: not a valid qcow2 image: %s" % (name, _errmsg(e)))
    if "p" in o and not res.corruptions:
        try:
            Q.Chain(name).close()
        except OSError as e:
            res.error("ERROR: backing chain: %s" % _errmsg(e))
    if res.corruptions or res.check_errors:
        ctx.say("%s appears invalid; dumping metadata\n" % name)
        for line in res.messages:
            ctx.say(line + "\n")
        raise Failed(errno.EINVAL, "%s: not a valid qcow2 image: %d errors" % (name, res.corruptions))
    ctx.say("%s is valid\n" % name)
    if res.leaks:
        ctx.say("%d leaked clusters (repair frees them)\n" % res.leaks)
    return 0


def cmd_read(ctx, args):
    o, name = _named(args, "n:pBh")
    if not ("p" in o or "B" in o):
        raise Usage()
    img = _open(name, fmt="Failed to open %s: %d\n")
    with img:
        if "p" in o:
            _dump(ctx, img)
        if "B" in o:
            ctx.raw(_call(img.allocation_bitmap))
    return 0


def _dump(ctx, img):
    h = img.header
    w = ctx.say
    w("QCOW2 Header (%s)\n" % img.path)
    for key in Q.Header.FIELDS[1:] + (Q.Header.V3_FIELDS if h.version >= 3 else ()):
        w("%-24s: %s\n" % (key.replace("_", " "), getattr(h, key)))
    w("%-24s: %d\n" % ("cluster size", img.cluster_size))
    w("%-24s: %s\n" % ("backing file", h.backing_file if h.backing_file is not None else "none"))
    w("%-24s: %s\n" % ("backing format", h.backing_format or "none"))
    w("Hidden                  : %d\n" % img.hidden)
    for kind, data in h.extensions:
        w("%-24s: %#010x, %d bytes\n" % ("header extension", kind, len(data)))


# -- scan ------------------------------------------------------------------------------------
def _scan_one(path, name, fast):
    image = VU._Image(name, 0)
    try:
        image.size = os.path.getsize(path)
    except OSError as e:
        image.error, image.message = -e.errno, "failure scanning target"
        return image
    try:
        img = Q.Image(path)
    except OSError as e:
        image.error, image.message = -(e.errno or errno.EIO), "opening file"
        return image
    with img:
        image.capacity = img.size
        image.hidden = img.hidden
        if img.backing_file is not None:
            image.parent = img.backing_file if fast else img.backing_path()
            try:
                image.parent_raw = img.backing_is_raw()
            except OSError as e:
                image.error, image.message = -(e.errno or errno.EIO), "getting parent"
    return image


def cmd_scan(ctx, args):
    o, rest = _opts(args, "m:fcl:pavMh")
    pattern = o.get("m")
    flags = set(k for k in o if k not in "ml")
    if (not pattern and not rest) or "l" in o:
        raise Usage()
    targets = []
    if pattern:
        for pat in VU._braces(pattern):
            targets.extend((p, p) for p in sorted(glob.glob(pat)))
    targets.extend((p, p) for p in rest)
    seen = set(os.path.basename(p) for p, _ in targets)
    err, images, i = 0, [], 0
    while i < len(targets):
        path, name = targets[i]
        i += 1
        image = _scan_one(path, name, "f" in flags)
        if "p" in flags and not image.error:
            image.name = os.path.realpath(path)
            images.append(image)
        else:
            VU._print_image(ctx, image, flags)
        if image.error:
            err = err or -image.error
            if "c" not in flags:
                break
        if "a" in flags and image.parent and not image.error:
            ppath = image.parent if image.parent.startswith("/") else \
                os.path.join(os.path.dirname(path), image.parent)
            if os.path.basename(ppath) not in seen and not getattr(image, "parent_raw", False):
                seen.add(os.path.basename(ppath))
                targets.append((ppath, ppath))
    if "p" in flags:
        images.sort(key=lambda im: im.name)
        by_name = dict((im.name, im) for im in images)
        for im in images:
            if im.parent:
                parent = by_name.get(os.path.realpath(im.parent) if im.parent.startswith("/")
                                     else im.parent)
                if parent is not None:
                    im.parent_image = parent
                    parent.children.append(im)
        done = set()
        for im in images:
            if id(im) not in done and not im.parent_image:
                VU._print_tree(ctx, im, flags, 0, done)
    if err and "c" not in flags:
        raise Failed(err, "scan failed: %s" % os.strerror(err))
    return 0


# -- dispatch ----------------------------------------------------------------------------------
USAGE = {
    "create": "options: <-n name> <-s size (MB)> [-r reserve (preallocation full)] "
              "[-S size (MB), ignored] [-c cluster size (bytes)] [-h help]",
    "snapshot": "options: <-n name> <-p parent name> [-l snapshot depth limit] [-m "
                "parent_is_raw] [-e link to supplied parent name even if it's empty] "
                "[-c cluster size (bytes)] [-h help]",
    "query": "options: <-n name> [-v print virtual size (in MB)] [-s print physical "
             "utilization (bytes)] [-p print parent] [-f print fields] [-m print marker] "
             "[-d print chain depth] [-S print max virtual size (MB) without moving the L1 "
             "table] [-a print allocated cluster count] [-u don't resolve parent path] [-h help]",
    "set": "options: <-n name> <-f hidden> <-v value> [-h help]",
    "modify": "options: <-n name> [-p NEW_PARENT set parent [-m raw]] [-z zero (kill data)] "
              "[-h help]",
    "resize": "options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]",
    "revert": "options: <-n name> <-j journal> [-h help]",
    "repair": "options: <-n name> [-h help]",
    "coalesce": "options: <-n name> [-h help]",
    "check": "options: -n <file> [-p check parents] [-h help]",
    "scan": "usage: [OPTIONS] FILES options: [-m match filter] [-f fast] [-c continue on "
            "failure] [-p pretty print] [-a scan parents] [-v verbose] [-h help]",
    "read": "options: -n name [-p print headers] [-B allocated clusters as a bitmap] [-h help]",
}
COMMANDS = {"create": cmd_create, "snapshot": cmd_snapshot, "query": cmd_query, "set": cmd_set,
            "modify": cmd_modify, "resize": cmd_resize, "revert": cmd_revert,
            "repair": cmd_repair, "coalesce": cmd_coalesce, "check": cmd_check,
            "scan": cmd_scan, "read": cmd_read}
ORDER = "create snapshot query read set repair resize coalesce modify scan check revert".split()
IMG_ONLY = ("info", "map", "rebase", "commit")


def _vhd_style(args):
    """create, check and resize are vhd-util's when given -n FILE, else qemu-img's."""
    for a in args:
        if a == "-n" or (a.startswith("-") and not a.startswith("--") and "n" in a[1:]
                         and a[1:].isalpha() and a[1:].islower()):
            return True
    return False


def run(argv, out=None, err=None):
    """Run qcow2-util with argv (without the program name); returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    ctx = VU.Ctx(out, err, PROG)
    args = [a for a in argv if a != "--debug"]
    ctx.debug = len(args) != len(argv)
    cmd = args[0] if args else None
    if cmd in IMG_ONLY or (cmd in ("create", "check", "resize") and not _vhd_style(args[1:])):
        try:
            return qcow2img.run(ctx, cmd, args[1:])
        finally:
            out.flush()
    if cmd not in COMMANDS:
        if cmd:
            err.write("invalid COMMAND %s\n" % cmd)
        err.write("usage: %s COMMAND [OPTIONS]\nCOMMAND := { %s } (vhd-util's)\n"
                  "         | { create | check | resize | rebase | commit | info | map } "
                  "(qemu-img's)\n" % (PROG, " | ".join(ORDER)))
        return errno.EINVAL
    return VU.run_command(ctx, cmd, COMMANDS[cmd], args[1:], USAGE[cmd])


def main(argv=None):
    return VU.guarded(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
