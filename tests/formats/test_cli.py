"""vhd-util and td-util: the exact output the storage layer parses, exit status = errno,
usage on bad arguments, one clear line for a file that is not a VHD (left untouched)."""
import errno
import os
import re

import pytest

from smtap.formats import vhd as V
from lib.sizes import MiB
from lib.vhd import fingerprint, td_util, vhd_util


def test_query_reproduces_upstreams_fixture(work):
    """sm's test fixture: query -vsafp of a 51200 MB base with 18856 blocks allocated."""
    vhd_util("create", "-n", "base.vhd", "-s", 51200, check=0)
    with V.VHD("base.vhd", writable=True) as img:
        img.ordered = False                 # 18856 allocations: skip the barriers
        for blk in range(18856):
            img.write(b"\x01" * 512, blk * 2 * MiB)
    out = vhd_util("query", "--debug", "-vsafp", "-n", "base.vhd", check=0)
    assert out.text == "51200\n39621239296\nbase.vhd has no parent\nhidden: 0\n18856\n"
    assert out.err == ""


def test_query_prints_in_upstreams_order(work):
    vhd_util("create", "-n", "p.vhd", "-s", 10, "-S", 100, check=0)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "p.vhd", check=0)
    vhd_util("set", "-n", "c.vhd", "-f", "marker", "-v", "1", check=0)
    out = vhd_util("query", "-S", "-a", "-d", "-m", "-f", "-p", "-s", "-v", "-n", "c.vhd", check=0)
    size = V.VHD("c.vhd").phys_size()
    assert out.text == "10\n%d\n%s\nhidden: 0\nmarker: 1\nchain depth: 2\n0\n10\n" % (
        size, work / "p.vhd")
    assert vhd_util("query", "-S", "-n", "p.vhd", check=0).text == "100\n"   # presized
    assert vhd_util("query", "-u", "-p", "-n", "c.vhd", check=0).text == "./p.vhd\n"
    os.rename("p.vhd", "gone.vhd")
    out = vhd_util("query", "-p", "-n", "c.vhd")
    assert out.text == "query failed\n" and out.returncode == errno.ENOENT
    assert len(out.err.splitlines()) == 1


def test_set_modify_and_scan(work):
    vhd_util("create", "-n", "a.vhd", "-s", 8, check=0)
    vhd_util("create", "-n", "b.vhd", "-s", 8, check=0)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "a.vhd", "-e", check=0)
    with V.VHD("c.vhd", writable=True) as c:
        c.write(b"\x01" * 4096, 0)
    vhd_util("set", "--debug", "-n", "a.vhd", "-f", "hidden", "-v", "1", check=0)
    assert vhd_util("query", "-f", "-n", "a.vhd", check=0).text == "hidden: 1\n"
    lines = vhd_util("scan", "-f", "-m", str(work / "*.vhd"), check=0).text.splitlines()
    sizes = [os.path.getsize(n) for n in ("a.vhd", "b.vhd", "c.vhd")]
    assert lines == ["vhd=a.vhd capacity=%d size=%d hidden=1 parent=none" % (8 * MiB, sizes[0]),
                     "vhd=b.vhd capacity=%d size=%d hidden=0 parent=none" % (8 * MiB, sizes[1]),
                     "vhd=c.vhd capacity=%d size=%d hidden=0 parent=a.vhd" % (8 * MiB, sizes[2])]
    # modify -p: reparent (uuid, name and locators follow); -z: reset; -s: physical size
    vhd_util("modify", "--debug", "-p", str(work / "b.vhd"), "-n", "c.vhd", check=0)
    with V.VHD("c.vhd") as c, V.VHD("b.vhd") as b:
        assert c.parent_uuid == b.uuid and c.parent_name() == "b.vhd"
        assert c.parent_path() == str(work / "b.vhd")
    vhd_util("check", "-n", "c.vhd", check=0)
    assert vhd_util("query", "-a", "-n", "c.vhd", check=0).text == "1\n"
    vhd_util("modify", "-z", "-n", "c.vhd", check=0)
    assert vhd_util("query", "-a", "-n", "c.vhd", check=0).text == "0\n"
    phys = int(vhd_util("query", "-s", "-n", "c.vhd", check=0).text)
    assert phys == os.path.getsize("c.vhd")
    vhd_util("modify", "-s", phys + 4 * MiB, "-n", "c.vhd", check=0)
    assert os.path.getsize("c.vhd") == phys + 4 * MiB
    out = vhd_util("modify", "-s", 1024, "-n", "c.vhd")
    assert out.returncode == 22 and out.text.startswith("failed to set physical size to 1024: -22")
    # scan: the error line of a file that is not a VHD; -c goes on, exit 0
    (work / "junk.vhd").write_bytes(b"x" * 4096)
    out = vhd_util("scan", "-f", "-m", str(work / "*.vhd"))
    assert out.returncode == 22
    assert out.text.splitlines()[-1] == \
        "vhd=%s scan-error=-22 error-message='opening file'" % (work / "junk.vhd")
    out = vhd_util("scan", "-f", "-c", "-m", str(work / "*.vhd"), check=0)
    assert len(out.text.splitlines()) == 4
    assert vhd_util("scan", "-f", "-m", str(work / "nothing*.vhd"), check=0).text == ""
    out = vhd_util("scan", "-f", "-a", "-m", str(work / "c.vhd"), check=0)
    assert [l.split()[0] for l in out.text.splitlines()] == ["vhd=c.vhd", "vhd=b.vhd"]


def test_read_dump_parsed_as_the_storage_layer_does(work):
    vhd_util("create", "-n", "p.vhd", "-s", 8, check=0)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "p.vhd", check=0)
    for name, kind in (("p.vhd", "Dynamic"), ("c.vhd", "Differencing")):
        text = vhd_util("read", "--debug", "-p", "-n", name, check=0).text
        assert re.match(r".*Disk type\s+: (\S+) hard disk.*", text, flags=re.S).group(1) == kind
        assert "Hidden              : 0\n" in text
    text = vhd_util("read", "-p", "-n", "c.vhd", check=0).text
    names = [l.split(":")[1].strip() for l in text.splitlines() if "decoded name :" in l]
    assert names == ["./p.vhd"] * 3
    assert [l.split(":")[1].strip() for l in text.splitlines() if "code  " in l] == \
        ["PLAT_CODE_MACX", "PLAT_CODE_W2KU", "PLAT_CODE_W2RU"]


def test_read_block_bitmap(work):
    vhd_util("create", "-n", "d.vhd", "-s", 21, check=0)      # 11 blocks (rounded up)
    with V.VHD("d.vhd", writable=True) as img:
        for blk in (0, 3, 8, 10):
            img.write(b"\x01" * 512, blk * 2 * MiB)
    out = vhd_util("read", "--debug", "-B", "-n", "d.vhd", check=0)
    assert out.stdout == bytes([0x80 | 0x10, 0x80 | 0x20])


def test_key(work):
    vhd_util("create", "-n", "p.vhd", "-s", 8, check=0)
    assert vhd_util("key", "-p", "-n", "p.vhd", check=0).text == "none\n"
    nonce, hashed = "ab" * 32, "cd" * 32
    vhd_util("key", "-s", "-n", "p.vhd", "-N", nonce, "-H", hashed, check=0)
    assert vhd_util("key", "-p", "-n", "p.vhd", check=0).text == "%s %s\n" % (nonce, hashed)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "p.vhd", check=0)      # the keyhash follows
    assert vhd_util("key", "-p", "-n", "c.vhd", check=0).text == "%s %s\n" % (nonce, hashed)
    key = os.urandom(32)
    (work / "c,aes-xts-plain,256.key").write_bytes(key)
    vhd_util("key", "-c", "-n", "c.vhd", "-k", "c,aes-xts-plain,256.key", check=22)
    vhd_util("key", "-s", "-n", "c.vhd", "-N", nonce, "-k", "c,aes-xts-plain,256.key", check=0)
    vhd_util("key", "-c", "-n", "c.vhd", "-k", "c,aes-xts-plain,256.key", check=0)
    calc = vhd_util("key", "-C", "-N", nonce, "-k", "c,aes-xts-plain,256.key", check=0).text
    assert calc == V.keyhash_of(bytes.fromhex(nonce), key).hex() + "\n"


def test_create_errors(work):
    out = vhd_util("create", "-n", "x.vhd", "-s", 100, "-S", 10)
    assert out.returncode == 22 and out.text == "Error: <-S size> must be greater than <-s size>\n"
    assert not os.path.exists("x.vhd")
    vhd_util("create", "-n", "f.vhd", "-s", 4, "-r", check=0)
    assert os.path.getsize("f.vhd") == 4 * MiB + 512
    assert vhd_util("query", "-vsp", "-n", "f.vhd", check=0).text == \
        "4\n%d\nf.vhd has no parent\n" % (4 * MiB + 512)


BAD_ARGS = [["query", "-n"], ["query", "-v"], ["query", "-Z", "-n", "x"], ["create", "-n", "x"],
            ["create", "-s", "abc", "-n", "x"], ["snapshot", "-n", "x"], ["set", "-n", "x"],
            ["modify"], ["resize", "-n", "x", "-s", "8"], ["resize", "-n", "x", "-s", "8", "-f",
                                                            "-j", "j"],
            ["revert", "-n", "x"], ["coalesce"], ["check"], ["check", "-n", "x", "-b", "-B"],
            ["repair"], ["scan"], ["read", "-n", "x", "-b", "y"], ["key", "-n", "x"],
            ["bogus"], []]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=[" ".join(a) or "none" for a in BAD_ARGS])
def test_bad_arguments(work, argv):
    out = vhd_util(*argv)
    assert out.returncode == errno.EINVAL
    assert out.text == "" and out.err.strip()
    assert not os.path.exists("x")


NOT_VHD = [["query", "-vsfp", "-n"], ["check", "-n"], ["read", "-p", "-n"], ["read", "-B", "-n"],
           ["set", "-f", "hidden", "-v", "1", "-n"], ["modify", "-z", "-n"],
           ["resize", "-s", "64", "-j", "j", "-n"], ["resize", "-s", "64", "-f", "-n"],
           ["coalesce", "-n"], ["repair", "-n"], ["key", "-p", "-n"], ["fill", "-n"],
           ["snapshot", "-n", "child.vhd", "-p"]]


@pytest.mark.parametrize("argv", NOT_VHD, ids=[a[0] + " " + a[1] for a in NOT_VHD])
def test_a_file_that_is_not_a_vhd(work, argv):
    junk = work / "junk.vhd"
    junk.write_bytes(os.urandom(3 * 4096))
    before = fingerprint(junk)
    out = vhd_util("--debug", *(argv + [str(junk)]))
    assert out.returncode == errno.EINVAL, (out.text, out.err)
    assert len(out.err.splitlines()) == 1 and re.search("not a (valid )?VHD", out.err), out.err
    assert "Traceback" not in out.err
    assert fingerprint(junk) == before
    assert sorted(os.listdir(str(work))) == ["junk.vhd"]


def test_td_util(work):
    td_util("create", "vhd", 10, "p.vhd", check=0)
    td_util("snapshot", "vhd", "c.vhd", "p.vhd", check=0)
    assert td_util("query", "vhd", "-vpfd", "c.vhd", check=0).text == \
        "10\n%s\nhidden: 0\nchain depth: 2\n" % (work / "p.vhd")
    td_util("set", "vhd", "p.vhd", "hidden", "1", check=0)
    # The file SR's parse of `query vhd -vpfb` while a tapdisk holds the leaf.
    with V.VHD("c.vhd", writable=True, strict=True):
        lines = td_util("query", "vhd", "-vpfb", "c.vhd", check=0).text.splitlines()
    assert lines[0] == "10" and os.path.basename(lines[1]) == "p.vhd" and lines[2] == "hidden: 0"
    assert td_util("query", "vhd", "-f", "p.vhd", check=0).text == "hidden: 1\n"
    assert td_util("snapshot", "vhd", "d.vhd", "nope.vhd").returncode == errno.ENOENT
    td_util("create", "aio", 2, "r.img", check=22)              # sparse aio: refused
    td_util("create", "aio", "-r", 2, "r.img", check=0)
    assert td_util("query", "aio", "-vpf", "r.img", check=0).text == \
        "2\nr.img has no parent\nhidden: 0\n"
    assert td_util("query", "vhd", "-Z", "c.vhd").returncode == errno.EINVAL
    assert td_util("query", "bogus", "c.vhd").returncode == 255
    (work / "junk").write_bytes(b"j" * 1024)
    out = td_util("query", "vhd", "-v", "junk")
    assert out.returncode == 22 and out.text == "failed opening junk: -22\n"
    assert len(out.err.splitlines()) == 1


def test_scan_lvm_volume_group(work, monkeypatch):
    """-l VG: the group's volumes (here files under SMTAP_ROOT's /dev/VG), by LV name."""
    monkeypatch.setenv("SMTAP_ROOT", str(work))
    vg = work / "dev" / "VG_XenStorage-sr1"
    vg.mkdir(parents=True)
    for name, mb in (("VHD-aaa", 8), ("VHD-bbb", 4), ("other", 4)):
        vhd_util("create", "-n", vg / name, "-s", mb, check=0)
    out = vhd_util("scan", "-f", "-l", "VG_XenStorage-sr1", "-m", "VHD-*", check=0)
    assert out.text.splitlines() == [
        "vhd=VHD-aaa capacity=%d size=%d hidden=0 parent=none" % (8 * MiB, os.path.getsize(str(vg / "VHD-aaa"))),
        "vhd=VHD-bbb capacity=%d size=%d hidden=0 parent=none" % (4 * MiB, os.path.getsize(str(vg / "VHD-bbb")))]
    assert vhd_util("scan", "-f", "-l", "nosuchvg", "-m", "VHD-*", check=0).text == ""
