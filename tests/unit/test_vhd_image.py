"""The module API a disk driver uses: geometry, BAT and bitmap state, extents, the
crash-safe allocation order, the strict-mode footer, parents, a pluggable file interface;
and the storage layer's size figures. vhd-util and td-util run in this process here (the
unit tier); tests/formats runs them as processes."""
import errno
import os

import pytest

from smtap.formats import vhd as V
from lib.sizes import MiB
from lib.vhd import td_util_here, vhd_util_here


class Recorder(V.PosixFile):
    """PosixFile that logs every write and flush, in order."""

    def __init__(self, path):
        super(Recorder, self).__init__(path, writable=True)
        self.log = []

    def pwrite(self, buf, offset):
        self.log.append(("write", offset, len(buf)))
        super(Recorder, self).pwrite(buf, offset)

    def pwritev(self, requests):
        for buf, offset in requests:
            self.pwrite(buf, offset)

    def flush(self):
        self.log.append(("flush",))
        super(Recorder, self).flush()


class MemFile(object):
    """The file interface over a bytearray: what a driver's own I/O path would provide."""
    is_block = False

    def __init__(self, data):
        self.data = bytearray(data)

    def pread(self, length, offset):
        return bytes(self.data[offset:offset + length])

    def pwrite(self, buf, offset):
        end = offset + len(buf)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = buf

    def preadv(self, reqs):
        return [self.pread(n, o) for n, o in reqs]

    def pwritev(self, reqs):
        for b, o in reqs:
            self.pwrite(b, o)

    def flush(self):
        pass

    def size(self):
        return len(self.data)

    def truncate(self, size):
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))

    def close(self):
        pass


def test_geometry_bat_bitmaps_extents(work):
    vhd_util_here("create", "-n", "d.vhd", "-s", 10, check=0)
    with V.VHD("d.vhd", writable=True) as img:
        assert (img.size, img.type, img.block_size, img.spb, img.bm_secs, img.blocks) == \
            (10 * MiB, V.HD_TYPE_DYNAMIC, 2 * MiB, 4096, 1, 5)
        assert img.has_batmap() and img.block_offset(0) is None and img.read_bitmap(0) is None
        img.write(b"\x01" * 1024, 2 * MiB + 4096)
        img.write(b"\x02" * (2 * MiB), 6 * MiB)
        assert img.extents(0, 10 * MiB) == [(0, 2 * MiB + 4096, False), (2 * MiB + 4096, 1024, True),
                                            (2 * MiB + 5120, 4 * MiB - 5120, False),
                                            (6 * MiB, 2 * MiB, True), (8 * MiB, 2 * MiB, False)]
        bm = img.read_bitmap(1)
        assert [V.test_bit(bm, i) for i in (7, 8, 9, 10)] == [False, True, True, False]
        assert img.block_full(3) and not img.block_full(1)      # batmap: full blocks only
        sec = img.block_offset(1)
        assert (sec + img.bm_secs) * 512 % 4096 == 0            # data 4 KiB aligned
        assert img.data_offset(2 * MiB + 4096) == (sec + 1) * 512 + 4096
        with pytest.raises(V.VHDError) as e:
            img.write(b"x" * 100, 0)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(V.VHDError) as e:
            img.read(10 * MiB - 512, 1024)
        assert e.value.errno == errno.ERANGE
    vhd_util_here("check", "-n", "d.vhd", check=0)


def test_allocation_order(work):
    vhd_util_here("create", "-n", "d.vhd", "-s", 10, check=0)
    rec = Recorder("d.vhd")
    img = V.VHD("d.vhd", writable=True, io=rec)
    eod, table = img.end_of_data(), img.header.table_offset
    img.write(b"\x05" * 4096, 2 * MiB + 8192)
    kinds = []
    for entry in rec.log:
        if entry[0] == "flush":
            kinds.append("flush")
        elif entry[1] == eod:
            kinds.append("zeroed bitmap")
        elif table <= entry[1] < table + 512:
            kinds.append("BAT")
        elif entry[2] == 512 and entry[1] > eod + 2 * MiB:
            kinds.append("footer past the block")
        elif entry[2] == 4096:
            kinds.append("data")
        elif entry[1] == img.block_offset(1) * 512:
            kinds.append("bitmap")
        else:
            kinds.append(entry)
    assert kinds == ["footer past the block", "zeroed bitmap", "flush", "BAT", "data", "bitmap"]
    img.close()
    rec.close()
    vhd_util_here("check", "-n", "d.vhd", check=0)


def test_several_blocks_allocated_at_once_share_one_barrier(work):
    """write_runs (coalesce's batches): the footer past the last new block, every new
    block's zeroed bitmap, one flush, the BAT, then the data and each bitmap once."""
    vhd_util_here("create", "-n", "d.vhd", "-s", 10, check=0)
    rec = Recorder("d.vhd")
    img = V.VHD("d.vhd", writable=True, io=rec)
    eod, table = img.end_of_data(), img.header.table_offset
    img.write_runs([(b"\x05" * 4096, 2 * MiB + 8192), (b"\x06" * 4096, 2 * MiB + 65536),
                    (b"\x07" * (2 * MiB), 6 * MiB), (b"\x08" * 512, 0)])
    bitmaps = dict((img.block_offset(b) * 512, b) for b in (0, 1, 3))
    kinds = []
    for entry in rec.log:
        if entry[0] == "flush":
            kinds.append("flush")
        elif table <= entry[1] < table + 512:
            kinds.append("BAT")
        elif entry[1] + entry[2] - 512 in bitmaps:     # (a zeroed one: with its gap)
            kinds.append(("bitmap" if kinds.count("flush") else "zeroed bitmap",
                          bitmaps[entry[1] + entry[2] - 512]))
        elif entry[2] == 512 and entry[1] >= eod + 6 * MiB:
            kinds.append("footer past the blocks")
        else:
            kinds.append("data" if entry[1] > eod else "batmap")
    assert kinds[:5] == ["footer past the blocks", ("zeroed bitmap", 0), ("zeroed bitmap", 1),
                         ("zeroed bitmap", 3), "flush"]
    assert kinds[5:] == ["BAT", "data", "data", "data", "data", ("bitmap", 0), ("bitmap", 1),
                         ("bitmap", 3), "batmap", "batmap"]      # block 3 full: its batmap bit
    assert img.extents(0, 10 * MiB) == [
        (0, 512, True), (512, 2 * MiB + 7680, False), (2 * MiB + 8192, 4096, True),
        (2 * MiB + 12288, 53248, False), (2 * MiB + 65536, 4096, True),
        (2 * MiB + 69632, 4 * MiB - 69632, False), (6 * MiB, 2 * MiB, True),
        (8 * MiB, 2 * MiB, False)]
    img.close()
    rec.close()
    vhd_util_here("check", "-n", "d.vhd", check=0)
    with V.VHD("d.vhd") as img:
        assert img.read(2 * MiB + 65536, 4096) == b"\x06" * 4096 and img.block_full(3)


class CrashPoints(MemFile):
    """MemFile that keeps the file as a kill -9 would leave it after each write."""

    def __init__(self, data):
        super(CrashPoints, self).__init__(data)
        self.states = []

    def pwrite(self, buf, offset):
        super(CrashPoints, self).pwrite(buf, offset)
        self.states.append(bytes(self.data))


@pytest.mark.parametrize("zero", [True, False], ids=["zeroed", "bitmap-only"])
def test_an_allocation_killed_after_any_write_leaves_the_poison_last(work, zero):
    """Strict mode: whatever write an allocation dies after, the file's last sector is the
    poison, so repair restores the footer from the backup and the image checks clean."""
    vhd_util_here("create", "-n", "d.vhd", "-s", 10, check=0)
    with V.VHD("d.vhd", writable=True) as img:
        img.write(b"\x01" * 512, 0)            # an old block, so the end is past the BAT
    mem = CrashPoints((work / "d.vhd").read_bytes())
    img = V.VHD("d.vhd", writable=True, strict=True, io=mem)
    mem.states = []
    img.allocate_blocks({1: zero, 3: zero})
    assert len(mem.states) >= 3
    for i, state in enumerate(mem.states):
        assert state[-512:] == V.FOOTER_POISON, "write %d of %d" % (i + 1, len(mem.states))
        (work / "c.vhd").write_bytes(state)
        vhd_util_here("repair", "-n", "c.vhd", check=0)
        vhd_util_here("check", "-n", "c.vhd", check=0)
        with V.VHD("c.vhd") as again:
            assert again.read(0, 512) == b"\x01" * 512


def test_strict_open_poisons_the_primary_footer(work):
    vhd_util_here("create", "-n", "d.vhd", "-s", 10, check=0)
    img = V.VHD("d.vhd", writable=True, strict=True)
    img.write(b"\x09" * 512, 0)
    img.write(b"\x0a" * 512, 8 * MiB)
    raw = (work / "d.vhd").read_bytes()
    assert raw[-512:] == V.FOOTER_POISON and raw[:8] == b"conectix"
    assert vhd_util_here("query", "-b", "-vf", "-n", "d.vhd", check=0).text == "10\nhidden: 0\n"
    assert td_util_here("query", "vhd", "-vb", "d.vhd", check=0).text == "10\n"
    assert "capacity=%d" % (10 * MiB) in vhd_util_here("scan", "-f", "-m", str(work / "*.vhd"),
                                                  check=0).text
    vhd_util_here("check", "-n", "d.vhd", check=22)
    vhd_util_here("check", "-i", "-n", "d.vhd", check=0)
    # A crash: the footer is never rewritten; repair restores it from the backup.
    img.io.close()
    img.io = None
    vhd_util_here("repair", "-n", "d.vhd", check=0)
    vhd_util_here("check", "-n", "d.vhd", check=0)
    with V.VHD("d.vhd") as again:
        assert again.read(8 * MiB, 512) == b"\x0a" * 512 and again.read(0, 512) == b"\x09" * 512
    # A clean close rewrites it.
    with V.VHD("d.vhd", writable=True, strict=True) as img:
        img.write(b"\x0b" * 512, 4 * MiB)
    vhd_util_here("check", "-n", "d.vhd", check=0)


def test_parents_from_locators(work):
    os.mkdir("a")
    os.mkdir("elsewhere")
    vhd_util_here("create", "-n", "a/p.vhd", "-s", 8, check=0)
    vhd_util_here("snapshot", "-n", "a/c.vhd", "-p", "a/p.vhd", check=0)
    vhd_util_here("create", "-n", "elsewhere/p.vhd", "-s", 8, check=0)     # a decoy
    os.chdir("elsewhere")
    with V.VHD("../a/c.vhd") as c, V.VHD("../a/p.vhd") as p, V.VHD("p.vhd") as decoy:
        assert c.parent_path() == str(work / "a" / "p.vhd")            # the child's directory
        assert c.parent_path(resolve=False) == "./p.vhd"
        c.validate_parent(p)
        with pytest.raises(V.VHDError) as e:
            c.validate_parent(decoy)
        assert e.value.errno == errno.EINVAL
    assert V.chain_depth("../a/c.vhd") == 2


def test_the_file_interface_is_pluggable(work):
    vhd_util_here("create", "-n", "d.vhd", "-s", 6, check=0)
    mem = MemFile((work / "d.vhd").read_bytes())
    with V.VHD("d.vhd", writable=True, io=mem) as img:
        img.write(b"\x33" * 8192, 3 * MiB)
    (work / "d.vhd").write_bytes(bytes(mem.data))       # nothing went to the file itself
    with V.VHD("d.vhd") as img:
        assert img.read(3 * MiB, 8192) == b"\x33" * 8192
    vhd_util_here("check", "-n", "d.vhd", check=0)


def test_storage_layer_size_figures(work):
    assert V.overhead_empty(2 << 40) == 4329472
    assert V.overhead_bitmap(24 * MiB) == 49152
    vhd_util_here("create", "-n", "big.vhd", "-s", 2 * 1024 * 1024, check=0)    # 2 TiB, empty
    assert os.path.getsize("big.vhd") <= V.overhead_empty(2 << 40)
    vhd_util_here("check", "-n", "big.vhd", check=0)
    vhd_util_here("create", "-n", "d.vhd", "-s", 24, check=0)
    empty = os.path.getsize("d.vhd")
    with V.VHD("d.vhd", writable=True) as img:
        img.write(b"\x01" * (24 * MiB), 0)
    growth = os.path.getsize("d.vhd") - empty - 24 * MiB
    assert 12 * 512 <= growth <= V.overhead_bitmap(24 * MiB)
    assert vhd_util_here("query", "-a", "-n", "d.vhd", check=0).text == "12\n"
