"""XAPI's `sm-plugins` whitelist: the host's effective list, plus the suite's SR types.

xapi.conf holds `key = value` lines (`#` starts a comment). XAPI reads /etc/xapi.conf,
then the drop-ins of /etc/xapi.conf.d in name order, and a later assignment of a key
replaces the earlier one. `sm-plugins` is a single space-separated list (`*` = every
type), so a drop-in naming only the suite's types would unregister the stock ones: our
drop-in (/etc/xapi.conf.d/smtap.conf) carries the whole list, i.e. the list the host
had without it, plus the suite's types.

    smtap-sm-plugins           print the effective list (what XAPI registers)
    smtap-sm-plugins --write   rewrite our drop-in: host list (without ours) + our types
    smtap-sm-plugins --check   exit 1 if one of our types is not whitelisted

Our types are the SR executables in the sm dir that are smtap launchers. Every path
comes from smtap.settings (SMTAP_ROOT moves them).
"""
import os
import sys

from smtap import settings

KEY = "sm-plugins"
DROPIN = "smtap.conf"
# The stock list of an XCP-ng 8.3 / XenServer 8 xapi.conf; used when no file assigns
# the key (a real host always does).
STOCK = ("ext nfs iscsi lvmoiscsi dummy file hba rawhba udev iso lvm lvmohba "
         "lvmofcoe shm smb").split()
LAUNCHER_MARK = b"smtap launcher"
HEADER = """\
# smtap: XAPI's sm-plugins whitelist with the smtap SR types added.
# sm-plugins is one list and a later assignment replaces an earlier one (xapi.conf,
# then xapi.conf.d/*.conf in name order), so this line repeats the host's whole list
# and appends ours. Written by /opt/smtap/bin/smtap-sm-plugins --write (run by the
# package's %post); rerun it after changing sm-plugins elsewhere, then restart the
# toolstack (xe-toolstack-restart).
"""


def dropin_path():
    return os.path.join(settings.xapi_conf_d(), DROPIN)


def config_files(include_ours=True):
    """The files XAPI reads, in order."""
    files = [settings.xapi_conf()]
    try:
        names = sorted(os.listdir(settings.xapi_conf_d()))
    except OSError:
        names = []
    for name in names:
        if not name.endswith(".conf") or (name == DROPIN and not include_ours):
            continue
        files.append(os.path.join(settings.xapi_conf_d(), name))
    return [f for f in files if os.path.isfile(f)]


def read_key(path, key=KEY):
    """The last value assigned to key in one file, or None."""
    value = None
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "=" not in line:
                continue
            k, v = line.split("=", 1)
            if k.strip() == key:
                value = v.split()
    return value


def effective(include_ours=True):
    """The sm-plugins list XAPI ends up with; STOCK when nothing assigns it."""
    value = None
    for path in config_files(include_ours):
        v = read_key(path)
        if v is not None:
            value = v
    return list(STOCK) if value is None else value


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
        if t not in out:
            out.append(t)
    return out


def write(types=None):
    types = our_types() if types is None else types
    value = merged(effective(include_ours=False), types)
    path = dropin_path()
    if not os.path.isdir(os.path.dirname(path)):
        os.makedirs(os.path.dirname(path))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(HEADER + "%s = %s\n" % (KEY, " ".join(value)))
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
    return value


def missing(types=None):
    """Our types that XAPI would not register."""
    types = our_types() if types is None else types
    value = effective()
    if "*" in value:
        return []
    return [t for t in types if t not in value]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--write"]:
        print("%s: %s = %s" % (dropin_path(), KEY, " ".join(write())))
        return 0
    if argv == ["--check"]:
        lost = missing()
        if lost:
            sys.stderr.write(
                "smtap: SR type(s) %s not in XAPI's effective sm-plugins (files read: "
                "%s); run smtap-sm-plugins --write, and if a drop-in read after %s "
                "assigns sm-plugins, add them to its list\n"
                % (" ".join(lost), " ".join(config_files()), DROPIN))
            return 1
        return 0
    if argv:
        sys.stderr.write(__doc__)
        return 2
    print(" ".join(effective()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
