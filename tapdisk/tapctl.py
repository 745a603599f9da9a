"""tap-ctl: upstream's command line over the control socket, and the compound
operations (create, destroy, list) it is made of, importable by the storage layer.

Output is upstream's: `list` prints `pid=%d minor=%d state=%#x args=%s:%s` lines when
stdout is not a terminal (fields it does not know left out), with the image's options
(after `?`) left out of `args=`: upstream sm splits each field on `=` into exactly two
parts, so a field may hold no other `=` (stats and list_vbds keep the full params).
`create`/`allocate` print the device (the minor's marker path), `spawn` the pid, `stats`
JSON. A failure is one line on stderr and an exit status of its errno.
"""
import errno
import json
import os
import sys

from smtap.tapdisk import control, minors

# Per-subcommand getopt spec and usage (one line each).
_OPEN_OPTS = "a:RDe:r2:st:C:n:L:"
_OPEN_USAGE = ("-a type:/path [-R read-only] [-e parent_minor] [-r read cache] "
               "[-2 secondary] [-s standby] [-t request_timeout_secs] [-D no O_DIRECT] "
               "[-C cbtlog] [-n nbd_export_name] [-L [host:]port extra NBD TCP listener]")
COMMANDS = {
    "list": ("p:m:t:f:", "list [-p pid] [-m minor] [-t type] [-f file]"),
    "allocate": ("d:", "allocate [-d devname]"),
    "free": ("m:", "free -m minor"),
    "create": (_OPEN_OPTS + "d:", "create [-d devname] " + _OPEN_USAGE),
    "destroy": ("p:m:t:", "destroy -p pid -m minor [-t timeout_secs]"),
    "spawn": ("", "spawn"),
    "attach": ("p:m:", "attach -p pid -m minor"),
    "detach": ("p:m:", "detach -p pid -m minor"),
    "open": ("p:m:" + _OPEN_OPTS, "open -p pid -m minor " + _OPEN_USAGE),
    "close": ("p:m:ft:", "close -p pid -m minor [-f force] [-t timeout_secs]"),
    "pause": ("p:m:t:", "pause -p pid -m minor [-t timeout_secs]"),
    "unpause": ("p:m:a:2:c:", "unpause -p pid -m minor [-a type:/path] [-2 secondary] "
                "[-c cbtlog]"),
    "stats": ("p:m:", "stats -p pid -m minor"),
}
_FLAG_OPTS = {"-R": control.FLAG_RDONLY, "-D": control.FLAG_NO_O_DIRECT,
              "-r": control.FLAG_ADD_LCACHE, "-s": control.FLAG_STANDBY}


class UsageError(Exception):
    pass


# -- compound operations ----------------------------------------------------------------
def create(params, flags=0, prt_minor=None, secondary=None, timeout=0, logpath=None,
           export_name=None, tcp=None, devname=None):
    """allocate + spawn + attach + open; returns (pid, minor, device). On failure
    everything done so far is undone."""
    minor = minors.allocate()
    pid = None
    try:
        pid = control.spawn()
        client = control.Client(pid)
        client.attach(minor)
        client.open(minor, params, flags, timeout, secondary, prt_minor, logpath,
                    export_name, tcp)
        device = _link(devname, minor)
    except BaseException:
        _abandon(pid, minor)
        raise
    return pid, minor, device


def _abandon(pid, minor):
    if pid is not None:
        try:
            control.Client(pid, io_timeout=30).exit()
        except Exception:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    try:
        minors.free_released(minor)    # a killed tapdisk drops its lock as it exits
    except OSError:
        pass


def _link(devname, minor):
    """The device printed: the minor's marker, or a symlink to it named devname."""
    marker = minors.marker(minor)
    if not devname:
        return marker
    tmp = devname + ".tmp%d" % os.getpid()
    os.symlink(marker, tmp)
    os.rename(tmp, devname)
    return devname


def destroy(pid, minor, timeout=None):
    """close + detach + free."""
    client = control.Client(pid, io_timeout=timeout)
    client.close(minor)
    client.detach(minor)
    minors.free(minor)


def list_vbds(pid=None):
    """Upstream's 3-way join of tapdisks, their VBDs and allocated minors: dicts with
    the keys known among pid, minor, state, params. Only live tapdisks are listed;
    with pid, only that one (and no orphan minors)."""
    if pid is None:
        pids = control.find_tapdisks()
    else:
        try:
            pids = [pid] if control.Client(pid).get_pid() == pid else []
        except control.ControlError:
            pids = []
    entries, seen = [], set()
    for tapdisk in pids:
        try:
            vbds = control.Client(tapdisk, io_timeout=10).list()
        except control.ControlError:
            vbds = []
        if not vbds:
            entries.append({"pid": tapdisk})
        for vbd in vbds:
            entries.append(dict(vbd, pid=tapdisk))
            seen.add(vbd["minor"])
    if pid is None:
        entries.extend({"minor": m} for m in minors.allocated() if m not in seen)
    return entries


def format_entry(entry):
    """One `list` line as upstream prints it to a pipe."""
    fields = []
    if entry.get("pid") is not None:
        fields.append("pid=%d" % entry["pid"])
    if entry.get("minor") is not None and entry["minor"] >= 0:
        fields.append("minor=%d" % entry["minor"])
    if entry.get("state") is not None:
        fields.append("state=%s" % _hex(entry["state"]))
    if entry.get("params") and ":" in entry["params"]:
        fields.append("args=%s" % image_of(entry["params"]))
    return " ".join(fields)


def image_of(params):
    """"type:/path?k=v&..." -> "type:/path": what `list` shows and filters on."""
    return params.partition("?")[0]


def _hex(value):
    return "%#x" % value if value else "0"     # C's %#x prints 0 as "0"


# -- command line --------------------------------------------------------------------
def _int(opts, name, what, required=True, minimum=0):
    if name not in opts:
        if required:
            raise UsageError("missing %s %s" % (name, what))
        return None
    try:
        value = int(opts[name], 10)
    except ValueError:
        raise UsageError("%s %s must be a number, got %r" % (name, what, opts[name]))
    if value < minimum:
        raise UsageError("%s %s must be at least %d" % (name, what, minimum))
    return value


def _image_arg(value):
    """Check "type:path"; a relative path that exists here is made absolute (the
    tapdisk runs in /)."""
    kind, sep, rest = value.partition(":")
    if not sep or not kind:
        raise UsageError("-a needs type:/path, got %r" % value)
    path, q, query = rest.partition("?")
    if path and not path.startswith("/") and os.path.exists(path):
        return "%s:%s%s%s" % (kind, os.path.abspath(path), q, query)
    return value


def _open_args(opts):
    if not opts.get("-a"):
        raise UsageError("missing -a type:/path")
    opts["-a"] = _image_arg(opts["-a"])
    flags = 0
    for opt, flag in _FLAG_OPTS.items():
        if opt in opts:
            flags |= flag
    timeout = _int(opts, "-t", "request timeout", required=False) or 0
    if timeout > 0xffff:
        raise UsageError("-t request timeout must be at most 65535 seconds")
    return dict(params=opts["-a"], flags=flags,
                prt_minor=_int(opts, "-e", "parent minor", required=False),
                secondary=opts.get("-2"), timeout=timeout, logpath=opts.get("-C"),
                export_name=opts.get("-n"), tcp=opts.get("-L"))


def _timeout(opts):
    return _int(opts, "-t", "timeout", required=False, minimum=1)


def cmd_list(opts):
    pid = _int(opts, "-p", "pid", required=False, minimum=1)
    minor = _int(opts, "-m", "minor", required=False)
    tty = sys.stdout.isatty()
    if tty:
        print("%8s %4s %4s %10s %s" % ("pid", "minor", "state", "type", "file"))
    for entry in list_vbds(pid):
        kind, _, path = image_of(entry.get("params") or "").partition(":")
        if minor is not None and entry.get("minor") != minor:
            continue
        if "-t" in opts and kind != opts["-t"]:
            continue
        if "-f" in opts and path != opts["-f"]:
            continue
        if tty:
            state = entry.get("state")
            print("%8s %4s %4s %10s %s" % (
                entry.get("pid", "-"), entry.get("minor", "-"),
                "-" if state is None else _hex(state), kind or "-", path or "-"))
        else:
            print(format_entry(entry))


def cmd_allocate(opts):
    print(_link(opts.get("-d"), minors.allocate()))


def cmd_free(opts):
    minors.free(_int(opts, "-m", "minor"))


def cmd_create(opts):
    args = _open_args(opts)
    print(create(devname=opts.get("-d"), **args)[2])


def cmd_destroy(opts):
    destroy(_int(opts, "-p", "pid", minimum=1), _int(opts, "-m", "minor"), _timeout(opts))


def cmd_spawn(opts):
    pid = control.spawn()
    print("tapdisk spawned with pid %d" % pid if sys.stdout.isatty() else pid)


def _client(opts):
    return control.Client(_int(opts, "-p", "pid", minimum=1), io_timeout=_timeout(opts))


def cmd_attach(opts):
    _client(opts).attach(_int(opts, "-m", "minor"))


def cmd_detach(opts):
    _client(opts).detach(_int(opts, "-m", "minor"))


def cmd_open(opts):
    client = control.Client(_int(opts, "-p", "pid", minimum=1))
    minor = _int(opts, "-m", "minor")
    args = _open_args(opts)
    client.open(minor, args.pop("params"), **args)


def cmd_close(opts):
    _client(opts).close(_int(opts, "-m", "minor"), force="-f" in opts)


def cmd_pause(opts):
    _client(opts).pause(_int(opts, "-m", "minor"))


def cmd_unpause(opts):
    if "-a" in opts:
        opts["-a"] = _image_arg(opts["-a"])
    _client(opts).resume(_int(opts, "-m", "minor"), opts.get("-a"), opts.get("-2"),
                         opts.get("-c"))


def cmd_stats(opts):
    client = _client(opts)
    print(json.dumps(client.stats(_int(opts, "-m", "minor"))))


def _usage():
    return "usage: tap-ctl <%s> [options] (tap-ctl <command> -h for its options)" % (
        "|".join(sorted(COMMANDS)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        (sys.stdout if argv else sys.stderr).write(_usage() + "\n")
        return 0 if argv else errno.EINVAL
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write("tap-ctl: unknown command %r; %s\n" % (name, _usage()))
        return errno.EINVAL
    spec, usage = COMMANDS[name]
    try:
        if "-h" in args:
            print("usage: tap-ctl " + usage)
            return 0
        import getopt  # here: it imports gettext; the SR drivers use tapctl as a module
        try:
            pairs, rest = getopt.getopt(args, spec)
        except getopt.GetoptError as exc:
            raise UsageError(str(exc))
        if rest:
            raise UsageError("unexpected argument %r" % rest[0])
        globals()["cmd_" + name](dict(pairs))
    except UsageError as exc:
        sys.stderr.write("tap-ctl %s: %s; usage: tap-ctl %s\n" % (name, exc, usage))
        return errno.EINVAL
    except (OSError, ValueError) as exc:
        err = getattr(exc, "errno", None) or errno.EINVAL
        reason = getattr(exc, "strerror", None) or str(exc)
        sys.stderr.write("tap-ctl %s: %s\n" % (name, reason.replace("\n", " ")))
        return err if 0 < err < 256 else 1
    except KeyboardInterrupt:
        sys.stderr.write("tap-ctl %s: interrupted\n" % name)
        return errno.EINTR
    return 0


if __name__ == "__main__":
    sys.exit(main())
