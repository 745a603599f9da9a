"""The NBD loop's C part (tapdisk/smtap_nbd.c) on every kind of image it places
(Driver.c_image): a VHD's full blocks and its parents' through the block map, a RAM
disk's mapping; what it must leave to the drivers (allocation, partial blocks, the RAM
budget, a writeback's flush) still answered right. `served_c` in tap-ctl stats tells
which side answered."""
import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import threading
import time

import pytest

from smtap.tapdisk import aiofile, control
from smtap.tapdisk import driver as drv
from smtap.tapdisk import native

from lib.engine import Raw, image_file, qemu_io, tmpfs
from lib.procs import run, wait_for
from lib.sizes import KiB, MiB
from lib.vhd import vhd_check, vhd_util, vhd_util_here


def _served_c(tap):
    client = control.Client(tap.pid)
    assert wait_for(lambda: client.stats(tap.minor)["nbd"]["clients"] == 0)
    return client.stats(tap.minor)["nbd"]["served_c"]


def _io(tap, *cmds):
    """qemu-io cmds on one connection; returns how many requests C answered. A
    connection's first request is Python's (it takes the chain: C's from the next on),
    and qemu-io flushes as it closes (C's where the image's flush is fdatasync)."""
    before = _served_c(tap)
    qemu_io(tap.uri, *cmds)
    return _served_c(tap) - before


def _vhd(path, size_mib, writes=(), parent=None, raw_parent=False):
    from smtap.formats import vhd as V
    if parent:
        vhd_util("snapshot", "-n", path, "-p", parent, *(["-m"] if raw_parent else []),
                 check=0)
    else:
        vhd_util("create", "-n", path, "-s", size_mib, check=0)
    with V.VHD(str(path), writable=True) as img:
        for data, offset in writes:
            img.write(data, offset)
    return str(path)


@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
def test_vhd_full_blocks_are_served_in_c_the_rest_by_the_driver(make_tap, smtap_root,
                                                               direct):
    """Full blocks (written whole, or filled up by the driver) read and write in C; an
    unallocated block of a base image reads zeros in C; a partial block once the driver
    has its bitmap reads in C (its sectors here, or zeros: a read across both in pieces)
    and writes in C where its sectors are all present; a write that sets bits or
    allocates goes to the driver. Every byte reads back right, qemu-img agrees."""
    path = _vhd(smtap_root / "d.vhd", 8, [(b"\1" * (2 * MiB), 0),       # block 0: full
                                          (b"\2" * 4096, 5 * MiB)])     # block 2: partial
    tap = make_tap("vhd:" + path, flags=0 if direct else drv.OPEN_NO_O_DIRECT)
    assert _io(tap, "read -P 1 0 4k", "read -P 1 64k 64k", "read -P 1 1M 1M",
               "read -P 0 7M 4k",                                       # block 3: absent
               "write -P 3 4k 4k", "read -P 3 4k 4k") == 6
    # the driver's: a partial block's first read (its bitmap), a write setting its bits,
    # allocation (a new block); C's: the absent sectors of the partial block, the flush
    assert _io(tap, "read -P 1 0 4k", "read -P 2 5M 4k", "read -P 0 4M 4k",
               "write -P 4 4M 4k", "write -P 5 2M 2M") == 2
    # block 1 was written whole by the driver: C's now; block 2 stays partial, its
    # present sectors read and rewritten in C, a read across present and absent too
    assert _io(tap, "read -P 1 0 4k", "read -P 5 2M 4k", "read -P 5 3M 1M",
               "write -P 6 3M 4k", "read -P 6 3M 4k", "read -P 4 4M 4k",
               "write -P 8 5M 4k", "read -P 8 5M 4k", "read -P 0 5124k 4k") == 9
    assert _io(tap, "read -P 1 0 4k", "read -P 4 4M 4k", "read 4M 8k") == 3
    # a read spanning blocks 0 and 1 (both full, not adjacent in the file): two I/Os in
    # C; a write there is the driver's
    assert _io(tap, "read -P 1 0 4k", "read -P 1 2044k 4k", "read 2044k 8k",
               "write -P 9 2044k 8k", "read -P 9 2044k 8k") == 4
    tap.destroy()
    vhd_check(path)
    ref = bytearray(8 * MiB)
    for data, offset in ((b"\1" * (2 * MiB), 0), (b"\2" * 4096, 5 * MiB),
                         (b"\3" * 4096, 4096), (b"\4" * 4096, 4 * MiB),
                         (b"\5" * (2 * MiB), 2 * MiB), (b"\6" * 4096, 3 * MiB),
                         (b"\10" * 4096, 5 * MiB), (b"\11" * 8192, 2044 * KiB)):
        ref[offset:offset + len(data)] = data
    (smtap_root / "ref.img").write_bytes(bytes(ref))
    run("qemu-img", "compare", "-f", "vpc", "-F", "raw", path, smtap_root / "ref.img")


@pytest.mark.parametrize("base", ["vhd", "raw"])
def test_vhd_chain_reads_each_image_in_c_and_writes_the_leaf(make_tap, smtap_root, base):
    """Through a chain (a VHD or raw base, a VHD between, the leaf): a block in the base
    reads from the base, one in the middle from the middle image, one only the leaf
    holds from the leaf, all in C; a write to a block the leaf does not hold is the
    driver's (it allocates), and then that block is the leaf's."""
    mid = str(smtap_root / "mid.vhd")
    if base == "raw":
        root = image_file(smtap_root / "base.img", 8 * MiB)
        with open(root, "r+b") as f:
            f.write(b"\1" * (2 * MiB))
        vhd_util("snapshot", "-n", mid, "-p", root, "-m", check=0)
    else:
        root = _vhd(smtap_root / "base.vhd", 8, [(b"\1" * (2 * MiB), 0)])
        vhd_util("snapshot", "-n", mid, "-p", root, check=0)
    from smtap.formats import vhd as V
    with V.VHD(mid, writable=True) as img:
        img.write(b"\2" * (2 * MiB), 2 * MiB)
    leaf = _vhd(smtap_root / "leaf.vhd", 8, [(b"\3" * (2 * MiB), 4 * MiB)], parent=mid)
    tap = make_tap("vhd:" + leaf)
    assert _io(tap, "read -P 1 0 4k", "read -P 1 1M 1M", "read -P 2 2M 64k",
               "read -P 3 5M 4k", "read -P 0 6M 1M") == 5
    assert _io(tap, "read -P 1 0 4k", "write -P 7 8k 4k") == 1     # allocates in the leaf
    # block 0 is the leaf's now, partial (its bitmap, known since the write): the new
    # sectors read from the leaf, those around from the base, and across both, in C
    assert _io(tap, "read -P 1 0 4k", "read -P 7 8k 4k", "read -P 1 12k 4k",
               "read -P 2 3M 4k", "read 4k 12k") == 5
    tap.destroy()
    vhd_check(leaf)


def _raw_base(root):
    """An 8 MiB raw file of 0x01 bytes, a chain's base."""
    path = image_file(root / "base.img", 8 * MiB)
    with open(path, "r+b") as f:
        f.write(b"\1" * (8 * MiB))
    return path


def _place(present, sector):
    """Which layer holds a sector (present: the sectors of each above the base)."""
    for layer in range(len(present) - 1, -1, -1):
        if sector in present[layer]:
            return layer
    return -1


@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
def test_vhd_sector_bitmaps_read_in_c_at_any_sector(make_tap, smtap_root, direct):
    """Partial blocks whose bitmaps have runs of every length at every sector alignment
    (a leaf over a middle image over a full base): random reads of 512-byte multiples,
    within a block and across blocks, pipelined and one at a time, equal the reference
    byte for byte; once the driver has read the bitmaps (the pipelined reads), C
    answers every read aligned as O_DIRECT wants, however many places it spans."""
    import random
    rng = random.Random(7)
    size = 8 * MiB
    ref = bytearray(b"\x11" * size)
    base = _vhd(smtap_root / "base.vhd", 8, [(bytes(ref), 0)])
    present = []                                        # per layer, leaf last: sectors
    parent = base
    for name, byte in (("mid.vhd", 0x22), ("leaf.vhd", 0x33)):
        writes, sectors = [], set()
        for i in range(60):
            start = rng.randrange(0, 3 * MiB // 512) * 512     # blocks 0-1, not 2-3
            n = rng.choice([1, 2, 3, 7, 8, 9, 16, 63, 200]) * 512
            data = bytes([byte + i % 8]) * n
            writes.append((data, start))
            ref[start:start + n] = data
            sectors.update(range(start // 512, (start + n) // 512))
        parent = _vhd(smtap_root / name, 8, writes, parent=parent)
        present.append(sectors)

    def in_c(offset, length):
        return not (offset | length) & tap_mask

    def reads(n):
        out = []
        for _ in range(n):
            unit = 4096 if direct and rng.random() < 0.7 else 512
            length = rng.choice([1, 2, 8, 16]) * unit
            out.append((rng.randrange(0, (4 * MiB - length) // unit) * unit, length))
        return out

    tap = make_tap("vhd:" + parent, flags=0 if direct else drv.OPEN_NO_O_DIRECT)
    tap_mask = 0                                        # O_DIRECT's alignment
    if direct:
        f = aiofile.AioFile(parent, writable=False)
        tap_mask = f.mask
        f.close()
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    pipelined = reads(2000)
    for batch in range(0, len(pipelined), 16):          # 16 in flight
        part = pipelined[batch:batch + 16]
        for handle, (offset, length) in enumerate(part, batch):
            c.request(0, handle, offset, length)
        for _ in part:                                  # replies in any order
            err, handle, _ = c.simple_reply()
            offset, length = pipelined[handle]
            assert err == 0 and c.recv(length) == bytes(ref[offset:offset + length]), \
                (offset, length)
    client = control.Client(tap.pid)
    before = client.stats(tap.minor)["nbd"]["served_c"]
    one_by_one = reads(1000)
    for handle, (offset, length) in enumerate(one_by_one):
        c.request(0, handle, offset, length)
        err, got, _ = c.simple_reply()
        assert (err, got) == (0, handle) and c.recv(length) == bytes(ref[offset:offset + length])
    served = client.stats(tap.minor)["nbd"]["served_c"] - before
    c.close()
    want = sum(1 for offset, length in one_by_one if in_c(offset, length))
    assert want > len(one_by_one) // 4
    assert served == want, (served, want)
    spread = sum(1 for offset, length in one_by_one       # reads of several places
                 if len(set(_place(present, n) for n in range(offset // 512,
                                                              (offset + length) // 512))) > 1)
    assert spread > len(one_by_one) // 20, spread


def test_a_read_in_pieces_whose_piece_fails_is_redone_by_the_driver(make_tap, smtap_root):
    """A read C puts together from the leaf and a raw base that was cut short under the
    tapdisk: the piece past the base's new end comes back short, the whole request is
    handed back once every piece completed, and the engine's own path answers it, as it
    does a short read of a chain's image (EIO, the request counted failed); C serves
    on."""
    root = _raw_base(smtap_root)
    leaf = _vhd(smtap_root / "leaf.vhd", 8, [(b"\7" * 4096, 8192)], parent=root,
                raw_parent=True)
    tap = make_tap("vhd:" + leaf)
    assert _io(tap, "read -P 1 0 4k", "read -P 7 8k 4k", "read 0 64k") == 3   # (+ flush)
    os.truncate(root, 16 * KiB)
    before = _served_c(tap)
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    c.request(0, 1, 0, 4096)                            # (Python's: the first)
    assert c.simple_reply(4096) == (0, 1, b"\1" * 4096)
    c.request(0, 2, 0, 64 * KiB)
    assert c.simple_reply(64 * KiB) == (errno.EIO, 2, b"")
    c.request(0, 3, 8192, 4096)
    assert c.simple_reply(4096) == (0, 3, b"\7" * 4096)
    c.close()
    assert _served_c(tap) - before == 1                 # the last one; the cut one: not C's
    assert control.Client(tap.pid).stats(tap.minor)["images"][0]["fail"] == [1, 0]


def test_reads_of_many_pieces_fill_the_turn_and_a_write_behind_them_waits(make_tap,
                                                                          smtap_root):
    """16 reads of 64 pieces each (a leaf's every other 4 KiB over a raw base) fill C's
    I/Os of a turn to the last one; a write sent behind them in the same packet waits
    for the next turn instead of overrunning it: all 17 answered, in C, data right."""
    leaf = _vhd(smtap_root / "leaf.vhd", 8,
                [(b"\7" * 4096, off) for off in range(0, 2 * MiB, 8 * KiB)],
                parent=_raw_base(smtap_root), raw_parent=True)
    tap = make_tap("vhd:" + leaf)
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    c.request(0, 99, 0, 4096)                           # Python's: the bitmap is known
    assert c.simple_reply(4096) == (0, 99, b"\7" * 4096)
    before = control.Client(tap.pid).stats(tap.minor)["nbd"]["served_c"]
    c.s.sendall(b"".join(_req(0, h, 0, 256 * KiB) for h in range(16))
                + _req(1, 16, 0, 4096, b"\11" * 4096))
    old = (b"\7" * 4096 + b"\1" * 4096) * 32
    new = b"\11" * 4096 + old[4096:]
    got = {}
    for _ in range(17):
        err, handle, _ = c.simple_reply()
        assert err == 0
        got[handle] = c.recv(256 * KiB) if handle < 16 else b""
    assert sorted(got) == list(range(17))
    assert all(got[h] in (old, new) for h in range(16))
    c.request(0, 17, 0, 8192)
    assert c.simple_reply(8192) == (0, 17, b"\11" * 4096 + b"\1" * 4096)
    c.close()
    assert control.Client(tap.pid).stats(tap.minor)["nbd"]["served_c"] - before == 18


@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
def test_big_writes_arriving_in_pieces_are_written_whole(make_tap, smtap_root, direct):
    """Pipelined 1 MiB writes, each followed by a 4 KiB read (of a region none writes:
    requests in flight together are not ordered), sent in pieces of 100 KiB that end
    anywhere in a header or a payload, into a buffer that can hold several: every reply
    is right and in C, and the disk holds every write."""
    img = image_file(smtap_root / "d.img", 24 * MiB)
    tap = make_tap("aio:" + img, flags=0 if direct else drv.OPEN_NO_O_DIRECT)
    c = Raw(tap.nbd_path, timeout=30)
    c.greet()
    c.go()
    # a connection's first request is Python's; 4 MiB, it grows the buffer to hold it
    c.request(1, 99, 16 * MiB, 4 * MiB, payload=b"\x5a" * (4 * MiB))
    assert c.simple_reply() == (0, 99, b"")
    before = control.Client(tap.pid).stats(tap.minor)["nbd"]["served_c"]
    stream = b"".join(_req(1, 2 * i, i * MiB, MiB, bytes([i + 1]) * MiB)
                      + _req(0, 2 * i + 1, 12 * MiB + i * 4096, 4096) for i in range(8))
    sender = threading.Thread(target=lambda: [
        (c.s.sendall(stream[k:k + 100 * KiB]), time.sleep(0.002))
        for k in range(0, len(stream), 100 * KiB)])
    sender.start()
    got = {}
    for _ in range(16):
        err, handle, _ = c.simple_reply()
        assert err == 0, handle
        got[handle] = c.recv(4096) if handle % 2 else b""
    sender.join()
    assert sorted(got) == list(range(16))
    assert all(got[2 * i + 1] == bytes(4096) for i in range(8))
    c.close()
    assert _served_c(tap) - before == 16
    qemu_io(tap.uri, *["read -P %d %d 1M" % (i + 1, i * MiB) for i in range(8)]
            + ["read -P 0 12M 4M", "read -P 0x5a 16M 4M"])


def test_structured_reads_of_zeros_are_hole_chunks(make_tap, smtap_root):
    """With structured replies, C answers a read of zeros only (an absent block of a
    base VHD, a zero run) with one OFFSET_HOLE chunk, no payload; DF asks for one data
    chunk of zeros, which it gets; a read of data, or of data and zeros, is one data
    chunk."""
    path = _vhd(smtap_root / "d.vhd", 8, [(b"\1" * (2 * MiB), 0)])
    tap = make_tap("vhd:" + path)
    before = _served_c(tap)
    c = Raw(tap.nbd_path)
    c.greet()
    c.structured()
    c.go()
    c.request(0, 1, 0, 4096)                            # (Python's: the first)
    assert c.chunk() == (1, 1, 1, struct.pack(">Q", 0) + b"\1" * 4096)
    c.request(0, 2, 4 * MiB, MiB)
    assert c.chunk() == (1, 2, 2, struct.pack(">QI", 4 * MiB, MiB))
    c.request(0, 3, 4 * MiB, 64 * KiB, flags=4)        # DF
    assert c.chunk() == (1, 1, 3, struct.pack(">Q", 4 * MiB) + bytes(64 * KiB))
    c.request(0, 4, 2 * MiB - 4096, 8192)               # data, then zeros
    assert c.chunk() == (1, 1, 4, struct.pack(">Q", 2 * MiB - 4096) + b"\1" * 4096
                         + bytes(4096))
    c.close()
    assert _served_c(tap) - before == 3
    assert qemu_io(tap.uri, "read -P 0 4M 1M", "read -P 1 1M 1M")


def test_ram_mapping_in_c_the_budget_and_new_chunks_by_the_driver(make_tap, smtap_root):
    """A RAM disk: reads anywhere and writes into chunks holding memory in C; a write
    needing a new chunk is the driver's, so the budget holds (ENOSPC past it)."""
    tap = make_tap("ram:%s?size=%d&budget=%d" % (smtap_root / "r", MiB, 128 * KiB))
    assert _io(tap, "read -P 0 0 4k", "read -P 0 512k 64k", "write -P 1 0 4k") == 2
    assert _io(tap, "read -P 1 0 4k", "write -P 2 8k 4k", "read -P 2 8k 4k",
               "read -P 1 0 4k", "write -P 3 64k 64k", "read -P 3 64k 64k") == 5
    out = qemu_io(tap.uri, "write -P 4 128k 4k", check=False).output
    assert "No space left on device" in out, out
    assert _io(tap, "read -P 1 0 4k", "read -P 3 64k 4k", "read -P 0 128k 4k",
               "write -P 5 60k 8k", "read -P 5 60k 8k") == 5
    assert control.Client(tap.pid).stats(tap.minor)["images"][0]["fail"] == [0, 1]


def test_ram_writeback_flushes_stay_with_the_driver(make_tap, smtap_root):
    """writeback=1: C's writes (without FUA: qemu-io's carry it) mark their chunks, and
    the flush (Python's) writes back everything written before it, C's included."""
    seed = image_file(smtap_root / "seed.img", MiB)
    tap = make_tap("ram:%s?writeback=1" % seed)
    qemu_io(tap.uri, "write -P 1 0 64k")                # the driver's: new chunk
    before = _served_c(tap)
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    for handle, (offset, byte) in enumerate(((4096, 2), (32768, 3), (8192, 4))):
        c.request(1, handle, offset, 4096, payload=bytes([byte]) * 4096)
        assert c.simple_reply()[:2] == (0, handle)
    c.request(3, 9, 0, 0)                               # flush: the writeback
    assert c.simple_reply()[:2] == (0, 9)
    with open(seed, "rb") as f:
        data = f.read(64 * KiB)
    c.close()
    assert _served_c(tap) - before == 2                 # (the first is Python's)
    assert data[:4096] == b"\1" * 4096 and data[4096:8192] == b"\2" * 4096
    assert data[8192:12288] == b"\4" * 4096 and data[32768:36864] == b"\3" * 4096


class _NoFile(object):
    mask, fd, direct = 511, -1, False


def test_guard_wait_moves_the_epoch_and_waits_for_the_old_parity_only():
    m = native.BlockMap(_NoFile(), 1 << 28, 16, max_pages=1, guard=True)
    g = m.guard
    g[1] = 1                    # a C request counted under epoch 0, in flight
    g[2] = 5                    # ... and requests of the other parity: not waited for
    done = threading.Event()
    t = threading.Thread(target=lambda: (native.guard_wait(g), done.set()))
    t.start()
    time.sleep(0.2)
    assert not done.is_set() and g[0] == 1              # waiting, the epoch moved on
    g[1] = 0                                            # its I/O completed
    t.join(5)
    assert done.is_set()
    g[2] = 0
    native.guard_wait(g)                                # nothing of parity 1: at once
    assert g[0] == 2


# -- qcow2: the L2 entries mirrored ------------------------------------------------------
def _qcow2(path, size, backing=None, fmt="qcow2"):
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", fmt]
    run(*(args + [path, str(size)]))
    return str(path)


def test_qcow2_clusters_in_c_allocation_and_zeros_by_the_driver(make_tap, smtap_root):
    """Allocated clusters of refcount 1 read and write in C, a hole reads the backing
    file's data in C, a zero cluster reads zeros in C; the first write that allocates
    is the driver's (it reserves clusters for C: the next ones are C's, a zero
    cluster's too), as are flushes (its refcounts, its deferred frees: qemu-io's at
    close); after a trim the cluster reads zeros."""
    base = _raw_base(smtap_root)
    leaf = _qcow2(smtap_root / "leaf.qcow2", 8 * MiB, base, "raw")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", leaf)
    tap = make_tap("qcow2:" + leaf)
    assert _io(tap, "read -P 1 0 4k", "read -P 1 64k 64k", "read -P 2 1M 4k",
               "read -P 0 2M 4k", "write -P 3 1M 4k", "read -P 3 1M 4k") == 5
    assert _io(tap, "read -P 1 0 4k", "write -P 4 3M 4k", "write -P 5 2M 4k") == 1
    assert _io(tap, "read -P 1 0 4k", "read -P 4 3M 4k", "read -P 1 3149824 4k",
               "read -P 5 2M 4k", "write -P 6 3153920 4k") == 4
    # reads across the backing file's data, allocated and zero clusters: in C, in pieces
    assert _io(tap, "read -P 1 0 4k", "read 1020k 8k", "read 1984k 192k",
               "read 3M 16k") == 3
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    for handle, (offset, length, want) in enumerate((
            (1020 * KiB, 8 * KiB, b"\1" * 4096 + b"\3" * 4096),
            (1984 * KiB, 192 * KiB, b"\1" * 65536 + b"\5" * 4096 + bytes(61440)
             + b"\1" * 65536),
            (3 * MiB, 16 * KiB, b"\4" * 4096 + b"\1" * 4096 + b"\6" * 4096 + b"\1" * 4096))):
        c.request(0, handle, offset, length)
        assert c.simple_reply(length) == (0, handle, want)
    c.close()
    assert _io(tap, "read -P 1 0 4k", "discard 1M 64k", "read -P 0 1M 4k") == 1
    tap.destroy()
    run("qemu-img", "check", "-q", leaf)
    ref = bytearray(b"\1" * (8 * MiB))
    ref[MiB:MiB + 65536] = bytes(65536)
    ref[2 * MiB:2 * MiB + 65536] = bytes(65536)
    ref[2 * MiB:2 * MiB + 4096] = b"\5" * 4096
    ref[3 * MiB:3 * MiB + 4096] = b"\4" * 4096
    ref[3 * MiB + 8192:3 * MiB + 12288] = b"\6" * 4096
    (smtap_root / "ref.img").write_bytes(bytes(ref))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", leaf, smtap_root / "ref.img")


def test_qcow2_freed_clusters_are_reused_only_after_c_is_done_with_them(make_tap,
                                                                         smtap_root):
    """The flow the guard protects (the wait itself: the test above): while
    fio writes a region in C (clusters of refcount 1, in place), another client
    discards that region again and again and writes a second one, whose new clusters
    reuse the freed ones. No write of the first client lands in the second region's
    clusters: it reads back exactly, and qemu-img check is clean. (The race is narrow:
    this does not fail reliably without the guard.) Each round waits until C has
    written again since the last (fio's writes re-allocate the region in Python
    first): on a slow machine the rounds came faster than that."""
    leaf = _qcow2(smtap_root / "d.qcow2", 64 * MiB)
    tap = make_tap("qcow2:" + leaf)
    qemu_io(tap.uri, "write -P 7 0 16M")                # region A, allocated
    client = control.Client(tap.pid)
    fio = run_background_fio(tap.uri, 16 * MiB)
    try:
        rounds = 0
        while fio.poll() is None and rounds < 40:
            mark = _c_count(tap)
            assert wait_for(lambda: _c_count(tap) >= mark + 100 or fio.poll() is not None,
                            10, 0.005), "C wrote nothing for 10 s"
            if fio.poll() is not None:
                break
            byte = 0x10 + rounds % 32
            qemu_io(tap.uri, "discard 0 16M", "write -P %d 32M 4M" % byte,
                    "read -P %d 32M 4M" % byte, "discard 32M 4M")
            rounds += 1
    finally:
        fio.wait(120)
    assert fio.returncode == 0, fio.stderr.read() if fio.stderr else ""
    assert rounds >= 5
    qemu_io(tap.uri, "write -P 9 32M 4M")
    qemu_io(tap.uri, "read -P 9 32M 4M")
    stats = client.stats(tap.minor)
    assert stats["nbd"]["served_c"] > 1000, stats
    tap.destroy()
    run("qemu-img", "check", "-q", leaf)


def _c_count(tap):
    return control.Client(tap.pid).stats(tap.minor)["nbd"]["served_c"]


def _connect(tap):
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    return c


def _write(c, handle, offset, data, flags=0):
    c.request(1, handle, offset, len(data), flags, data)
    assert c.simple_reply() == (0, handle, b"")


def _read(c, handle, offset, length):
    c.request(0, handle, offset, length)
    err, got_handle, data = c.simple_reply(length)
    assert (err, got_handle) == (0, handle)
    return data


def _end_offset_is_file_size(path):
    info = json.loads(run("qemu-img", "check", "--output=json", path).stdout)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info
    assert info["image-end-offset"] == os.path.getsize(path), info


def test_qcow2_clusters_allocated_in_c_from_the_drivers_reserve(make_tap, smtap_root):
    """A write into a cluster the leaf lacks is C's once the driver reserved clusters
    for it (at its first allocating write): the cluster written whole, the backing
    file's data around the request's (or zeros, in a zero cluster), its L2 entry, then
    mapped, so reads and writes into it are C's at once (a FUA one too: the entry is in
    the file before its fdatasync). The flush is the driver's. After close: qemu-img
    check clean (no leak: the reserve left is given back, cut off the file) and the
    disk as written."""
    base = _raw_base(smtap_root)
    leaf = _qcow2(smtap_root / "leaf.qcow2", 8 * MiB, base, "raw")
    run("qemu-io", "-f", "qcow2", "-c", "write -z 2M 64k", leaf)     # a zero cluster
    model = bytearray(b"\1" * (8 * MiB))
    model[2 * MiB:2 * MiB + 65536] = bytes(65536)
    tap = make_tap("qcow2:" + leaf)
    c = _connect(tap)
    writes = [(3 * MiB, b"\3" * 4096),                 # the driver's: it reserves
              (4 * MiB, b"\4" * 4096),                 # C's from here on
              (5 * MiB + 8192, b"\5" * 4096),          # inside a cluster
              (6 * MiB, b"\6" * 65536),                # a whole cluster: nothing to read
              (2 * MiB + 4096, b"\7" * 4096),          # a zero cluster: zeros around
              (4 * MiB + 4096, b"\x08" * 4096)]        # in place, into C's new cluster
    before = _c_count(tap)
    for handle, (offset, data) in enumerate(writes):
        _write(c, handle, offset, data)
        model[offset:offset + len(data)] = data
    assert _c_count(tap) - before == len(writes) - 1
    for handle, offset in enumerate((4 * MiB, 5 * MiB, 2 * MiB, 6 * MiB)):
        assert _read(c, 10 + handle, offset, 65536) == model[offset:offset + 65536]
    assert _c_count(tap) - before == len(writes) + 3
    mark = _c_count(tap)
    _write(c, 20, 7 * MiB, b"\x09" * 4096, flags=1)    # FUA
    model[7 * MiB:7 * MiB + 4096] = b"\x09" * 4096
    assert _c_count(tap) == mark + 1
    c.request(3, 21, 0, 0)                              # flush: the driver's
    assert c.simple_reply() == (0, 21, b"")
    assert _c_count(tap) == mark + 1
    c.close()
    tap.destroy()
    _end_offset_is_file_size(leaf)
    (smtap_root / "ref.img").write_bytes(bytes(model))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", leaf, smtap_root / "ref.img")


def test_qcow2_c_allocates_in_a_table_a_write_zeroes_made(make_tap, smtap_root):
    """An L2 table the format makes outside the driver's allocations (write-zeroes
    over a fresh leaf: zero clusters) is one C links its allocations in too."""
    base = _raw_base(smtap_root)
    leaf = _qcow2(smtap_root / "leaf.qcow2", 8 * MiB, base, "raw")
    tap = make_tap("qcow2:" + leaf)
    c = _connect(tap)
    c.request(6, 0, MiB, 65536)                         # write zeroes: the table
    assert c.simple_reply() == (0, 0, b"")
    _write(c, 1, 3 * MiB, b"\3" * 4096)                # the driver's: it reserves
    mark = _c_count(tap)
    _write(c, 2, 5 * MiB, b"\5" * 4096)
    assert _c_count(tap) == mark + 1
    assert _read(c, 3, MiB, 4096) == bytes(4096)
    c.close()
    tap.destroy()
    _end_offset_is_file_size(leaf)
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0 1M 64k", "-c", "read -P 3 3M 4k",
        "-c", "read -P 5 5M 4k", "-c", "read -P 1 5636096 60k", leaf)


def test_qcow2_clusters_c_allocated_survive_a_kill_9_without_a_flush(make_tap, smtap_root):
    """What C acknowledged is in the file (the cluster, then its L2 entry, through the
    page cache) before the reply: a kill -9 right after, with no flush, loses none of
    it; the dirty bit's repair (qemu-img check -r) finds leaks at most (the reserve)."""
    base = _raw_base(smtap_root)
    leaf = _qcow2(smtap_root / "leaf.qcow2", 8 * MiB, base, "raw")
    model = bytearray(b"\1" * (8 * MiB))
    tap = make_tap("qcow2:" + leaf)
    c = _connect(tap)
    mark = _c_count(tap)
    for k in range(40):
        offset = k * 196 * KiB                          # clusters of their own, some C's
        data = bytes([0x20 + k]) * 4096
        _write(c, k, offset, data)
        model[offset:offset + 4096] = data
    assert _c_count(tap) - mark >= 30
    os.kill(tap.pid, signal.SIGKILL)
    c.close()
    assert wait_for(lambda: not os.path.exists("/proc/%d" % tap.pid) or
                    open("/proc/%d/stat" % tap.pid).read().split()[2] == "Z")
    run("qemu-img", "check", "-q", "-r", "all", leaf)
    run("qemu-img", "check", "-q", leaf)
    (smtap_root / "ref.img").write_bytes(bytes(model))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", leaf, smtap_root / "ref.img")


def test_qcow2_c_allocates_only_while_one_connection_serves_the_image(make_tap,
                                                                       smtap_root):
    """A second connection stops C's allocations (the driver's tables are then read by
    two threads): its join waits for those in flight, the first connection's
    allocating writes are the driver's while both are open, C's again once the second
    went; every write reads back on both."""
    leaf = _qcow2(smtap_root / "d.qcow2", 16 * MiB)
    tap = make_tap("qcow2:" + leaf)
    a = _connect(tap)
    _write(a, 0, 0, b"\1" * 4096)                      # the driver's: it reserves
    mark = _c_count(tap)
    _write(a, 1, MiB, b"\2" * 4096)
    assert _c_count(tap) == mark + 1
    b = _connect(tap)
    assert _read(b, 2, MiB, 4096) == b"\2" * 4096      # (the driver's: b's first)
    mark = _c_count(tap)
    for k in range(4):
        _write(a, 3 + k, (2 + k) * MiB, bytes([0x10 + k]) * 4096)
    assert _c_count(tap) == mark                        # two connections: the driver's
    for k in range(4):
        assert _read(b, 7 + k, (2 + k) * MiB, 4096) == bytes([0x10 + k]) * 4096
    b.close()
    assert wait_for(lambda: control.Client(tap.pid).stats(tap.minor)["nbd"]["clients"] == 1)
    mark = _c_count(tap)
    _write(a, 11, 8 * MiB, b"\3" * 4096)
    assert _c_count(tap) == mark + 1                    # alone again: C's
    a.close()
    tap.destroy()
    _end_offset_is_file_size(leaf)
    run("qemu-io", "-f", "qcow2", "-c", "read -P 1 0 4k", "-c", "read -P 2 1M 4k",
        "-c", "read -P 0x13 5M 4k", "-c", "read -P 3 8M 4k", "-c", "read -P 0 8200k 4k",
        leaf)


def test_qcow2_c_allocation_on_a_full_file_system_answers_enospc(make_tap, smtap_root):
    """C's allocating writes into reserved clusters (sparse: room is taken as they are
    written) on a full file system: the write that finds no room is redone by the
    driver and answered ENOSPC; the tapdisk serves on, every acknowledged write reads
    back, a discard makes room again, and the image is clean after close (the failed
    cluster went back to the reserve, the reserve back to the image)."""
    shm = tmpfs(smtap_root / "shm", 3 * MiB)
    leaf = _qcow2(shm / "d.qcow2", 16 * MiB)
    tap = make_tap("qcow2:" + leaf)
    c = _connect(tap)
    done, err = [], 0
    mark = _c_count(tap)
    for k in range(64):
        c.request(1, k, k * 65536, 65536, 0, bytes([k + 1]) * 65536)
        err = c.simple_reply()[0]
        if err:
            break
        done.append(k)
    assert err == errno.ENOSPC and len(done) > 8, (err, len(done))
    assert _c_count(tap) - mark >= len(done) - 1        # C's, but the first
    for k in done:
        assert _read(c, 100 + k, k * 65536, 65536) == bytes([k + 1]) * 65536
    c.request(4, 200, 0, 8 * 65536)                     # trim: room again
    assert c.simple_reply() == (0, 200, b"")
    _write(c, 201, len(done) * 65536, b"\xee" * 65536)
    assert _read(c, 202, len(done) * 65536, 65536) == b"\xee" * 65536
    c.close()
    tap.destroy()
    run("qemu-img", "check", "-q", leaf)


def run_background_fio(uri, size):
    """fio writing 4k blocks at random over [0, size) of uri for 4 s, QD16."""
    return subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=%d" % size, "--time_based", "--runtime=4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)


# -- a disk with a slow region: replies in completion order ------------------------------
SLOW = 2 * MiB      # [0, SLOW) of a slow disk answers DELAY seconds late, the rest at once
DELAY = 0.5
DMSETUP = "/usr/sbin/dmsetup"


@contextlib.contextmanager
def _dm_delay_disk(root, size):
    """A device-mapper device over a loop device: a `delay` target on [0, SLOW), linear
    (no delay) past it. Removed, and its loop device, even if the test fails."""
    if not os.path.exists(DMSETUP) or run("modprobe", "dm_delay", check=False).returncode:
        pytest.skip("no dm-delay target here (modprobe dm_delay failed)")
    backing = image_file(root / "dm.img", size)
    loop = run("losetup", "-f", "--show", backing).stdout.strip()
    name = "smtap-delay-%s" % os.path.basename(str(root))
    try:
        slow = SLOW // 512
        table = "0 %d delay %s 0 %d\n%d %d linear %s %d\n" % (
            slow, loop, int(DELAY * 1000), slow, size // 512 - slow, loop, slow)
        made = run(DMSETUP, "create", name, input=table, check=False)
        if made.returncode:
            pytest.skip("dmsetup create failed: %s" % made.stderr.strip())
        path = "/dev/mapper/" + name
        assert wait_for(lambda: os.path.exists(path))
        yield path
    finally:
        run(DMSETUP, "remove", "--retry", name, check=False)
        run("losetup", "-d", loop, check=False)


_SLOW_PLUGIN = """
import time
import nbdkit
API_VERSION = 2
SIZE, SLOW, DELAY = %d, %d, %r
disk = bytearray(SIZE)
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return 1
def get_size(h):
    return SIZE
def pread(h, buf, offset, flags):
    if offset < SLOW:
        time.sleep(DELAY)
    buf[:] = disk[offset:offset + len(buf)]
def pwrite(h, buf, offset, flags):
    if offset < SLOW:
        time.sleep(DELAY)
    disk[offset:offset + len(buf)] = buf
def flush(h, flags):
    pass
def can_multi_conn(h):
    return True
"""


@contextlib.contextmanager
def _fuse_delay_disk(root, size):
    """The same fault where device-mapper is missing: a file of an nbdfuse mount whose
    nbdkit (a Python plugin, parallel) sleeps DELAY in each request of [0, SLOW). It
    takes O_DIRECT; the kernel hands FUSE direct I/O over asynchronously. The plugin
    says multi-conn, so nbdfuse opens several connections and gives consecutive
    requests to different ones (round robin, libnbd 1.14's fuse/operations.c): on one
    connection, a request waited for the slow one before it (libnbd keeps the handle
    locked across its poll)."""
    for prog in ("nbdkit", "nbdfuse", "fusermount3"):
        if run("which", prog, check=False).returncode:
            pytest.skip("no %s here" % prog)
    plugin, sock, mnt = root / "slow.py", str(root / "slow.sock"), root / "fuse"
    plugin.write_text(_SLOW_PLUGIN % (size, SLOW, DELAY))
    mnt.mkdir()
    procs = []
    try:
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", sock, "python", str(plugin)],
                                      stderr=subprocess.DEVNULL))
        if not wait_for(lambda: os.path.exists(sock)):
            pytest.skip("nbdkit's python plugin did not start")
        path = str(mnt / "disk")
        procs.append(subprocess.Popen(["nbdfuse", "-C", "4", path, "--unix", sock],
                                      stderr=subprocess.DEVNULL))
        assert wait_for(lambda: os.path.exists(path)), "nbdfuse did not mount"
        yield path
    finally:
        run("fusermount3", "-u", mnt, check=False)
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(params=["dm-delay", "fuse"])
def slow_disk(request, smtap_root):
    """An 8 MiB disk (a path) whose [0, SLOW) answers DELAY seconds late (reads and
    writes), the rest at once: a device-mapper delay target, or an nbdfuse file."""
    with (_dm_delay_disk if request.param == "dm-delay" else _fuse_delay_disk)(
            smtap_root, 8 * MiB) as path:
        yield path


def _req(typ, handle, offset, length, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, 0, typ, handle, offset, length) + payload


def _replies(c, n, t0, datalen=0):
    """The next n simple replies as (handle, error, data, seconds since t0)."""
    out = []
    for _ in range(n):
        err, handle, data = c.simple_reply(datalen)
        out.append((handle, err, data, time.monotonic() - t0))
    return out


def test_each_request_is_answered_when_its_own_io_completes(slow_disk, make_tap,
                                                            io_backend, nbd_loop):
    """O_DIRECT on a disk with a slow region: a read there, then one in the fast region,
    pipelined on one connection (in one send: one batch of the loop's), the fast one's
    reply comes first, before the slow one's I/O completed, the slow one's after the
    delay; the same for two writes. C answered all four (served_c) or, with C off,
    Python's loop did; the data is right."""
    tap = make_tap("aio:" + slow_disk)
    qemu_io(tap.uri, "write -P 1 0 64k", "write -P 2 4M 64k")
    before = _served_c(tap)
    c = Raw(tap.nbd_path)
    c.greet()
    c.go()
    c.request(0, 1, 4 * MiB, 4096)      # (a connection's first request is Python's)
    assert c.simple_reply(4096) == (0, 1, b"\2" * 4096)
    t0 = time.monotonic()
    c.s.sendall(_req(0, 10, 0, 4096) + _req(0, 11, 4 * MiB, 4096))
    (h1, e1, d1, t1), (h2, e2, d2, t2) = _replies(c, 2, t0, 4096)
    assert (h1, e1, d1) == (11, 0, b"\2" * 4096), (h1, t1, h2, t2)
    assert (h2, e2, d2) == (10, 0, b"\1" * 4096)
    # the fast reply went out before the slow read completed; the fault was real
    assert t1 < DELAY / 2 and t2 >= DELAY * 0.8, (t1, t2)
    t0 = time.monotonic()
    c.s.sendall(_req(1, 20, 8 * KiB, 4096, b"\3" * 4096)
                + _req(1, 21, 4 * MiB + 8 * KiB, 4096, b"\4" * 4096))
    (h1, e1, _, t1), (h2, e2, _, t2) = _replies(c, 2, t0)
    assert (h1, e1, h2, e2) == (21, 0, 20, 0), (t1, t2)
    assert t1 < DELAY / 2 and t2 >= DELAY * 0.8, (t1, t2)
    c.close()
    assert _served_c(tap) - before == (4 if nbd_loop == "c" else 0)
    qemu_io(tap.uri, "read -P 3 8k 4k", "read -P 1 12k 4k", "read -P 4 4202496 4k",
            "read -P 2 4206592 4k")
    tap.destroy()


def test_c_takes_the_connection_back_while_python_io_is_in_flight(slow_disk, make_tap,
                                                                  monkeypatch):
    """A client that always keeps requests outstanding: now and then a read C hands back
    (unaligned for O_DIRECT: the driver reads it through the page cache) in the slow
    region, so Python has I/O in flight for DELAY seconds, between them a stream of
    aligned reads of the fast region, 16 outstanding. Python serves at most
    nbd.HANDBACK requests after each hand-back, lets what it started complete, and C
    takes the connection again: it answered all the others. (Python kept the
    connection as long as it had I/O in flight: with a pipelining client and a slow
    disk, for ever.) Every reply is right."""
    from smtap.tapdisk import nbd
    monkeypatch.setenv("SMTAP_IO", "io_uring")  # (libaio runs buffered reads in the loop)
    tap = make_tap("aio:" + slow_disk)
    qemu_io(tap.uri, "write -P 1 0 64k", "write -P 2 4M 1M")
    assert control.Client(tap.pid).stats(tap.minor)["io"] == "io_uring"
    before = _served_c(tap)
    c = Raw(tap.nbd_path, timeout=30)
    c.greet()
    c.go()
    fast, slow_every, window = 1000, 250, 16
    sent = answered = 0
    pending = {}                        # handle -> expected data
    slow = 0

    def send_next():
        nonlocal sent, slow
        if sent % slow_every == 0:
            handle, data = 1 << 32 | sent, b"\1" * 4096
            c.s.sendall(_req(0, handle, 100, 4096))
            slow += 1
            pending[handle] = data
        handle = sent
        c.s.sendall(_req(0, handle, 4 * MiB + (sent % 256) * 4096, 4096))
        pending[handle] = b"\2" * 4096
        sent += 1

    while sent < window:
        send_next()
    while pending:
        err, handle, data = c.simple_reply(4096)
        assert (err, data) == (0, pending.pop(handle)), handle
        answered += 1
        if sent < fast:
            send_next()
    c.close()
    assert answered == fast + slow
    python = fast + slow - (_served_c(tap) - before)
    # each hand-back: at most HANDBACK started by Python, the window's requests with them
    assert python <= slow * (nbd.HANDBACK + window), (python, slow)
    tap.destroy()


# -- a RAM disk giving chunks back while C copies from them ------------------------------
@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_ram_zero_and_trim_racing_c_reads(make_tap, smtap_root, shared):
    """Readers read a region in C (three connections, 64 KiB requests) while another
    connection writes it, write-zeroes it and trims it again and again (the driver marks
    its chunks free, waits on the guard, then madvises or punches them) and writes a
    second region with another pattern, its chunks taken from the budget the first
    freed. For 3 s: no read fails, every byte a reader gets is the region's pattern or
    zero (a 4 KiB block may mix both only while a write of it runs: no atomicity), the
    second region's pattern never; the tapdisk lives on, and C served the reads."""
    if shared:
        img = image_file("%s/d.img" % tmpfs(smtap_root / "shm", 8 * MiB), 4 * MiB)
        path = "%s?shared=1&budget=%d" % (img, 1536 * KiB)
    else:
        path = "%s?size=%d&budget=%d" % (smtap_root / "r", 4 * MiB, 1536 * KiB)
    tap = make_tap("ram:" + path)
    A, B, N = 0, 2 * MiB, MiB                       # regions; N bytes each
    PA, PB = 0x5a, 0xc3
    before = _served_c(tap)
    stop = time.monotonic() + 3
    errors, reads = [], [0]

    def reader(k):
        try:
            c = Raw(tap.nbd_path)
            c.greet()
            c.go()
            off = (k * 192 * KiB) % N
            while time.monotonic() < stop:
                c.s.sendall(b"".join(_req(0, i, A + (off + i * 64 * KiB) % N, 64 * KiB)
                                     for i in range(4)))
                for _ in range(4):
                    err, handle, data = c.simple_reply(64 * KiB)
                    assert err == 0, err
                    for p in range(0, len(data), 4096):
                        block = set(data[p:p + 4096])
                        assert block <= {0, PA}, (handle, p, sorted(block)[:4])
                    reads[0] += 1
            c.close()
        except Exception as e:      # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    w = Raw(tap.nbd_path)
    w.greet()
    w.go()
    rounds = 0
    try:
        while time.monotonic() < stop and not errors:
            for typ, off, n, payload in ((1, A, N, bytes([PA]) * N), (6, A, N, b""),
                                         (1, A, N // 2, bytes([PA]) * (N // 2)),
                                         (4, A, N, b""), (1, B, N // 2, bytes([PB]) * (N // 2)),
                                         (4, B, N // 2, b"")):
                w.s.sendall(_req(typ, rounds, off, n, payload))
                assert w.simple_reply()[:2] == (0, rounds)
            rounds += 1
    finally:
        for t in threads:
            t.join(30)
        w.close()
    assert not errors, errors
    assert rounds >= 3 and reads[0] > 100, (rounds, reads[0])
    assert os.path.exists("/proc/%d" % tap.pid)
    qemu_io(tap.uri, "write -P 7 0 64k", "read -P 7 0 64k", "read -P 0 3M 64k")
    # (shared: a chunk trimmed is a hole of the file, read by the driver until written)
    assert _served_c(tap) - before > (100 if shared else reads[0] // 2)


# -- a chain whose middle image is shorter than the leaf ---------------------------------
def test_chain_reads_past_a_shorter_middle_image_are_zeros(make_tap, smtap_root, nbd_loop):
    """base (raw, 8 MiB, all 1s) <- mid (VHD, 4 MiB: it was made over the base when
    that was 4 MiB; a block of 2s) <- leaf (VHD resized to 8 MiB; a block of 3s): what
    lies past the middle image's end reads zeros (image.py's rule: past a smaller
    parent), not the base's 1s; below it the base's and mid's data, the leaf's own
    above. Both when C answers (served_c > 0) and with Python's loop."""
    base = image_file(smtap_root / "base.img", 4 * MiB)
    mid, leaf = str(smtap_root / "mid.vhd"), str(smtap_root / "leaf.vhd")
    vhd_util_here("snapshot", "-n", mid, "-p", base, "-m", check=0)
    with open(base, "r+b") as f:                    # the base grows past mid's end
        f.write(b"\1" * (8 * MiB))
    from smtap.formats import vhd as V
    with V.VHD(mid, writable=True) as img:
        assert img.size == 4 * MiB
        img.write(b"\2" * (2 * MiB), 2 * MiB)
    vhd_util_here("snapshot", "-n", leaf, "-p", mid, check=0)
    vhd_util_here("resize", "-n", leaf, "-s", 8, "-j", str(smtap_root / "j"), check=0)
    with V.VHD(leaf, writable=True) as img:
        assert img.size == 8 * MiB
        img.write(b"\3" * (2 * MiB), 6 * MiB)
    tap = make_tap("vhd:" + leaf)
    served = _io(tap, "read -P 1 0 4k", "read -P 1 1M 64k", "read -P 2 2M 4k",
                 "read -P 2 4092k 4k",                          # mid's last block
                 "read -P 0 4M 4k", "read -P 0 4M 1M", "read -P 0 5M 64k",  # past mid
                 "read -P 0 6140k 4k", "read -P 3 6M 4k", "read -P 3 8188k 4k")
    c = Raw(tap.nbd_path)                           # across mid's end: the driver's
    c.greet()
    c.go()
    c.request(0, 1, 4 * MiB - 4096, 8192)
    assert c.simple_reply(8192) == (0, 1, b"\2" * 4096 + bytes(4096))
    c.close()
    if nbd_loop == "c":
        assert served > 0, served
    else:
        assert served == 0
    tap.destroy()
