"""Minor numbers: marker files <runtime>/tapdisk/tapdisk-<N> (smtap.names), as upstream
blktap.

allocate() holds an flock on the directory while it picks the first free N, so
concurrent allocations never collide. A tapdisk holds an exclusive flock on its
marker while attached (hold()); free() removes a marker only when it can take that
lock itself, so a live tapdisk's minor is never freed and a crashed one's (the kernel
dropped its lock) always can be.
"""
import errno
import fcntl
import os
import time

from smtap import names

MAX_MINOR = 16384
directory = names.minors_dir
marker = names.marker_path


def allocated():
    """Sorted minors that have a marker."""
    try:
        entries = os.listdir(directory())
    except OSError:
        return []
    return sorted(m for m in map(names.minor_of_marker, entries) if m is not None)


def _check(minor):
    if not 0 <= minor < MAX_MINOR:
        raise OSError(errno.EINVAL, "minor %d out of range 0..%d" % (minor, MAX_MINOR - 1))


def allocate():
    """Create the first free marker; return its minor."""
    path = directory()
    os.makedirs(path, exist_ok=True)
    dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        taken = set(allocated())
        for minor in range(MAX_MINOR):
            if minor not in taken:
                os.close(os.open(marker(minor), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return minor
        raise OSError(errno.ENOSPC, "all %d minors are allocated" % MAX_MINOR)
    finally:
        os.close(dirfd)     # drops the lock


def free(minor):
    """Remove a marker no live tapdisk holds. EBUSY if one does, ENOENT if none."""
    _check(minor)
    path = marker(minor)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise OSError(errno.ENOENT, "minor %d is not allocated" % minor)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(errno.EBUSY, "minor %d is in use by a tapdisk" % minor)
            raise
        os.unlink(path)
    finally:
        os.close(fd)


def free_released(minor, timeout=5.0):
    """free() once the tapdisk holding the minor is gone: the kernel drops a killed
    process's lock only as it finishes exiting, so EBUSY is waited out. True when the
    minor is free (or was not allocated), False if still held after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            free(minor)
            return True
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return True
            if exc.errno != errno.EBUSY:
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class Hold(object):
    """An exclusive lock on an allocated minor's marker, for as long as it is attached."""

    def __init__(self, minor):
        _check(minor)
        self.minor = minor
        path = marker(minor)
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise OSError(errno.ENODEV, "minor %d is not allocated" % minor)
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # free() may have unlinked the marker between our open and our lock.
            if os.fstat(self.fd).st_ino != os.stat(path).st_ino:
                raise OSError(errno.ENOENT, "minor %d was freed" % minor)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(errno.EBUSY, "minor %d is held by another tapdisk" % minor)
            if exc.errno == errno.ENOENT:
                raise OSError(errno.ENODEV, "minor %d is not allocated" % minor)
            raise

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
