"""A real block device for a VBD without the blktap kernel module: nbdfuse + a loop device.

attach() exposes the NBD export as a file (nbdfuse mounts `<mount_dir>/disk`) and puts
a loop device on it; detach() undoes both: loop first, then the FUSE mount, then waits
for nbdfuse to exit. The nbd kernel module (nbd-client) would be shorter, but it is not
loadable in every dom0 or container; FUSE and loop are.
"""
import errno
import os
import shutil
import signal
import subprocess
import time

from smtap import mounts

FILENAME = "disk"


class BlockdevError(Exception):
    pass


def _run(cmd, timeout=60):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise BlockdevError("%s failed (%d): %s" % (" ".join(cmd), proc.returncode,
                                                    err.strip() or out.strip()))
    return out


def _fusermount():
    """fuse3's fusermount3, or fuse2's fusermount on older hosts."""
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def _pidfile(mount_dir):
    return mount_dir.rstrip("/") + ".pid"


def _mounted(mount_dir):
    real = os.path.realpath(mount_dir)
    return any(point == real for _, point, _ in mounts.entries())


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def attach(nbd_socket_path, export_name, mount_dir, read_only=False, timeout=30):
    """Serve the export as a block device; returns its path ("/dev/loopN")."""
    if not os.path.isdir(mount_dir):
        os.makedirs(mount_dir)
    if _mounted(mount_dir):
        raise BlockdevError("%s is already a mount point" % mount_dir)
    pidfile = _pidfile(mount_dir)
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    uri = "nbd+unix:///%s?socket=%s" % (export_name or "", nbd_socket_path)
    cmd = ["nbdfuse", "-P", pidfile] + (["-r"] if read_only else []) + \
        [os.path.join(mount_dir, FILENAME), uri]
    errlog = open(mount_dir.rstrip("/") + ".log", "w")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                start_new_session=True)     # outlives its caller
    finally:
        errlog.close()
    deadline = time.time() + timeout
    while not os.path.exists(pidfile) or not _mounted(mount_dir):
        if proc.poll() is not None:
            with open(mount_dir.rstrip("/") + ".log") as f:
                raise BlockdevError("nbdfuse %s exited %d: %s"
                                    % (uri, proc.returncode, f.read().strip()))
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            raise BlockdevError("nbdfuse %s not ready after %ss" % (uri, timeout))
        time.sleep(0.05)
    try:
        dev = _run(["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) +
                   [os.path.join(mount_dir, FILENAME)]).strip()
    except Exception:
        _unmount(mount_dir, timeout)
        raise
    return dev


def backing_file(dev):
    return _run(["losetup", "--noheadings", "--output", "BACK-FILE", dev]).strip()


def detach(dev, timeout=30):
    """Remove the loop device, unmount its nbdfuse and wait for nbdfuse to exit."""
    backing = backing_file(dev)
    mount_dir = os.path.dirname(backing)
    _run(["losetup", "--detach", dev])
    _unmount(mount_dir, timeout)


def _unmount(mount_dir, timeout):
    pidfile = _pidfile(mount_dir)
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    deadline = time.time() + timeout
    while _mounted(mount_dir):
        try:
            _run([_fusermount(), "-u", mount_dir])
        except BlockdevError:
            if time.time() > deadline:     # the loop device lets go of the file lazily
                raise
            time.sleep(0.1)
    while pid and _alive(pid):
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    for path in (pidfile, mount_dir.rstrip("/") + ".log"):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(mount_dir)
    except OSError:
        pass
