"""pause / unpause under load: no request lost or corrupted, waiting requests resume,
unpause -a switches images of the same size or bigger (an online resize), never smaller;
no disk type loses a byte across a pause."""
import json
import subprocess
import threading
import time

import pytest

from smtap.tapdisk import control, drivers

from lib.engine import disk_sha256, image_file, nbd_loop_env, nbd_size, qemu_io, tap_ctl
from lib.fs import tmpfs
from lib.procs import run
from lib.qcow2 import QCOW2_DISKS, check_images
from lib.sizes import MiB
from lib.vhd import VHD_DISKS, vhd_disk

PAUSED = 0x2a


def fio_verify(uri, size):
    """One fio pass over NBD: random 4k writes then a crc32c read-back."""
    proc = run("fio", "--name=verify", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
               "--bs=4k", "--size=%d" % size, "--iodepth=8", "--verify=crc32c",
               "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1", "--randrepeat=0",
               "--output-format=json", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    return job


class Pauser(threading.Thread):
    """Pauses and unpauses a VBD over its control socket, every 20 ms, until stop()
    (or `limit` cycles); samples the paused state every 10 cycles; keeps its error."""

    def __init__(self, tap, limit=None):
        threading.Thread.__init__(self)
        self.client, self.minor, self.limit = control.Client(tap.pid), tap.minor, limit
        self.cycles, self.states, self.failure = 0, set(), []
        self.done = threading.Event()
        self.start()

    def run(self):
        try:
            while not self.done.is_set() and self.cycles != self.limit:
                self.client.pause(self.minor)
                if self.cycles % 10 == 0:
                    self.states.add(self.client.list()[0]["state"])
                time.sleep(0.005)
                self.client.resume(self.minor)
                self.cycles += 1
                time.sleep(0.02)
        except Exception as exc:    # reported by the main thread
            self.failure.append(exc)

    def stop(self):
        self.done.set()
        self.join(60)


# the disks the heavier pause tests run on: raw, a VHD, a VHD chain, qcow2, a qcow2 chain
DISKS = dict(VHD_DISKS, aio=lambda root, size: "aio:" + image_file(root / "disk.img", size))
DISKS.update(QCOW2_DISKS)


@pytest.mark.parametrize("disk,loop", [(d, "c") for d in sorted(DISKS)] + [("aio", "python")])
def test_fio_verify_during_100_pause_cycles(make_tap, smtap_root, monkeypatch, disk, loop,
                                            io_backend):
    """(a raw disk: on the NBD loop's C part, which pauses must stop, and on Python's)"""
    monkeypatch.setenv(*nbd_loop_env(loop))
    size = 16 * MiB
    tap = make_tap(DISKS[disk](smtap_root, size))
    client = control.Client(tap.pid)
    assert client.stats(tap.minor)["io"] == io_backend
    pauser = Pauser(tap, limit=100)
    runs, overlap = 0, []      # cycles done when each fio pass ended
    try:
        while pauser.is_alive() or runs < 2:
            job = fio_verify(tap.uri, size)
            assert job["write"]["io_bytes"] >= size
            assert job["read"]["io_bytes"] >= size      # the verify pass read it all
            runs += 1
            overlap.append(pauser.cycles)
    finally:
        pauser.stop()
    assert not pauser.failure, pauser.failure
    assert pauser.cycles == 100 and pauser.states == {PAUSED}
    assert overlap[0] > 0       # the first pass really ran across pauses
    assert client.list()[0]["state"] == 0
    stats = client.stats(tap.minor)
    assert stats["reqs_outstanding"] == 0 and stats["images"]
    assert all(image["fail"] == [0, 0] for image in stats["images"]), stats
    assert (stats["nbd"]["served_c"] > 0) == (loop == "c"), stats
    tap.destroy()
    check_images(smtap_root)


def test_requests_wait_while_paused(make_tap, smtap_root):
    tap = make_tap("aio:" + image_file(smtap_root / "disk.img", 4 * MiB, b"\x3c"))
    # qemu-io connects first, then reads commands from stdin: its read is a request
    # arriving while the VBD is paused.
    qio = subprocess.Popen(["qemu-io", "-f", "raw", tap.uri], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)
        assert qio.poll() is None
        tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
        qio.stdin.write("read -P 0x3c 0 1M\n")
        qio.stdin.flush()
        time.sleep(0.5)
        stats = control.Client(tap.pid).stats(tap.minor)
        assert stats["secs"][0] == 0            # nothing read while paused
        tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
        qio.stdin.write("quit\n")
        qio.stdin.flush()
        out = qio.communicate(timeout=30)[0]
    finally:
        if qio.poll() is None:
            qio.kill()
            qio.wait()
    assert "read 1048576/1048576 bytes" in out and "fail" not in out.lower(), out
    assert control.Client(tap.pid).stats(tap.minor)["secs"][0] >= 2048


def read_pattern(uri, pattern, length="64k"):
    """The first `length` bytes all hold `pattern`."""
    proc = qemu_io(uri, "read -P %s 0 %s" % (pattern, length), check=False)
    return proc.returncode == 0 and "fail" not in proc.stdout.lower()


def test_unpause_a_onto_a_vhd_snapshot_of_the_same_disk(make_tap, smtap_root):
    """The storage layer's snapshot of a live VHD: pause, snapshot (the leaf becomes a
    parent), unpause -a onto the new leaf; data kept, new writes land in the new leaf."""
    for depth in (1, 3):
        root = smtap_root / ("d%d" % depth)
        root.mkdir()
        params = vhd_disk(root, 8 * MiB, depth)
        tap = make_tap(params)
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa7 0 1M", tap.uri)
        before = disk_sha256(tap.uri, smtap_root)
        tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
        new = str(root / "snap.vhd")
        run("vhd-util", "snapshot", "-n", new, "-p", params[4:])
        tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a", "vhd:" + new)
        assert tap_ctl("list").stdout.splitlines() == [
            "pid=%d minor=%d state=0 args=vhd:%s" % (tap.pid, tap.minor, new)]
        assert disk_sha256(tap.uri, smtap_root) == before
        assert len(control.Client(tap.pid).stats(tap.minor)["images"]) == depth + 1
        run("qemu-io", "-f", "raw", "-c", "write -P 0xa8 0 64k", tap.uri)
        assert read_pattern(tap.uri, "0xa8") and not read_pattern(tap.uri, "0xa7", "1M")
        tap.destroy()
        check_images(root)


def test_unpause_switches_to_an_image_of_the_same_size(make_tap, smtap_root):
    a = image_file(smtap_root / "a.img", 4 * MiB, b"\xaa")
    b = image_file(smtap_root / "b.img", 4 * MiB, b"\xbb")
    tap = make_tap("aio:" + a)
    assert read_pattern(tap.uri, "0xaa")
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a", "aio:" + b)
    assert tap_ctl("list").stdout.splitlines() == [
        "pid=%d minor=%d state=0 args=aio:%s" % (tap.pid, tap.minor, b)]
    assert read_pattern(tap.uri, "0xbb")


def test_unpause_refuses_a_smaller_image(make_tap, smtap_root):
    a = image_file(smtap_root / "a.img", 8 * MiB, b"\xaa")
    small = image_file(smtap_root / "small.img", 4 * MiB, b"\xcc")
    tap = make_tap("aio:" + a)
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    proc = tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a", "aio:" + small,
                   check=False)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1
    assert "size" in proc.stderr
    # Still paused on the original image; a plain unpause brings it back.
    assert tap_ctl("list").stdout.splitlines() == [
        "pid=%d minor=%d state=0x2a args=aio:%s" % (tap.pid, tap.minor, a)]
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert read_pattern(tap.uri, "0xaa", "8M") and nbd_size(tap.uri) == 8 * MiB
    with open(small, "rb") as f:
        assert f.read(4) == b"\xcc" * 4     # the refused image was not touched


def test_a_disk_grown_while_paused_is_served_at_its_new_size(make_tap, smtap_root):
    """Online resize: the image grows while its tapdisk is paused; after the unpause new
    NBD clients see (and can write) the new size, the old data is kept."""
    path = str(smtap_root / "d.vhd")
    run("vhd-util", "create", "-n", path, "-s", "4")
    tap = make_tap("vhd:" + path)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 4M", tap.uri)
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    run("vhd-util", "resize", "-n", path, "-s", "12", "-j", path + ".journal")
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert nbd_size(tap.uri) == 12 * MiB
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa2 8M 4M", tap.uri)
    assert read_pattern(tap.uri, "0xa1", "4M")
    run("qemu-io", "-f", "raw", "-c", "read -P 0xa2 8M 4M", tap.uri)
    tap.destroy()
    assert run("vhd-util", "check", "-n", path).returncode == 0


def test_pause_and_unpause_state_errors(make_tap, smtap_root):
    tap = make_tap("aio:" + image_file(smtap_root / "a.img", MiB))
    proc = tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, check=False)
    assert proc.returncode != 0 and "not paused" in proc.stderr
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)       # idempotent, as upstream
    # A paused VBD can be destroyed (close drops the waiters).
    tap_ctl("destroy", "-p", tap.pid, "-m", tap.minor)
    assert tap_ctl("list").stdout == ""


def test_pause_closes_the_image_so_it_can_be_rewritten(make_tap, smtap_root):
    # The storage layer rewrites files while a VBD is paused (snapshot, coalesce):
    # unpause must reopen and see the new content.
    a = image_file(smtap_root / "a.img", 4 * MiB, b"\xaa")
    tap = make_tap("aio:" + a)
    assert read_pattern(tap.uri, "0xaa")
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    image_file(smtap_root / "new.img", 4 * MiB, b"\xdd")
    (smtap_root / "new.img").rename(a)
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert read_pattern(tap.uri, "0xdd")


# -- every disk type keeps its data across pause / unpause --------------------------------
# One line per way of serving a disk: name ("<type>[-<variant>]") -> (params of a disk of
# `size` under `root`, whether it keeps what is written). A new disk type is covered by
# adding its line (test_every_disk_type_has_a_pause_case fails until it has one).
PAUSE_CASES = {
    "aio": (lambda root, size: "aio:" + image_file(root / "a.img", size), True),
    "ram": (lambda root, size: "ram:%s?size=%d" % (root / "none", size), True),
    "ram-seeded": (lambda root, size: "ram:" + image_file(root / "seed.img", size, b"\x11"),
                   True),
    "ram-writeback": (lambda root, size: "ram:%s?size=%d&writeback=1" % (root / "wb.img", size),
                      True),
    "ram-shared": (lambda root, size: "ram:%s?shared=1" % image_file(
        tmpfs(root / "shm", 2 * size) / "s.img", size), True),
    "null": (lambda root, size: "null:x?size=%d" % size, False),
    "vhd": (VHD_DISKS["vhd"], True),
    "vhd-chain3": (VHD_DISKS["vhd-chain3"], True),
    "qcow2": (QCOW2_DISKS["qcow2"], True),
    "qcow2-chain3": (QCOW2_DISKS["qcow2-chain3"], True),
}
KEEPING = sorted(name for name, (_, keeps) in PAUSE_CASES.items() if keeps)


def test_every_disk_type_has_a_pause_case():
    registered = {name for name in drivers.types() if not name.startswith("test-")}
    assert registered <= {case.split("-")[0] for case in PAUSE_CASES}


@pytest.mark.parametrize("case", sorted(PAUSE_CASES))
def test_a_flushed_write_survives_pause_and_unpause(make_tap, smtap_root, case):
    make_params, keeps = PAUSE_CASES[case]
    tap = make_tap(make_params(smtap_root, 8 * MiB))
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 0 1M", "-c", "flush", tap.uri)
    before = disk_sha256(tap.uri, smtap_root)
    for _ in range(2):
        tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
        assert "state=0x2a" in tap_ctl("list").stdout
        tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert disk_sha256(tap.uri, smtap_root) == before
    assert read_pattern(tap.uri, "0xa5" if keeps else "0", "1M")
    tap.destroy()
    check_images(smtap_root)


@pytest.mark.parametrize("case", KEEPING)
def test_fio_verify_across_pause_cycles(make_tap, smtap_root, case):
    size = 8 * MiB
    tap = make_tap(PAUSE_CASES[case][0](smtap_root, size))
    pauser = Pauser(tap)
    try:
        job = fio_verify(tap.uri, size)         # writes it all, then reads it all back
    finally:
        pauser.stop()
    assert not pauser.failure, pauser.failure
    assert job["read"]["io_bytes"] >= size and pauser.cycles >= 5, (job["read"], pauser.cycles)
    tap.destroy()
    check_images(smtap_root)


def test_a_refused_unpause_keeps_a_volatile_ram_disk(make_tap, smtap_root):
    tap = make_tap("ram:%s?size=%d" % (smtap_root / "v", 4 * MiB))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3e 0 64k", tap.uri)
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    proc = tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a",
                   "ram:%s?size=%d" % (smtap_root / "w", 2 * MiB), check=False)   # smaller
    assert proc.returncode != 0 and "size" in proc.stderr
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert read_pattern(tap.uri, "0x3e")
    # unpause -a onto another disk of the same size: that one is served from then on
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a",
            "ram:%s?size=%d" % (smtap_root / "w", 4 * MiB))
    assert read_pattern(tap.uri, "0")
