"""The qcow2 disk type served by real tapdisks, with real peers: qemu-img/qemu-io (format
qcow2) both ways, nbdcopy, nbdinfo's block status, fio verify, qemu-img check after
everything the engine writes; chains of 30 snapshots and raw backing files, other
cluster sizes and v2, a 16 TiB image, the dirty bit, the storage layer's snapshot of a
live disk, clear refusals, corrupted images and kill -9 in the middle of fio writes."""
import json
import os
import random
import shutil
import signal
import struct
import subprocess

import pytest

from lib.engine import (check_raw_parent_opens_with_aio, FIO_CRASH, FuzzTapdisk, acknowledged_writes, create_refused, disk_sha256,
                        minor_freed, nbd_map, qemu_io, tap_ctl, write_model)
from lib.procs import run, wait_for
from lib.qcow2 import qcow2_chain, qcow2_check, qemu_view
from lib.sizes import MiB
from lib.vhd import sha
from smtap import names
from smtap.formats import qcow2 as Q
from smtap.tapdisk import control, tapctl
from smtap.tapdisk import driver as drv
from smtap.toolstack import hostroot

SIZE = 24 * MiB


def q2(*args, check=True):
    return run("qcow2-util", *args, check=check)


def qemu_compare(image, model_path):
    out = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, model_path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def chain_map(leaf, size, raw_data=()):
    """Per 64 KiB of the leaf's disk, what the chain holds, from smtap.formats: 0 data,
    2 zeros (a zero cluster), 3 nothing (nbdinfo's types); raw_data: the [(offset,
    length)] a raw base holds."""
    out = bytearray(b"\3" * (size // 65536))
    for off, n in raw_data:
        out[off // 65536:(off + n) // 65536] = b"\0" * (n // 65536)
    with Q.Chain(str(leaf)) as chain:
        for img in reversed(chain.images):
            for off, n, kind in img.extents(0, min(img.size, size)):
                if kind != Q.HOLE:
                    out[off // 65536:(off + n) // 65536] = (b"\0" if kind == Q.DATA else b"\2") * \
                        (n // 65536)
    return out


def map_units(extents, size, unit=65536):
    out = bytearray(size // unit)
    for off, n, kind in extents:
        out[off // unit:(off + n) // unit] = bytes([kind]) * (n // unit)
    return out


# -- qemu-img both ways ------------------------------------------------------------------------
@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=4096",
                                  "cluster_size=2M", "cluster_size=512"])
def test_qemu_images_served_written_and_read_back_by_qemu(make_tap, smtap_root, opts):
    path = smtap_root / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", "-c", "write -P 0x5c 3M 1M",
        "-c", "write -z 8M 1M", path)
    model = bytearray(SIZE)
    model[0:65536] = b"\xab" * 65536
    model[3 * MiB:4 * MiB] = b"\x5c" * MiB
    tap = make_tap("qcow2:%s" % path)
    assert int(run("nbdinfo", "--size", tap.uri).stdout) == SIZE
    qemu_io(tap.uri, "read -P 0xab 0 64k", "read -P 0x5c 3M 1M", "read -P 0 1M 1M",
            "read -P 0 8M 1M")
    writes = [(0x11, 2 * MiB, 65536), (0x22, 1000, 777), (0x33, 4 * MiB - 4096, 2 * MiB),
              (0x44, SIZE - 512, 512), (0x55, 8 * MiB + 512, 100)]
    qemu_io(tap.uri, *["write -P %#x %d %d" % w for w in writes] + ["write -z 3M 4k", "flush"])
    for pattern, off, n in writes:
        model[off:off + n] = bytes([pattern]) * n
    model[3 * MiB:3 * MiB + 4096] = bytes(4096)
    out = smtap_root / "out.raw"
    run("nbdcopy", tap.uri, out)
    assert out.read_bytes() == bytes(model)
    tap.destroy()
    qcow2_check(path)
    qemu_compare(path, write_model(smtap_root / "model.raw", model))


def test_images_we_make_are_what_qemu_reads(make_tap, smtap_root):
    path = str(smtap_root / "ours.qcow2")
    q2("create", "-n", path, "-s", SIZE >> 20)
    tap = make_tap("qcow2:" + path)
    proc = run("fio", "--name=v", "--ioengine=nbd", "--uri=" + tap.uri, "--rw=randwrite",
               "--bsrange=512-256k", "--bs_unaligned", "--iodepth=16", "--size=%d" % SIZE,
               "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1",
               "--output-format=json")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == job["write"]["io_bytes"]
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", tap.uri, smtap_root / "via-nbd.raw")
    tap.destroy()
    qcow2_check(path)
    qemu_compare(path, str(smtap_root / "via-nbd.raw"))


def test_a_chain_of_30_snapshots_reads_right_through_the_engine(make_tap, smtap_root):
    """30 snapshots with qcow2-util over a raw base: the engine, nbdcopy and qemu-img
    (reading the qcow2 chain itself) agree; block status is the chain's allocation."""
    size = 16 * MiB
    rng = random.Random(30)
    base = smtap_root / "l00.raw"
    model = bytearray(size)
    with open(str(base), "wb") as f:                 # sparse: data at 0 and 5 MiB
        f.truncate(size)
        for off in (0, 5 * MiB):
            f.seek(off)
            f.write(b"\x01" * MiB)
            model[off:off + MiB] = b"\x01" * MiB
    prev = str(base)
    for level in range(1, 31):
        path = str(smtap_root / ("l%02d.qcow2" % level))
        q2("snapshot", "-n", path, "-p", prev, *(["-m"] if level == 1 else []))
        with Q.Image(path, writable=True) as img:
            for _ in range(3):
                n = rng.randint(1, 256) * 512
                off = rng.randrange(0, (size - n) // 512) * 512
                data = rng.randbytes(n)
                img.write(data, off)
                model[off:off + n] = data
            if level % 10 == 0:
                img.write_zeroes(level * 65536 * 4, 65536)
                model[level * 65536 * 4:level * 65536 * 4 + 65536] = bytes(65536)
        prev = path
    assert q2("query", "-d", "-n", prev).stdout.strip() == "chain depth: 31"
    tap = make_tap("qcow2:" + prev, flags=drv.OPEN_RDONLY)
    stats = control.Client(tap.pid).stats(tap.minor)
    assert [i["driver"]["name"] for i in stats["images"]] == [
        str(smtap_root / ("l%02d.qcow2" % level)) for level in range(30, 0, -1)] + [str(base)]
    out = smtap_root / "out.raw"
    run("nbdcopy", tap.uri, out)
    assert out.read_bytes() == bytes(model)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", prev, smtap_root / "q.raw")
    assert (smtap_root / "q.raw").read_bytes() == bytes(model)
    assert map_units(nbd_map(tap.uri), size) == chain_map(prev, size, [(0, MiB), (5 * MiB, MiB)])
    tap.destroy()
    qcow2_check(prev)


@pytest.mark.parametrize("flags", [0, drv.OPEN_NO_O_DIRECT], ids=["direct", "page-cache"])
def test_copy_on_write_reads_every_level_of_the_chain(make_tap, smtap_root, flags):
    """Partial-cluster writes into a leaf over qcow2 <- qcow2 <- raw (each level's data
    in stripes, holes between), the leaf grown past its parents: each new cluster's
    content around the write comes from whichever level holds it (holes handed down,
    zeros past a parent's end), read straight into the cluster; nbdcopy, qemu-img and
    the model agree."""
    size, grown = 8 * MiB, 9 * MiB
    rng = random.Random(13)
    leaf = qcow2_chain(smtap_root, size, 4, raw_base=True)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", leaf, smtap_root / "before.raw")
    model = bytearray((smtap_root / "before.raw").read_bytes()) + bytearray(grown - size)
    with Q.Image(leaf, writable=True) as img:
        img.grow(grown)
    tap = make_tap("qcow2:" + leaf, flags=flags)
    cmds = []
    for _ in range(150):
        n = rng.choice((512, 4096, 8192, 65536))
        off = rng.randrange(0, (grown - n) // 512) * 512
        byte = rng.randrange(1, 256)
        cmds.append("write -P %d %d %d" % (byte, off, n))
        model[off:off + n] = bytes([byte]) * n
    qemu_io(tap.uri, *cmds)
    out = smtap_root / "out.raw"
    run("nbdcopy", tap.uri, out)
    assert out.read_bytes() == bytes(model)
    tap.destroy()
    qcow2_check(leaf)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", leaf, smtap_root / "q.raw")
    assert (smtap_root / "q.raw").read_bytes() == bytes(model)


def test_block_status_follows_the_l2_tables(make_tap, smtap_root):
    path = smtap_root / "bs.qcow2"
    q2("create", "-n", path, "-s", 16)
    tap = make_tap("qcow2:%s" % path)
    assert nbd_map(tap.uri) == [(0, 16 * MiB, 3)]
    qemu_io(tap.uri, "write -P 1 4096 4096", "write -P 2 1M 1536", "write -P 3 2M 2M",
            "write -z 5M 128k")
    assert nbd_map(tap.uri) == [
        (0, 65536, 0), (65536, MiB - 65536, 3), (MiB, 65536, 0), (MiB + 65536, MiB - 65536, 3),
        (2 * MiB, 2 * MiB, 0), (4 * MiB, MiB, 3), (5 * MiB, 128 << 10, 2),
        (5 * MiB + (128 << 10), 11 * MiB - (128 << 10), 3)]
    for copy in (["nbdcopy", tap.uri, smtap_root / "c.raw"],
                 ["qemu-img", "convert", "-f", "raw", "-O", "raw", tap.uri, smtap_root / "q.raw"]):
        secs = control.Client(tap.pid).stats(tap.minor)["secs"][0]
        run(*copy)          # they skip the holes: they read little more than the data
        assert control.Client(tap.pid).stats(tap.minor)["secs"][0] - secs < 3 * MiB // 512
    tap.destroy()
    qcow2_check(path)


def test_writes_zeroes_and_trims_never_show_the_parent(make_tap, smtap_root):
    base = str(smtap_root / "base.qcow2")
    q2("create", "-n", base, "-s", 16)
    with Q.Image(base, writable=True) as img:
        img.write(b"\x5a" * (16 * MiB), 0)
    leaf = str(smtap_root / "leaf.qcow2")
    q2("snapshot", "-n", leaf, "-p", base)
    tap = make_tap("qcow2:" + leaf)
    info = json.loads(run("nbdinfo", "--no-content", "--json", tap.uri).stdout)["exports"][0]
    assert info["can_trim"] and info["can_zero"] and info["can_fast_zero"]
    qemu_io(tap.uri, "write -P 0x77 1000 777",            # partial clusters: parent around
            "write -z 4M 1M",                               # a region the leaf did not hold
            "write -z 6291556 3000",                        # unaligned zeroes
            "write -P 0x66 8M 2M", "discard 8M 2M",         # trim of the leaf's own data
            "discard 12M 1M", "flush")                      # trim of what it never held
    qemu_io(tap.uri, "read -P 0x5a 0 1000", "read -P 0x77 1000 777", "read -P 0x5a 1777 2319",
            "read -P 0 4M 1M", "read -P 0x5a 6M 100", "read -P 0 6291556 3000",
            "read -P 0x5a 6294556 1024", "read -P 0 8M 2M", "read -P 0 12M 1M")
    tap.destroy()
    qcow2_check(leaf)
    with Q.Image(base) as img:
        assert img.read(0, 16 * MiB) == b"\x5a" * (16 * MiB)


def test_a_raw_backing_file_opens_with_aio(make_tap, smtap_root):
    check_raw_parent_opens_with_aio(
        make_tap, smtap_root, "qcow2", lambda leaf, raw: q2("snapshot", "-n", leaf, "-p", raw, "-m"),
        qcow2_check, "60k")


def test_a_read_only_open_writes_nothing(make_tap, smtap_root):
    leaf = qcow2_chain(smtap_root, 8 * MiB, 3)
    files = sorted(smtap_root.glob("q*.qcow2"))
    before = {p: (sha(p), os.stat(p).st_mtime_ns) for p in files}
    tap = make_tap("qcow2:" + leaf, flags=drv.OPEN_RDONLY)
    run("nbdcopy", tap.uri, smtap_root / "out.raw")
    out = qemu_io(tap.uri, "write -P 1 0 4k", check=False).output
    assert "Permission denied" in out, out
    tap.destroy()
    assert {p: (sha(p), os.stat(p).st_mtime_ns) for p in files} == before


def dirty(path):
    return json.loads(run("qemu-img", "info", "--output=json", "-U", path).stdout)["dirty-flag"]


def test_dirty_while_open_clean_after_pause_and_close(make_tap, smtap_root):
    path = str(smtap_root / "d.qcow2")
    q2("create", "-n", path, "-s", 16)
    q2("set", "-n", path, "-f", "hidden", "-v", 1)
    tap = make_tap("qcow2:" + path)
    qemu_io(tap.uri, "write -P 0x61 0 3M", "flush")
    assert dirty(path)
    assert q2("query", "-vf", "-n", path).stdout == "16\nhidden: 1\n"     # readable meanwhile
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    assert not dirty(path)
    qcow2_check(path)
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
    assert dirty(path)
    qemu_io(tap.uri, "read -P 0x61 0 3M")
    tap.destroy()
    assert not dirty(path)
    qcow2_check(path)
    assert q2("query", "-f", "-a", "-n", path).stdout == "hidden: 1\n48\n"


def test_unpause_a_onto_a_snapshot_taken_while_paused(make_tap, smtap_root):
    """The storage layer's snapshot of a live qcow2 VDI: pause, qcow2-util snapshot (the
    leaf becomes the backing file), unpause -a onto the new leaf."""
    leaf = qcow2_chain(smtap_root, 8 * MiB, 2)
    tap = make_tap("qcow2:" + leaf)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa7 0 1M", tap.uri)
    before = disk_sha256(tap.uri, smtap_root)
    tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)
    new = str(smtap_root / "snap.qcow2")
    q2("snapshot", "-n", new, "-p", leaf)
    q2("set", "-n", leaf, "-f", "hidden", "-v", 1)
    tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor, "-a", "qcow2:" + new)
    assert tap_ctl("list").stdout.splitlines() == [
        "pid=%d minor=%d state=0 args=qcow2:%s" % (tap.pid, tap.minor, new)]
    assert disk_sha256(tap.uri, smtap_root) == before
    assert len(control.Client(tap.pid).stats(tap.minor)["images"]) == 3
    frozen = sha(leaf)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa8 0 64k", "-c", "flush", tap.uri)
    assert sha(leaf) == frozen
    tap.destroy()
    for p in (new, leaf):
        qcow2_check(p)


def test_a_16_tib_disk_written_at_its_last_gib(make_tap, smtap_root):
    """The largest VDI of the storage layer, plugged: its last GiB written over NBD and
    read back through the engine and, from the file, by qemu."""
    size = 16 << 40
    path = str(smtap_root / "big.qcow2")
    q2("create", "-n", path, "-s", size >> 20)
    tap = make_tap("qcow2:" + path)
    assert int(run("nbdinfo", "--size", tap.uri).stdout) == size
    start = size - (1 << 30)
    cmds = ["write -q -P %d %d 64M" % (k + 1, start + k * 64 * MiB) for k in range(16)]
    qemu_io(tap.uri, *(cmds + ["flush"]))
    qemu_io(tap.uri, *["read -q -P %d %d 64M" % (k + 1, start + k * 64 * MiB) for k in range(16)])
    assert nbd_map(tap.uri)[-1] == (start, 1 << 30, 0)
    tap.destroy()
    out = run("qemu-io", "-f", "qcow2", *sum((["-c", "read -q -P %d %d 64M" % (
        k + 1, start + k * 64 * MiB)] for k in range(0, 16, 5)), []), path)
    assert "Pattern verification failed" not in out.stdout + out.stderr
    qcow2_check(path)


# -- refusals -----------------------------------------------------------------------------------
def test_bad_images_are_refused_clearly_and_left_untouched(smtap_root):
    junk = smtap_root / "junk.qcow2"
    junk.write_bytes(os.urandom(64 * 1024))
    base = str(smtap_root / "base.qcow2")
    q2("create", "-n", base, "-s", 8)
    orphan = str(smtap_root / "orphan.qcow2")
    q2("snapshot", "-n", orphan, "-p", base)
    os.rename(base, base + ".gone")
    aes = str(smtap_root / "aes.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", aes, "1M")
    with open(aes, "r+b") as f:
        f.seek(32)
        f.write(b"\0\0\0\1")
    ext = str(smtap_root / "ext.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, "1M")
    snap = str(smtap_root / "snap.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", snap, "1M")
    run("qemu-img", "snapshot", "-c", "s1", snap)
    corrupt = str(smtap_root / "corrupt.qcow2")
    q2("create", "-n", corrupt, "-s", 1)
    with open(corrupt, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))       # the corrupt bit
    cases = {str(junk): "not a qcow2 image", orphan: "not found", aes: "encrypted",
             ext: "extended L2", snap: "internal snapshots", corrupt: "corrupt"}
    before = {p: sha(p) for p in cases}
    for path, reason in cases.items():
        assert reason in create_refused("qcow2:" + path), path
    assert tap_ctl("list").stdout == ""
    for path in (snap, corrupt):                # read-only: they open
        pid, minor, _ = tapctl.create("qcow2:" + path, flags=drv.OPEN_RDONLY)
        run("nbdcopy", "nbd+unix:///?socket=%s" % names.nbd_path(pid, minor), "null:")
        tapctl.destroy(pid, minor, timeout=30)
    assert {p: sha(p) for p in cases} == before


# -- corrupted images ---------------------------------------------------------------------------
def _regions(path):
    with Q.Image(path) as img:
        h = img.header
        img._load_reftable()
        out = [("header", 0, 512), ("l1", h.l1_table_offset, h.l1_size * 8),
               ("reftable", h.refcount_table_offset, 64),
               ("refblock", img.reftable[0] & Q.REFT_OFFSET_MASK, 256)]
        out += [("l2", e & Q.OFFSET_MASK, 4096) for e in img.l1 if e & Q.OFFSET_MASK]
    return out


@pytest.mark.timeout(300)
def test_corrupted_images_get_a_clear_error_never_a_crash_hang_or_write(smtap_root):
    """Random damage to a valid qcow2 child (its tables and header), opened by one real
    tapdisk again and again, read-only and read-write: a clear error or a readable disk,
    never a hang, an exception the driver did not mean, a dead tapdisk, or a byte
    written (but the dirty bit, set while open and cleared on close)."""
    cases = int(os.environ.get("SMTAP_QCOW2_FUZZ_CASES", "60"))
    parent = qcow2_chain(smtap_root, 8 * MiB, 2, name="p")
    good = str(smtap_root / "good.qcow2")
    q2("snapshot", "-n", good, "-p", parent, "-c", 4096)
    with Q.Image(good, writable=True) as img:
        img.write(b"\x42" * (3 * MiB), MiB)
        img.write(b"\x43" * 4096, 6 * MiB)
        img.write_zeroes(5 * MiB, 64 << 10)
    regions = _regions(good)
    tap = FuzzTapdisk()
    rng = random.Random(int(os.environ.get("SMTAP_QCOW2_FUZZ_SEED", "7")))
    path = str(smtap_root / "bad.qcow2")
    for case in range(cases):
        shutil.copy(good, path)
        name, off, length = rng.choice(regions)
        with open(path, "r+b") as f:
            f.seek(off)
            data = bytearray(f.read(length))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            f.seek(off)
            f.write(data)
        with open(path, "rb") as f:
            before = f.read()
        was_dirty = before[72:80] != bytes(8) if name == "header" else False
        flags = drv.OPEN_RDONLY if case % 2 else 0
        tap.try_open("qcow2:" + path, flags, name)
        with open(path, "rb") as f:
            after = f.read()
        if not flags and not was_dirty:     # a read-write open clears the autoclear bits
            before = before[:88] + bytes(8) + before[96:]          # (the spec's rule)
            after = after[:88] + bytes(8) + after[96:]
        if not was_dirty or flags:          # a dirty image is repaired by a read-write open
            assert after == before, (name, off, flags)
    tap.finish()


# -- kill -9 in the middle of fio writes -----------------------------------------------------------
def fio_or_base_blocks(data, base_byte):
    """The offsets of the 4 KiB blocks of data that are neither the base's (base_byte
    throughout) nor one of fio's for that offset (its verify header: magic, offset)."""
    base = bytes([base_byte]) * 4096
    bad = []
    for off in range(0, len(data), 4096):
        block = data[off:off + 4096]
        if block != base:
            magic, _, _, _, at = struct.unpack_from("<HHIQQ", block)
            if magic != 0xacca or at != off:
                bad.append(off)
    return bad


@pytest.mark.timeout(600)
@pytest.mark.parametrize("over", ["empty", "backing"])
def test_kill_9_during_fio_writes_loses_no_acknowledged_write(smtap_root, over):
    """At random points of fio writes (a flush every 8) the tapdisk is killed -9: the
    image is left dirty, qemu-img check finds no corruption (leaks at most), fio's verify
    reads back every write it saw complete, and the next read-write open repairs it:
    qemu-img check clean. On an empty image (every first write allocates) and on a
    snapshot of a full one (each copies the rest of its cluster from the backing file):
    there every 4 KiB block reads as the backing file's or as one fio wrote there,
    never anything else. SMTAP_QCOW2_KILL_POINTS points (default 8)."""
    import re
    bad_block = re.compile(r"\(requested block: offset=(\d+), length=\d+\)")
    points = int(os.environ.get("SMTAP_QCOW2_KILL_POINTS", "8"))
    rng = random.Random(int(os.environ.get("SMTAP_QCOW2_KILL_SEED", "9")))
    path, empty = str(smtap_root / "crash.qcow2"), str(smtap_root / "empty.qcow2")
    if over == "empty":
        q2("create", "-n", empty, "-s", 64)
    else:
        base = str(smtap_root / "base.qcow2")
        q2("create", "-n", base, "-s", 64)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64M", base)
        q2("snapshot", "-n", empty, "-p", base)
    state = smtap_root / "state"
    during = 0
    for point in range(points):
        shutil.rmtree(str(state), ignore_errors=True)
        state.mkdir()
        shutil.copy(empty, path)
        pid, minor, _ = tapctl.create("qcow2:" + path)
        uri = "nbd+unix:///?socket=%s" % names.nbd_path(pid, minor)
        args = [a.replace("%d", str(point)) for a in FIO_CRASH] + (
            ["--verify_interval=4k"] if over == "backing" else [])
        fio = subprocess.Popen(["fio"] + args + ["--uri=" + uri, "--do_verify=0",
                                                 "--verify_state_save=1", "--write_lat_log=ack",
                                                 "--log_offset=1"], cwd=str(state),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mark = rng.randint(2048, 48 * 2048)
        client = control.Client(pid, io_timeout=10)
        assert wait_for(lambda: client.stats(minor)["secs"][1] >= mark, 60, 0.005), point
        os.kill(pid, signal.SIGKILL)
        out, err = fio.communicate(timeout=60)
        assert hostroot.wait_dead(pid)
        assert wait_for(lambda: minor_freed(minor), 10), minor
        job = json.loads(out[out.index("{"):])["jobs"][0]
        acked = acknowledged_writes(state / "ack_clat.1.log")
        during += bool(acked) and job["error"] != 0
        assert dirty(path)
        check = run("qemu-img", "check", "--output=json", path, check=False)
        assert check.returncode in (0, 3), check.stdout + check.stderr
        assert not json.loads(check.stdout).get("corruptions")
        pid, minor, _ = tapctl.create("qcow2:" + path, flags=drv.OPEN_RDONLY)
        proc = subprocess.run(["fio"] + args + ["--uri=nbd+unix:///?socket=%s" % names.nbd_path(
            pid, minor), "--verify_only", "--verify_state_load=1"], cwd=str(state),
            capture_output=True, text=True, timeout=120)
        tapctl.destroy(pid, minor, timeout=30)
        bad = {int(m) for m in bad_block.findall(proc.stderr)}
        assert not bad & set(acked), (point, sorted(bad & set(acked)), proc.stderr[-3000:])
        if over == "backing":
            garbage = fio_or_base_blocks(qemu_view(path, smtap_root), 0x77)
            assert not garbage, (point, [hex(b) for b in garbage[:16]])
        verified = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
        assert verified["io_bytes"] >= sum(acked.values()), point
        pid, minor, _ = tapctl.create("qcow2:" + path)        # read-write: repaired
        tapctl.destroy(pid, minor, timeout=30)
        assert not dirty(path)
        qcow2_check(path)
    assert during == points
