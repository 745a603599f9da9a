"""The base class of VDIs served by a tapdisk on this host (FileSR, ramSR).

A VDI active here is one tapdisk VBD (tapvbd) exported over NBD and linked as
<runtime>/nbd/<sr_uuid>/<vdi_uuid> (vdilink); attach hands XAPI that link. A driver's
VDI class says only which "type:/path?opts" serves it (tapdisk_params).
"""
import os

from smtap.sm import errors
from smtap.sm import log
from smtap.sm import poolpause
from smtap.sm import testhooks
from smtap.sm import vdi
from smtap.sm import vdilink
from smtap.sm.tapvbd import Tapdisk


class TapdiskVDI(vdi.VDI):
    """A VDI served by a tapdisk. Subclasses define tapdisk_params()."""

    O_DIRECT = True          # what dom0's consumer of the block device should use
    O_DIRECT_REASON = ""

    def tapdisk_params(self, writable):
        """"type:/path[?opts]" serving this VDI."""
        raise NotImplementedError

    @property
    def link(self):
        return vdilink.path(self.sr.uuid, self.uuid)

    def tapdisk(self):
        """This VDI's live tapdisk on this host, or None."""
        return vdilink.live(self.sr.uuid, self.uuid)

    def is_active(self):
        """Active here (a live tapdisk) or on another host (a host_ tag)."""
        if self.tapdisk() is not None:
            return True
        if self.sr.request.session_ref:
            return bool(poolpause.tagged_hosts(self.xenapi.VDI.get_sm_config(self.ref)))
        return False

    def attach(self, writable):
        os.makedirs(os.path.dirname(self.link), exist_ok=True)
        kind = self.tapdisk_params(writable).partition(":")[0]
        xenstore_data = dict(self.xenstore_data)
        xenstore_data["storage-type"] = kind
        return {"params_nbd": vdilink.params_nbd(self.sr.uuid, self.uuid),
                "params": self.link, "o_direct": self.O_DIRECT,
                "o_direct_reason": self.O_DIRECT_REASON, "xenstore_data": xenstore_data}

    def activate(self, writable):
        if self.sr.request.session_ref:
            poolpause.wait_unpaused(self)
        tap = self.tapdisk()
        if tap is not None:
            log.info("VDI %s already active in %r", self.uuid, tap)
        else:
            stale = vdilink.recorded(self.sr.uuid, self.uuid)
            if stale is not None:
                stale.reap()
                vdilink.remove(self.sr.uuid, self.uuid)
            tap = Tapdisk.launch(self.tapdisk_params(writable), read_only=not writable,
                                 export_name=self.uuid)
            try:
                vdilink.make(self.sr.uuid, self.uuid, tap)
                testhooks.check("activate-fail", "activate of %s" % self.uuid)
            except BaseException:
                self._teardown(tap)
                raise
        try:
            self.db_set_host_mode(writable)
        except BaseException:
            self._teardown(tap)
            raise

    def deactivate(self):
        tap = vdilink.recorded(self.sr.uuid, self.uuid)    # destroy() reaps a dead one
        if tap is None:    # no link: still stop a tapdisk serving the VDI's image
            try:
                candidates = sorted(set(self.tapdisk_params(w) for w in (True, False)))
            except errors.SROSError:       # no image left: nothing can serve it
                candidates = []
            tap = vdilink.live(self.sr.uuid, self.uuid, candidates)
        if tap is not None:
            self._teardown(tap)
        vdilink.remove(self.sr.uuid, self.uuid)
        self.db_clear_host_mode()

    def detach(self):
        if os.path.lexists(self.link):   # deactivate did not run or failed: undo it too
            log.warning("detach of %s with its tapdisk link still there", self.uuid)
            self.deactivate()
        try:
            os.rmdir(os.path.dirname(self.link))
        except OSError:
            pass      # other VDIs of the SR are attached, or it never existed

    def _teardown(self, tap):
        tap.destroy()
        vdilink.remove(self.sr.uuid, self.uuid)
