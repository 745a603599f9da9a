"""A real block device for a VBD without the blktap kernel module: nbdfuse + a loop device.

A device lives in one directory, `mount_dir`: nbdfuse mounts it and serves the NBD
export as the file `<mount_dir>/disk`, and a loop device sits on that file. Everything
is found again from `mount_dir` at the moment it is needed: the loop devices are those
whose backing file is `<mount_dir>/disk` now (sysfs), the mount is the one on
`mount_dir`, nbdfuse is the process whose command line serves that file. A device name
remembered from earlier is never acted on: loop numbers are reused as soon as freed.

detach() refuses (Busy) before touching anything while the device is in use: mounted,
claimed by the kernel (device mapper, a mount in another namespace), or held open by a
process; force=True detaches anyway, as a forced unplug does (users then get I/O errors,
the loop device goes when its last user closes it). attach() first removes what a
crashed attach or detach left in `mount_dir`, so both can simply be run again.

The nbd kernel module (nbd-client) would be shorter, but it is not loadable in every
dom0 or container; FUSE and loop are.
"""
import errno
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import time

from smtap import mounts

FILENAME = "disk"
LOOP_CLR_FD = 0x4C01
BUSY_GRACE = 2.0      # a transient opener (udev probing a changed device) gets this long


class BlockdevError(Exception):
    pass


class Busy(BlockdevError):
    """The device is in use; nothing was changed."""


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


def _logfile(mount_dir):
    return mount_dir.rstrip("/") + ".log"


def _real(mount_dir):
    # realpath of the parent only: a dead FUSE mount point itself cannot be stat'ed
    mount_dir = os.path.abspath(mount_dir.rstrip("/"))
    return os.path.join(os.path.realpath(os.path.dirname(mount_dir)),
                        os.path.basename(mount_dir))


def disk_file(mount_dir):
    return os.path.join(_real(mount_dir), FILENAME)


def mounted(mount_dir):
    real = _real(mount_dir)
    return any(point == real for _, point, _ in mounts.entries())


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def loops(mount_dir):
    """[/dev/loopN] whose backing file is <mount_dir>/disk at this moment."""
    disk = disk_file(mount_dir)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return []
    return sorted("/dev/" + name for name in names if name.startswith("loop")
                  and _read("/sys/block/%s/loop/backing_file" % name) == disk)


def _rdev(dev):
    try:
        st = os.stat(dev)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _backing_of_rdev(rdev):
    return _read("/sys/dev/block/%d:%d/loop/backing_file" % (os.major(rdev), os.minor(rdev)))


def _comm(pid):
    return _read("/proc/%s/comm" % pid) or "?"


def _openers(rdevs, disk):
    """["pid N (comm)"] of processes with a descriptor on one of the devices or the file."""
    found = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            path = os.path.join(fd_dir, fd)
            try:
                target = os.readlink(path)
                # stat only device nodes: any other file could sit on a hung mount
                hit = target == disk or (target.startswith("/dev/") and
                                         os.stat(path).st_rdev in rdevs)
            except OSError:
                continue
            if hit:
                found.append("pid %s (%s)" % (pid, _comm(pid)))
                break
    return found


def _users(mount_dir):
    """(claims, openers): mounts and kernel holders, then processes holding it open."""
    disk = disk_file(mount_dir)
    devs = loops(mount_dir)
    if not devs and not mounted(mount_dir):
        return [], []
    rdevs = set(r for r in (_rdev(d) for d in devs) if r is not None)
    claims = []
    for source, point, _ in mounts.entries():
        if source.startswith("/dev/") and _rdev(source) in rdevs:
            claims.append("%s is mounted on %s" % (source, point))
    for dev in devs:
        try:
            holders = os.listdir("/sys/block/%s/holders" % os.path.basename(dev))
        except OSError:
            holders = []
        if holders:
            claims.append("%s is held by %s" % (dev, ", ".join(sorted(holders))))
        try:
            os.close(os.open(dev, os.O_RDONLY | os.O_EXCL))
        except OSError as e:
            if e.errno == errno.EBUSY and not claims:
                claims.append("%s is claimed (mounted in another namespace?)" % dev)
    openers = _openers(rdevs, disk)
    held = ["%s is open in %s" % (" ".join(devs) or disk, ", ".join(openers))] if openers else []
    return claims, held


def users(mount_dir):
    """Why the device of mount_dir cannot go now: readable reasons, [] when free."""
    claims, held = _users(mount_dir)
    return claims + held


def _check_free(mount_dir):
    """Busy unless free; an opener alone gets BUSY_GRACE to close (udev probes)."""
    deadline = time.time() + BUSY_GRACE
    while True:
        claims, held = _users(mount_dir)
        if not claims and not held:
            return
        if claims or time.time() > deadline:
            raise Busy("; ".join(claims + held))
        time.sleep(0.1)


def nbdfuse_pids(mount_dir):
    """nbdfuse processes serving <mount_dir>/disk, found by their command line."""
    disk = disk_file(mount_dir)
    wanted = set([disk, os.path.join(mount_dir, FILENAME)])
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == "nbdfuse" and wanted & set(argv) \
                and _alive(int(pid)):
            found.append(int(pid))
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    stat_line = _read("/proc/%d/stat" % pid)
    return bool(stat_line) and stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


# --- attach ----------------------------------------------------------------------------
def mount(nbd_socket_path, export_name, mount_dir, read_only=False, timeout=30):
    """nbdfuse serving the export as <mount_dir>/disk; returns that file's path."""
    if loops(mount_dir) or mounted(mount_dir) or nbdfuse_pids(mount_dir):
        detach(mount_dir, timeout=timeout)      # what a crash left; Busy if in use
    if not os.path.isdir(mount_dir):
        os.makedirs(mount_dir)
    pidfile = _pidfile(mount_dir)
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    uri = "nbd+unix:///%s?socket=%s" % (export_name or "", nbd_socket_path)
    cmd = ["nbdfuse", "-P", pidfile] + (["-r"] if read_only else []) + \
        [os.path.join(mount_dir, FILENAME), uri]
    errlog = open(_logfile(mount_dir), "w")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                start_new_session=True)     # outlives its caller
    finally:
        errlog.close()
    deadline = time.time() + timeout
    while not os.path.exists(pidfile) or not mounted(mount_dir):
        if proc.poll() is not None:
            with open(_logfile(mount_dir)) as f:
                raise BlockdevError("nbdfuse %s exited %d: %s"
                                    % (uri, proc.returncode, f.read().strip()))
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            _unmount(mount_dir, timeout)
            raise BlockdevError("nbdfuse %s not ready after %ss" % (uri, timeout))
        time.sleep(0.05)
    return os.path.join(mount_dir, FILENAME)


def add_loop(mount_dir, read_only=False, timeout=30):
    """A loop device on <mount_dir>/disk; returns its path ("/dev/loopN")."""
    try:
        return _run(["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) +
                    [os.path.join(mount_dir, FILENAME)]).strip()
    except Exception:
        _unmount(mount_dir, timeout)
        raise


def attach(nbd_socket_path, export_name, mount_dir, read_only=False, timeout=30):
    """Serve the export as a block device; returns its path ("/dev/loopN")."""
    mount(nbd_socket_path, export_name, mount_dir, read_only, timeout)
    return add_loop(mount_dir, read_only, timeout)


# --- detach ----------------------------------------------------------------------------
def _clear(dev, disk, force):
    """Detach one loop device, on a descriptor proved to be on `disk`: the name cannot be
    reused between the check and the ioctl, as the device is not free meanwhile."""
    flags = os.O_RDONLY | (0 if force else os.O_EXCL)
    try:
        fd = os.open(dev, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise Busy("%s is in use" % dev)
        if e.errno in (errno.ENOENT, errno.ENXIO):
            return
        raise BlockdevError("open %s: %s" % (dev, e))
    try:
        if _backing_of_rdev(os.fstat(fd).st_rdev) != disk:
            return                                  # not ours (any more)
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as e:
            if e.errno != errno.ENXIO:              # ENXIO: already free
                raise BlockdevError("detach %s: %s" % (dev, e))
    finally:
        os.close(fd)


def detach(mount_dir, force=False, timeout=30):
    """Remove the device of mount_dir (loop devices, nbdfuse mount, nbdfuse, files).

    Not forced, it raises Busy before changing anything while the device is in use.
    Idempotent: what is already gone is skipped, so a detach cut short can be rerun."""
    disk = disk_file(mount_dir)
    if not force:
        _check_free(mount_dir)
    for dev in loops(mount_dir):
        _clear(dev, disk, force)
    deadline = time.time() + timeout
    while loops(mount_dir) and not force and time.time() < deadline:
        time.sleep(0.05)        # the loop device lets go of the file when it is closed
    _unmount(mount_dir, timeout, lazy=force)


def _unmount(mount_dir, timeout, lazy=False):
    """Unmount nbdfuse, make sure it exits, remove its files."""
    deadline = time.time() + timeout
    while mounted(mount_dir):
        try:
            _run([_fusermount(), "-u"] + (["-z"] if lazy else []) + [_real(mount_dir)])
        except BlockdevError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    pids = nbdfuse_pids(mount_dir)
    # forced, nbdfuse may still be referenced by a loop device in use: do not wait long
    quit_by = time.time() + min(timeout, 1 if lazy else 5)
    for pid in pids:
        while _alive(pid) and time.time() < quit_by:
            time.sleep(0.05)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if mounted(mount_dir):         # nbdfuse killed under a lazy unmount: a dead mount
        subprocess.call([_fusermount(), "-u", "-z", _real(mount_dir)],
                        stderr=subprocess.DEVNULL)
    for path in (_pidfile(mount_dir), _logfile(mount_dir)):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(mount_dir)
    except OSError:
        pass

