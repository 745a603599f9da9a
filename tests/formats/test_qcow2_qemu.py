"""qemu-img and smtap.formats.qcow2 both ways: images qemu makes (v2 and v3, cluster
sizes from 512 B to 2 MiB, refcount widths, zero clusters, discards, compressed
clusters, backing files) read right by us, with qemu-img map's exact output; every
image we write passes qemu-img check and qemu-img compare against the bytes written."""
import json
import os

import pytest

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2ops
from lib.procs import run
from lib.sizes import MiB
from lib.vhd import Model, random_writes, seeded, tool

SIZE = 12 * MiB


def qio(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*(args + [str(path)]))


def qemu_map(path):
    return run("qemu-img", "map", "--output=json", str(path)).stdout


def qemu_raw(path, work, fmt="qcow2"):
    out = work / "dump.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    return out.read_bytes()


def qemu_check_clean(path):
    out = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert out.returncode == 0, (out.stdout, out.stderr)
    res = json.loads(out.stdout)
    assert not res.get("corruptions") and not res.get("leaks"), res
    return res


def qemu_compare(path, raw):
    out = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), check=False)
    assert out.returncode == 0, (out.stdout, out.stderr)


def writes_by_qemu(path, size, work):
    """Patterns, a zero write (a zero cluster in v3), a discard, an unaligned write:
    returns the bytes the disk holds as qemu reads it."""
    ops = [("write -P 0xab 0 %d" % (128 << 10), 0, 128 << 10, 0xab),
           ("write -P 0x5c %d 4096" % (3 * MiB + 512), 3 * MiB + 512, 4096, 0x5c),
           ("write -P 0x11 %d %d" % (5 * MiB, 2 * MiB), 5 * MiB, 2 * MiB, 0x11),
           ("write -z %d %d" % (5 * MiB, MiB), 5 * MiB, MiB, 0),
           ("write -P 0x77 %d %d" % (size - MiB, MiB), size - MiB, MiB, 0x77),
           ("discard %d %d" % (size - MiB, 512 << 10), size - MiB, 512 << 10, 0)]
    qio(path, *[c for c, _, _, _ in ops])
    return qemu_raw(path, work)


@pytest.mark.parametrize("opts", [
    "compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=4096,refcount_bits=1",
    "cluster_size=2M", "compat=0.10,cluster_size=16384", "refcount_bits=64",
    "lazy_refcounts=on", "preallocation=metadata,cluster_size=65536"])
def test_images_qemu_writes_are_read_right(work, opts):
    path = work / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE))
    expected = writes_by_qemu(path, SIZE, work)
    with Q.Image(str(path)) as img:
        assert img.size == SIZE
        assert img.read(0, SIZE) == expected
        assert img.version == (2 if "0.10" in opts else 3)
    out = tool("qcow2-util", "map", "--output=json", path, check=0)
    assert out.text == qemu_map(path)                       # byte for byte
    ours = json.loads(tool("qcow2-util", "info", "--output=json", path, check=0).text)
    theirs = json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
    assert ours == theirs
    res = qcow2check.check(str(path))
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages
    theirs = json.loads(run("qemu-img", "check", "--output=json", str(path)).stdout)
    assert res.json(str(path)) == theirs


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=4096"])
def test_writes_into_images_qemu_made(work, opts):
    """Our writes (unaligned, zeros, discards) into qemu's images: check clean, compare equal."""
    path = work / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE))
    model = Model(SIZE)
    model.data[:] = writes_by_qemu(path, SIZE, work)
    with Q.Image(str(path), writable=True) as img:
        random_writes(seeded(1), img, model, 80, max_sectors=300)
        img.write(b"\x42" * 1000, 12345)
        model.data[12345:13345] = b"\x42" * 1000
        img.write_zeroes(MiB, 3 * MiB + 4096)
        model.data[MiB:4 * MiB + 4096] = bytes(3 * MiB + 4096)
        img.discard(6 * MiB, 2 * MiB)
        model.data[6 * MiB:8 * MiB] = bytes(2 * MiB)
    raw = work / "model.raw"
    raw.write_bytes(bytes(model.data))
    qemu_check_clean(path)
    qemu_compare(path, raw)


@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 * MiB])
def test_images_we_create_and_write(work, cluster):
    path = work / "ours.qcow2"
    tool("qcow2-util", "create", "-n", path, "-s", SIZE >> 20, "-c", cluster, check=0)
    qemu_check_clean(path)
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
    assert info["cluster-size"] == cluster and info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["compat"] == "1.1"
    model = Model(SIZE)
    with Q.Image(str(path), writable=True) as img:
        random_writes(seeded(cluster), img, model, 80, max_sectors=200)
        model.write(img, b"\xee" * (2 * MiB), 4 * MiB)
        img.write_zeroes(4 * MiB + 4096, MiB)
        model.data[4 * MiB + 4096:5 * MiB + 4096] = bytes(MiB)
    raw = work / "model.raw"
    raw.write_bytes(bytes(model.data))
    qemu_check_clean(path)
    qemu_compare(path, raw)
    assert tool("qcow2-util", "check", "-n", path, check=0).text == "%s is valid\n" % path
    assert tool("qcow2-util", "map", "--output=json", path, check=0).text == qemu_map(path)


def test_refcount_table_and_l1_growth(work):
    """512-byte clusters: a one-cluster refcount table covers 8 MiB of file; writing 24
    MiB grows it (table and blocks moved), and growing the disk moves the L1 table."""
    path = work / "small.qcow2"
    qcow2ops.create(str(path), 24 * MiB, cluster_size=512)
    model = Model(64 * MiB)
    with Q.Image(str(path), writable=True) as img:
        first_table = img.header.refcount_table_offset
        for off in range(0, 24 * MiB, MiB):
            model.write(img, bytes([off >> 20]) * MiB, off)
        assert img.header.refcount_table_offset != first_table
        l1 = img.header.l1_table_offset
        img.grow(64 * MiB)
        assert img.header.l1_table_offset != l1
        model.write(img, b"\x99" * MiB, 63 * MiB)
    raw = work / "model.raw"
    raw.write_bytes(bytes(model.data))
    qemu_check_clean(path)
    qemu_compare(path, raw)


def test_chains_with_qcow2_and_raw_backing(work):
    """raw <- qcow2 <- qcow2 (a smaller middle): our reads equal qemu's, our writes into
    the leaf copy-on-write from the chain, qemu-img compare agrees."""
    base = work / "base.raw"
    base.write_bytes(seeded(5).getrandbits(8 * 4 * MiB).to_bytes(4 * MiB, "little"))
    mid, top = work / "mid.qcow2", work / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "6M")
    qio(mid, "write -P 0x21 1M 64k", "write -z 2M 128k", "write -P 0x22 5M 64k")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2",
         "-F", "qcow2", str(top), str(SIZE))
    qio(top, "write -P 0x31 1M 4k", "write -P 0x32 8M 64k")
    expected = qemu_raw(top, work)
    with Q.Chain(str(top)) as chain:
        assert chain.depth == 3
        assert chain.read(0, SIZE) == expected
    assert tool("qcow2-util", "map", "--output=json", top, check=0).text == qemu_map(top)
    assert tool("qcow2-util", "query", "-d", "-n", top, check=0).text == "chain depth: 3\n"
    model = Model(SIZE)
    model.data[:] = expected
    with Q.Image(str(top), writable=True) as img:
        random_writes(seeded(9), img, model, 60, max_sectors=20)
        img.write_zeroes(2 * MiB, 64 << 10)                     # hides the backing data
        model.data[2 * MiB:2 * MiB + (64 << 10)] = bytes(64 << 10)
        img.discard(3 * MiB, 64 << 10)                          # reads zeros, not base's
        model.data[3 * MiB:3 * MiB + (64 << 10)] = bytes(64 << 10)
    raw = work / "model.raw"
    raw.write_bytes(bytes(model.data))
    qemu_check_clean(top)
    qemu_compare(top, raw)


def test_compressed_clusters_are_read(work):
    src = work / "src.raw"
    text = b"".join(b"line %08d of a compressible disk\n" % i for i in range(60000))
    src.write_bytes(text.ljust(4 * MiB, b"\0"))
    path = work / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(path))
    with Q.Image(str(path)) as img:
        assert img.read(0, 4 * MiB) == src.read_bytes()
    res = qcow2check.check(str(path))
    theirs = json.loads(run("qemu-img", "check", "--output=json", str(path)).stdout)
    assert res.json(str(path)) == theirs and theirs["compressed-clusters"] > 0
    with Q.Image(str(path), writable=True) as img:       # overwriting one: copied out first
        img.write(b"\x01" * 100, 70000)
    data = bytearray(src.read_bytes())
    data[70000:70100] = b"\x01" * 100
    (work / "model.raw").write_bytes(bytes(data))
    qemu_check_clean(path)
    qemu_compare(path, work / "model.raw")


def test_dirty_image_repaired_on_write_open(work):
    """lazy_refcounts and a crash (qemu-io abort): the dirty bit is set; a read-only open
    reads it as is, a read-write open repairs it first, as qemu does."""
    path = work / "lazy.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "8M")
    out = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "abort", str(path),
               check=False)
    assert out.returncode != 0
    with Q.Image(str(path)) as img:
        assert img.dirty and img.read(0, MiB) == b"\x5a" * MiB
    res = qcow2check.check(str(path))
    assert res.corruptions or res.leaks                 # refcounts were never written
    with Q.Image(str(path), writable=True) as img:
        assert not img.dirty
        img.write(b"\x01" * 512, 2 * MiB)
    qemu_check_clean(path)
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
    assert info["dirty-flag"] is False


def test_unsupported_images_are_refused_clearly(work):
    aes = work / "aes.qcow2"               # qemu reads AES images (creating them is gone)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(aes), "1M")
    with open(str(aes), "r+b") as f:
        f.seek(32)
        f.write(b"\0\0\0\1")
    ext = work / "extl2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(ext), "1M")
    snap = work / "snap.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(snap), "1M")
    qio(snap, "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(snap))
    for path, what in ((aes, "encrypted"), (ext, "extended L2")):
        before = path.read_bytes()
        with pytest.raises(Q.QCow2Error) as e:
            Q.Image(str(path))
        assert e.value.errno == 95 and what in e.value.strerror
        out = tool("qcow2-util", "query", "-v", "-n", path)
        assert out.returncode == 95 and len(out.err.splitlines()) == 1 and what in out.err
        assert path.read_bytes() == before
    with Q.Image(str(snap)) as img:                     # internal snapshots: read, not written
        assert img.read(0, 65536) == b"\x01" * 65536
    assert qcow2check.check(str(snap)).corruptions == 0
    with pytest.raises(Q.QCow2Error) as e:
        Q.Image(str(snap), writable=True)
    assert e.value.errno == 95 and "snapshots" in e.value.strerror


def test_unknown_extensions_kept_and_hidden_flag(work):
    """A header extension qemu does not know (XCP-ng's "vate" is one) survives our header
    rewrites, and qemu ignores ours."""
    path = work / "x.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "-u", str(path), "1M")
    (work / "b.raw").write_bytes(b"\x33" * MiB)
    with Q.Image(str(path), writable=True) as img:
        img.header.set_ext(0x12345678, b"keep me, please")
        img.write_header()
        img.set_hidden(1)                               # added: a header rewrite
        img.set_backing("b.raw", "raw")
    with Q.Image(str(path)) as img:
        assert img.header.ext(0x12345678) == b"keep me, please"
        assert img.hidden == 1 and img.header.ext(Q.EXT_HIDDEN) == b"\x01" + bytes(7)
    assert tool("qcow2-util", "query", "-f", "-n", path, check=0).text == "hidden: 1\n"
    tool("qcow2-util", "set", "-n", path, "-f", "hidden", "-v", "0", check=0)   # in place
    with Q.Image(str(path)) as img:
        assert img.hidden == 0 and img.header.ext(0x12345678) == b"keep me, please"
    qemu_check_clean(path)
    assert qemu_raw(path, work) == b"\x33" * MiB
    os.unlink(str(work / "dump.raw"))
