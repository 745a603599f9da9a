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


def _getopt(args, spec, usage):
    try:
        opts, rest = getopt.gnu_getopt(args, spec)
    except getopt.GetoptError as e:
        raise _Usage("Unknown option %s\n%s" % (e.opt, usage))
    if any(o == "-h" for o, _ in opts):
        raise _Usage(usage, 0)
    return dict(opts), rest


def td_create(kind, args, out, err):
    usage = ("usage: td-util create %s [-h help] [-r reserve] [-b file_is_fixed_size] "
             "<SIZE(MB)> <FILENAME>" % kind)
    opts, rest = _getopt(args, "hrb", usage)
    if len(rest) != 2:
        raise _Usage(usage)
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
    if kind != "vhd":
        err.write("Cannot create snapshot of %s image type\n" % kind)
        return errno.EINVAL
    opts, rest = _getopt(args, "hbml:", usage)
    if len(rest) != 2:
        raise _Usage(usage)
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
    opts, rest = _getopt(args, "hvpfdb", usage)
    if len(rest) != 1:
        raise _Usage(usage)
    name = rest[0]
    if kind == "aio":
        return _query_aio(name, opts, out, err)
    try:
        img = V.VHD(name, use_backup="-b" in opts)
    except V.VHDError as e:
        out.write("failed opening %s: %d\n" % (name, -e.errno))
        err.write("%s query: %s\n" % (PROG, e.strerror))
        return e.errno
    rc = 0
    with img:
        if "-v" in opts:
            out.write("%d\n" % (img.size >> 20))
        if "-p" in opts:
            if img.type != V.HD_TYPE_DIFF:
                out.write("%s has no parent\n" % name)
            else:
                try:
                    out.write("%s\n" % img.parent_path())
                except V.VHDError as e:
                    out.write("failed getting parent: %d\n" % -e.errno)
                    err.write("%s query: %s\n" % (PROG, e.strerror))
                    rc = rc or e.errno
        if "-f" in opts:
            try:
                out.write("hidden: %d\n" % img.hidden())
            except V.VHDError as e:
                out.write("failed checking 'hidden' field: %d\n" % -e.errno)
                rc = rc or e.errno
        if "-d" in opts:
            try:
                out.write("chain depth: %d\n" % V.chain_depth(name))
            except V.VHDError as e:
                out.write("error checking chain depth: %d\n" % -e.errno)
                err.write("%s query: %s\n" % (PROG, e.strerror))
                rc = rc or e.errno
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
    if kind != "vhd":
        err.write("Cannot set fields of %s images\n" % kind)
        return errno.EINVAL
    opts, rest = _getopt(args, "h", usage)
    if len(rest) != 3:
        raise _Usage(usage)
    name, field, value = rest
    if field != "hidden":
        raise _Usage("Invalid field %s\n%s" % (field, usage))
    return vhdutil.run(["set", "-n", name, "-f", field, "-v", value], out, err)


HANDLERS = {"create": td_create, "snapshot": td_snapshot, "query": td_query, "set": td_set}


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
    try:
        return HANDLERS[args[0]](args[1], args[2:], out, err)
    except _Usage as e:
        (out if e.code == 0 else err).write(e.text + "\n")
        return e.code


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        return errno.EPIPE
    except Exception as e:      # noqa: BLE001 - one line, never a traceback
        sys.stderr.write("%s: internal error: %s: %s\n" % (PROG, type(e).__name__, e))
        return errno.EIO


if __name__ == "__main__":
    sys.exit(main())
