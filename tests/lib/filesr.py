"""The file SR on VHD and qcow2: write into a VDI's image as a guest would (offline, through
smtap.formats), read whole chains, look at the SR's tree, stop the GC at a phase, fill
its file system."""
import hashlib
import os
import signal
import time

from lib.sizes import MiB
from smtap.formats import qcow2 as Q
from smtap.formats import vhd as V
from smtap.sm import gcctl, testhooks, vhdchain


COW_EXTS = (".vhd", ".qcow2")


def vhd_write(path, pattern, offset, length):
    """Guest writes into an unplugged VDI's leaf (a VHD or a qcow2 image)."""
    with (Q.Image if path.endswith(".qcow2") else V.VHD)(path, writable=True) as img:
        img.write(bytes([pattern]) * length, offset)


def chain_sha(path):
    """sha256 of what the VDI's chain reads, all of its virtual size."""
    h = hashlib.sha256()
    with (Q.Chain if path.endswith(".qcow2") else V.Chain)(path) as chain:
        pos = 0
        while pos < chain.size:
            n = min(4 * MiB, chain.size - pos)
            h.update(chain.read(pos, n))
            pos += n
    return h.hexdigest()


def vhd_tree(directory):
    """{uuid: (parent uuid or None, hidden)} of the images in the SR directory."""
    return dict((u, (i.parent, i.hidden)) for u, i in vhdchain.scan(directory).items())


def all_valid(directory):
    """vhd-util / qcow2-util check of every image of the directory: [(file, reason)] of
    the invalid."""
    bad = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(COW_EXTS):
            why = vhdchain.check(os.path.join(directory, name))
            if why:
                bad.append((name, why))
    return bad


def leftovers(directory):
    """What is in the SR directory besides visible VDIs: hidden images, journals, temp."""
    hidden = [u for u, (_, h) in vhd_tree(directory).items() if h]
    other = [n for n in os.listdir(directory)
             if not n.endswith(COW_EXTS + (".raw",))]
    return sorted(hidden + other)


def sr_location(x, sr):
    return x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"]


def wait_gc(x, sr, timeout=120):
    return gcctl.wait_idle(x.SR.get_uuid(sr), timeout)


def park_and_kill(sr_uuid, phase, start, timeout=60):
    """park() the GC at `phase`, kill -9 it there; the hook is cleared. Its pid."""
    try:
        pid = park(sr_uuid, phase, start, timeout)
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not gcctl.running(sr_uuid):
                break
            time.sleep(0.05)
        return pid
    finally:
        testhooks.clear_hook("gc-park")


def hidden_images(directory):
    return sorted(u for u, (_, h) in vhd_tree(directory).items() if h)


def retry_depth(path):
    """query -d, read again if the GC relinks or deletes a parent meanwhile."""
    for attempt in range(10):
        try:
            return vhdchain.depth(path)
        except OSError:
            time.sleep(0.05)
    return vhdchain.depth(path)


def fill_fs(directory):
    """Take every free block of the file system: files allocated in shrinking chunks
    until not even one block fits. Returns them."""
    made, chunk = [], os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    while chunk >= 4096:
        path = os.path.join(directory, "filler%d" % len(made))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, chunk)
            made.append(path)
        except OSError:
            os.unlink(path)
            chunk //= 2
        finally:
            os.close(fd)
    return made


def park(sr_uuid, phase, start, timeout=60):
    """Arm the gc-park hook at `phase`, start() something that kicks the GC and wait
    until it stops there: its pid. The caller clears the hook."""
    testhooks.set_hook("gc-park", phase)
    start()
    deadline = time.time() + timeout
    while True:
        state = gcctl.status(sr_uuid)
        if state.get("doing") == "parked at %s" % phase and state.get("state") == "running":
            return state["pid"]
        assert time.time() < deadline, "the GC never parked at %s: %s" % (phase, state)
        time.sleep(0.05)
