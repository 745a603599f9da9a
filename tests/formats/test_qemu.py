"""qemu-img (format vpc) both ways: its images read right by us, ours by it."""
import json

import pytest

from smtap.formats import vhd as V
from lib.procs import run
from lib.sizes import MiB
from lib.vhd import Model, random_writes, seeded, vhd_util

SIZE = 24 * MiB


def qemu_info(path):
    return json.loads(run("qemu-img", "info", "-f", "vpc", "--output=json", str(path)).stdout)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_images_qemu_creates_are_read_right(work, subformat):
    path = work / ("q-%s.vhd" % subformat)
    run("qemu-img", "create", "-q", "-f", "vpc", "-o",
         "subformat=%s,force_size=on" % subformat, str(path), str(SIZE))
    writes = [(0xab, 0, 65536), (0x5c, 3 * MiB + 512, 4096), (0x11, SIZE - MiB, MiB)]
    for pattern, off, n in writes:
        run("qemu-io", "-f", "vpc", "-c", "write -P %#x %d %d" % (pattern, off, n), str(path))
    expected = bytearray(SIZE)
    for pattern, off, n in writes:
        expected[off:off + n] = bytes([pattern]) * n
    with V.VHD(str(path)) as img:
        assert img.size == SIZE == qemu_info(path)["virtual-size"]
        assert img.type == (V.HD_TYPE_FIXED if subformat == "fixed" else V.HD_TYPE_DYNAMIC)
        assert img.read(0, SIZE) == bytes(expected)
        if subformat == "dynamic":
            # qemu sets a new block's whole sector bitmap: blocks 0, 1 and the last.
            present = [(o, n) for o, n, p in img.extents(0, SIZE) if p]
            assert present == [(0, 4 * MiB), (SIZE - 2 * MiB, 2 * MiB)]
    vhd_util("check", "-n", path, check=0)
    assert vhd_util("query", "-v", "-n", path, check=0).text == "%d\n" % (SIZE >> 20)


def test_qemu_chs_sized_image(work):
    """Without force_size qemu sizes the disk by its CHS geometry (creator "qemu"): the
    footer says the same, and we agree with qemu on the size."""
    path = work / "chs.vhd"
    run("qemu-img", "create", "-q", "-f", "vpc", str(path), str(SIZE))
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x77 1M 1M", str(path))
    with V.VHD(str(path)) as img:
        assert img.size == qemu_info(path)["virtual-size"]
        assert img.read(MiB, MiB) == b"\x77" * MiB and not any(img.read(0, MiB))
    vhd_util("check", "-n", path, check=0)


@pytest.mark.parametrize("fixed", [False, True])
def test_images_we_write_read_right_in_qemu(work, fixed):
    path = work / "ours.vhd"
    vhd_util("create", "-n", path, "-s", SIZE >> 20, *(["-r"] if fixed else []), check=0)
    model = Model(SIZE)
    with V.VHD(str(path), writable=True) as img:
        random_writes(seeded(7), img, model, 60)
        model.write(img, b"\xee" * (2 * MiB), 4 * MiB)         # one whole block
    info = qemu_info(path)
    assert info["format"] == "vpc" and info["virtual-size"] == SIZE
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(work / "out.raw"))
    assert (work / "out.raw").read_bytes() == bytes(model.data)
    vhd_util("check", "-n", path, check=0)
    # vpc has no qemu-img check; qemu says so rather than passing silently.
    out = run("qemu-img", "check", "-f", "vpc", str(path), check=False)
    assert out.returncode != 0 and "does not support checks" in out.stderr


def test_qemu_converts_into_a_vhd_we_read(work):
    raw = work / "src.raw"
    data = seeded(3).getrandbits(8 * 4 * MiB).to_bytes(4 * MiB, "little")
    raw.write_bytes(bytes(3 * MiB) + data + bytes(SIZE - 7 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", str(raw),
         str(work / "c.vhd"))
    with V.VHD(str(work / "c.vhd")) as img:
        assert img.read(0, SIZE) == raw.read_bytes()
        assert img.allocated_blocks() == 3       # zero blocks stay unallocated
