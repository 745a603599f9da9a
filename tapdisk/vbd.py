"""A VBD: one virtual disk of a tapdisk process, its image chain and its NBD server.

States are upstream's bit flags: 0 running, CLOSED before open and after close,
CLOSED|QUIESCED|PAUSED (0x2a) while paused. The daemon's control thread calls
open/close/pause/resume/stats/info. NBD client threads pass the gate: a client is busy
from the request that woke it until it waits for its socket again with nothing in
flight (quiet); a pause or close raises `held` and waits until every client is quiet
or parked (a busy client seeing `held` stops taking requests, finishes those in flight
and parks until resume). That costs a client two attribute writes and a read per loop
turn, no lock. A client's loop may run in C without the GIL (smtap_nbd.c): it reads
the gate from `gate` (native.Gate, raised with `held`, a barrier after the store) and
writes busy and inflight into the Client record, memory both sides share; its comment
says why the ordering argument below holds for it too.

    python -m smtap.tapdisk.vbd [-R] [-D] [-m minor] [-e export] [--tcp host:port] type:/path

serves one VBD in the foreground (prints the socket path; SIGTERM or SIGINT closes it).
"""
import argparse
import errno
import os
import signal
import sys
import threading
import time

from smtap import names, settings
from smtap.tapdisk import driver as drv
from smtap.tapdisk import image
from smtap.tapdisk import ioqueue
from smtap.tapdisk import native
from smtap.tapdisk import nbd

STATE_DEAD = 0x1
STATE_CLOSED = 0x2
STATE_QUIESCE_REQUESTED = 0x4
STATE_QUIESCED = 0x8
STATE_PAUSE_REQUESTED = 0x10
STATE_PAUSED = 0x20
STATE_SHUTDOWN_REQUESTED = 0x40
STATE_RUNNING = 0
STATE_PAUSED_ALL = STATE_CLOSED | STATE_QUIESCED | STATE_PAUSED     # 0x2a

DEFAULT_TIMEOUT = 120
STALL_CHECK = 2.0       # seconds between looks at the clients while a pause or close waits


class Client(native.ClientState):
    """An NBD client as the gate sees it. busy: it may be using the chain (its thread
    writes it, the pause reads it: under the GIL, a write then a read on each side is
    enough, see VBD.park; C, outside it, puts barriers between them); inflight: its
    requests started and not answered. Memory C shares (native.ClientState): 0 both
    to begin with."""


class VBD(object):
    def __init__(self, minor, runtime_dir):
        self.minor = minor
        self.runtime_dir = runtime_dir
        self.nbd_path = names.nbd_path(os.getpid(), minor, runtime_dir)
        self.state = STATE_CLOSED
        self.params = None
        self.flags = 0
        self.timeout = DEFAULT_TIMEOUT
        self.export_name = None
        self.chain = None
        self.suspended = None       # the chain a pause suspended, until resume or close
        self.server = None
        self._size = None           # kept across a pause: resume may only grow it
        self._sector_size = None
        self._export_flags = 0
        self._banked = {"secs": [0, 0], "images": [], "retries": 0,   # chains closed by pause
                        "served_c": 0}
        self._gate = threading.Condition(threading.Lock())
        self._clients = set()
        self.held = False           # a pause or close waits for the clients to go quiet
        self.gate = native.Gate()   # held, as the clients' C loops read it (_set_held)
        self.io_backend = None      # the NBD clients' I/O queues' (ioqueue), from open
        self._control = threading.RLock()

    # -- the gate NBD clients pass -----------------------------------------------------
    def join(self):
        """A new NBD client (its transmission phase): its Client record."""
        client = Client()
        with self._gate:
            self._clients.add(client)
        return client

    def part(self, client):
        with self._gate:
            self._clients.discard(client)
            self._gate.notify_all()

    def park(self, client):
        """client (busy, nothing in flight) saw `held`: wait until the gate opens again.
        The client sets busy before reading held, the pause sets held before reading
        busy: whichever comes second sees the other's write."""
        with self._gate:
            client.busy = False
            self._gate.notify_all()
            while self.held:
                self._gate.wait()
            client.busy = True

    def quiet(self, client):
        """client went quiet while held (it set busy to False): tell the waiting pause."""
        with self._gate:
            self._gate.notify_all()

    def idle(self):
        """An NBD client's thread went idle: its per-thread driver buffers may go."""
        chain = self.chain
        if chain is not None:
            chain.idle()

    def _set_held(self, held):
        """Raise or lower the gate, for Python clients (held) and C ones (gate: a
        barrier after the store, before the caller reads any client's busy)."""
        self.held = held
        native.gate_set(self.gate, held)

    def _busy(self):
        return [c for c in self._clients if c.busy]

    def _hold(self, force=False):
        """Hold new requests and wait until every client is quiet or parked (their
        requests in flight answered). A client stuck sending to a peer that does not
        read its replies stops being busy when it is dropped (its unread replies did not
        move for STALL_CHECK seconds), so no client can hold a pause or close. EBUSY
        after the request timeout (the gate opens again), unless force."""
        with self._gate:
            self._set_held(True)
            deadline = time.monotonic() + self.timeout
            unread = {}
            # Once every client was seen quiet, the gate holds: one that turns busy
            # after that (a request came) reads held next and parks without touching the
            # chain (see park). So the decision is on that one look, never on another
            # (a C loop, outside the GIL, can turn busy between any two).
            busy = self._busy()
            while busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self._gate.wait(min(left, STALL_CHECK)) and self.server is not None:
                    unread = self.server.drop_stalled(unread)
                busy = self._busy()
            if busy and not force:
                self._set_held(False)
                self._gate.notify_all()
                raise OSError(errno.EBUSY, "%d clients still busy after %ss (%d requests in "
                              "flight)" % (len(busy), self.timeout,
                                           sum(c.inflight for c in busy)))

    def _release(self, chain):
        """Open the gate on `chain` (None: waiting and new requests fail with EIO)."""
        with self._gate:
            self.chain = chain
            self._set_held(False)
            self._gate.notify_all()

    # -- control --------------------------------------------------------------------------
    def open(self, params, flags=0, timeout=DEFAULT_TIMEOUT, secondary=None, export_name=None,
             tcp=None):
        """Open the image chain, then serve NBD on nbd_path (and tcp=(host, port))."""
        with self._control:
            if self.state != STATE_CLOSED or self.server is not None:
                raise OSError(errno.EBUSY, "minor %d already has %s open"
                              % (self.minor, self.params))
            if secondary or flags & (drv.OPEN_SECONDARY | drv.OPEN_STANDBY):
                raise OSError(errno.ENOTSUP, "secondary (mirror) images are not supported")
            self.timeout = timeout or DEFAULT_TIMEOUT
            self.io_backend = ioqueue.backend()
            chain = image.Chain(params, flags, self.timeout)
            try:
                if not os.path.isdir(self.runtime_dir):
                    os.makedirs(self.runtime_dir)
                self.flags, self.export_name = flags, export_name
                self._size, self._sector_size = chain.size, chain.sector_size
                self._export_flags = nbd.transmission_flags(chain)
                self._banked = {"secs": [0, 0], "images": [], "retries": 0, "served_c": 0}
                self._release(chain)
                self.server = nbd.Server(self, self.nbd_path, tcp)
            except Exception:
                self._release(None)
                self._size = None
                chain.close()
                raise
            self.params = params
            self.state = STATE_RUNNING

    def close(self, force=False):
        """Stop NBD (disconnect clients), close the images. Without force, batches in
        flight finish first (EBUSY if they do not within the request timeout)."""
        with self._control:
            if self.state == STATE_CLOSED and self.server is None:
                return
            self._hold(force)
            chain = self.chain
            self._release(None)         # late batches fail with EIO
            try:
                if self.server is not None:
                    self.server.close()
            finally:
                self.server = None
                self.state = STATE_CLOSED
                self.params = None
                self._size = None
                suspended, self.suspended = self.suspended, None
                try:
                    if chain is not None:
                        chain.close()
                finally:
                    if suspended is not None:
                        suspended.close()

    def pause(self):
        """Hold new requests, drain in-flight ones, suspend the images (their files are
        closed; what lives only in this process is kept for the resume)."""
        with self._control:
            if self.state & STATE_PAUSED:
                return
            if self.chain is None:
                raise OSError(errno.EINVAL, "minor %d is not open" % self.minor)
            self.state |= STATE_PAUSE_REQUESTED | STATE_QUIESCE_REQUESTED
            try:
                self._hold()
            except OSError:
                self.state &= ~(STATE_PAUSE_REQUESTED | STATE_QUIESCE_REQUESTED)
                raise
            chain = self.chain
            self.chain = None           # the gate stays held: batches wait for resume
            self._bank(chain)
            self.state = STATE_PAUSED_ALL
            self.suspended = chain      # resume picks up what it kept (Chain.suspend)
            chain.suspend()

    def resume(self, params=None):
        """Reopen (params: another image of the same size and sector size; the same one
        by default, resumed where the pause kept it) and release the waiting requests;
        if that fails they fail with EIO and the VBD stays paused."""
        with self._control:
            if not self.state & STATE_PAUSED:
                raise OSError(errno.EINVAL, "minor %d is not paused" % self.minor)
            params = params or self.params
            try:
                chain = image.Chain(params, self.flags, self.timeout, resume=self.suspended,
                                    expect=(self._size, self._sector_size))
            except Exception:
                self._release(None)     # waiting requests fail with EIO
                raise
            self.suspended = None
            self.params = params
            self._size = chain.size     # grown while paused: new clients see the new size
            self.state = STATE_RUNNING
            self._export_flags = nbd.transmission_flags(chain)
            self._release(chain)

    def _bank(self, chain):
        st = chain.stats()
        b = self._banked
        b["secs"] = [x + y for x, y in zip(b["secs"], st["secs"])]
        b["retries"] += st["retries"]
        b["served_c"] += st["served_c"]
        b["images"] = st["images"]

    # -- introspection -----------------------------------------------------------------
    def stats(self):
        chain = self.chain
        b = self._banked
        secs, retries, images = b["secs"], b["retries"], b["images"]
        served_c = b["served_c"]
        if chain is not None:
            st = chain.stats()
            secs = [x + y for x, y in zip(secs, st["secs"])]
            retries += st["retries"]
            served_c += st["served_c"]
            images = st["images"]
        server = self.server
        return {
            "name": self.params,
            "minor": self.minor,
            "state": self.state,
            "secs": secs,
            "images": images,
            "reqs_outstanding": sum(c.inflight for c in list(self._clients)),
            "io": self.io_backend,
            "retries": retries,
            "nbd": {"path": self.nbd_path if server else None,
                    "clients": server.clients() if server else 0,
                    "tcp": list(server.tcp_address[:2]) if server and server.tcp_address
                    else None,
                    # requests the transmission loop's C part answered (smtap_nbd.c);
                    # the rest, Python's
                    "served_c": served_c},
        }

    def info(self):
        if self._size is None:
            raise OSError(errno.EINVAL, "minor %d is not open" % self.minor)
        return {"size": self._size, "sector_size": self._sector_size, "info": 0}

    def export_info(self):
        """(size, NBD transmission flags) for a client's handshake."""
        if self._size is None:
            raise OSError(errno.EIO, "minor %d is not open" % self.minor)
        return self._size, self._export_flags

    @property
    def tcp_address(self):
        return self.server.tcp_address if self.server else None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smtap.tapdisk.vbd",
                                     description="serve one image over NBD in the foreground")
    parser.add_argument("params", help="type:/path[?k=v&...]")
    parser.add_argument("-m", "--minor", type=int, default=0)
    parser.add_argument("-R", "--read-only", action="store_true")
    parser.add_argument("-D", "--no-o-direct", action="store_true")
    parser.add_argument("-e", "--export-name")
    parser.add_argument("-t", "--timeout", type=int, default=DEFAULT_TIMEOUT)
    parser.add_argument("--tcp", help="host:port (port 0: any free port)")
    args = parser.parse_args(argv)
    flags = (drv.OPEN_RDONLY if args.read_only else 0) | \
        (drv.OPEN_NO_O_DIRECT if args.no_o_direct else 0)
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        tcp = (host or "127.0.0.1", int(port))
    vbd = VBD(args.minor, settings.runtime_dir())
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        vbd.open(args.params, flags, args.timeout, export_name=args.export_name, tcp=tcp)
    except (OSError, ValueError) as e:
        sys.stderr.write("%s: %s\n" % (args.params, e))
        return 1
    address = vbd.tcp_address
    print(vbd.nbd_path + (" %s:%d" % address[:2] if address else ""))
    sys.stdout.flush()
    while not done.wait(1):
        pass
    vbd.close(force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
