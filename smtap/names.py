"""The names of the engine's runtime files, defined once for the engine, SM, tests and
bench. Under settings.runtime_dir():

    ctl<pid>                    a tapdisk's control socket
    nbd<pid>.<minor>            the NBD socket of a VBD (minor) of that tapdisk
    nbd/<sr_uuid>/<vdi_uuid>    SM's link to it, what XAPI is told (params_nbd)
    tapdisk/tapdisk-<minor>     an allocated minor's marker (the device tap-ctl prints)

Each name has its parser: the pid and minor stay recoverable from a link's target even
after its tapdisk died.
"""
import os

from smtap import settings

CTL = "ctl"
NBD = "nbd"
LINKS = "nbd"
MINORS = "tapdisk"
MARKER = "tapdisk-"


def _number(text):
    return int(text) if text.isdigit() else None


# -- control sockets ----------------------------------------------------------------------
def ctl_name(pid):
    return "%s%d" % (CTL, pid)


def ctl_path(pid):
    return os.path.join(settings.runtime_dir(), ctl_name(pid))


def pid_of_ctl(name):
    """ctl<pid> -> pid; None for any other name."""
    return _number(name[len(CTL):]) if name.startswith(CTL) else None


# -- NBD sockets -----------------------------------------------------------------------------
def nbd_prefix(pid):
    """What every NBD socket of that tapdisk starts with."""
    return "%s%d." % (NBD, pid)


def nbd_name(pid, minor):
    return "%s%d" % (nbd_prefix(pid), minor)


def nbd_path(pid, minor, runtime_dir=None):
    return os.path.join(runtime_dir or settings.runtime_dir(), nbd_name(pid, minor))


def parse_nbd(name):
    """nbd<pid>.<minor> (a name or a path) -> (pid, minor); None for anything else."""
    name = os.path.basename(name)
    if not name.startswith(NBD):
        return None
    pid, dot, minor = name[len(NBD):].partition(".")
    pid, minor = _number(pid), _number(minor)
    return (pid, minor) if dot and pid is not None and minor is not None else None


# -- SM's links ------------------------------------------------------------------------------
def link_dir(sr_uuid):
    return os.path.join(settings.runtime_dir(), LINKS, sr_uuid)


def link_path(sr_uuid, vdi_uuid):
    return os.path.join(link_dir(sr_uuid), vdi_uuid)


def params_nbd(sr_uuid, vdi_uuid):
    """The VDI's attach result for XAPI: its link, exported under the VDI's uuid."""
    return "nbd:unix:%s:exportname=%s" % (link_path(sr_uuid, vdi_uuid), vdi_uuid)


# -- minor markers -----------------------------------------------------------------------------
def minors_dir():
    return os.path.join(settings.runtime_dir(), MINORS)


def marker_path(minor):
    return os.path.join(minors_dir(), "%s%d" % (MARKER, minor))


def minor_of_marker(name):
    """tapdisk-<minor> -> minor; None for any other name."""
    return _number(name[len(MARKER):]) if name.startswith(MARKER) else None
