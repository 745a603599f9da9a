"""Pausing a VDI on every host that has it active: those whose host_<ref> tag is in the
VDI's sm_config, each through host.call_plugin of the smtap-tapdisk-pause plugin (which
runs hostpause there). While paused, the VDI's sm_config has "paused" set, and activate
waits (wait_unpaused)."""
import time

from smtap.sm import errors
from smtap.sm import log

PAUSE_PLUGIN = "smtap-tapdisk-pause"
PAUSED_KEY = "paused"
PAUSE_WAIT = 60          # seconds activate waits for a paused VDI to be unpaused


def tagged_hosts(sm_config):
    return sorted(k[len("host_"):] for k in sm_config if k.startswith("host_"))


def call_pause_plugin(xenapi, host_ref, fn, sr_uuid, vdi_uuid, **extra):
    args = dict(extra, sr_uuid=sr_uuid, vdi_uuid=vdi_uuid)
    return xenapi.host.call_plugin(host_ref, PAUSE_PLUGIN, fn, args)


def _on_host(vdi_obj, host_ref, fn, **extra):
    """fn of the pause plugin on one host; on this host, in process (the plugin's own
    code, without its process: a snapshot's pause costs milliseconds, not two
    interpreter start-ups)."""
    if host_ref and host_ref == getattr(vdi_obj.sr, "host_ref", None):
        from smtap.sm import hostpause
        return str(getattr(hostpause, fn)(vdi_obj.sr.uuid, vdi_obj.uuid, **extra))
    return call_pause_plugin(vdi_obj.xenapi, host_ref, fn, vdi_obj.sr.uuid, vdi_obj.uuid,
                             **extra)


class Paused(object):
    """with Paused(vdi): the VDI's tapdisks are paused on every host that has it active;
    unpaused on the way out, also on failure."""

    def __init__(self, vdi_obj):
        self.vdi = vdi_obj
        self.done = []

    def __enter__(self):
        v = self.vdi
        xenapi = v.xenapi
        hosts = tagged_hosts(xenapi.VDI.get_sm_config(v.ref))
        if not hosts:
            return self
        xenapi.VDI.remove_from_sm_config(v.ref, PAUSED_KEY)
        xenapi.VDI.add_to_sm_config(v.ref, PAUSED_KEY, "true")
        try:
            for host in hosts:
                _on_host(v, host, "pause")
                self.done.append(host)
        except Exception as e:
            self._unpause()
            raise errors.error("VDIUnavailable", "cannot pause VDI %s on host %s: %s"
                               % (v.uuid, host, errors.describe(e)))
        return self

    def _unpause(self):
        v = self.vdi
        failed = []
        for host in self.done:
            try:
                _on_host(v, host, "unpause")
            except Exception as e:
                log.exception("unpause of %s on %s failed", v.uuid, host)
                failed.append("%s: %s" % (host, errors.describe(e)))
        self.done = []
        v.xenapi.VDI.remove_from_sm_config(v.ref, PAUSED_KEY)
        return failed

    def __exit__(self, kind, value, tb):
        failed = self._unpause()
        if failed and kind is None:
            errors.raise_error("VDIUnavailable", "unpause of VDI %s failed on %s"
                               % (self.vdi.uuid, "; ".join(failed)))


def refresh(vdi_obj):
    """Reopen the VDI's images on every host that has it active; the hosts refreshed."""
    hosts = tagged_hosts(vdi_obj.xenapi.VDI.get_sm_config(vdi_obj.ref))
    for host in hosts:
        _on_host(vdi_obj, host, "refresh")
    return hosts


def unpause_all(vdi_obj):
    """After a crash of whatever paused the VDI: unpause it on every host that has it
    active and drop the "paused" mark (a running tapdisk is left alone)."""
    xenapi = vdi_obj.xenapi
    sm_config = xenapi.VDI.get_sm_config(vdi_obj.ref)
    for host in tagged_hosts(sm_config):
        _on_host(vdi_obj, host, "unpause")
    if PAUSED_KEY in sm_config:
        xenapi.VDI.remove_from_sm_config(vdi_obj.ref, PAUSED_KEY)


def wait_unpaused(vdi_obj):
    """Block while a pause (a snapshot, on any host) holds the VDI; VDIUnavailable after
    PAUSE_WAIT seconds."""
    deadline = time.time() + PAUSE_WAIT
    while PAUSED_KEY in vdi_obj.xenapi.VDI.get_sm_config(vdi_obj.ref):
        if time.time() > deadline:
            errors.raise_error("VDIUnavailable", "VDI %s stayed paused for %ds"
                               % (vdi_obj.uuid, PAUSE_WAIT))
        time.sleep(0.5)
