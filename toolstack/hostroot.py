"""A simulated host's root (SMTAP_ROOT): make a short one, list and remove what it left.

Shared by `make demo` and the tests: everything a host root can leave on the machine
(processes, loop devices, mounts, runtime sockets and links) is found here, by path.
"""
import os
import random
import signal
import socket
import string
import subprocess
import time

from smtap import mounts, settings

# The VDI's runtime link <root>/run/blktap-control/nbd/<sr>/<vdi> (97 bytes past the
# root) is the NBD socket path clients connect to; sun_path holds 107 bytes.
ROOT_MAX = 107 - len(settings.RUNTIME_DIR + "/nbd/") - 36 - 1 - 36


def _under(path, root):
    root = root.rstrip("/") + "/"
    return path == root.rstrip("/") or path.startswith(root)


def mounts_under(root):
    """[(mount point, fs type, source)] below root, deepest first."""
    found = [(point, fstype, source) for source, point, fstype in mounts.entries()
             if _under(point, root)]
    return sorted(found, key=lambda m: len(m[0]), reverse=True)


def loops_under(root):
    """[(/dev/loopN, backing file)] whose backing file lies below root."""
    found = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open("/sys/block/%s/loop/backing_file" % name) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if _under(backing.replace(" (deleted)", ""), root):
            found.append(("/dev/" + name, backing))
    return sorted(found)


def _is_zombie(pid):
    with open("/proc/%s/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def wait_dead(pid, timeout=10):
    """True once pid is gone or a zombie (a killed process nobody reaped yet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if _is_zombie(pid):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def processes_under(root):
    """[(pid, command line)] of processes of this root: SMTAP_ROOT=root in their
    environment, or the root in their command line (tapdisk, nbdfuse)."""
    marker = ("%s=%s" % (settings.ROOT_ENV, root.rstrip("/"))).encode()
    rootb = root.rstrip("/").encode() + b"/"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read()
            with open("/proc/%s/environ" % entry, "rb") as f:
                environ = f.read().split(b"\0")
            if _is_zombie(entry):
                continue          # a zombie holds nothing; its parent reaps it
        except OSError:
            continue
        if marker in environ or rootb in cmdline:
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")
                          .strip()))
    return found


def runtime_entries(root):
    """Non-directories (sockets, links, markers) left in the root's runtime dir."""
    base = settings.runtime_dir(under=root)
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.append(os.path.join(dirpath, name))
    return sorted(found)


def leftovers(root):
    """Everything of this root still alive on the machine, as readable lines."""
    root = str(root).rstrip("/")
    out = ["process %d: %s" % p for p in processes_under(root)]
    out += ["loop device %s -> %s" % d for d in loops_under(root)]
    out += ["mount %s (%s from %s)" % m for m in mounts_under(root)]
    out += ["runtime entry %s" % e for e in runtime_entries(root)]
    return out


def cleanup(root):
    """Best effort: unmount, free loop devices, kill processes of the root (in that
    order: a loop device pins its nbdfuse file), then unmount and free again what a
    process kept busy. Returns what could not be removed."""
    root = str(root).rstrip("/")
    for _ in range(2):
        _release(root)
        for pid, _ in processes_under(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.time() + 5
        while processes_under(root) and time.time() < deadline:
            time.sleep(0.05)
        if not (mounts_under(root) or loops_under(root)):
            break
    return leftovers(root)


def _release(root):
    for point, fstype, _ in mounts_under(root):
        if fstype.startswith("fuse"):
            continue
        subprocess.run(["umount", point], stderr=subprocess.DEVNULL)
    for dev, _ in loops_under(root):
        subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
    for point, fstype, _ in mounts_under(root):
        cmd = ["fusermount3", "-u", point] if fstype.startswith("fuse") else ["umount", point]
        if subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode:
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)


def short_root(prefix="/tmp/s"):
    """A fresh directory short enough for the runtime links (mkdtemp's are too long),
    owned by this process (OWNER_FILE): a root whose owner died without cleaning up
    (a run killed with -9) is found by stale_roots."""
    alphabet = string.ascii_lowercase + string.digits
    n = ROOT_MAX - len(prefix)
    for _ in range(1000):
        path = prefix + "".join(random.choice(alphabet) for _ in range(min(n, 6)))
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            continue
        with open(os.path.join(path, OWNER_FILE), "w") as f:
            f.write(_process_id(os.getpid()))
        return path
    raise RuntimeError("no free directory name under %s" % prefix)


OWNER_FILE = ".smtap-owner"     # "<pid> <start time>" of the process that made the root


def _process_id(pid):
    """pid and its start time (/proc/<pid>/stat field 22): a pid reused later differs."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return "%d %s" % (pid, f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return ""


def stale_roots(prefix):
    """Roots made by short_root(prefix) whose owner process is gone."""
    parent, start = os.path.split(prefix)
    found = []
    try:
        names = os.listdir(parent or "/")
    except OSError:
        return found
    for name in names:
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = f.read().strip()
        except OSError:
            continue            # not a root, or not one short_root made
        if name.startswith(start) and owner and _process_id(int(owner.split()[0])) != owner:
            found.append(path)
    return sorted(found)


def wait_for_socket(path, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return True
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    return False
