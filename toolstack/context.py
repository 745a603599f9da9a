"""What a message runs against: the toolstack's long-lived state and the caller."""
import threading

from smtap.toolstack import errors
from smtap.toolstack.errors import ApiError

# How long a call that needs the SM registry waits for start-up discovery.
DISCOVERY_WAIT = 120


class Toolstack(object):
    """The daemon's state: the store, this host's refs, the registered drivers, locks."""

    def __init__(self, store):
        self.store = store
        self.host = self.pool = self.dom0 = None
        self.drivers = {}                 # SR type -> discovery.Driver
        self.domains = {}                 # VM ref -> domains.Domain: its running qemu
        self.drivers_ready = threading.Event()
        self.ready = threading.Event()    # discovery and the start-up resync are done
        self._locks = {}
        self._locks_guard = threading.Lock()

    def lock(self, *key):
        """A lock per key: ("SR", ref) serialises attach/detach/probe, ("VDI", ref) plugs."""
        with self._locks_guard:
            return self._locks.setdefault(key, threading.RLock())

    def wait_for_drivers(self):
        self.drivers_ready.wait(DISCOVERY_WAIT)

    def wait_ready(self):
        self.ready.wait(DISCOVERY_WAIT)

    def driver(self, sr_type):
        self.wait_for_drivers()
        try:
            return self.drivers[sr_type]
        except KeyError:
            raise ApiError(errors.SR_UNKNOWN_DRIVER, sr_type)

    def sm_session(self, sr_ref):
        """The session handed to drivers for this SR (None: not tagged to an SR, for
        probe): one per SR, kept while the SR exists, so driver helpers may reuse it."""
        with self.store.transaction():
            if sr_ref:
                found = self.store.find("session", sm_sr=sr_ref)
                if found:
                    return found[0][0]
            return self.store.create("session", {
                "this_host": self.host, "this_user": "root", "is_local_superuser": True,
                "originator": "SM", "sm_sr": sr_ref or ""})

    def forget_sm_sessions(self, sr_ref):
        for ref, _ in self.store.find("session", sm_sr=sr_ref):
            self.store.destroy("session", ref)


class Context(object):
    """One message: the toolstack plus the calling session (None for login)."""

    def __init__(self, ts, session_ref=None, session=None):
        self.ts = ts
        self.store = ts.store
        self.session_ref = session_ref
        self.session = session or {}

    def require_sm_session(self, sr_ref):
        """Driver-only setters: refuse any session but the SR's own SM session."""
        if not sr_ref or self.session.get("sm_sr") != sr_ref:
            raise ApiError(errors.RBAC_PERMISSION_DENIED, "SM-only operation",
                           "only the storage driver of SR %s may call this" % sr_ref)
