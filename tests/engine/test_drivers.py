"""Disk drivers (aio, ram, null) and the generic engine parts: image chains, pause/resume."""
import errno
import os
import random
import subprocess
import time

import pytest

from lib.engine import nbd_map, nbd_uri, qemu_io
from lib.procs import fd_flags_of, run
from lib.sizes import MiB
from smtap import settings
from smtap.tapdisk import driver as drv
from smtap.tapdisk import drivers, image, vbd


QEMU_FORMAT = {"vhd": "vpc", "qcow2": "qcow2"}


# -- aio ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffered", [False, True])
def test_aio_direct_and_buffered(serve, tmp_path, buffered):
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(8 * MiB))
    s = serve("aio:%s" % img, *(["-D"] if buffered else []))
    flags = fd_flags_of(s.proc.pid, img)
    assert flags
    assert any(f & os.O_DIRECT for f in flags) == (not buffered)
    # aligned and unaligned requests both land where they should
    qemu_io(s.uri, "write -P 0x21 4096 1M", "write -P 0x43 1000 777", "flush")
    data = img.read_bytes()
    assert data[1000:1777] == b"\x43" * 777 and data[4096:4096 + MiB] == b"\x21" * MiB
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), s.uri)


@pytest.mark.parametrize("how", ["direct", "direct=0", "-D"])
@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_image_formats_direct_and_buffered(serve, tmp_path, fmt, how):
    """An image format opens its file O_DIRECT by default, buffered with `?direct=0` or
    -D; either way aligned, unaligned and block-crossing writes land where qemu reads
    them, and a later connection (fresh buffers) reads them back."""
    img = tmp_path / ("d." + fmt)
    run("qemu-img", "create", "-q", "-f", QEMU_FORMAT[fmt], img, 24 * MiB)
    s = serve("%s:%s%s" % (fmt, img, "?direct=0" if how == "direct=0" else ""),
              *(["-D"] if how == "-D" else []))
    flags = fd_flags_of(s.proc.pid, img)
    assert flags
    assert any(f & os.O_DIRECT for f in flags) == (how == "direct")
    writes = [(0x21, 4096, MiB), (0x43, 1000, 777), (0x65, 3 * MiB + 512, 2 * MiB)]
    qemu_io(s.uri, *["write -P %#x %d %d" % w for w in writes] + ["flush"])
    qemu_io(s.uri, *["read -P %#x %d %d" % w for w in writes])
    s.stop()
    model = bytearray(24 * MiB)
    for pattern, off, n in writes:
        model[off:off + n] = bytes([pattern]) * n
    want = tmp_path / "model.raw"
    want.write_bytes(bytes(model))
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", QEMU_FORMAT[fmt], want, img)


def test_aio_errors_are_clear(serve, tmp_path):
    with pytest.raises(AssertionError, match="No such file"):
        serve("aio:%s" % (tmp_path / "missing.img"))
    with pytest.raises(AssertionError, match="unknown disk type"):
        serve("nosuch:%s" % (tmp_path / "missing.img"))


def test_aio_extents_follow_the_file(tmp_path):
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(4 * MiB)
        f.write(b"x" * MiB)
    d = drivers.get("aio")()
    d.open(str(img), 0, {})
    try:
        ext = d.extents(16 * MiB, 0)
        assert ext[0] == (4 * MiB, drv.EXTENT_HOLE | drv.EXTENT_ZERO)
        assert ext[1] == (MiB, 0)
        assert sum(n for n, _ in ext) == 16 * MiB
        d.zero(MiB, 4 * MiB, may_trim=True)
        assert d.extents(MiB, 4 * MiB) == [(MiB, drv.EXTENT_HOLE | drv.EXTENT_ZERO)]
        bufs = d.preadv([(4096, 0), (8192, 4 * MiB)])
        assert [bytes(b) for b in bufs] == [bytes(4096), bytes(8192)]
    finally:
        d.close()


# -- ram ------------------------------------------------------------------------------------------
def test_ram_budget_gives_enospc(serve, tmp_path):
    s = serve("ram:%s?size=%d&budget=%d" % (tmp_path / "none", 64 * MiB, MiB))
    qemu_io(s.uri, "write -P 1 0 512k")
    out = qemu_io(s.uri, "write -P 2 8M 2M", check=False).output
    assert "No space left on device" in out
    qemu_io(s.uri, "read -P 1 0 512k")      # what fit is still there
    # trimming gives memory back: then it fits
    qemu_io(s.uri, "discard 0 512k", "write -P 3 8M 1M", "read -P 3 8M 1M")


def test_ram_seed_costs_only_its_data(tmp_path):
    seed = tmp_path / "seed.img"
    with open(seed, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(b"\x7f" * MiB)
        f.write(bytes(MiB))                      # written zeros cost nothing either
    d = drivers.get("ram")()
    d.open(str(seed), 0, {})
    try:
        assert d.size == 256 * MiB
        assert d.debug()["allocated"] == MiB
        assert bytes(d.pread(16, 100 * MiB)) == b"\x7f" * 16
        assert d.extents(MiB, 100 * MiB) == [(MiB, 0)]
        assert d.extents(MiB, 0) == [(MiB, drv.EXTENT_HOLE | drv.EXTENT_ZERO)]
    finally:
        d.close()


def test_ram_is_volatile_unless_writeback(serve, tmp_path):
    seed = tmp_path / "seed.img"
    seed.write_bytes(b"\x01" * (8 * MiB))
    s = serve("ram:%s" % seed)
    qemu_io(s.uri, "write -P 2 0 1M")
    s.stop()
    assert seed.read_bytes() == b"\x01" * (8 * MiB)

    s = serve("ram:%s?writeback=1" % seed)
    qemu_io(s.uri, "read -P 1 0 1M", "write -P 2 0 1M", "write -z 4M 1M", "flush")
    data = seed.read_bytes()
    assert data[:MiB] == b"\x02" * MiB and data[4 * MiB:5 * MiB] == bytes(MiB)
    # zeros are written back as a hole
    fd = os.open(seed, os.O_RDONLY)
    try:
        assert os.lseek(fd, 4 * MiB, os.SEEK_HOLE) == 4 * MiB
    finally:
        os.close(fd)
    qemu_io(s.uri, "write -P 3 7M 64k")
    s.stop()                                     # close writes back too
    assert seed.read_bytes()[7 * MiB:7 * MiB + 65536] == b"\x03" * 65536


def test_ram_writeback_creates_the_file(serve, tmp_path):
    path = tmp_path / "new.img"
    s = serve("ram:%s?size=%d&writeback=1" % (path, 4 * MiB))
    qemu_io(s.uri, "write -P 9 1M 4k")
    s.stop()
    assert os.path.getsize(path) == 4 * MiB
    assert path.read_bytes()[MiB:MiB + 4096] == b"\x09" * 4096


# -- null -------------------------------------------------------------------------------------------
def test_null_reads_zeros_discards_writes(serve):
    s = serve("null:whatever?size=%d" % (3 * MiB))
    assert run("nbdinfo", "--size", s.uri).stdout.strip() == str(3 * MiB)
    qemu_io(s.uri, "write -P 5 0 1M", "read -P 0 0 1M")
    assert nbd_map(s.uri) == [(0, 3 * MiB, 3)]


# -- image chains, with a test-only layered disk type -----------------------------------------
LAYERS = {}
BLOCK = 65536


@drivers.register
class LayerDriver(drv.Driver):
    """layer:<name>: an image in LAYERS holding some 64 KiB blocks, with a parent."""
    name = "test-layer"
    can_extents = True

    def open(self, path, flags, options):
        self.layer = LAYERS[path]
        self.size = self.layer["size"]
        self.path = path

    def pread(self, length, offset):
        fail = self.layer.get("fail")
        if fail:
            err = fail.pop(0) if isinstance(fail, list) else fail
            raise OSError(err, os.strerror(err))
        return bytes(self.layer["data"][offset:offset + length])

    def preadv(self, requests):
        self.layer["batches"] = self.layer.get("batches", 0) + 1
        return drv.Driver.preadv(self, requests)

    def extents(self, length, offset):
        held = self.layer["held"]
        first = offset // BLOCK
        state = first in held
        end = min(offset + length, self.size)
        pos = (first + 1) * BLOCK
        while pos < end and (pos // BLOCK in held) == state:
            pos += BLOCK
        return [(min(pos, end) - offset, 0 if state else drv.EXTENT_HOLE | drv.EXTENT_ZERO)]

    def get_parent_id(self):
        return self.layer.get("parent")

    def validate_parent(self, parent):
        if self.layer.get("bad_parent"):
            raise OSError(errno.EINVAL, "%s is not the parent of %s" % (parent.path, self.path))


def layer(name, size, blocks, parent=None, **kw):
    data = bytearray(size)
    for b, value in blocks.items():
        data[b * BLOCK:(b + 1) * BLOCK] = bytes([value]) * BLOCK
    LAYERS[name] = dict(size=size, data=data, held=set(blocks), parent=parent, **kw)


def test_chain_reads_through_parents(smtap_root):
    layer("base", 512 * 1024, {0: 1, 1: 1, 2: 1})             # smaller than the leaf
    layer("mid", MiB, {1: 2, 5: 2}, parent="test-layer:base")
    layer("leaf", MiB, {2: 3}, parent="test-layer:mid")
    v = vbd.VBD(7, settings.runtime_dir())
    v.open("test-layer:leaf", drv.OPEN_RDONLY)
    try:
        uri = nbd_uri(v.nbd_path)
        out = smtap_root / "out.img"
        run("nbdcopy", uri, out)
        got = out.read_bytes()
        want = bytearray(MiB)
        for b, value in {0: 1, 1: 2, 2: 3, 5: 2}.items():
            want[b * BLOCK:(b + 1) * BLOCK] = bytes([value]) * BLOCK
        assert got == bytes(want)
        # unaligned reads spanning layers
        qemu_io(uri, "read -P 1 1000 64536", "read -P 2 65536 65536", "read -P 0 196608 100000",
                readonly=True)
        assert nbd_map(uri) == [(0, 3 * BLOCK, 0), (3 * BLOCK, 2 * BLOCK, 3), (5 * BLOCK, BLOCK, 0),
                                (6 * BLOCK, MiB - 6 * BLOCK, 3)]
        st = v.stats()
        assert [i["name"] for i in st["images"]] == ["test-layer:leaf", "test-layer:mid",
                                                     "test-layer:base"]
        assert all(i["hits"][0] > 0 for i in st["images"])
        assert st["secs"][0] >= 4 * BLOCK // 512     # nbdcopy skips the holes
    finally:
        v.close()


def test_chain_reads_are_batched_per_image(smtap_root):
    """A batch of reads through a chain is one preadv per image (not one read per
    request), and it reads what the request-at-a-time path reads."""
    layer("b3", 512 * 1024, {0: 1, 1: 1, 2: 1, 7: 1})        # smaller than the others
    layer("m3", MiB, {1: 2, 5: 2, 9: 2}, parent="test-layer:b3")
    layer("l3", MiB, {2: 3, 9: 3, 10: 3}, parent="test-layer:m3")
    chain = image.Chain("test-layer:l3", drv.OPEN_RDONLY)
    try:
        rng = random.Random(3)
        requests = [(BLOCK * 2, 0), (BLOCK, 7 * BLOCK), (BLOCK, 11 * BLOCK), (100, BLOCK - 50)] + [
            (rng.randint(1, 3 * BLOCK), rng.randrange(0, MiB - 3 * BLOCK)) for _ in range(40)]
        before = {n: LAYERS[n].get("batches", 0) for n in ("b3", "m3", "l3")}
        bufs = chain.preadv(requests)
        assert {n: LAYERS[n].get("batches", 0) - before[n] for n in before} == \
            {"b3": 1, "m3": 1, "l3": 1}
        for (length, offset), buf in zip(requests, bufs):
            assert bytes(buf) == bytes(chain._read(0, length, offset)), (length, offset)
        assert bytes(bufs[1]) == b"\x01" * BLOCK    # from the base, through two holes
        assert bytes(bufs[2]) == bytes(BLOCK)       # past the smaller base: zeros
    finally:
        chain.close()


@drivers.register
class SectorDriver(LayerDriver):
    """A writable layer that takes only whole 512-byte sectors (as a VHD)."""
    name = "test-sectors"
    can_write = True
    write_align = 512

    def open(self, path, flags, options):
        LayerDriver.open(self, path, flags, options)
        self.layer.setdefault("sectors", {s for b in self.layer["held"]
                                          for s in range(b * BLOCK // 512, (b + 1) * BLOCK // 512)})

    def pwrite(self, buf, offset):
        if (len(buf) | offset) & 511:
            raise OSError(errno.EINVAL, "unaligned write %d at %d" % (len(buf), offset))
        self.layer["data"][offset:offset + len(buf)] = buf
        self.layer["sectors"].update(range(offset // 512, (offset + len(buf)) // 512))

    def extents(self, length, offset):
        """Per sector, as a VHD's bitmap."""
        held = self.layer["sectors"]
        state = offset // 512 in held
        pos = (offset // 512 + 1) * 512
        end = min(offset + length, self.size)
        while pos < end and (pos // 512 in held) == state:
            pos += 512
        return [(min(pos, end) - offset, 0 if state else drv.EXTENT_HOLE | drv.EXTENT_ZERO)]


def test_unaligned_writes_are_widened_with_the_chain_data(smtap_root):
    """A driver with write_align gets whole sectors: the engine reads the rest of a
    partial sector through the chain (the parent's data where the leaf holds none)."""
    layer("sp", MiB, {0: 0x11, 1: 0x11})
    layer("sl", MiB, {1: 0x22}, parent="test-layer:sp")
    chain = image.Chain("test-sectors:sl")
    try:
        want = bytearray(chain._read(0, 2 * BLOCK, 0))
        writes = [(b"\xaa" * 100, 1000), (b"\xbb" * 1024, BLOCK + 512), (b"\xcc" * 10, 1050),
                  (b"\xdd" * 700, BLOCK - 300)]
        assert chain.pwritev(writes) is None
        for buf, off in writes:
            want[off:off + len(buf)] = buf
        chain.zero(1000, 5000)                     # partial sectors at both ends
        want[5000:6000] = bytes(1000)
        assert bytes(chain._read(0, 2 * BLOCK, 0)) == bytes(want)
        assert bytes(LAYERS["sl"]["data"][512:1000]) == b"\x11" * 488   # from the parent
    finally:
        chain.close()


def test_chain_validation_failure_leaves_nothing_open(smtap_root):
    layer("p", MiB, {})
    layer("c", MiB, {}, parent="test-layer:p", bad_parent=True)
    v = vbd.VBD(8, settings.runtime_dir())
    with pytest.raises(OSError, match="not the parent"):
        v.open("test-layer:c")
    assert v.state == vbd.STATE_CLOSED and not os.path.exists(v.nbd_path)
    layer("loop", MiB, {}, parent="test-layer:loop")
    with pytest.raises(ValueError, match="deeper than"):
        image.Chain("test-layer:loop")


# -- pause / resume in process -------------------------------------------------------------------
def test_pause_holds_requests_and_resume_releases_them(smtap_root, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\x05" * (4 * MiB))
    other = tmp_path / "e.img"
    other.write_bytes(b"\x06" * (4 * MiB))
    v = vbd.VBD(9, settings.runtime_dir())
    v.open("aio:%s" % img)
    uri = nbd_uri(v.nbd_path)
    try:
        qemu_io(uri, "write -P 7 0 64k")
        v.pause()
        assert v.state == 0x2a and v.info()["size"] == 4 * MiB
        reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 6 0 64k", uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        assert reader.poll() is None                       # waiting for the resume
        v.resume("aio:%s" % other)                         # another image, same size
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0, out
        assert v.state == 0 and v.params == "aio:%s" % other

        # a failed resume (size differs) fails the waiting requests with EIO
        small = tmp_path / "s.img"
        small.write_bytes(bytes(MiB))
        v.pause()
        reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read 0 4k", uri],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        with pytest.raises(ValueError, match="differ"):
            v.resume("aio:%s" % small)
        out, _ = reader.communicate(timeout=30)
        assert "Input/output error" in out, out
        assert v.state == 0x2a
        v.resume()                                         # the right image: running again
        qemu_io(uri, "read -P 6 0 64k")
    finally:
        v.close()
    assert v.state == vbd.STATE_CLOSED and not os.path.exists(v.nbd_path)


def test_transient_errors_are_retried_until_the_timeout(smtap_root):
    layer("flaky", MiB, {0: 9}, fail=[errno.EAGAIN, errno.EBUSY, errno.EINTR])
    v = vbd.VBD(10, settings.runtime_dir())
    v.open("test-layer:flaky", drv.OPEN_RDONLY, timeout=3)
    uri = nbd_uri(v.nbd_path)
    try:
        started = time.time()
        qemu_io(uri, "read -P 9 0 64k", readonly=True)     # fails 3 times, then works
        assert 1.5 < time.time() - started < 10
        assert v.stats()["retries"] == 2
        LAYERS["flaky"]["fail"] = errno.EAGAIN               # never gets better
        started = time.time()
        out = qemu_io(uri, "read 0 4k", readonly=True, check=False).output
        assert "Input/output error" in out
        assert 1.5 < time.time() - started < 10
        LAYERS["flaky"]["fail"] = errno.ENOSPC               # not transient: at once
        started = time.time()
        out = qemu_io(uri, "read 0 4k", readonly=True, check=False).output
        assert "No space left on device" in out and time.time() - started < 1.5
        assert v.stats()["images"][0]["fail"][0] >= 2
    finally:
        v.close()


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"")
    os.truncate(backing, 8 * MiB)
    dev = run("losetup", "--find", "--show", backing).stdout.strip()
    yield dev, backing
    run("losetup", "--detach", dev, check=False)


def test_aio_on_a_block_device(serve, loop_device):
    dev, backing = loop_device
    s = serve("aio:%s" % dev)
    assert run("nbdinfo", "--size", s.uri).stdout.strip() == str(8 * MiB)
    qemu_io(s.uri, "write -P 0x3c 1M 64k", "write -P 0x3d 3000 1000", "flush",
            "write -z 2M 1M", "discard 4M 1M")
    qemu_io(s.uri, "read -P 0x3c 1M 64k", "read -P 0x3d 3000 1000", "read -P 0 2M 1M")
    run("losetup", "--detach", dev, check=False)
    s.stop()
    data = backing.read_bytes()
    assert data[MiB:MiB + 65536] == b"\x3c" * 65536 and data[3000:4000] == b"\x3d" * 1000
