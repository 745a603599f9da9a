"""The queued data path (tapdisk/ioqueue.py and the NBD loop): each request is answered
as its own I/O completes, the loop keeps receiving meanwhile, and the VBD says which I/O
back end it uses. A disk type of the test's own, served in this process, holds one
request's data back in a pipe until the test writes it."""
import os
import socket
import struct
import subprocess

import pytest

from smtap import settings
from smtap.tapdisk import driver as drv
from smtap.tapdisk import drivers, ioqueue, vbd as vbdmod
from smtap.tapdisk.drivers import qcow2 as qcow2drv

from lib.engine import (IO_BACKENDS, Raw, have_io_uring, image_file, nbd_loop_env, qemu_io,
                        tap_ctl)
from lib.fs import tmpfs
from lib.procs import run, wait_for
from lib.qcow2 import QCOW2_DISKS, check_images, qcow2_check, qcow2_chain
from lib.sizes import MiB

PIPES = {}


@drivers.register
class PipeDriver(drv.Driver):
    """Reads at offset 0 wait for the test's pipe (queued: io_uring polls it); any other
    read is answered at once, from memory (the offset's first byte, repeated)."""
    name = "test-pipe"
    can_queue = True

    def open(self, path, flags, options):
        self.size = MiB
        self.pipe = PIPES[path]

    def pread(self, length, offset):
        return bytes([(offset >> 12) & 0xff]) * length

    def queue_reads(self, io, requests):
        for length, offset, view, address, op in requests:
            if offset == 0:
                io.read(self.pipe, 0, length, address, op, True)
            else:
                view[:] = self.pread(length, offset)

    def queue_writes(self, io, requests):
        raise OSError(30, "read-only")


@pytest.fixture
def served_pipe(smtap_root, monkeypatch):
    if not have_io_uring():
        pytest.skip("io_uring reads pipes asynchronously; libaio cannot")
    monkeypatch.setenv("SMTAP_IO", "io_uring")
    r, w = os.pipe()
    PIPES["p"] = r
    vbd = vbdmod.VBD(0, settings.runtime_dir())
    vbd.open("test-pipe:p", drv.OPEN_RDONLY)
    yield vbd, w
    os.set_blocking(w, False)
    try:
        os.write(w, bytes(65536))   # whatever still waits for it
    except BlockingIOError:
        pass
    vbd.close(force=True)
    os.close(r)
    os.close(w)


def answer(client):
    err, handle, _ = client.simple_reply()
    return err, handle, client.recv(4096) if not err else b""


def test_a_reply_goes_out_when_its_own_data_is_there(served_pipe):
    vbd, pipe = served_pipe
    c = Raw(vbd.nbd_path)
    c.greet()
    c.go()
    # A waits for the pipe; B, sent with it in one go, is answered first
    c.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096)
                + struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 4096, 4096))
    assert answer(c) == (0, 2, b"\x01" * 4096)
    assert wait_for(lambda: vbd.stats()["reqs_outstanding"] == 1)    # A, in flight
    # and a request sent while A is in flight is received and answered meanwhile
    c.request(0, 3, 2 * 4096, 4096)
    assert answer(c) == (0, 3, b"\x02" * 4096)
    c.s.settimeout(0.3)
    with pytest.raises(socket.timeout):
        c.recv(1)                                        # A: nothing yet
    c.s.settimeout(10)
    os.write(pipe, b"\x5a" * 4096)
    assert answer(c) == (0, 1, b"\x5a" * 4096)
    # the count drops once the loop is past its send: the client may read the answer first
    assert wait_for(lambda: vbd.stats()["reqs_outstanding"] == 0)
    c.close()


@pytest.mark.parametrize("forced", [None] + IO_BACKENDS)
def test_the_back_end_is_chosen_at_open_and_shown_in_stats(make_tap, smtap_root, monkeypatch,
                                                           forced):
    if forced:
        monkeypatch.setenv("SMTAP_IO", forced)
    else:
        monkeypatch.delenv("SMTAP_IO", raising=False)
    if forced == "io_uring" and not have_io_uring():
        pytest.skip("no io_uring here")
    img = image_file(smtap_root / "d.img", 4 * MiB, b"\x33")
    tap = make_tap("aio:" + img)
    expected = forced or ("io_uring" if have_io_uring() else "libaio")
    stats = tap_ctl("stats", "-p", tap.pid, "-m", tap.minor).stdout
    assert '"io": "%s"' % expected in stats
    run("qemu-io", "-f", "raw", "-c", "read -P 0x33 0 1M", "-c", "write -P 0x44 1M 1M",
        "-c", "read -P 0x44 1M 1M", tap.uri)


def test_an_unknown_back_end_is_refused_at_open(smtap_root, monkeypatch):
    monkeypatch.setenv("SMTAP_IO", "posix")
    img = image_file(smtap_root / "d.img", MiB)
    out = tap_ctl("create", "-a", "aio:" + img, check=False)
    assert out.returncode != 0 and "SMTAP_IO=posix" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_pool_buffers_are_aligned_and_reused():
    pool = ioqueue.Pool()
    a = pool.get(4096)
    b = pool.get(3000)
    assert a[1] % 4096 == 0 and b[1] % 4096 == 0 and len(a[0]) == len(b[0]) == 4096
    big = pool.get(MiB + 1)
    assert len(big[0]) == 2 * MiB and big[1] % 4096 == 0
    pool.put(a)
    assert pool.get(100) is a


@pytest.mark.parametrize("backend", IO_BACKENDS)
def test_page_cache_writes_on_a_full_file_system_answer_enospc(serve, smtap_root, monkeypatch,
                                                              backend):
    """aio -D writes into the page cache in the turn (pwrite): on a full file system the
    write is answered ENOSPC (not a dead tapdisk, nor a write acknowledged and lost), what
    was written before stays, and writes succeed again once there is room."""
    if backend == "io_uring" and not have_io_uring():
        pytest.skip("this kernel has no io_uring for this process")
    monkeypatch.setenv("SMTAP_IO", backend)
    shm = tmpfs(smtap_root / "shm", 6 * MiB)
    path = shm / "disk.img"
    os.truncate(image_file(path, 0), 16 * MiB)
    s = serve("aio:%s" % path, "-D")
    qemu_io(s.uri, "write -P 0x61 0 1M")
    out = qemu_io(s.uri, "write -P 0x62 4M 8M", check=False).output      # past the tmpfs
    assert "No space left on device" in out
    assert s.proc.poll() is None                                          # still serving
    qemu_io(s.uri, "read -P 0x61 0 1M")
    qemu_io(s.uri, "discard 4M 8M")
    qemu_io(s.uri, "write -P 0x63 4M 1M", "read -P 0x63 4M 1M")           # room again


@pytest.mark.parametrize("disk,backend", [(d, b) for d in sorted(QCOW2_DISKS) for b in IO_BACKENDS])
def test_qcow2_reads_and_in_place_writes_take_the_queue(smtap_root, monkeypatch, disk, backend):
    """A qcow2 image (and a chain of two over a raw base) on the queued path: reads and
    writes into allocated clusters give their I/O to the connection's queue, the
    synchronous preadv is not used; allocating writes, zeroes and trims (frees while
    reads may be in flight) keep the data right and the images clean."""
    if backend == "io_uring" and not have_io_uring():
        pytest.skip("no io_uring here")
    monkeypatch.setenv("SMTAP_IO", backend)
    monkeypatch.setenv(*nbd_loop_env("python"))     # the driver's path, not the C loop's
    qcls = qcow2drv.Qcow2Driver
    seen = {"read": 0, "write": 0, "sync_reads": 0}

    def counting(kind, fn):
        def wrapper(self, io, requests):
            fn(self, io, requests)
            seen[kind] += sum(1 for r in requests if r[4].pending)    # I/O queued for it
        return wrapper

    def sync_preadv(self, requests, _orig=qcls.preadv):
        seen["sync_reads"] += 1
        return _orig(self, requests)

    monkeypatch.setattr(qcls, "queue_reads", counting("read", qcls.queue_reads))
    monkeypatch.setattr(qcls, "queue_writes", counting("write", qcls.queue_writes))
    params = QCOW2_DISKS[disk](smtap_root, 8 * MiB)
    vbd = vbdmod.VBD(0, settings.runtime_dir())
    vbd.open(params, 0)
    try:
        assert vbd.chain.queued
        uri = "nbd+unix:///?socket=%s" % vbd.nbd_path
        qemu_io(uri, "write -P 0x41 0 2M", "write -z 2M 64k", "discard 3M 1M")  # allocating
        monkeypatch.setattr(qcls, "preadv", sync_preadv)
        qemu_io(uri, "write -P 0x42 64k 128k", "write -P 0x43 1M 4k",            # in place
                "read -P 0x41 0 64k", "read -P 0x42 64k 128k", "read -P 0x41 192k 832k",
                "read -P 0x43 1M 4k", "read -P 0 2M 64k", "read -P 0 3M 1M")
        assert seen["write"] >= 2 and seen["read"] >= 4 and seen["sync_reads"] == 0
        # frees (discard) while the other connection's reads are queued
        qemu_io(uri, "aio_read -P 0x41 256k 64k", "discard 512k 64k", "aio_flush",
                "read -P 0 512k 64k", "write -P 0x44 5M 1M", "read -P 0x44 5M 1M")
    finally:
        vbd.close(force=True)
    check_images(smtap_root)


def test_a_qcow2_free_waits_for_the_queued_requests_in_flight(smtap_root):
    """A cluster trimmed while a queued read of it is still in flight (another
    connection's) stays allocated until that read completed: no allocation reuses it
    meanwhile; the next flush after that frees it."""
    path = qcow2_chain(smtap_root, 4 * MiB, 1)
    d = qcow2drv.Qcow2Driver()
    d.open(path, 0, {})
    try:
        d.pwrite(b"\x55" * 65536, 0)
        host = d._host_of(0) >> d.bits
        op = ioqueue.Op()
        op.pending = 1                          # its I/O on some connection's queue
        d._leave(d._enter(), [(65536, 0, None, 0, op)])
        d.trim(65536, 0)
        assert d.extents(65536, 0) == [(65536, drv.EXTENT_HOLE | drv.EXTENT_ZERO)]
        assert d.img.refcount(host) == 1        # not reusable yet
        d.pwrite(b"\x66" * 65536, MiB)
        assert d._host_of(MiB) >> d.bits != host
        op.pending = 0                          # completed: freed at the next flush
        d.flush()
        assert d.img.refcount(host) == 0
        assert d.pread(65536, MiB) == b"\x66" * 65536
    finally:
        d.close()
    qcow2_check(path)


@pytest.mark.timeout(300)
def test_qcow2_frees_racing_queued_reads_past_the_l2_cache_never_hang(make_tap, smtap_root):
    """A disk whose L2 tables do not all fit the driver's cache (4 KiB clusters: 2048
    tables of 2 MiB for a cache of 1024), three connections at once: random reads over
    all of it (queued, loading tables), writes and trims in its first 8 MiB (each trim of
    a written cluster frees it). A free must never wait for a reader that waits for the
    image: the jobs end (a hang is the timeout here), the image checks clean."""
    path = smtap_root / "wide.qcow2"
    size = 4096 * MiB
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, size)
    cmds = []
    for off in range(0, size, 2 * MiB):            # one cluster in each table
        cmds += ["-c", "write -P 0x5a %d 4k" % off]
    for i in range(0, len(cmds), 512):
        run("qemu-io", "-f", "qcow2", *(cmds[i:i + 512] + [str(path)]))
    tap = make_tap("qcow2:%s" % path)
    common = ["--ioengine=nbd", "--uri=" + tap.uri, "--bs=4k", "--time_based", "--runtime=8",
              "--randrepeat=0"]
    jobs = [["--name=reads", "--rw=randread", "--size=%d" % size, "--iodepth=16"],
            ["--name=writes", "--rw=randwrite", "--size=8M", "--iodepth=8"],
            ["--name=trims", "--rw=randtrim", "--size=8M", "--iodepth=8"]]
    args = ["fio", "--output-format=terse"] + common
    for job in jobs:
        args += job
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the tapdisk hung: a free waited for queued readers waiting for it")
    assert out.returncode == 0, out.stderr[-2000:]
    tap.destroy()
    qcow2_check(path)


@pytest.mark.parametrize("disk", sorted(QCOW2_DISKS))
def test_qcow2_allocating_and_copy_on_write_writes_take_the_queue(smtap_root, monkeypatch, disk):
    """First writes to clusters (zeros around them, or the parents' data copied: a chain
    of two over a raw base) go on the queue, none on the synchronous path, even two
    connections writing the blocks of the same new clusters at once, in random order
    (each 4 KiB its own, many in flight): every block reads back as written, the rest
    of each cluster as it was, and the images check clean."""
    import random
    qcls = qcow2drv.Qcow2Driver
    sync = []
    monkeypatch.setattr(qcls, "_pwritev_slow", lambda self, requests: sync.append(requests))
    monkeypatch.setattr(qcls, "_plan_write", lambda self, requests: sync.append(requests))
    stacked = []        # a new cluster's content taken from one still in flight

    def content(self, g, v, _orig=qcls._content):
        stacked.append(g)
        return _orig(self, g, v)

    monkeypatch.setattr(qcls, "_content", content)
    size = 8 * MiB
    params = QCOW2_DISKS[disk](smtap_root, size)
    vbd = vbdmod.VBD(0, settings.runtime_dir())
    vbd.open(params, 0)
    try:
        uri = "nbd+unix:///?socket=%s" % vbd.nbd_path
        before = smtap_root / "before.raw"
        run("nbdcopy", uri, str(before))
        model = bytearray(before.read_bytes())
        rng = random.Random(13)
        region = range(MiB, 3 * MiB, 4096)        # 32 clusters, every block written once
        blocks = list(region)
        rng.shuffle(blocks)
        scripts = [[], []]
        for i, off in enumerate(blocks):
            pattern = 0x20 + (off >> 12) % 200
            model[off:off + 4096] = bytes([pattern]) * 4096
            scripts[(off >> 12) & 1] += ["-c", "aio_write -P %#x %d 4k" % (pattern, off)]
        for off in (5 * MiB + 512, 6 * MiB - 1000):              # unaligned, across clusters
            model[off:off + 3000] = b"\x7e" * 3000
            scripts[0] += ["-c", "aio_write -P 0x7e %d 3000" % off]
        procs = [subprocess.Popen(["qemu-io", "-f", "raw"] + s + ["-c", "aio_flush", uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for s in scripts]
        for p in procs:
            out = p.communicate(timeout=120)[0]
            assert p.returncode == 0 and "error" not in out.lower(), out[-2000:]
        after = smtap_root / "after.raw"
        run("nbdcopy", uri, str(after))
        got = after.read_bytes()
        bad = [off for off in range(0, size, 4096) if got[off:off + 4096] != model[off:off + 4096]]
        assert not bad, [hex(b) for b in bad[:16]]
        assert not sync, "allocating writes took the synchronous path"
        # copied from the parents: writes to a cluster in flight stack; zeros past the
        # end of the file are linked at once (the writes to it are then in place)
        assert bool(stacked) == (disk != "qcow2")
        assert not vbd.chain.leaf._pending     # every allocation linked
    finally:
        vbd.close(force=True)
    check_images(smtap_root)
