"""vhd-util check: valid on what we write; each corruption of the list reported, with its
message, the metadata dump and a non-zero exit (the errno). vhd-util runs in this process
here (the unit tier); tests/formats runs it as a process."""
import os
import struct

import pytest

from smtap.formats import vhd as V
from lib.sizes import MiB
from lib.vhd import vhd_util_here


def image(work, name="d.vhd", blocks=(0, 1)):
    vhd_util_here("create", "-n", name, "-s", 16, check=0)
    with V.VHD(name, writable=True) as img:
        for b in blocks:
            img.write(b"\x5a" * 4096, b * 2 * MiB)
    return str(work / name)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rewrite_footers(path, **fields):
    """Both footer copies with `fields` changed and a valid checksum."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        footer = V.Footer.unpack(f.read(512))
    for k, v in fields.items():
        setattr(footer, k, v)
    raw = footer.seal()
    patch(path, 0, raw)
    patch(path, size - 512, raw)


def rewrite_header(path, **fields):
    with open(path, "rb") as f:
        f.seek(512)
        h = V.Header.unpack(f.read(1024))
    for k, v in fields.items():
        setattr(h, k, v)
    patch(path, 512, h.seal())


def bat_entry(path, blk, value):
    patch(path, 1536 + 4 * blk, struct.pack(">I", value))


def set_batmap_bit(path, blk, size_secs=None):
    """Mark blk full in the batmap and keep its checksum valid."""
    with V.VHD(path) as img:
        bh_off = img.batmap_header_offset()
        bh, bmap = img.batmap, img.batmap_map
        V.set_bit(bmap, blk)
        if size_secs is not None:
            bh.batmap_size = size_secs
        bh.checksum = img.batmap_checksum(bh, bmap)
        patch(path, bh.batmap_offset, bytes(bmap))
        patch(path, bh_off, bh.pack())


def bad_check(path, message):
    out = vhd_util_here("check", "-n", path)
    lines = out.text.splitlines()
    assert out.returncode == 22, out.text
    assert lines[0] == message
    assert lines[1] == "%s appears invalid; dumping metadata" % path
    assert "VHD Footer Summary:" in out.text
    assert len(out.err.splitlines()) == 1
    return out


def test_valid_images_pass(work):
    for name, args in (("dyn.vhd", []), ("fix.vhd", ["-r"]), ("pre.vhd", ["-S", 64])):
        vhd_util_here("create", "-n", name, "-s", 8, *args, check=0)
        assert vhd_util_here("check", "-n", name, check=0).text == "%s is valid\n" % name
    path = image(work)
    assert vhd_util_here("check", "-b", "-n", path, check=0).text == "%s is valid\n" % path


CORRUPTIONS = [
    ("footer cookie", lambda p: patch(p, os.path.getsize(p) - 512, b"garbage!"),
     "primary footer invalid: invalid cookie"),
    ("footer checksum", lambda p: patch(p, os.path.getsize(p) - 512 + 48, b"\x00\x00\x01"),
     "primary footer invalid: invalid checksum"),
    ("file format version", lambda p: rewrite_footers(p, ff_version=0x20000),
     "primary footer invalid: invalid file format version"),
    ("future timestamp", lambda p: rewrite_footers(p, timestamp=V.vhd_time() + 86400),
     "primary footer invalid: creation time in future"),
    ("hidden not 0/1", lambda p: rewrite_footers(p, hidden=2),
     "primary footer invalid: invalid 'hidden' state"),
    ("null uuid", lambda p: rewrite_footers(p, uuid=bytes(16)),
     "primary footer invalid: invalid (NULL) uuid"),
    ("footers differ", lambda p: patch(p, 0, V.Footer.unpack(open(p, "rb").read(512)).pack(
        hidden=1, checksum=V.Footer.unpack(open(p, "rb").read(512)).checksum - 1)),
     "primary and backup footers do not match"),
    ("header cookie", lambda p: patch(p, 512, b"cxsparsX"), "header is invalid: invalid cookie"),
    ("header checksum", lambda p: patch(p, 512 + 36, b"\x01"), "header is invalid: invalid checksum"),
    ("header version", lambda p: rewrite_header(p, hdr_ver=0x20000),
     "header is invalid: invalid header version"),
    ("header data offset", lambda p: rewrite_header(p, data_offset=0),
     "header is invalid: invalid data offset"),
    ("block size", lambda p: rewrite_header(p, block_size=3 << 20),
     "header is invalid: invalid block size"),
    ("BAT outside the file", lambda p: bat_entry(p, 1, 0x100000),
     "block 1 (offset 0x100000) clobbers footer"),
    ("BAT into the headers", lambda p: bat_entry(p, 1, 2), "block 1 (offset 0x2) clobbers headers"),
    ("BAT overlap", lambda p: bat_entry(p, 1, V.VHD(p).bat[0] + 8),
     None),
    ("batmap full, BAT unallocated", lambda p: set_batmap_bit(p, 5),
     "batmap shows unallocated block 5 full"),
    ("batmap smaller than the BAT", lambda p: set_batmap_bit(p, 0, size_secs=0),
     "batmap is invalid: invalid size zero"),
]


@pytest.mark.parametrize("what,corrupt,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corruption_detected(work, what, corrupt, message):
    path = image(work)
    vhd_util_here("check", "-n", path, check=0)
    corrupt(path)
    if message is None:         # overlap: which block clobbers which depends on the order
        with V.VHD(path) as img:
            a, b = sorted([(img.bat[0], 0), (img.bat[1], 1)])
        message = "block %d (offset %#x) clobbers block %d (offset %#x)" % (b[1], b[0], a[1], a[0])
    bad_check(path, message)


def test_batmap_bat_size_mismatch(work):
    vhd_util_here("create", "-n", "big.vhd", "-s", 16 * 1024, check=0)     # 8192 blocks
    path = str(work / "big.vhd")
    with V.VHD(path) as img:
        bh, off = img.batmap, img.batmap_header_offset()
    bh.batmap_size = 1                                                  # 4096 bits < 8192
    patch(path, off, bh.pack())
    bad_check(path, "batmap is invalid: batmap-BAT size mismatch")


def test_parent_uuid_mismatch(work):
    vhd_util_here("create", "-n", "p.vhd", "-s", 8, check=0)
    vhd_util_here("snapshot", "-n", "c.vhd", "-p", "p.vhd", "-e", check=0)
    rewrite_header(str(work / "c.vhd"), prt_uuid=os.urandom(16))
    bad_check("c.vhd", "invalid parent %s: invalid parent uuid" % (work / "p.vhd"))
    vhd_util_here("check", "-I", "-n", "c.vhd", check=0)                    # -I: ignore it


def test_missing_primary_footer(work):
    path = image(work)
    with V.VHD(path, writable=True, strict=True):       # as a tapdisk holding it open
        bad_check(path, "primary footer invalid: invalid cookie")
        vhd_util_here("check", "-i", "-n", path, check=0)
        assert vhd_util_here("query", "-b", "-v", "-n", path, check=0).text == "16\n"
    vhd_util_here("check", "-n", path, check=0)


def test_check_parents(work):
    vhd_util_here("create", "-n", "a.vhd", "-s", 8, check=0)
    vhd_util_here("snapshot", "-n", "b.vhd", "-p", "a.vhd", "-e", check=0)
    vhd_util_here("snapshot", "-n", "c.vhd", "-p", "b.vhd", "-e", check=0)
    assert vhd_util_here("check", "-p", "-n", "c.vhd", check=0).text == \
        "c.vhd is valid\n%s is valid\n%s is valid\n" % (work / "b.vhd", work / "a.vhd")
    patch(str(work / "a.vhd"), 0, b"x")
    out = vhd_util_here("check", "-p", "-n", "c.vhd")
    assert out.returncode == 22 and "backup footer invalid: invalid cookie" in out.text
