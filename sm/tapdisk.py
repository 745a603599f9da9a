"""The tapdisk glue: how SR drivers serve VDIs through the engine.

A VDI active on this host is one tapdisk VBD (tap-ctl create), exported over NBD on
<runtime>/nbd<pid>.<minor>, and linked as <runtime>/nbd/<sr_uuid>/<vdi_uuid>: the link
is what XAPI is told (params_nbd), and its target keeps the pid and minor recoverable
even after the tapdisk died. A driver's VDI class subclasses TapdiskVDI and says only
which "type:path?opts" serves it (tapdisk_params).

Pausing (snapshots, refresh) happens on every host whose host_<ref> tag is in the VDI's
sm_config, through host.call_plugin of the smtap-tapdisk-pause plugin, which runs the
local_* functions below on that host.
"""
import errno
import os
import sys
import time
import types

from smtap import settings
from smtap.sm import errors
from smtap.sm import lock
from smtap.sm import log
from smtap.sm import testhooks
from smtap.sm import vdi
from smtap.tapdisk import control, drivers, minors, tapctl

# TYPES (every disk type of the engine) and VDI_PLUG_TYPE (how XAPI plugs each) are read
# from the registry, so a new disk type shows up here without an edit. Read on first use,
# not at import: the registry imports every disk driver (ctypes, mmap, ...), which most
# driver calls never need. A module subclass, as module __getattr__ needs Python 3.7.
_types = None


def _registry_types():
    global _types
    if _types is None:
        found = drivers.types()
        _types = (sorted(found), dict((name, cls.plug_type) for name, cls in found.items()))
    return _types


class _Module(types.ModuleType):
    TYPES = property(lambda self: _registry_types()[0])
    VDI_PLUG_TYPE = property(lambda self: _registry_types()[1])


sys.modules[__name__].__class__ = _Module

PAUSE_PLUGIN = "smtap-tapdisk-pause"
PAUSED_KEY = "paused"
PAUSE_WAIT = 60          # seconds activate waits for a paused VDI to be unpaused


class Tapdisk(object):
    """One tapdisk VBD: (pid, minor), with its state and params when known."""

    def __init__(self, pid, minor, state=None, params=None):
        self.pid, self.minor, self.state, self.params = pid, minor, state, params

    def __repr__(self):
        return "Tapdisk(pid=%d, minor=%d, params=%r)" % (self.pid, self.minor, self.params)

    @property
    def nbd_path(self):
        return os.path.join(settings.runtime_dir(), "nbd%d.%d" % (self.pid, self.minor))

    # -- finding ------------------------------------------------------------------------
    @classmethod
    def list(cls, pid=None, minor=None, params=None):
        """The live VBDs (tap-ctl list), filtered."""
        found = []
        for entry in tapctl.list_vbds(pid):
            if entry.get("pid") is None or entry.get("minor") is None:
                continue
            if minor is not None and entry["minor"] != minor:
                continue
            if params is not None and entry.get("params") != params:
                continue
            found.append(cls(entry["pid"], entry["minor"], entry.get("state"),
                             entry.get("params")))
        return found

    @classmethod
    def find(cls, pid=None, minor=None, params=None):
        found = cls.list(pid, minor, params)
        return found[0] if found else None

    @classmethod
    def from_link(cls, sr_uuid, vdi_uuid):
        """The VBD a VDI's link names (alive or not), or None without a link."""
        try:
            target = os.readlink(link_path(sr_uuid, vdi_uuid))
        except OSError:
            return None
        name = os.path.basename(target)
        pid, _, minor = name[len("nbd"):].partition(".")
        if not name.startswith("nbd") or not pid.isdigit() or not minor.isdigit():
            log.warning("link %s -> %s names no tapdisk", link_path(sr_uuid, vdi_uuid), target)
            return None
        return cls(int(pid), int(minor))

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def launch(cls, params, read_only=False, export_name=None):
        """tap-ctl create -a params [-R] [-n export_name]."""
        flags = control.FLAG_RDONLY if read_only else 0
        try:
            pid, minor, _ = tapctl.create(params, flags, export_name=export_name)
        except (OSError, ValueError) as e:
            raise errors.error("TapdiskFailed", "tap-ctl create -a %s: %s" % (params, e))
        log.info("tapdisk %d minor %d serves %s", pid, minor, params)
        return cls(pid, minor, 0, params)

    def alive(self):
        """The process answers and still has this minor; fills state and params."""
        try:
            vbds = control.Client(self.pid, io_timeout=10).list()
        except control.ControlError:
            return False
        for vbd in vbds:
            if vbd["minor"] == self.minor:
                self.state, self.params = vbd["state"], vbd["params"]
                return True
        return False

    def pause(self):
        control.Client(self.pid).pause(self.minor)

    def unpause(self, params=None, secondary=None):
        control.Client(self.pid).resume(self.minor, params, secondary)

    def destroy(self):
        """tap-ctl destroy (close, detach, free); a tapdisk found dead is reaped."""
        if self.alive():
            try:
                tapctl.destroy(self.pid, self.minor)
                return
            except OSError as e:
                if self.alive():
                    raise errors.error("TapdiskFailed", "tap-ctl destroy -p %d -m %d: %s"
                                       % (self.pid, self.minor, e))
                log.warning("tapdisk %d died during destroy (%s)", self.pid, e)
        self.reap()

    def reap(self):
        """What a dead tapdisk leaves: its minor (tap-ctl free) and its sockets."""
        log.info("reaping dead tapdisk %d minor %d", self.pid, self.minor)
        try:
            if control.Client(self.pid).get_pid(timeout=5) == self.pid:
                return       # the process lives (another VBD): its sockets are its own
        except control.ControlError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):   # hung, not dead
                raise errors.error("TapdiskFailed", "tapdisk %d does not answer: %s"
                                   % (self.pid, e))
            control.remove_sockets(self.pid)
        for _ in range(50):  # the kernel drops a killed process's locks as it exits
            try:
                minors.free(self.minor)
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                if e.errno != errno.EBUSY:
                    raise
            time.sleep(0.1)
        log.warning("minor %d still held: left allocated", self.minor)


# -- the runtime link -------------------------------------------------------------------
def link_path(sr_uuid, vdi_uuid):
    return os.path.join(settings.runtime_dir(), "nbd", sr_uuid, vdi_uuid)


def make_link(sr_uuid, vdi_uuid, tapdisk):
    path = link_path(sr_uuid, vdi_uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp%d" % (path, os.getpid())
    os.symlink(tapdisk.nbd_path, tmp)
    os.rename(tmp, path)


def remove_link(sr_uuid, vdi_uuid):
    try:
        os.unlink(link_path(sr_uuid, vdi_uuid))
    except FileNotFoundError:
        pass


def nbd_uri(sr_uuid, vdi_uuid):
    return "nbd:unix:%s:exportname=%s" % (link_path(sr_uuid, vdi_uuid), vdi_uuid)


def active_vdis(sr_uuid):
    """uuids of the SR's VDIs whose link names a live tapdisk on this host."""
    try:
        names = os.listdir(os.path.dirname(link_path(sr_uuid, "x")))
    except FileNotFoundError:
        return []
    active = []
    for name in names:
        tap = Tapdisk.from_link(sr_uuid, name)
        if tap is not None and tap.alive():
            active.append(name)
    return active


# -- this host's side of pause / unpause / refresh (run by the plugin) -------------------
def _local_tapdisk(sr_uuid, vdi_uuid):
    tap = Tapdisk.from_link(sr_uuid, vdi_uuid)
    return tap if tap is not None and tap.alive() else None


def local_pause(sr_uuid, vdi_uuid):
    """Pause the VDI's tapdisk here (its images closed: ram writes back). False if
    the VDI has no live tapdisk on this host."""
    with lock.Lock("vdi", vdi_uuid):
        testhooks.check("pause-fail", "pause of %s" % vdi_uuid)
        tap = _local_tapdisk(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        tap.pause()
        return True


def local_unpause(sr_uuid, vdi_uuid, params=None, secondary=None):
    """Unpause (optionally onto new params). False if nothing to unpause here."""
    with lock.Lock("vdi", vdi_uuid):
        tap = _local_tapdisk(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        if tap.state:     # paused (0x2a): resume; a running one is left alone
            tap.unpause(params or None, secondary or None)
        return True


def local_refresh(sr_uuid, vdi_uuid, params=None):
    """Reopen the images (pause + unpause), e.g. after the image changed underneath."""
    with lock.Lock("vdi", vdi_uuid):
        tap = _local_tapdisk(sr_uuid, vdi_uuid)
        if tap is None:
            return False
        tap.pause()
        tap.unpause(params or None)
        return True


def local_is_open(sr_uuid, vdi_uuid):
    return _local_tapdisk(sr_uuid, vdi_uuid) is not None


# -- every host holding the VDI ----------------------------------------------------------
def tagged_hosts(sm_config):
    return sorted(k[len("host_"):] for k in sm_config if k.startswith("host_"))


def call_pause_plugin(xenapi, host_ref, fn, sr_uuid, vdi_uuid, **extra):
    args = dict(extra, sr_uuid=sr_uuid, vdi_uuid=vdi_uuid)
    return xenapi.host.call_plugin(host_ref, PAUSE_PLUGIN, fn, args)


class Paused(object):
    """with Paused(vdi): the VDI's tapdisks are paused on every host that has it active
    (sm_config "paused" set meanwhile, so activate waits); unpaused on the way out, also
    on failure."""

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
                call_pause_plugin(xenapi, host, "pause", v.sr.uuid, v.uuid)
                self.done.append(host)
        except Exception as e:
            self._unpause()
            raise errors.error("VDIUnavailable", "cannot pause VDI %s on host %s: %s"
                               % (v.uuid, host, _failure_text(e)))
        return self

    def _unpause(self):
        v = self.vdi
        failed = []
        for host in self.done:
            try:
                call_pause_plugin(v.xenapi, host, "unpause", v.sr.uuid, v.uuid)
            except Exception as e:
                log.exception("unpause of %s on %s failed", v.uuid, host)
                failed.append("%s: %s" % (host, _failure_text(e)))
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
        call_pause_plugin(vdi_obj.xenapi, host, "refresh", vdi_obj.sr.uuid, vdi_obj.uuid)
    return hosts


_failure_text = errors.describe


# -- the VDI base class -------------------------------------------------------------------
class TapdiskVDI(vdi.VDI):
    """A VDI served by a tapdisk. Subclasses define tapdisk_params()."""

    O_DIRECT = True          # what dom0's consumer of the block device should use
    O_DIRECT_REASON = ""

    def tapdisk_params(self, writable):
        """"type:/path[?opts]" serving this VDI."""
        raise NotImplementedError

    @property
    def link(self):
        return link_path(self.sr.uuid, self.uuid)

    def tapdisk(self):
        """This VDI's live tapdisk on this host, or None."""
        return _local_tapdisk(self.sr.uuid, self.uuid)

    def is_active(self):
        """Active here (a live tapdisk) or on another host (a host_ tag)."""
        if self.tapdisk() is not None:
            return True
        if self.sr.request.session_ref:
            return bool(tagged_hosts(self.xenapi.VDI.get_sm_config(self.ref)))
        return False

    def attach(self, writable):
        os.makedirs(os.path.dirname(self.link), exist_ok=True)
        kind = self.tapdisk_params(writable).partition(":")[0]
        xenstore_data = dict(self.xenstore_data)
        xenstore_data["storage-type"] = kind
        return {"params_nbd": nbd_uri(self.sr.uuid, self.uuid), "params": self.link,
                "o_direct": self.O_DIRECT, "o_direct_reason": self.O_DIRECT_REASON,
                "xenstore_data": xenstore_data}

    def activate(self, writable):
        self._wait_unpaused()
        tap = Tapdisk.from_link(self.sr.uuid, self.uuid)
        if tap is not None and tap.alive():
            log.info("VDI %s already active in %r", self.uuid, tap)
        else:
            if tap is not None:
                tap.reap()
                remove_link(self.sr.uuid, self.uuid)
            tap = Tapdisk.launch(self.tapdisk_params(writable), read_only=not writable,
                                 export_name=self.uuid)
            try:
                make_link(self.sr.uuid, self.uuid, tap)
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
        tap = Tapdisk.from_link(self.sr.uuid, self.uuid)
        if tap is None:    # no link: still stop a tapdisk serving us (e.g. link removed)
            try:
                candidates = set(self.tapdisk_params(w) for w in (True, False))
            except errors.SROSError:       # no image left: nothing can serve it
                candidates = set()
            for params in candidates:
                tap = tap or Tapdisk.find(params=params)
        if tap is not None:
            self._teardown(tap)
        remove_link(self.sr.uuid, self.uuid)
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
        remove_link(self.sr.uuid, self.uuid)

    def _wait_unpaused(self):
        """Activation waits while a snapshot has the VDI paused."""
        if not self.sr.request.session_ref:
            return
        deadline = time.time() + PAUSE_WAIT
        while PAUSED_KEY in self.xenapi.VDI.get_sm_config(self.ref):
            if time.time() > deadline:
                errors.raise_error("VDIUnavailable", "VDI %s stayed paused for %ds"
                                   % (self.uuid, PAUSE_WAIT))
            time.sleep(0.5)
