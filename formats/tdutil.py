"""td-util: upstream's tapdisk utility (create, snapshot, query, set) over vhd-util.

    td-util COMMAND TYPE [OPTIONS]     TYPE := { vhd | aio }
"""
import errno
import fcntl
import getopt
import os
import stat
import struct
import sys

from smtap.formats import vhd as V
from smtap.formats import vhdutil

PROG = "td-util"
TYPES = ("vhd", "aio")
COMMANDS = ("create", "snapshot", "query", "set")
BLKGETSIZE64 = 0x80081272


def _help(err):
    err.write("Tapdisk Utilities: v1.0.0\nusage: td-util COMMAND [TYPE] [OPTIONS]\n"
              "COMMAND := { %s }\nTYPE := { %s }\n" % (" | ".join(COMMANDS), " | ".join(TYPES)))
    return 255


class _Usage(Exception):
    def __init__(self, text, code=errno.EINVAL):
        super(_Usage, self).__init__(text)
        self.text, self.code = text, code


def _getopt(args, spec, usage, operands):
    """({-x: argument}, the `operands` operands), or the usage."""
    try:
        opts, rest = getopt.gnu_getopt(args, spec)
    except getopt.GetoptError as e:
        raise _Usage("Unknown option %s\n%s" % (e.opt, usage))
    if any(o == "-h" for o, _ in opts):
        raise _Usage(usage, 0)
    if len(rest) != operands:
        raise _Usage(usage)
    return dict(opts), rest


def td_create(kind, args, out, err):
    usage = ("usage: td-util create %s [-h help] [-r reserve] [-b file_is_fixed_size] "
             "<SIZE(MB)> <FILENAME>" % kind)
    opts, rest = _getopt(args, "hrb", usage, 2)
    try:
        mb = int(rest[0], 10)
    except ValueError:
        raise _Usage(usage)
    name = rest[1]
    if kind == "vhd":
        argv = ["create", "-n", name, "-s", str(mb)] + (["-r"] if "-r" in opts else [])
        return vhdutil.run(argv, out, err)
    if "-r" not in opts:
        err.write("Cannot create sparse %s image\n" % kind)
        return errno.EINVAL
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            chunk = bytes(1 << 20)
            for i in range(mb):
                V.pwrite_all(fd, chunk, i << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        err.write("%s: %s\n" % (name, e.strerror))
        try:
            os.unlink(name)
        except OSError:
            pass
        return errno.EIO
    return 0


def td_snapshot(kind, args, out, err):
    usage = ("usage: td-util snapshot %s [-h help] [-m parent_raw] [-b file_is_fixed_size] "
             "[-l snapshot depth limit] <FILENAME> <BACKING_FILENAME>" % kind)
    opts, rest = _getopt(args, "hbml:", usage, 2)
    name, backing = rest
    if not os.path.exists(backing):
        err.write("File %s not found\n" % backing)
        return errno.ENOENT
    argv = ["snapshot", "-n", name, "-p", backing]
    if "-m" in opts:
        argv.append("-m")
    if "-l" in opts:
        argv += ["-l", opts["-l"]]
    return vhdutil.run(argv, out, err)


def td_query(kind, args, out, err):
    usage = ("usage: td-util query %s [-h help] [-v virtsize] [-p parent] [-f fields] "
             "[-d chain depth] [-b don't trust the footer, use the back-up one instead] "
             "<FILENAME>" % kind)
    opts, rest = _getopt(args, "hvpfdb", usage, 1)
    name = rest[0]
    if kind == "aio":
        return _query_aio(name, opts, out, err)
    try:
        img = V.VHD(name, use_backup="-b" in opts)
    except V.VHDError as e:
        out.write("failed opening %s: %d\n" % (name, -e.errno))
        err.write("%s query: %s\n" % (PROG, e.strerror))
        return e.errno
    results = []
    with img:
        if "-v" in opts:
            out.write("%d\n" % (img.size >> 20))
        if "-p" in opts:
            if img.type != V.HD_TYPE_DIFF:
                out.write("%s has no parent\n" % name)
            else:
                results.append(vhdutil.report(out.write, "%s\n", img.parent_path,
                                              "failed getting parent: %d\n"))
        if "-f" in opts:
            results.append(vhdutil.report(out.write, "hidden: %d\n", img.hidden,
                                          "failed checking 'hidden' field: %d\n"))
        if "-d" in opts:
            results.append(vhdutil.report(out.write, "chain depth: %d\n",
                                          lambda: V.chain_depth(name),
                                          "error checking chain depth: %d\n"))
    failures = [r for r in results if r[0]]
    for _, why in failures:
        err.write("%s query: %s\n" % (PROG, why))
    rc = failures[0][0] if failures else 0
    return rc


def _query_aio(name, opts, out, err):
    if "-v" in opts:
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError as e:
            out.write("failed opening %s: %d\n" % (name, e.errno))
            err.write("%s query: %s: %s\n" % (PROG, name, e.strerror))
            return e.errno
        try:
            if stat.S_ISBLK(os.fstat(fd).st_mode):
                size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            else:
                size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        out.write("%d\n" % (size >> 20))
    if "-p" in opts:
        out.write("%s has no parent\n" % name)
    if "-f" in opts:
        out.write("hidden: 0\n")
    return 0


def td_set(kind, args, out, err):
    usage = "usage: td-util set %s [-h help] <FILENAME> <FIELD> <VALUE>\nFIELD := { hidden }" % kind
    opts, rest = _getopt(args, "h", usage, 3)
    name, field, value = rest
    if field != "hidden":
        raise _Usage("Invalid field %s\n%s" % (field, usage))
    return vhdutil.run(["set", "-n", name, "-f", field, "-v", value], out, err)


HANDLERS = {"create": td_create, "snapshot": td_snapshot, "query": td_query, "set": td_set}
VHD_ONLY = {"snapshot": "Cannot create snapshot of %s image type",
            "set": "Cannot set fields of %s images"}


def run(argv, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    args = [a for a in argv if a != "--debug"]
    if not args:
        return _help(err)
    if args[0] not in HANDLERS:
        err.write("invalid COMMAND %s\n" % args[0])
        return _help(err)
    if len(args) < 2:
        err.write("td-util %s requires a TYPE\nTYPE := { %s }\n" % (args[0], " | ".join(TYPES)))
        return 255
    if args[1] not in TYPES:
        err.write("invalid TYPE '%s'.\nTYPE := { %s }\n" % (args[1], " | ".join(TYPES)))
        return 255
    if args[0] in VHD_ONLY and args[1] != "vhd":
        err.write(VHD_ONLY[args[0]] % args[1] + "\n")
        return errno.EINVAL
    try:
        return HANDLERS[args[0]](args[1], args[2:], out, err)
    except _Usage as e:
        (out if e.code == 0 else err).write(e.text + "\n")
        return e.code


def main(argv=None):
    return vhdutil.guarded(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
