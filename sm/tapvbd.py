"""One tapdisk VBD on this host, (pid, minor), as SM drives it: launched, found by what
it serves, paused, destroyed, or reaped once dead. Through the engine's tap-ctl
operations (smtap.tapdisk.tapctl, in process) and the tapdisk's control socket."""
import errno

from smtap import names
from smtap.sm import errors
from smtap.sm import log
from smtap.tapdisk import control, minors, tapctl


class Tapdisk(object):
    """One tapdisk VBD: (pid, minor), with its state and params ("type:/path?opts")
    when known."""

    def __init__(self, pid, minor, state=None, params=None):
        self.pid, self.minor, self.state, self.params = pid, minor, state, params

    def __repr__(self):
        return "Tapdisk(pid=%d, minor=%d, params=%r)" % (self.pid, self.minor, self.params)

    @property
    def nbd_path(self):
        return names.nbd_path(self.pid, self.minor)

    @classmethod
    def serving(cls, params):
        """The live VBD serving exactly these params (options included), or None."""
        for entry in tapctl.list_vbds():
            if entry.get("minor") is not None and entry.get("params") == params:
                return cls(entry["pid"], entry["minor"], entry.get("state"), params)
        return None

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
        if not minors.free_released(self.minor):
            log.warning("minor %d still held: left allocated", self.minor)
