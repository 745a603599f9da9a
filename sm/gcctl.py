"""Starting, stopping and watching an SR's garbage collector (sm/gc.py) from outside
it: the driver kicks it after snapshot, clone, delete, attach and scan, and aborts it on
detach and delete; tests, the demo and `smtap-gc` watch it. All of it goes through files
under the SR's lock namespace (<lock_dir>/<sr_uuid>/): the gc_active lock (held by the one
GC process), gc.kick (a token each kick changes), gc.abort (present: stop), gc.status
(what it last said it was doing, JSON).
"""
import json
import os
import sys
import time

from smtap import settings
from smtap.sm import lock
from smtap.sm import log

LOCK_GC_ACTIVE = "gc_active"
SESSION_ENV = "SMTAP_SM_SESSION"       # the SR's SM session, from the driver that kicked
HOST_ENV = "SMTAP_HOST_REF"
ABORT_WAIT = 30                        # seconds abort() waits for the GC to stop
POLL = 0.05


class AbortTimeout(Exception):
    pass


STARTUP_WAIT = 2                       # seconds a new GC tries for gc_active (probes hold it
                                       # for an instant: kick, running())


def _path(sr_uuid, name):
    return os.path.join(settings.lock_dir(), sr_uuid, name)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


# -- the GC's side -----------------------------------------------------------------------------
def kick_token(sr_uuid):
    """Changes at each kick (None before the first)."""
    return _read(_path(sr_uuid, "gc.kick"))


def abort_requested(sr_uuid):
    return os.path.exists(_path(sr_uuid, "gc.abort"))


def write_status(sr_uuid, state):
    _write(_path(sr_uuid, "gc.status"), json.dumps(state, sort_keys=True))


def speeds(sr_uuid):
    """The copy speeds (bytes/s) of the SR's last coalesces, kept across GC processes
    (upstream's speed log): what a live leaf-coalesce is sized by."""
    try:
        return [float(v) for v in json.loads(_read(_path(sr_uuid, "gc.speed")) or "[]")]
    except (ValueError, TypeError):
        return []


def save_speeds(sr_uuid, values):
    _write(_path(sr_uuid, "gc.speed"), json.dumps(values))


# -- control from outside: kick, abort, status ----------------------------------------------
def kick(sr):
    """Make sure a GC runs on the SR soon: start one unless one runs (it then sees the
    kick and does another round before it exits)."""
    _write(_path(sr.uuid, "gc.kick"), os.urandom(8).hex())
    active = lock.Lock(LOCK_GC_ACTIVE, sr.uuid)
    if active.held():                   # this process is the GC
        return None
    if not active.acquire_noblock():
        log.info("GC of SR %s running: kicked", sr.uuid)
        return None
    active.release()
    import subprocess
    import smtap
    libdir = os.path.dirname(os.path.dirname(os.path.abspath(smtap.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (libdir, env.get("PYTHONPATH")) if p)
    env[SESSION_ENV] = sr.request.session_ref
    env[HOST_ENV] = sr.host_ref or ""
    proc = subprocess.Popen([sys.executable, "-m", "smtap.sm.gc", "-u", sr.uuid, "-g"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, close_fds=True, cwd="/",
                            start_new_session=True)
    log.info("GC of SR %s started: pid %d", sr.uuid, proc.pid)
    started = [pid for pid in _pids(sr.uuid) if not gone(pid)] + [proc.pid]
    _write(_path(sr.uuid, "gc.pids"), json.dumps(started))
    return proc.pid


def _pids(sr_uuid):
    """The GC processes kick() started for the SR (some may be gone)."""
    try:
        return [int(p) for p in json.loads(_read(_path(sr_uuid, "gc.pids")) or "[]")]
    except (ValueError, TypeError):
        return []


def abort(sr_uuid, timeout=ABORT_WAIT):
    """Stop the SR's GC; returns holding gc_active (no GC starts until this process
    releases it or exits). AbortTimeout if it did not stop in time."""
    active = lock.Lock(LOCK_GC_ACTIVE, sr_uuid)
    if active.acquire_noblock():
        stopped(sr_uuid)
        return False
    flag = _path(sr_uuid, "gc.abort")
    _write(flag, str(os.getpid()))
    log.info("aborting the GC of SR %s", sr_uuid)
    deadline = time.time() + timeout
    try:
        while not active.acquire_noblock():
            if time.time() > deadline:
                raise AbortTimeout("the garbage collector of SR %s did not stop within %ds"
                                   % (sr_uuid, timeout))
            time.sleep(POLL)
    finally:
        try:
            os.unlink(flag)
        except FileNotFoundError:
            pass
    stopped(sr_uuid)
    log.info("GC of SR %s aborted", sr_uuid)
    return True


def stopped(sr_uuid):
    """Holding gc_active: no GC runs and none will for these kicks (wait_idle is done)."""
    state = status(sr_uuid)
    if state.get("state") != "idle" or state.get("kick") != kick_token(sr_uuid):
        write_status(sr_uuid, {"state": "idle", "doing": "stopped", "pid": None,
                               "kick": kick_token(sr_uuid), "updated": time.time()})


def running(sr_uuid):
    """A GC process holds the SR (gc_active)."""
    active = lock.Lock(LOCK_GC_ACTIVE, sr_uuid)
    if active.held() or not active.acquire_noblock():
        return True
    active.release()
    return False


def take(lk, wait, sr_uuid=None):
    """acquire_noblock, retried for `wait` seconds (not once an abort of the SR's GC is
    asked)."""
    deadline = time.time() + wait
    while not lk.acquire_noblock():
        if time.time() > deadline or (sr_uuid and abort_requested(sr_uuid)):
            return False
        time.sleep(POLL)
    return True


def dealt_with(sr_uuid):
    """Every kick so far was followed by a round with nothing to do, or by a stop."""
    state = status(sr_uuid)
    return state.get("state") == "idle" and state.get("kick") == kick_token(sr_uuid)


def wait_idle(sr_uuid, timeout=120, watch=None):
    """Wait until the GC has dealt with the last kick and stopped; its last status.
    TimeoutError otherwise. watch(status) is called as it changes."""
    deadline = time.time() + timeout
    last = None
    while True:
        kicked = _read(_path(sr_uuid, "gc.kick"))
        state = status(sr_uuid)
        if watch is not None and (state.get("doing"), state.get("progress")) != last:
            last = state.get("doing"), state.get("progress")
            watch(state)
        if not kicked or (state.get("kick") == kicked and state.get("state") == "idle"
                          and not running(sr_uuid) and gone(state.get("pid"))
                          and all(gone(pid) for pid in _pids(sr_uuid))):
            return state
        if state.get("state") == "dead" and time.time() > deadline - timeout + 5:
            raise TimeoutError("the GC of SR %s died: %s" % (sr_uuid, state))
        if time.time() > deadline:
            raise TimeoutError("the GC of SR %s is not idle after %ds: %s"
                               % (sr_uuid, timeout, state))
        time.sleep(0.1)


def gone(pid):
    """The process has exited (a zombie counts as gone: it holds nothing)."""
    if not pid:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def status(sr_uuid):
    """What the SR's GC last said it was doing, as a dict ({} if it never ran)."""
    text = _read(_path(sr_uuid, "gc.status"))
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        state = {}
    if state and state.get("state") != "idle" and not running(sr_uuid):
        state["state"] = "dead"         # killed: it never said idle
    return state
