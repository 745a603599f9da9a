"""dom0's block device for an attached VDI: the host's job (XAPI/blkback), not the driver's.

After vdi_attach the VDI is served over NBD (params_nbd); when that socket exists and the
engine's blockdev helper is available, dom0 gets /dev/loopN for it. A driver whose
params_nbd names no live socket (DummySR) gets no device: the plug still succeeds.

The device of a VDI lives in <state>/dom0-devices/<vdi uuid>; everything about it is
found there again when needed (never by a remembered /dev/loopN, which may be another
VBD's by then), so create and remove can both be rerun after a crash at any point.
"""
import importlib
import os
import re

from smtap import settings
from smtap.toolstack import faults

_NBD = re.compile(r"^nbd:unix:(?P<path>.+):exportname=(?P<name>.*)$")


class Busy(Exception):
    """The device is in use (mounted, held open); nothing was changed."""


def parse_nbd(params_nbd):
    """(socket path, export name) of an "nbd:unix:<path>:exportname=<name>" URI."""
    m = _NBD.match(params_nbd or "")
    if not m:
        raise ValueError("not an nbd:unix URI: %s" % params_nbd)
    return m.group("path"), m.group("name")


def _blockdev():
    try:
        return importlib.import_module("smtap.tapdisk.blockdev")
    except ImportError:
        return None


def mount_dir(vdi_uuid):
    return os.path.join(settings.state_dir(), "dom0-devices", vdi_uuid)


def create(vdi_uuid, params_nbd, params="", writable=True):
    """Fields for the VDI's attach info: the device name (and whether we made one).
    An empty params_nbd (upstream blktap2's answer when it starts no tapdisk) is no NBD
    export: as XAPI, the block device in `params`, if any, is the VDI's device."""
    if not params_nbd:
        return {"device": os.path.basename(params) if params else ""}
    path, name = parse_nbd(params_nbd)
    blockdev = _blockdev()
    if blockdev is None or not os.path.exists(path):
        return {"device": os.path.basename(params) if params else ""}
    where = mount_dir(vdi_uuid)
    os.makedirs(os.path.dirname(where), exist_ok=True)
    # Connect through the link's target: the link's own path under a long SMTAP_ROOT
    # can pass the 107 bytes a unix socket path may have.
    try:
        blockdev.mount(os.path.realpath(path), name, where, read_only=not writable)
        faults.point("plug-mounted")
        dev = blockdev.add_loop(where, read_only=not writable)
    except blockdev.Busy as e:
        raise Busy(str(e))
    return {"device": os.path.basename(dev), "blockdev": dev}


def current(vdi_uuid):
    """The loop devices on the VDI's nbdfuse file now ([] without one)."""
    blockdev = _blockdev()
    return blockdev.loops(mount_dir(vdi_uuid)) if blockdev else []


def healthy(vdi_uuid):
    """One loop device on a live nbdfuse mount."""
    blockdev = _blockdev()
    where = mount_dir(vdi_uuid)
    return bool(blockdev) and len(blockdev.loops(where)) == 1 and blockdev.mounted(where) \
        and bool(blockdev.nbdfuse_pids(where))


def users(vdi_uuid):
    blockdev = _blockdev()
    return blockdev.users(mount_dir(vdi_uuid)) if blockdev else []


def remove(vdi_uuid, force=False):
    """Tear down the VDI's device, whatever is left of it; Busy (and nothing changed)
    while it is in use, unless forced."""
    blockdev = _blockdev()
    if blockdev is None:
        return
    try:
        blockdev.detach(mount_dir(vdi_uuid), force=force)
    except blockdev.Busy as e:
        raise Busy(str(e))
