"""Helpers for the file SR on VHD: write into a VDI's image as a guest would (offline,
through smtap.formats), read whole chains, look at the SR's tree, drive the GC."""
import hashlib
import os
import signal
import subprocess
import time

from smtap.formats import vhd as V
from smtap.sm import gcctl, testhooks, vhdchain

MiB = 1 << 20


def vhd_write(path, pattern, offset, length):
    """Guest writes into an unplugged VDI's leaf."""
    with V.VHD(path, writable=True) as img:
        img.write(bytes([pattern]) * length, offset)


def chain_sha(path):
    """sha256 of what the VDI's chain reads, all of its virtual size."""
    h = hashlib.sha256()
    with V.Chain(path) as chain:
        pos = 0
        while pos < chain.size:
            n = min(4 * MiB, chain.size - pos)
            h.update(chain.read(pos, n))
            pos += n
    return h.hexdigest()


def tree(directory):
    """{uuid: (parent uuid or None, hidden)} of the images in the SR directory."""
    return dict((u, (i.parent, i.hidden)) for u, i in vhdchain.scan(directory).items())


def all_valid(directory):
    """vhd-util check of every VHD of the directory: [(file, reason)] of the invalid."""
    bad = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".vhd"):
            why = vhdchain.check(os.path.join(directory, name))
            if why:
                bad.append((name, why))
    return bad


def leftovers(directory):
    """What is in the SR directory besides visible VDIs: hidden images, journals, temp."""
    hidden = [u for u, (_, h) in tree(directory).items() if h]
    other = [n for n in os.listdir(directory)
             if not (n.endswith(".vhd") or n.endswith(".raw"))]
    return sorted(hidden + other)


def sr_location(x, sr):
    return x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"]


def wait_gc(x, sr, timeout=120):
    return gcctl.wait_idle(x.SR.get_uuid(sr), timeout)


def park_and_kill(sr_uuid, phase, start, timeout=60):
    """Arm the gc-park hook at `phase`, start() something that kicks the GC, wait until it
    parks there, kill -9 it; the hook is cleared. Returns the killed pid."""
    testhooks.set_hook("gc-park", phase)
    try:
        start()
        deadline = time.time() + timeout
        while True:
            state = gcctl.status(sr_uuid)
            if state.get("doing") == "parked at %s" % phase and state.get("state") == "running":
                break
            assert time.time() < deadline, "the GC never parked at %s: %s" % (phase, state)
            time.sleep(0.05)
        os.kill(state["pid"], signal.SIGKILL)
        for _ in range(200):
            if not gcctl.running(sr_uuid):
                break
            time.sleep(0.05)
        return state["pid"]
    finally:
        testhooks.clear_hook("gc-park")


def vhd_util(*argv):
    return subprocess.run(["vhd-util"] + list(argv), capture_output=True, text=True, timeout=60)
