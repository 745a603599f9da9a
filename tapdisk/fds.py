"""File descriptors: a resource clients can exhaust (RLIMIT_NOFILE caps a tapdisk's,
and every NBD client holds one).

  - NBD listeners keep RESERVE descriptors free: a client accepted past that is hung up
    on at once (headroom()), so the control socket, image opens and the log find some;
  - when there are none anyway (the limit lowered under what is open), the control
    socket still answers through a Spare, a descriptor held open for that alone;
  - accept loops that fail back off (Backoff) and log at a bounded rate (ratelog).
LOCK serialises every listener's accept with the spare's release and retake, so no
other accept can take the descriptor the spare frees for the control socket.
"""
import errno
import os
import resource
import threading

RESERVE = 16
LOCK = threading.Lock()
EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def headroom():
    """True while more than RESERVE descriptors are left under the soft limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return True
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return False            # not even one left for the listing
    return soft - used > RESERVE


class Spare(object):
    """A descriptor held so that one more can be opened when none is left."""

    def __init__(self):
        self.fd = None
        self.take()

    def take(self):
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass            # none to spare now: the next take() tries again

    def release(self):
        """Free it (False if it is not held): the caller's next open gets its number."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


class Backoff(object):
    """Delays between retries of something failing: 50 ms doubling up to 1 s."""

    def __init__(self, first=0.05, longest=1.0):
        self.first, self.longest = first, longest
        self.delay = 0.0

    def next(self):
        self.delay = min(self.longest, max(self.first, 2 * self.delay))
        return self.delay

    def reset(self):
        self.delay = 0.0
