"""This host's side of pausing a VDI: what the smtap-tapdisk-pause and smtap-on-slave
plugins run on each host the pool-wide pause (poolpause) reaches. Each acts on the VDI's
live tapdisk here, under the VDI's lock, and answers False when it has none here."""
from smtap.sm import lock
from smtap.sm import testhooks
from smtap.sm import vdilink


def pause(sr_uuid, vdi_uuid):
    """Drain the VDI's I/O and close its images (ram writes back)."""
    with lock.Lock("vdi", vdi_uuid):
        testhooks.check("pause-fail", "pause of %s" % vdi_uuid)
        tap = vdilink.live(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        tap.pause()
        return True


def unpause(sr_uuid, vdi_uuid, params=None, secondary=None):
    """Reopen, optionally onto new params; a running tapdisk is left alone."""
    with lock.Lock("vdi", vdi_uuid):
        tap = vdilink.live(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        if tap.state:     # paused (0x2a)
            tap.unpause(params or None, secondary or None)
        return True


def refresh(sr_uuid, vdi_uuid, params=None):
    """Reopen the images (pause + unpause), e.g. after the image changed underneath."""
    with lock.Lock("vdi", vdi_uuid):
        tap = vdilink.live(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        tap.pause()
        tap.unpause(params or None)
        return True


def is_open(sr_uuid, vdi_uuid):
    return vdilink.live(sr_uuid, vdi_uuid) is not None
