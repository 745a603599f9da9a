"""Inter-process locks: fcntl locks on files under settings.lock_dir()/<ns>/<name>.

Same layout and call shape as upstream SM: Lock("sr", sr_uuid) is the file
<lock_dir>/<sr_uuid>/sr, Lock("vdi", vdi_uuid) is <lock_dir>/<vdi_uuid>/vdi.
POSIX record locks belong to the process and vanish when any descriptor of the file
is closed, so each file is opened once per process and counted: a lock is re-entrant
within a process and excludes other processes.
"""
import errno
import fcntl
import os

from smtap import settings

_held = {}  # path -> [fd, depth]: this process's locks


class Lock(object):
    def __init__(self, name, ns):
        if not name or not ns or "/" in name or "/" in ns or name in (".", "..") or ns in (".", ".."):
            raise ValueError("bad lock name %s in namespace %s" % (name, ns))
        self.name = name
        self.ns = ns
        self.path = os.path.join(settings.lock_dir(), ns, name)

    def _open(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _take(self, blocking):
        entry = _held.get(self.path)
        if entry:
            entry[1] += 1
            return True
        fd = self._open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not blocking and e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        _held[self.path] = [fd, 1]
        return True

    def acquire(self):
        """Block until this process holds the lock."""
        self._take(blocking=True)

    def acquire_noblock(self):
        """Take the lock if free (or already ours); False if another process holds it."""
        return self._take(blocking=False)

    def release(self):
        entry = _held.get(self.path)
        if not entry:
            raise RuntimeError("lock %s is not held" % self.path)
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.path]
            fcntl.lockf(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def held(self):
        """True if this process holds the lock."""
        return self.path in _held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def cleanup(ns):
    """Remove a namespace's lock files once its object is gone (e.g. a deleted VDI).

    Skipped while this process holds one of them."""
    directory = os.path.join(settings.lock_dir(), ns)
    if any(os.path.dirname(path) == directory for path in _held):
        return
    import shutil  # here: shutil imports bz2, lzma, ... and only vdi_delete needs it
    shutil.rmtree(directory, ignore_errors=True)
