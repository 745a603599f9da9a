"""VDI.copy's data path: both VDIs attached on this host (vdi_attach + vdi_activate, no
dom0 device) for the length of an nbdcopy from one NBD export to the other, as XAPI
copies between two dom0 attachments (Sm_fs_ops.copy_vdi).

A VDI that is already attached here (a VBD uses it) is read through that attachment;
any other is attached for the copy only, under the same journal as a VBD plug, so a
copy cut short by a crash is undone by the next plug or the start-up resync.
"""
import contextlib
import logging
import os
import subprocess
import urllib.parse

from smtap.toolstack import dom0_device, errors
from smtap.toolstack.classes import vbd as vbd_module
from smtap.toolstack.errors import ApiError

log = logging.getLogger("smtap.xapi.copy")


def copy_data(ctx, src, dst):
    # one lock order whatever the direction: two copies cannot wait on each other
    first, second = sorted([src, dst])
    with ctx.ts.lock("VDI", first), ctx.ts.lock("VDI", second):
        with attached(ctx, src, writable=False) as src_nbd, \
                attached(ctx, dst, writable=True) as dst_nbd:
            run = subprocess.run(["nbdcopy", "--flush", src_nbd, dst_nbd],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
            if run.returncode != 0:
                log.warning("nbdcopy %s -> %s: %s", src_nbd, dst_nbd, run.stderr.strip())
                raise ApiError(errors.VDI_COPY_FAILED)


@contextlib.contextmanager
def attached(ctx, vdi, writable):
    """The VDI's NBD URI while it is attached on this host."""
    rec = ctx.store.get("VDI", vdi)
    sr = rec["SR"]
    users = vbd_module._users(ctx, vdi, None)
    if users:
        if writable:
            raise ApiError(errors.VDI_IN_USE, vdi, "copy")
        yield uri(vdi, rec["attach"].get("params_nbd", ""))
        return
    vbd_module.undo_stale(ctx, sr, vdi)
    info = vbd_module.attach(ctx, sr, vdi, writable, device=False)
    try:
        yield uri(vdi, info["params_nbd"])
    finally:
        vbd_module.undo(ctx, sr, vdi, force=True)


def uri(vdi, params_nbd):
    """nbd+unix URI of a params_nbd whose socket is live; VDI_COPY_FAILED otherwise
    (a driver with no NBD export, like DummySR, has no data to copy)."""
    try:
        path, name = dom0_device.parse_nbd(params_nbd)
    except ValueError:
        path = name = None
    if not path or not os.path.exists(path):
        log.warning("VDI %s has no NBD export to copy (%r)", vdi, params_nbd)
        raise ApiError(errors.VDI_COPY_FAILED)
    # the link's target: a long SMTAP_ROOT can make the link's own path too long
    return "nbd+unix:///%s?socket=%s" % (urllib.parse.quote(name, safe=""),
                                         urllib.parse.quote(os.path.realpath(path), safe="/"))
