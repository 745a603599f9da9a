"""XAPI's `sm-plugins` whitelist: the host's effective list, plus the suite's SR types.

Read exactly as XAPI reads its configuration (xen-api: Xcp_service.read_config_file and
Config_file.parse_line; Xapi_globs' "sm-plugins" option):
- /etc/xapi.conf if it exists, then EVERY entry of /etc/xapi.conf.d (any name, dotfiles
  included), sorted byte-wise; an entry XAPI cannot read makes its start fail;
- per line: drop everything from the first `#`, trailing blanks; `key = value` where the
  key is the last run of non-blank, non-`=` characters before the first `=` it can take;
  a value wrapped in matching quotes ("..." or '...') loses them;
- a later assignment replaces the earlier one; the value is split on whitespace, `*`
  allows every type, names match case-insensitively; no assignment at all: no type.

So a drop-in naming only the suite's types would unregister the stock ones: ours
(/etc/xapi.conf.d/smtap.conf) carries the whole list, i.e. the list the host has without
it, plus the suite's types. It is written only from that list: when it cannot be computed
(no xapi.conf, no assignment, an unreadable entry) nothing is written. No temporary file
is ever made in xapi.conf.d (XAPI would read it): the new content is written in /etc,
then renamed into place.

    smtap-sm-plugins           print the effective list (what XAPI registers)
    smtap-sm-plugins --write   rewrite our drop-in: host list (without ours) + our types
    smtap-sm-plugins --check   exit 1 if one of our types is not whitelisted

Our types are the SR executables in the sm dir that are smtap launchers. Every path
comes from smtap.settings (SMTAP_ROOT moves them).
"""
import fcntl
import os
import re
import sys

from smtap import settings

KEY = "sm-plugins"
DROPIN = "smtap.conf"
# What XCP-ng 8.3's xapi.conf assigns (xcp-ng-rpms/xapi: "configure xapi.conf to meet our
# needs"). Never a fallback for --write: only the development profile's simulated host
# (`make install`) and the tests use it.
STOCK = ("ext nfs iscsi lvmoiscsi dummy file hba rawhba udev iso lvm lvmohba lvmofcoe "
         "shm smb cephfs glusterfs xfs zfs largeblock").split()
LAUNCHER_MARK = b"smtap launcher"
HEADER = """\
# smtap: XAPI's sm-plugins whitelist with the smtap SR types added.
# sm-plugins is one list and a later assignment replaces an earlier one (xapi.conf,
# then every file of xapi.conf.d in byte order), so this line repeats the host's whole
# list and appends ours. Written by /opt/smtap/bin/smtap-sm-plugins --write (the
# package runs it when it or xapi-core is installed or updated); rerun it after changing
# sm-plugins elsewhere, then restart the toolstack (xe-toolstack-restart).
"""
# Config_file.get_kv's regular expression, searched (not anchored) in each line.
_KV = re.compile(rb"([^= \t]+)[ \t]*=[ \t]*(.*)")
_TRAILING = re.compile(rb"[ \t]+$")
_SPACE = re.compile(rb"[ \t\r\n]+")        # xapi-stdext's String.isspace


class ConfigError(Exception):
    """The list cannot be computed as XAPI would."""


def dropin_path():
    return os.path.join(settings.xapi_conf_d(), DROPIN)


def config_files(include_ours=True):
    """The files XAPI reads, in order."""
    files = [settings.xapi_conf()] if os.path.exists(settings.xapi_conf()) else []
    confd = os.fsencode(settings.xapi_conf_d())
    try:
        names = sorted(os.listdir(confd))
    except OSError:
        names = []
    for name in names:
        if include_ours or name != os.fsencode(DROPIN):
            files.append(os.fsdecode(os.path.join(confd, name)))
    return files


def parse_line(line):
    """(key, value) of one line (bytes, no newline) as Xcp_service reads it, or None."""
    line = _TRAILING.sub(b"", line.split(b"#", 1)[0])
    m = _KV.search(line)
    if m is None:
        return None
    key, value = m.group(1), m.group(2)
    if len(value) >= 2 and value[:1] == value[-1:] and value[:1] in (b'"', b"'"):
        value = value[1:-1]
    return key, value


def read_key(path, key=KEY):
    """The last value assigned to key in one file (split on whitespace), or None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror))
    value = None
    for line in data.split(b"\n"):
        kv = parse_line(line)
        if kv is not None and kv[0] == key.encode():
            value = [os.fsdecode(t) for t in _SPACE.split(kv[1]) if t]
    return value


def assigned(include_ours=True):
    """The list the last file assigning sm-plugins gives, or None if none does."""
    value = None
    for path in config_files(include_ours):
        v = read_key(path)
        if v is not None:
            value = v
    return value


def effective(include_ours=True):
    """The sm-plugins list XAPI ends up with ([] when nothing assigns it: no type)."""
    return assigned(include_ours) or []


def host_list():
    """The host's list without our drop-in; ConfigError when it cannot be computed."""
    if not os.path.isfile(settings.xapi_conf()):
        raise ConfigError("%s not found (xapi-core's configuration)" % settings.xapi_conf())
    value = assigned(include_ours=False)
    if value is None:
        raise ConfigError("no file assigns %s (%s)" % (KEY, " ".join(config_files(False))))
    return value


def our_types():
    """The SR types this suite installed: smtap launchers named <Type>SR."""
    types = []
    try:
        names = sorted(os.listdir(settings.sm_dir()))
    except OSError:
        return types
    for name in names:
        path = os.path.join(settings.sm_dir(), name)
        if not name.endswith("SR") or len(name) <= 2 or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            if LAUNCHER_MARK in f.read(512):
                types.append(name[:-2].lower())
    return types


def merged(base, types):
    out = []
    for t in list(base) + list(types):
        if t.lower() not in [o.lower() for o in out]:
            out.append(t)
    return out


def write(types=None):
    """Rewrite our drop-in (when its content changes); the list written."""
    types = our_types() if types is None else types
    confd = settings.xapi_conf_d()
    if not os.path.isdir(confd):
        os.makedirs(confd)
    # One writer at a time (a %post and a trigger may race): lock the directory itself,
    # which creates no file in it.
    dfd = os.open(confd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        value = merged(host_list(), types)
        text = (HEADER + "%s = %s\n" % (KEY, " ".join(value))).encode()
        path = dropin_path()
        try:
            with open(path, "rb") as f:
                if f.read() == text:
                    return value
        except OSError:
            pass
        _replace(path, text, os.path.dirname(confd))
        os.fsync(dfd)
        return value
    finally:
        os.close(dfd)


def _replace(path, text, tmpdir):
    """Atomically replace path with text, through a temporary file in tmpdir (the same
    file system, a directory XAPI does not read). A leftover of a killed run has the
    same fixed name and is overwritten by the next one."""
    tmp = os.path.join(tmpdir, "." + DROPIN + ".smtap-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text)
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise


def missing(types=None):
    """Our types that XAPI would not register."""
    types = our_types() if types is None else types
    value = [v.lower() for v in effective()]
    if "*" in value:
        return []
    return [t for t in types if t.lower() not in value]


def _fail(message):
    sys.stderr.write("smtap-sm-plugins: %s\n" % message)
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv == ["--write"]:
            try:
                value = write()
            except ConfigError as e:
                return _fail("%s: the host's sm-plugins cannot be computed, %s not written"
                             % (e, dropin_path()))
            except OSError as e:
                return _fail("%s not written: %s" % (dropin_path(), e))
            print("%s: %s = %s" % (dropin_path(), KEY, " ".join(value)))
            return 0
        if argv == ["--check"]:
            lost = missing()
            if lost:
                return _fail(
                    "SR type(s) %s not in XAPI's effective sm-plugins (files read: %s); run "
                    "smtap-sm-plugins --write, and if a file read after %s assigns "
                    "sm-plugins, add them to its list"
                    % (" ".join(lost), " ".join(config_files()), DROPIN))
            return 0
        if argv:
            sys.stderr.write(__doc__)
            return 2
        print(" ".join(effective()))
        return 0
    except ConfigError as e:
        return _fail(str(e))


def simulate_stock_host():
    """Development profile only (`make install`): give a root without xapi-core the
    xapi.conf of a stock XCP-ng 8.3 host, as the toolstack and --write expect one."""
    path = settings.xapi_conf()
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("# A stock XCP-ng 8.3 xapi.conf's whitelist (smtap development profile).\n"
                    "sm-plugins=%s\n" % " ".join(STOCK))


if __name__ == "__main__":
    sys.exit(main())
