"""A chain of 30 snapshots made with vhd-util snapshot, data written at each level.

qemu's vpc driver ignores parents (it reads a differencing disk as a dynamic one), so
qemu-img checks each level's own data, and the whole chain after coalescing it into the
base; the chain itself is read through smtap.formats.vhd.Chain.
"""
import hashlib

from smtap.formats import vhd as V
from lib.procs import run
from lib.sizes import MiB
from lib.vhd import Model, seeded, vhd_util

SIZE = 8 * MiB         # four 2 MiB blocks: every level writes into several
LEVELS = 30


def qemu_raw(work, path):
    out = work / "dump.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def view(path):
    with V.Chain(str(path)) as chain:
        return chain.read(0, chain.size)


def test_chain_of_30_snapshots(work):
    rng = seeded(30)
    names = ["level00.vhd"]
    vhd_util("create", "-n", names[0], "-s", SIZE >> 20, check=0)
    leaf_view = Model(SIZE)
    own = []
    for level in range(LEVELS + 1):
        if level:
            names.append("level%02d.vhd" % level)
            vhd_util("snapshot", "-n", names[-1], "-p", names[-2], check=0)
        mine = Model(SIZE)
        with V.VHD(names[-1], writable=True) as img:
            for _ in range(12):
                n = rng.randint(1, 48) * 512
                off = rng.randrange(0, (SIZE - n) // 512) * 512
                data = rng.getrandbits(8 * n).to_bytes(n, "little")
                mine.write(img, data, off)
                leaf_view.data[off:off + n] = data
        own.append(mine)
    leaf = names[-1]
    assert vhd_util("query", "-d", "-n", leaf, check=0).text == "chain depth: %d\n" % (LEVELS + 1)
    assert vhd_util("check", "-p", "-n", leaf, check=0).text.count("is valid") == LEVELS + 1
    assert view(leaf) == bytes(leaf_view.data)
    for name, mine in zip(names, own):          # each level's own data, through qemu
        assert qemu_raw(work, name) == bytes(mine.data), name
    scan = vhd_util("scan", "-f", "-m", str(work / "level*.vhd"), check=0).text.splitlines()
    assert scan[0] == "vhd=level00.vhd capacity=%d size=%d hidden=0 parent=none" % (
        SIZE, (work / "level00.vhd").stat().st_size)
    for i, line in enumerate(scan[1:], 1):
        assert line.startswith("vhd=level%02d.vhd capacity=%d " % (i, SIZE))
        assert line.endswith(" hidden=0 parent=level%02d.vhd" % (i - 1))
    # Coalesce the chain down into the base: each time the parent then shows exactly
    # what its child showed before.
    expected = hashlib.sha256(leaf_view.data).hexdigest()
    for child, parent in reversed(list(zip(names[1:], names[:-1]))):
        out = vhd_util("coalesce", "-n", child, check=0).text
        assert out.startswith("Coalesced ") and out.endswith(" sectors") and "\n" not in out
        assert hashlib.sha256(view(parent)).hexdigest() == expected, parent
        vhd_util("check", "-n", parent, check=0)
    assert qemu_raw(work, names[0]) == bytes(leaf_view.data)


def test_coalesce_counts_sectors_and_leaves_the_child(work):
    vhd_util("create", "-n", "p.vhd", "-s", 8, check=0)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "p.vhd", check=0)
    with V.VHD("c.vhd", writable=True) as c:
        c.write(b"\x01" * 512 * 25, 512 * 7)                # 25 sectors, bitmap only
        c.write(b"\x02" * (2 * MiB), 2 * MiB)               # a whole block: batmap full
        assert c.block_full(1) and not c.block_full(0)
    before = (work / "c.vhd").read_bytes()
    assert vhd_util("coalesce", "-n", "c.vhd", check=0).text == "Coalesced %d sectors" % (25 + 4096)
    assert (work / "c.vhd").read_bytes() == before
    with V.VHD("p.vhd") as p:
        assert p.read(512 * 7, 512 * 25) == b"\x01" * 512 * 25
        assert p.read(2 * MiB, 2 * MiB) == b"\x02" * (2 * MiB)
        assert [e for e in p.extents(0, 4 * MiB) if e[2]] == [(3584, 12800, True),
                                                               (2 * MiB, 2 * MiB, True)]
    out = vhd_util("coalesce", "-n", "p.vhd")
    assert out.returncode == 22 and out.text == "error coalescing: -22\n"


def test_raw_parent(work):
    (work / "base.raw").write_bytes(b"\x09" * (4 * MiB))
    vhd_util("snapshot", "-n", "c.vhd", "-p", "base.raw", "-m", check=0)
    assert vhd_util("query", "-vd", "-n", "c.vhd", check=0).text == "4\nchain depth: 2\n"
    with V.VHD("c.vhd", writable=True) as c:
        assert c.parent_is_raw and c.parent_path() == str(work / "base.raw")
        c.write(b"\x01" * 1024, 4096)
    assert view(work / "c.vhd")[4090:4096 + 1030] == b"\x09" * 6 + b"\x01" * 1024 + b"\x09" * 6
    vhd_util("check", "-n", "c.vhd", check=0)
    vhd_util("coalesce", "-n", "c.vhd", check=0)
    assert (work / "base.raw").read_bytes()[4096:5120] == b"\x01" * 1024


def test_snapshot_walks_past_empty_parents(work):
    """Unless -e (or -m), the child links to the first ancestor holding data, and gets the
    size of the parent it was asked for; -e links to that parent as it is."""
    vhd_util("create", "-n", "base.vhd", "-s", 8, check=0)
    with V.VHD("base.vhd", writable=True) as base:
        base.write(b"\x05" * 4096, MiB)
    vhd_util("snapshot", "-n", "e1.vhd", "-p", "base.vhd", "-e", check=0)
    vhd_util("snapshot", "-n", "e2.vhd", "-p", "e1.vhd", "-e", check=0)
    vhd_util("resize", "-s", 16, "-n", "e2.vhd", "-j", "j", check=0)     # larger than base
    assert vhd_util("query", "-n", "e2.vhd", "-d", check=0).text == "chain depth: 3\n"

    vhd_util("snapshot", "-n", "walked.vhd", "-p", "e2.vhd", check=0)
    out = vhd_util("query", "-n", "walked.vhd", "-v", "-p", "-d", check=0).text
    assert out == "16\n%s\nchain depth: 2\n" % (work / "base.vhd")
    assert view(work / "walked.vhd")[MiB - 1:MiB + 4097] == b"\0" + b"\x05" * 4096 + b"\0"

    vhd_util("snapshot", "-n", "kept.vhd", "-p", "e2.vhd", "-e", check=0)
    out = vhd_util("query", "-n", "kept.vhd", "-p", "-d", check=0).text
    assert out == "%s\nchain depth: 4\n" % (work / "e2.vhd")

    with V.VHD("e1.vhd", writable=True) as e1:      # data in e1: the walk stops there
        e1.write(b"\x06" * 512, 0)
    vhd_util("snapshot", "-n", "w2.vhd", "-p", "e2.vhd", check=0)
    assert vhd_util("query", "-n", "w2.vhd", "-p", check=0).text == "%s\n" % (work / "e1.vhd")
    for name in ("walked.vhd", "kept.vhd", "w2.vhd"):
        vhd_util("check", "-n", name, "-p", check=0)


def test_snapshot_walk_ends_at_a_raw_parent(work):
    (work / "base.raw").write_bytes(b"\x09" * (4 * MiB))
    vhd_util("snapshot", "-n", "e.vhd", "-p", "base.raw", "-m", check=0)
    vhd_util("snapshot", "-n", "c.vhd", "-p", "e.vhd", check=0)    # e.vhd is empty
    with V.VHD("c.vhd") as c:
        assert c.parent_is_raw and c.parent_path() == str(work / "base.raw")
    assert vhd_util("query", "-n", "c.vhd", "-d", check=0).text == "chain depth: 2\n"
    assert view(work / "c.vhd") == b"\x09" * (4 * MiB)
