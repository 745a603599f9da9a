"""dom0's block device for an attached VDI: the host's job (XAPI/blkback), not the driver's.

After vdi_attach the VDI is served over NBD (params_nbd); when that socket exists and the
engine's blockdev helper is available, dom0 gets /dev/loopN for it. A driver whose
params_nbd names no live socket (DummySR) gets no device: the plug still succeeds.
"""
import importlib
import os
import re

from smtap import settings

_NBD = re.compile(r"^nbd:unix:(?P<path>.+):exportname=(?P<name>.*)$")


def parse_nbd(params_nbd):
    """(socket path, export name) of an "nbd:unix:<path>:exportname=<name>" URI."""
    m = _NBD.match(params_nbd or "")
    if not m:
        raise ValueError("not an nbd:unix URI: %r" % params_nbd)
    return m.group("path"), m.group("name")


def _blockdev():
    try:
        return importlib.import_module("smtap.tapdisk.blockdev")
    except ImportError:
        return None


def create(vdi_uuid, params_nbd, params="", writable=True):
    """Fields for the VDI's attach info: the device name (and the block device we own)."""
    path, name = parse_nbd(params_nbd)
    blockdev = _blockdev()
    if blockdev is None or not os.path.exists(path):
        return {"device": os.path.basename(params) if params else ""}
    mount_dir = os.path.join(settings.state_dir(), "dom0-devices", vdi_uuid)
    os.makedirs(mount_dir, exist_ok=True)
    # Connect through the link's target: the link's own path under a long SMTAP_ROOT
    # can pass the 107 bytes a unix socket path may have.
    dev = blockdev.attach(os.path.realpath(path), name, mount_dir, read_only=not writable)
    return {"device": os.path.basename(dev), "blockdev": dev}


def remove(info):
    """Tear down what create() made (before vdi_deactivate/vdi_detach)."""
    dev = info.get("blockdev")
    if dev:
        _blockdev().detach(dev)
