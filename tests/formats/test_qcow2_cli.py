"""qcow2-util's two faces as real processes: vhd-util's output and exit codes (errno)
for the file SR, and qemu-img's argv as XCP-ng's SM runs it, compared with qemu-img on
twin images. Bad arguments: usage, non-zero; a file that is not qcow2: one line, EINVAL,
the file untouched."""
import errno
import json
import os
import re
import shutil

from smtap.formats import qcow2 as Q
from lib.procs import run
from lib.qcow2 import qemu_view
from lib.sizes import MiB
from lib.vhd import fingerprint, tool

SIZE = 16 * MiB


def q2(*args, **kw):
    return tool("qcow2-util", *args, **kw)


def qio(path, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*(args + [str(path)]))


def qemu_map_text(path):
    return run("qemu-img", "map", "--output=json", str(path)).stdout


# -- vhd-util's face ----------------------------------------------------------------------
def test_query_create_snapshot_set_like_vhd_util(work):
    q2("create", "--debug", "-n", "base.qcow2", "-s", SIZE >> 20, check=0)
    qio("base.qcow2", "write -P 1 0 1M", "write -P 2 4M 64k")
    q2("snapshot", "-n", "snap.qcow2", "-p", "base.qcow2", check=0)
    out = q2("query", "-S", "-a", "-d", "-m", "-f", "-p", "-s", "-v", "-n", "snap.qcow2", check=0)
    size = os.path.getsize("snap.qcow2")
    assert out.text == "16\n%d\n%s\nhidden: 0\nmarker: 0\nchain depth: 2\n0\n4194304\n" % (
        size, work / "base.qcow2")
    assert out.err == ""
    out = q2("query", "-vsfpda", "-n", "base.qcow2", check=0)
    assert out.text == "16\n%d\nbase.qcow2 has no parent\nhidden: 0\nchain depth: 1\n17\n" \
        % os.path.getsize("base.qcow2")
    assert q2("query", "-u", "-p", "-n", "snap.qcow2", check=0).text == "base.qcow2\n"
    with Q.Image("snap.qcow2") as img:             # relative name, its format recorded
        assert (img.backing_file, img.backing_format) == ("base.qcow2", "qcow2")
    q2("set", "-n", "base.qcow2", "-f", "hidden", "-v", 1, check=0)
    assert q2("query", "-f", "-n", "base.qcow2", check=0).text == "hidden: 1\n"
    run("qemu-img", "check", "base.qcow2")
    # an empty snapshot is skipped by the next one, unless -e
    q2("snapshot", "-n", "s2.qcow2", "-p", "snap.qcow2", check=0)
    assert q2("query", "-p", "-n", "s2.qcow2", check=0).text == "%s\n" % (work / "base.qcow2")
    q2("snapshot", "-e", "-n", "s3.qcow2", "-p", "snap.qcow2", check=0)
    assert q2("query", "-d", "-n", "s3.qcow2", check=0).text == "chain depth: 3\n"
    out = q2("snapshot", "-e", "-l", 3, "-n", "s4.qcow2", "-p", "s3.qcow2")
    assert out.returncode == errno.ENOSPC and "snapshot depth exceeded" in out.text
    os.rename("base.qcow2", "gone.qcow2")
    out = q2("query", "-p", "-n", "snap.qcow2")
    assert out.text == "query failed\n" and out.returncode == errno.ENOENT
    assert len(out.err.splitlines()) == 1


def test_raw_parent_reparent_reset_resize(work):
    with open("base.raw", "wb") as f:
        f.write(b"\x07" * SIZE)
    q2("snapshot", "-m", "-n", "c.qcow2", "-p", "base.raw", check=0)
    assert q2("query", "-vd", "-n", "c.qcow2", check=0).text == "16\nchain depth: 2\n"
    qio("c.qcow2", "write -P 9 0 64k")
    assert qemu_view("c.qcow2", work) == b"\x09" * 65536 + b"\x07" * (SIZE - 65536)
    q2("create", "-n", "other.qcow2", "-s", 32, check=0)
    q2("modify", "-p", work / "other.qcow2", "-n", "c.qcow2", check=0)
    with Q.Image("c.qcow2") as img:
        assert (img.backing_file, img.backing_format) == ("other.qcow2", "qcow2")
    q2("modify", "-m", "-p", work / "base.raw", "-n", "c.qcow2", check=0)
    with Q.Image("c.qcow2") as img:
        assert (img.backing_file, img.backing_format) == ("base.raw", "raw")
    before = os.path.getsize("c.qcow2")
    q2("modify", "-z", "-n", "c.qcow2", check=0)
    assert q2("query", "-a", "-n", "c.qcow2", check=0).text == "0\n"
    assert os.path.getsize("c.qcow2") < before
    assert qemu_view("c.qcow2", work) == b"\x07" * SIZE
    run("qemu-img", "check", "c.qcow2")
    q2("resize", "-n", "c.qcow2", "-s", 64, "-j", "journal", check=0)
    q2("resize", "-n", "c.qcow2", "-s", 80, "-f", check=0)
    assert q2("query", "-v", "-n", "c.qcow2", check=0).text == "80\n"
    view = qemu_view("c.qcow2", work)                 # the new part reads zeros
    assert view == b"\x07" * SIZE + bytes(64 * MiB)
    run("qemu-img", "check", "c.qcow2")


def test_coalesce_scan_read_check_repair(work):
    q2("create", "-n", "p.qcow2", "-s", SIZE >> 20, check=0)
    qio("p.qcow2", "write -P 1 0 2M", "write -P 3 8M 1M")
    q2("snapshot", "-n", "c.qcow2", "-p", "p.qcow2", check=0)
    qio("c.qcow2", "write -P 2 64k 64k", "write -z 8M 64k", "write -P 4 12M 100k")
    view = qemu_view("c.qcow2", work)
    child = fingerprint("c.qcow2")
    out = q2("coalesce", "-n", "c.qcow2", check=0)
    # 64k + 64k of zeros + 100k rounded to clusters (the rest copied from the parent's view)
    assert out.text == "Coalesced %d sectors" % ((64 + 64 + 128) * 1024 // 512)
    assert qemu_view("p.qcow2", work) == view and fingerprint("c.qcow2") == child
    run("qemu-img", "check", "p.qcow2")
    lines = q2("scan", "-f", "-m", str(work / "*.qcow2"), check=0).text.splitlines()
    assert lines == [
        "vhd=c.qcow2 capacity=%d size=%d hidden=0 parent=p.qcow2" % (SIZE, os.path.getsize("c.qcow2")),
        "vhd=p.qcow2 capacity=%d size=%d hidden=0 parent=none" % (SIZE, os.path.getsize("p.qcow2"))]
    bitmap = q2("read", "-B", "-n", "c.qcow2", check=0).stdout
    assert len(bitmap) == SIZE // 65536 // 8
    bits = [i for i in range(SIZE // 65536) if bitmap[i >> 3] & (0x80 >> (i & 7))]
    assert bits == [1] + list(range(192, 194))     # 8M's is a zero cluster: no data
    assert "Hidden" in q2("read", "-p", "-n", "c.qcow2", check=0).text
    assert q2("check", "-n", "p.qcow2", check=0).text == "p.qcow2 is valid\n"
    # a leak (an L1 entry dropped): still valid; repair frees it
    with Q.Image("p.qcow2") as img:
        l1 = img.header.l1_table_offset
    with open("p.qcow2", "r+b") as f:
        f.seek(l1)
        f.write(bytes(8))
    out = q2("check", "-n", "p.qcow2", check=0)
    assert out.text.startswith("p.qcow2 is valid\n") and "leaked clusters" in out.text
    q2("repair", "-n", "p.qcow2", check=0)
    run("qemu-img", "check", "p.qcow2")
    # a corruption (two entries, one cluster): invalid, exit EINVAL; repair makes it consistent
    with Q.Image("c.qcow2") as img:
        table = img.l1[0] & Q.OFFSET_MASK
        first = img.entry(1)
    with open("c.qcow2", "r+b") as f:
        f.seek(table + 5 * 8)
        f.write(first.to_bytes(8, "big"))
    out = q2("check", "-n", "c.qcow2")
    assert out.returncode == errno.EINVAL and "appears invalid" in out.text
    assert len(out.err.splitlines()) == 1
    q2("repair", "-n", "c.qcow2", check=0)
    assert run("qemu-img", "check", "c.qcow2", check=False).returncode == 0


def test_usage_and_non_qcow2_files(work):
    out = q2()
    assert out.returncode == errno.EINVAL and "usage" in out.err
    out = q2("frobnicate")
    assert out.returncode == errno.EINVAL and "invalid COMMAND" in out.err
    out = q2("query", "-v")
    assert out.returncode == errno.EINVAL and out.err.startswith("options:")
    assert q2("query", "-h", check=0).text.startswith("options:")
    assert q2("set", "-n", "x", "-f", "marker", "-v", "1").returncode == errno.EINVAL
    with open("plain.txt", "wb") as f:
        f.write(b"not an image\n" * 1000)
    q2("create", "-n", "ok.qcow2", "-s", 8, check=0)
    before = fingerprint("plain.txt")
    for argv in (["query", "-vsfpda", "-n"], ["set", "-f", "hidden", "-v", "1", "-n"],
                 ["modify", "-z", "-n"], ["modify", "-p", "ok.qcow2", "-n"],
                 ["resize", "-s", "64", "-f", "-n"], ["coalesce", "-n"], ["check", "-n"],
                 ["repair", "-n"], ["read", "-B", "-n"], ["revert", "-j", "j", "-n"]):
        out = q2(*(argv + ["plain.txt"]))
        assert out.returncode == errno.EINVAL, (argv, out.returncode, out.err)
        assert len(out.err.splitlines()) == 1 and "not a qcow2 image" in out.err, (argv, out.err)
        assert "Traceback" not in out.err + out.text
    out = q2("snapshot", "-n", "s.qcow2", "-p", "plain.txt")
    assert out.returncode == errno.EINVAL and len(out.err.splitlines()) == 1
    assert not os.path.exists("s.qcow2")
    for argv in (["info"], ["map", "--output=json"], ["check"], ["resize"], ["commit"],
                 ["rebase", "-u", "-b", "ok.qcow2"]):
        out = q2(*(argv + (["plain.txt", "1G"] if argv == ["resize"] else ["plain.txt"])))
        assert out.returncode == 1 and len(out.err.splitlines()) == 1, (argv, out.err)
        assert "not a qcow2 image" in out.err
    assert fingerprint("plain.txt") == before


def test_a_control_character_in_a_backing_name_is_escaped_on_one_line(work):
    """A corrupt image's backing file name may hold a newline: the error is still one
    stderr line (tests/formats/test_qcow2_fuzz.py found it)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(work / "par\nent.qcow2"),
        "-F", "qcow2", "c.qcow2", str(8 * MiB))
    out = q2("query", "-vp", "-n", "c.qcow2")
    assert out.returncode == errno.ENOENT, (out.returncode, out.err)
    assert len(out.err.splitlines()) == 1 and "par\\nent.qcow2" in out.err, out.err


# -- qemu-img's face: XCP-ng's argv, against qemu-img on twin images ------------------------
def twins(work, *argv_before_path, size=None):
    """Run one create argv with qemu-img (a/) and qcow2-util (b/): the two paths."""
    for d in ("a", "b"):
        os.makedirs(str(work / d), exist_ok=True)
    paths = []
    for d, tool in (("a", "qemu-img"), ("b", "qcow2-util")):
        path = str(work / d / "disk.qcow2")
        argv = list(argv_before_path) + [path] + ([str(size)] if size is not None else [])
        if tool == "qemu-img":
            run("qemu-img", *argv)
        else:
            q2(*argv, check=0)
        paths.append(path)
    return paths


def test_xcpng_argv_create_snapshot_info_depth(work):
    """cowutil's QCowUtil: create (static: preallocation=full), snapshot with -b -F,
    rebase -u, resize, info --backing-chain (depth = "backing-filename" count + 1)."""
    a, b = twins(work, "create", "-f", "qcow2", size=SIZE)
    for p in (a, b):
        qio(p, "write -P 5 0 1M")
    for d in ("a", "b"):
        shutil.copy(str(work / d / "disk.qcow2"), str(work / d / "base.qcow2"))
    ca, cb = [str(work / d / "child.qcow2") for d in ("a", "b")]
    run("qemu-img", "create", "-f", "qcow2", "-b", str(work / "a" / "base.qcow2"), "-F", "qcow2", ca)
    out = q2("create", "-f", "qcow2", "-b", str(work / "b" / "base.qcow2"), "-F", "qcow2", cb, check=0)
    assert out.text.startswith("Formatting '%s', fmt=qcow2 cluster_size=65536" % cb)
    infos = []
    for tool, p in (("qemu-img", ca), ("qcow2-util", cb)):
        argv = ["info", "--backing-chain", "--output=json", p]
        text = run(tool, *argv).stdout if tool == "qemu-img" else q2(*argv, check=0).text
        assert len(re.findall("\"backing-filename\"", text)) + 1 == 2
        infos.append(json.loads(text))
    for info in infos:
        for entry in info:
            entry["filename"] = os.path.basename(entry["filename"])
            entry.pop("actual-size")
            for key in ("backing-filename", "full-backing-filename"):
                if key in entry:
                    entry[key] = os.path.basename(entry[key])
    assert infos[0] == infos[1]
    for tool, p in (("qemu-img", ca), ("qcow2-util", cb)):
        d = os.path.dirname(p)
        argv = ["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", os.path.join(d, "disk.qcow2"), p]
        run(*([tool] + argv)) if tool == "qemu-img" else q2(*argv, check=0)
        argv = ["resize", p, str(2 * SIZE)]
        assert (run(tool, *argv).stdout if tool == "qemu-img" else q2(*argv, check=0).text) \
            == "Image resized.\n"
    assert qemu_view(ca, work) == qemu_view(cb, work)
    for p in (ca, cb):
        run("qemu-img", "check", p)
    sa, sb = twins(work, "create", "-f", "qcow2", "-o", "preallocation=full,cluster_size=16384",
                   size=4 * MiB)
    info = json.loads(run("qemu-img", "info", "--output=json", sb).stdout)
    assert info["cluster-size"] == 16384 and info["actual-size"] >= 4 * MiB
    run("qemu-img", "check", sb)
    (entry,) = json.loads(q2("map", "--output=json", sb, check=0).text)
    assert (entry["length"], entry["data"], entry["zero"]) == (4 * MiB, True, False)
    assert q2("map", "--output=json", sb, check=0).text == qemu_map_text(sb)


def test_xcpng_argv_check_repair_commit_map(work):
    a, b = twins(work, "create", "-f", "qcow2", size=SIZE)
    for p in (a, b):
        qio(p, "write -P 1 0 3M", "write -P 2 9M 64k")
        with Q.Image(p) as img:
            l1 = img.header.l1_table_offset
        with open(p, "r+b") as f:          # the same leak in both: an L1 entry dropped
            f.seek(l1)
            f.write(bytes(8))
    results = []
    for tool, p in (("qemu-img", a), ("qcow2-util", b)):
        for argv in (["check", p], ["check", "--output=json", p]):
            out = run(tool, *argv, check=False) if tool == "qemu-img" else q2(*argv)
            results.append((out.returncode, out.stdout if isinstance(out.stdout, str) else out.text))
    assert results[0][0] == results[2][0] == 3          # leaks only
    assert results[0][1] == results[2][1]
    ja, jb = json.loads(results[1][1]), json.loads(results[3][1])
    ja["filename"] = jb["filename"] = "x"
    assert ja == jb and ja["leaks"] > 0
    for tool, p in (("qemu-img", a), ("qcow2-util", b)):
        argv = ["check", "-f", "qcow2", "-r", "all", p]
        out = run(tool, *argv) if tool == "qemu-img" else q2(*argv, check=0)
        text = out.stdout if tool == "qemu-img" else out.text
        assert "No errors were found on the image." in text
        assert run("qemu-img", "check", p).returncode == 0
    # commit -d: the base takes the child's view; the child stays as it was
    for p in (a, b):
        d = os.path.dirname(p)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
             os.path.join(d, "top.qcow2"))
        qio(os.path.join(d, "top.qcow2"), "write -P 7 1M 1M", "write -z 9M 64k")
    ta, tb = [os.path.join(os.path.dirname(p), "top.qcow2") for p in (a, b)]
    view = qemu_view(ta, work)
    run("qemu-img", "commit", "-f", "qcow2", ta, "-d")
    assert q2("commit", "-f", "qcow2", tb, "-d", check=0).text == "Image committed.\n"
    assert qemu_view(a, work) == qemu_view(b, work) == view
    assert run("qemu-img", "map", "--output=json", tb).stdout == \
        q2("map", "--output=json", tb, check=0).text
    assert run("qemu-img", "map", tb).stdout == q2("map", tb, check=0).text
    run("qemu-img", "check", b)
    # without -d the top is emptied (qemu's make_empty)
    q2("commit", tb, check=0)
    assert q2("query", "-a", "-n", tb, check=0).text == "0\n"
    assert qemu_view(tb, work) == view


def test_qemu_face_bad_arguments(work):
    for argv in (["create", "-f", "qcow2", "x.qcow2", "1x"], ["create", "-f", "qcow2", "-o",
                 "bogus=1", "x.qcow2", "1M"], ["create", "-f", "raw", "x.raw", "1M"],
                 ["info", "--output=xml", "x"], ["check", "-r", "some", "x"],
                 ["map"], ["resize", "x.qcow2"], ["rebase", "x.qcow2"],
                 ["create", "-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"],
                 ["create", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "1M"]):
        out = q2(*argv)
        assert out.returncode == 1 and len(out.err.splitlines()) == 1, (argv, out.err)
        assert not os.path.exists("x.qcow2")
    q2("create", "-q", "-f", "qcow2", "x.qcow2", "1M", check=0)
    out = q2("resize", "x.qcow2", "512K")
    assert out.returncode == 1 and "--shrink" in out.err
