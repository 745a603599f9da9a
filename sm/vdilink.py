"""A VDI's runtime link, <runtime>/nbd/<sr_uuid>/<vdi_uuid> -> nbd<pid>.<minor>
(smtap.names). It is what XAPI is told (params_nbd), and this host's record of the
tapdisk serving the VDI: its target keeps the pid and minor even after that tapdisk
died, so what it left can be reaped.
"""
import os

from smtap import names
from smtap.sm import log
from smtap.sm.tapvbd import Tapdisk

path = names.link_path
params_nbd = names.params_nbd


def make(sr_uuid, vdi_uuid, tapdisk):
    link = path(sr_uuid, vdi_uuid)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = "%s.tmp%d" % (link, os.getpid())
    os.symlink(tapdisk.nbd_path, tmp)
    os.rename(tmp, link)


def remove(sr_uuid, vdi_uuid):
    try:
        os.unlink(path(sr_uuid, vdi_uuid))
    except FileNotFoundError:
        pass


def recorded(sr_uuid, vdi_uuid):
    """The tapdisk the link names, alive or not; None without a link."""
    link = path(sr_uuid, vdi_uuid)
    try:
        target = os.readlink(link)
    except OSError:
        return None
    parsed = names.parse_nbd(target)
    if parsed is None:
        log.warning("link %s -> %s names no tapdisk", link, target)
        return None
    return Tapdisk(*parsed)


def live(sr_uuid, vdi_uuid, params=()):
    """The VDI's live tapdisk on this host, or None: the one its link names if alive,
    else (the link lost) one serving any of `params`."""
    tap = recorded(sr_uuid, vdi_uuid)
    if tap is not None and tap.alive():
        return tap
    for each in params:
        tap = Tapdisk.serving(each)
        if tap is not None:
            return tap
    return None


def active_vdis(sr_uuid):
    """uuids of the SR's VDIs with a live tapdisk on this host."""
    try:
        entries = os.listdir(names.link_dir(sr_uuid))
    except FileNotFoundError:
        return []
    return [vdi_uuid for vdi_uuid in entries if live(sr_uuid, vdi_uuid) is not None]
