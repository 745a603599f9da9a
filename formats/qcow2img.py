"""qcow2-util's qemu-img face: the argv XCP-ng's SM gives qemu-img for qcow2 images,
with the output its parsers read, so that its code can run this tool in qemu-img's
place:

    create [-q] [-f qcow2] [-o opts] [-b backing [-F fmt]] [-u] file [size]
    rebase [-q] [-f qcow2] [-u] -b backing [-F fmt] file   (without -u: safe, copying)
    resize [-q] [-f qcow2] [--shrink] file [+]size
    check  [-q] [-f qcow2] [--output=human|json] [-r leaks|all] file
    commit [-q] [-f qcow2] [-b base] [-d] [-p] file
    info   [-f qcow2|raw] [--output=human|json] [--backing-chain] [-U] file
    map    [-f qcow2] [--output=human|json] [--start-offset=N] [--max-length=N] file

Exit status as qemu-img: 0, or 1 on any failure (check: 2 corruptions, 3 leaks only);
errors are one line "qcow2-util: ..." on stderr.
"""
import getopt
import json
import os
import re

from smtap import sparse, units
from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2ops

PROG = "qcow2-util"
GENERIC = ["object=", "image-opts", "help"]


class ImgError(Exception):
    """qemu-img's failure: a message, exit 1 (or `status`)."""

    def __init__(self, message, status=1):
        super(ImgError, self).__init__(message)
        self.status = status


def _msg(e):
    return e.strerror or str(e)


def qemu_size(text, what="image size"):
    """qemu-img's size grammar, which this face must take as qemu-img does (so not
    smtap.units'): bytes or a decimal fraction with k/M/G/T/P/E (binary); 'b' is bytes."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)\s*$", str(text))
    if not m or ("." in m.group(1) and m.group(2) in ("", "b", "B")):
        raise ImgError("Invalid %s specified. You may use k, M, G, T, P or E suffixes for "
                       "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
                       % what)
    unit = 1 << (10 * "BKMGTPE".index(m.group(2).upper() or "B"))
    value = int(float(m.group(1)) * unit) if "." in m.group(1) else int(m.group(1)) * unit
    if value >= 1 << 63:
        raise ImgError("Invalid %s specified." % what)
    return value


def _getopt(args, short, long_opts=()):
    try:
        return getopt.gnu_getopt(args, short, list(long_opts) + GENERIC)
    except getopt.GetoptError as e:
        raise ImgError(str(e))


def _format(opts, allowed=("qcow2",)):
    fmt = opts.get("-f")
    if fmt is not None and fmt not in allowed:
        raise ImgError("format %s is not supported (only %s)" % (fmt, ", ".join(allowed)))
    return fmt


def _output(opts):
    output = opts.get("--output", "human")
    if output not in ("human", "json"):
        raise ImgError("--output must be used with human or json as argument.")
    return output


def _parse(args, short, long_opts=(), formats=("qcow2",)):
    """getopt, -f checked, one image name: (options, path)."""
    o, rest = _getopt(args, short, long_opts)
    opts = dict(o)
    _format(opts, formats)
    return opts, _one(rest)


def _one(rest, what="filename"):
    if len(rest) != 1:
        raise ImgError("Expecting one image file name" if not rest else
                       "Unexpected argument: %s" % rest[1])
    return rest[0]


def _open(path, **kw):
    try:
        return Q.Image(path, **kw)
    except Q.QCow2Error as e:
        raise ImgError("Could not open '%s': %s" % (path, _msg(e)))
    except OSError as e:
        raise ImgError("Could not open '%s': %s" % (path, _msg(e)))


def _say(ctx, opts, text):
    if "-q" not in opts:
        ctx.out.write(text)


# -- create ------------------------------------------------------------------------------
CREATE_OPTIONS = ("size", "compat", "backing_file", "backing_fmt", "encryption", "encrypt.format",
                  "cluster_size", "preallocation", "lazy_refcounts", "refcount_bits",
                  "compression_type", "extended_l2", "data_file", "data_file_raw")


def _create_options(text):
    out = {}
    for item in filter(None, re.split(r"(?<!,),(?!,)", text)):
        key, sep, value = item.partition("=")
        if key in ("help", "?"):
            raise ImgError("Supported options: %s" % ", ".join(CREATE_OPTIONS), status=0)
        if key not in CREATE_OPTIONS:
            raise ImgError("Invalid parameter '%s'" % key)
        out[key] = value.replace(",,", ",")
    return out


def _on_off(value, name):
    """qemu's on/off option (the name alone: on)."""
    try:
        return units.parse_bool(value or "on", name)
    except ValueError:
        raise ImgError("Parameter '%s' expects 'on' or 'off'" % name)


def cmd_create(ctx, args):
    o, rest = _getopt(args, "F:b:f:ho:qu")
    opts = {}
    for k, v in o:
        if k == "-o":
            opts.setdefault("-o", []).append(v)
        else:
            opts[k] = v
    if "-h" in opts or "--help" in opts:
        ctx.out.write(__doc__)
        return 0
    if opts.get("-f", "raw") != "qcow2":
        raise ImgError("only qcow2 images can be created (-f qcow2); got -f %s"
                       % opts.get("-f", "raw (the default)"))
    options = {}
    for text in opts.get("-o", []):
        options.update(_create_options(text))
    if not rest or len(rest) > 2:
        raise ImgError("Expecting image file name" if not rest else
                       "Unexpected argument: %s" % rest[2])
    path = rest[0]
    backing = opts.get("-b", options.get("backing_file"))
    bfmt = opts.get("-F", options.get("backing_fmt"))
    if options.get("encryption") and _on_off(options["encryption"], "encryption") or \
            "encrypt.format" in options:
        raise ImgError("%s: encrypted images are not supported" % path)
    if options.get("data_file"):
        raise ImgError("%s: external data files are not supported" % path)
    if options.get("extended_l2") and _on_off(options["extended_l2"], "extended_l2"):
        raise ImgError("%s: extended L2 entries are not supported" % path)
    if options.get("compression_type", "zlib") != "zlib":
        raise ImgError("%s: compression type %s is not supported" % (path, options["compression_type"]))
    compat = options.get("compat", "1.1")
    if compat not in ("0.10", "v2", "1.1", "v3"):
        raise ImgError("%s: Invalid parameter value for 'compat': %s" % (path, compat))
    version = 2 if compat in ("0.10", "v2") else 3
    size = None
    if len(rest) == 2:
        size = qemu_size(rest[1])
    elif "size" in options:
        size = qemu_size(options["size"])
    if backing is not None:
        bpath = backing if backing.startswith("/") else os.path.join(os.path.dirname(path), backing)
        if bfmt is None and "-u" not in opts:
            bfmt = "qcow2" if Q.is_qcow2(bpath) else "raw"
        if bfmt not in ("qcow2", "raw"):
            raise ImgError("%s: backing format %s is not supported (qcow2 or raw)" % (path, bfmt))
        if "-u" not in opts or size is None:
            try:
                bsize = qcow2ops.image_size(bpath, bfmt == "raw")
            except OSError as e:
                raise ImgError("%s: Could not open backing image '%s': %s"
                               % (path, backing, _msg(e)))
            if size is None:
                size = bsize
    if size is None:
        raise ImgError("%s: Image creation needs a size parameter" % path)
    try:
        cluster = qemu_size(options.get("cluster_size", "65536"), "cluster size")
        refbits = int(options.get("refcount_bits", "16"))
    except ValueError:
        raise ImgError("%s: Invalid parameter value" % path)
    prealloc = options.get("preallocation", qcow2ops.NO_PREALLOCATION)
    lazy = _on_off(options.get("lazy_refcounts", "off"), "lazy_refcounts")
    line = "Formatting '%s', fmt=qcow2 cluster_size=%d extended_l2=off%s compression_type=zlib " \
           "size=%d" % (path, cluster, "" if prealloc == qcow2ops.NO_PREALLOCATION else " preallocation=" + prealloc,
                        size)
    if backing is not None:
        line += " backing_file=%s" % backing + (" backing_fmt=%s" % bfmt if bfmt else "")
    if version == 2:
        line += " compat=0.10"
    _say(ctx, opts, line + " lazy_refcounts=%s refcount_bits=%d\n" % ("on" if lazy else "off", refbits))
    try:
        qcow2ops.create(path, size, cluster_size=cluster, backing=backing,
                        backing_format=bfmt or ("raw" if backing is not None else None),
                        preallocation=prealloc, version=version, lazy_refcounts=lazy,
                        refcount_bits=refbits)
    except OSError as e:
        raise ImgError("%s: %s" % (path, _msg(e)))
    return 0


# -- rebase / resize / commit ------------------------------------------------------------
def cmd_rebase(ctx, args):
    opts, path = _parse(args, "hf:F:b:upt:T:qUc")
    if "-b" not in opts:
        raise ImgError("Must specify backing file (-b) or use -u with -b \"\"")
    backing = opts["-b"] or None
    fmt = opts.get("-F")
    bpath = None
    if backing is not None:
        bpath = backing if backing.startswith("/") else os.path.join(os.path.dirname(path), backing)
        if fmt is None:
            fmt = "qcow2" if Q.is_qcow2(bpath) else "raw"
        if fmt not in ("qcow2", "raw"):
            raise ImgError("backing format %s is not supported (qcow2 or raw)" % fmt)
    if "-u" not in opts:
        _safe_rebase(path, bpath, fmt)
    img = _open(path, writable=True)
    try:
        img.set_backing(backing, fmt)
    except OSError as e:
        raise ImgError("Could not change the backing file to '%s': %s" % (backing, _msg(e)))
    finally:
        img.close()
    return 0


def _safe_rebase(path, bpath, fmt):
    """Before the new backing file is set: every region the image does not hold where
    the old and the new backing files differ gets the old one's data."""
    img = _open(path, writable=True, lazy=True)
    try:
        old = img.backing_reader()
        new = None
        if bpath is not None:
            if fmt == "raw":
                new_raw = Q.open_file(bpath)
                rsize = new_raw.size()
                new = lambda n, off: bytes(new_raw.pread(max(0, min(n, rsize - off)), off)).ljust(n, b"\0")   # noqa: E731
            else:
                chain = Q.Chain(bpath)
                new = chain.pread
        step = 4 << 20
        for pos, n, kind in img.extents(0, img.size):
            if kind != Q.HOLE:
                continue
            done = 0
            while done < n:
                k = min(step, n - done)
                a = old(k, pos + done) if old is not None else bytes(k)
                b = new(k, pos + done) if new is not None else bytes(k)
                if a != b:
                    img.write(a, pos + done)
                done += k
    except OSError as e:
        raise ImgError("Could not rebase %s: %s" % (path, _msg(e)))
    finally:
        img.close()


def cmd_resize(ctx, args):
    o, rest = _getopt(args, "f:hq", ["shrink", "preallocation="])
    opts = dict(o)
    _format(opts)
    if len(rest) != 2:
        raise ImgError("Expecting image file name and size")
    path, text = rest
    img = _open(path, writable=True)
    try:
        if text[:1] in "+-":
            delta = qemu_size(text[1:], "image size")
            size = img.size + delta if text[0] == "+" else img.size - delta
        else:
            size = qemu_size(text, "image size")
        size = -(-size // 512) * 512
        if size < img.size:
            if "--shrink" not in opts:
                raise ImgError("Use the --shrink option to perform a shrink operation.")
            raise ImgError("%s: shrinking is not supported" % path)
        if opts.get("--preallocation", qcow2ops.NO_PREALLOCATION) != qcow2ops.NO_PREALLOCATION:
            raise ImgError("%s: preallocation on resize is not supported" % path)
        img.grow(size)
    except OSError as e:
        raise ImgError("%s: %s" % (path, _msg(e)))
    finally:
        img.close()
    _say(ctx, opts, "Image resized.\n")
    return 0


def cmd_commit(ctx, args):
    opts, path = _parse(args, "f:ht:b:dpqr:")
    base = opts.get("-b")
    progress = None
    if "-p" in opts and "-q" not in opts:
        def progress(done, total):
            ctx.out.write("    (%.2f/100%%)\r" % (100.0 * done / max(total, 1)))
            ctx.out.flush()
    try:
        qcow2ops.commit(path, base=base, empty=base is None and "-d" not in opts,
                        progress=progress)
    except OSError as e:
        raise ImgError("%s: %s" % (path, _msg(e)))
    if progress is not None:
        ctx.out.write("    (100.00/100%)\n")
    _say(ctx, opts, "Image committed.\n")
    return 0


# -- check -------------------------------------------------------------------------------
def cmd_check(ctx, args):
    opts, path = _parse(args, "hf:r:T:qU", ["output=", "force-share"])
    output = _output(opts)
    repair = opts.get("-r")
    if repair not in (None, "leaks", "all"):
        raise ImgError("Unknown option value for -r (expecting 'leaks' or 'all'): %s" % repair)
    try:
        res = qcow2check.check(path, repair=repair)
    except OSError as e:
        raise ImgError("Could not open '%s': %s" % (path, _msg(e)))
    for line in getattr(res, "repaired_messages", []) + res.messages:
        ctx.err.write(line + "\n")
    if output == "json":
        ctx.out.write(json.dumps(res.json(path), indent=4) + "\n")
    elif "-q" not in opts:
        qcow2check.summary(res, ctx.out)
    return qcow2check.exit_status(res)


# -- info ----------------------------------------------------------------------------------
def _human_size(n):
    if n < 1024:
        return "%d B" % n
    for i, unit in enumerate(("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"), 1):
        v = n / float(1 << (10 * i))
        if v < 1024 or unit == "EiB":
            text = "%.3g" % v if v < 1000 else "%.0f" % v
            if "e" in text:
                text = "%.0f" % v
            return "%s %s" % (text, unit)


def _qcow2_info(img, name):
    st = os.stat(img.path)
    h = img.header
    data = {"compat": "1.1" if img.version >= 3 else "0.10", "compression-type":
            "zstd" if h.compression_type == 1 else "zlib"}
    if img.version >= 3:
        data.update({"lazy-refcounts": img.lazy_refcounts, "refcount-bits": img.refcount_bits,
                     "corrupt": img.corrupt, "extended-l2": False})
    else:
        data["refcount-bits"] = img.refcount_bits
    info = {"virtual-size": img.size, "filename": name, "cluster-size": img.cluster_size,
            "format": "qcow2", "actual-size": st.st_blocks * 512,
            "format-specific": {"type": "qcow2", "data": data}, "dirty-flag": img.dirty}
    if img.backing_file is not None:
        info["backing-filename"] = img.backing_file
        info["full-backing-filename"] = img.backing_path()
        if img.backing_format is not None:
            info["backing-filename-format"] = img.backing_format
    return info


def _raw_info(path):
    st = os.stat(path)
    with Q.open_file(path) as f:
        size = f.size()
    return {"virtual-size": size, "filename": path, "format": "raw",
            "actual-size": st.st_blocks * 512, "dirty-flag": False}


def _print_human(ctx, info):
    w = ctx.out.write
    w("image: %s\nfile format: %s\n" % (info["filename"], info["format"]))
    w("virtual size: %s (%d bytes)\n" % (_human_size(info["virtual-size"]), info["virtual-size"]))
    w("disk size: %s\n" % _human_size(info["actual-size"]))
    if "cluster-size" in info:
        w("cluster_size: %d\n" % info["cluster-size"])
    if "backing-filename" in info:
        name, full = info["backing-filename"], info["full-backing-filename"]
        w("backing file: %s%s\n" % (name, "" if name == full else " (actual path: %s)" % full))
        if "backing-filename-format" in info:
            w("backing file format: %s\n" % info["backing-filename-format"])
    if "format-specific" in info:
        data = info["format-specific"]["data"]
        w("Format specific information:\n")
        for key in ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                    "extended-l2"):
            if key in data:
                v = data[key]
                w("    %s: %s\n" % (key.replace("-", " "), str(v).lower() if isinstance(v, bool) else v))


def cmd_info(ctx, args):
    opts, path = _parse(args, "f:hU", ["output=", "backing-chain", "force-share", "limits"],
                        ("qcow2", "raw"))
    fmt = opts.get("-f")
    output = _output(opts)
    infos = []
    name, cur, cur_fmt = path, path, fmt
    seen = set()
    while cur is not None:
        if len(infos) > Q.MAX_CHAIN:
            raise ImgError("Backing file chain too long")
        try:
            key = os.stat(cur)
            key = (key.st_dev, key.st_ino)
        except OSError as e:
            raise ImgError("Could not open '%s': %s" % (cur, _msg(e)))
        if key in seen:
            raise ImgError("Backing file '%s' creates an infinite loop." % cur)
        seen.add(key)
        if cur_fmt == "raw":
            infos.append(_raw_info(cur))
            break
        img = _open(cur)
        try:
            infos.append(_qcow2_info(img, name))
            nxt = img.backing_path()
            nfmt = None if nxt is None else ("raw" if img.backing_is_raw() else "qcow2")
        finally:
            img.close()
        if "--backing-chain" not in opts:
            break
        name, cur, cur_fmt = nxt, nxt, nfmt
    if output == "json":
        text = json.dumps(infos if "--backing-chain" in opts else infos[0], indent=4)
        ctx.out.write(text + "\n")
    else:
        for i, info in enumerate(infos):
            if i:
                ctx.out.write("\n")
            _print_human(ctx, info)
    return 0


# -- map -------------------------------------------------------------------------------------
class _Layer(object):
    """One image of the chain for map: its block status as qemu's drivers report it."""

    def __init__(self, path, raw, name):
        self.path, self.raw, self.name = path, raw, name
        if raw:
            self.io = Q.open_file(path)
            self.size = self.io.size()
            self.img = None
        else:
            self.img = _open(path)
            self.io = self.img.io
            self.size = self.img.size
            self.prealloc = _metadata_preallocation(self.img)

    def close(self):
        if self.img is not None:
            self.img.close()
        else:
            self.io.close()

    def status(self, offset, length):
        """[(length, data, zero, host offset or None)] from offset (qemu's flags):
        None as data means unallocated here."""
        if self.raw:
            out = []
            pos = offset
            for n, is_data in sparse.extents(self.io.fd, offset, length, 64):
                out.append((n, is_data, not is_data, pos))
                pos += n
            return out
        out = []
        for pos, n, t, e in self.img.runs(offset, length):
            if t == Q.UNALLOCATED:
                out.append((n, None, False, None))
            elif t == Q.ZERO_PLAIN:
                out.append((n, False, True, None))
            elif t == Q.ZERO_ALLOC:
                out.append((n, False, True, (e & Q.OFFSET_MASK) + (pos & (self.img.cluster_size - 1))))
            elif t == Q.COMPRESSED:
                out.append((n, True, False, None))
            else:
                host = (e & Q.OFFSET_MASK) + (pos & (self.img.cluster_size - 1))
                if self.prealloc:           # qemu asks the file: holes read as zeros
                    end = self.img.file_size
                    for k, is_data in _file_extents(self.io, host, n, end):
                        out.append((k, True, not is_data, host))
                        host += k
                else:
                    out.append((n, True, False, host))
        return out


def _file_extents(io, host, n, end):
    out = []
    if host < end:
        inside = min(n, end - host)
        out.extend(sparse.extents(io.fd, host, inside))
        n -= inside
    if n > 0:
        out.append((n, False))
    return out


def _metadata_preallocation(img):
    """qemu's qcow2_detect_metadata_preallocation: more clusters in use than the file
    has blocks for (then block status asks the file whether data clusters hold data)."""
    try:
        real = os.fstat(img.io.fd).st_blocks * 512 // img.cluster_size
    except (AttributeError, OSError):
        return False
    img._load_reftable()
    used = 0
    for c in range(-(-img.file_size // img.cluster_size)):
        if img.refcount(c):
            used += 1
            if used > real:
                return True
    return False


def _map_entries(layers, offset, length):
    """qemu-img map's entries: each region from the first layer that has it."""
    out = []
    pos, end = offset, offset + length
    while pos < end:
        n = end - pos
        depth = 0
        entry = None
        while True:
            layer = layers[depth]
            if pos >= layer.size:
                entry = (min(n, 1 << 62), depth, False, True, False, None)
                break
            k, data, zero, host = layer.status(pos, min(n, layer.size - pos))[0]
            n = k
            if data is not None or zero:
                entry = (k, depth, True, zero, data, host)
                break
            below = layers[depth + 1] if depth + 1 < len(layers) else None
            if below is None:
                entry = (k, depth, False, True, False, None)
                break
            if pos >= below.size:
                entry = (min(k, 1 << 62), depth, False, True, False, None)
                break
            depth += 1
        k, depth, present, zero, data, host = entry
        k = min(k, end - pos)
        _merge(out, pos, k, depth, present, zero, data, host, layers[depth].name)
        pos += k
    return out


def _merge(out, start, length, depth, present, zero, data, host, name):
    if out:
        p = out[-1]
        if (p["depth"], p["present"], p["zero"], p["data"], p["_name"]) == \
                (depth, present, zero, data, name) and \
                (("offset" in p) == (host is not None)) and \
                (host is None or p["offset"] + p["length"] == host):
            p["length"] += length
            return
    e = {"start": start, "length": length, "depth": depth, "present": present, "zero": zero,
         "data": data, "_name": name}
    if host is not None:
        e["offset"] = host
    out.append(e)


def _jbool(v):
    return "true" if v else "false"


def cmd_map(ctx, args):
    opts, path = _parse(args, "f:hU", ["output=", "start-offset=", "max-length=", "force-share"])
    output = _output(opts)
    layers = []
    try:
        layers.append(_Layer(path, False, path))
        cur = layers[0]
        while cur.img is not None and cur.img.backing_file is not None:
            if len(layers) > Q.MAX_CHAIN:
                raise ImgError("Backing file chain too long")
            bpath = cur.img.backing_path()
            try:
                cur = _Layer(bpath, cur.img.backing_is_raw(), bpath)
            except OSError as e:
                raise ImgError("Could not open backing file '%s': %s" % (bpath, _msg(e)))
            layers.append(cur)
        size = layers[0].size
        start = qemu_size(opts.get("--start-offset", "0"), "offset")
        length = qemu_size(opts.get("--max-length", str(size)), "length")
        length = max(0, min(length, size - start))
        try:
            entries = _map_entries(layers, start, length) if length else []
        except OSError as e:
            raise ImgError("%s: %s" % (path, _msg(e)))
    finally:
        for layer in layers:
            layer.close()
    if output == "json":
        rows = []
        for e in entries:
            row = '{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, ' \
                  '"data": %s' % (e["start"], e["length"], e["depth"], _jbool(e["present"]),
                                  _jbool(e["zero"]), _jbool(e["data"]))
            if "offset" in e:
                row += ', "offset": %d' % e["offset"]
            rows.append(row + "}")
        ctx.out.write("[" + ",\n".join(rows) + "]\n")
    else:
        ctx.out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        for e in entries:
            if e["data"] and "offset" in e:
                ctx.out.write("%-16s%-16s%-16s%s\n" % (_chex(e["start"]), _chex(e["length"]),
                                                       _chex(e["offset"]), e["_name"]))
    return 0


def _chex(n):
    """C's %#x: no 0x for zero."""
    return "0" if not n else "%#x" % n


COMMANDS = {"create": cmd_create, "rebase": cmd_rebase, "resize": cmd_resize,
            "check": cmd_check, "commit": cmd_commit, "info": cmd_info, "map": cmd_map}


def run(ctx, cmd, args):
    """Run one qemu-img-style command; returns the exit status."""
    try:
        return COMMANDS[cmd](ctx, args)
    except ImgError as e:
        if e.status == 0:
            ctx.out.write("%s\n" % e)
            return 0
        ctx.err.write("%s: %s\n" % (PROG, e))
        return e.status
    except OSError as e:
        ctx.err.write("%s: %s\n" % (PROG, _msg(e)))
        return 1
    except ValueError as e:
        ctx.err.write("%s: %s\n" % (PROG, e))
        return 1
