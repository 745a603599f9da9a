"""Fuzzing the qcow2 parser: a valid chain (a qemu-compressed base, a child of ours with
4 KiB clusters: several L2 tables, zero clusters) with random bytes changed in its
metadata or cut short gives a clear error (an OSError with an errno) or valid data:
never another exception, a hang, or a write to the file. Read-only commands of
qcow2-util run in-process for hundreds of cases, and as real processes for a sample."""
import io
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2util
from lib.procs import run
from lib.sizes import MiB
from lib.vhd import fingerprint, tool

pytestmark = pytest.mark.timeout(600)
SIZE = 4 * MiB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("q2fuzz")
    raw = d / "src.raw"
    raw.write_bytes(b"".join(b"%07d compressible\n" % i for i in range(40000))[:2 * MiB]
                    .ljust(SIZE, b"\0"))
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(d / "p.qcow2"))
    raw.unlink()
    tool("qcow2-util", "snapshot", "-e", "-c", 4096, "-n", d / "c.qcow2", "-p", d / "p.qcow2",
        check=0)
    with Q.Image(str(d / "c.qcow2"), writable=True) as c:
        c.write(b"\x02" * 10000, 5000)
        c.write(b"\x03" * (600 << 10), 3 * MiB)
        c.write_zeroes(MiB, 64 << 10)
    with Q.Image(str(d / "c.qcow2")) as c:
        h = c.header
        c._load_reftable()
        spots = [(0, 4096), (h.l1_table_offset, h.l1_size * 8),
                 (h.refcount_table_offset, 64), (c.reftable[0] & Q.REFT_OFFSET_MASK, 512)]
        spots += [(e & Q.OFFSET_MASK, 4096) for e in c.l1 if e & Q.OFFSET_MASK]
    return d, spots


def corruptions(spots):
    """[(offset, byte)] inside the metadata: header, L1, refcount table/block, L2s."""
    where = st.sampled_from(spots).flatmap(
        lambda s: st.integers(s[0], s[0] + max(s[1], 8) - 1))
    return st.lists(st.tuples(where, st.integers(0, 255)), min_size=1, max_size=10)


def exercise(path):
    """Everything a reader does; only OSError (with an errno) may come out of it."""
    try:
        with Q.Image(path) as img:
            n = min(img.size, 8 * MiB)
            img.read(0, n)
            img.extents(0, n)
            img.allocated_clusters() if len(img.l1) < 4096 else None
            img.end_offset()
        with Q.Chain(path) as chain:
            chain.read(0, min(chain.size, 8 * MiB))
        qcow2check.check(path)
    except OSError as e:
        assert e.errno and e.strerror, repr(e)


COMMANDS = [["query", "-vsfpdaS", "-n"], ["check", "-n"], ["read", "-B", "-n"],
            ["read", "-p", "-n"], ["info", "--output=json", "--backing-chain"],
            ["map", "--output=json"], ["check", "--output=json"], ["scan", "-m"]]


def run_all(path):
    for argv in COMMANDS:
        out, err = io.StringIO(), io.StringIO()
        out.buffer = io.BytesIO()
        rc = qcow2util.run(argv + [path], out, err)
        assert isinstance(rc, int)
        assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue()
        if rc:
            assert len(err.getvalue().splitlines()) <= 1 or argv[0] == "check", \
                (argv, err.getvalue())


def case(d, tmp_path):
    c = tmp_path / "case"
    shutil.rmtree(str(c), ignore_errors=True)
    c.mkdir()
    shutil.copy(str(d / "p.qcow2"), str(c / "p.qcow2"))
    shutil.copy(str(d / "c.qcow2"), str(c / "c.qcow2"))
    return c, str(c / "c.qcow2")


def unchanged(c, before=None):
    now = fingerprint(str(c / "c.qcow2")), fingerprint(str(c / "p.qcow2"))
    assert before is None or now == before
    return now


def test_pristine_is_valid(pristine, tmp_path):
    d, _ = pristine
    c, path = case(d, tmp_path)
    exercise(path)
    assert tool("qcow2-util", "check", "-n", path, check=0).text == "%s is valid\n" % path
    run("qemu-img", "check", path)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_metadata(pristine, tmp_path, data):
    d, spots = pristine
    c, path = case(d, tmp_path)
    with open(path, "r+b") as f:
        for off, value in data.draw(corruptions(spots)):
            f.seek(off)
            f.write(bytes([value]))
    before = unchanged(c)
    exercise(path)
    run_all(path)
    unchanged(c, before)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(0, 400 << 10))
def test_truncated_file(pristine, tmp_path, cut):
    d, _ = pristine
    c, path = case(d, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(min(cut, os.path.getsize(path)))
    before = unchanged(c)
    exercise(path)
    run_all(path)
    unchanged(c, before)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.lists(st.tuples(st.sampled_from(range(0, 112, 4)), st.integers(0, (1 << 32) - 1)),
                       min_size=1, max_size=4))
def test_header_fields(pristine, tmp_path, fields):
    """Whole header fields set to arbitrary 32-bit values (sizes, offsets, counts, bits)."""
    d, _ = pristine
    c, path = case(d, tmp_path)
    with open(path, "r+b") as f:
        for off, value in fields:
            f.seek(off)
            f.write(struct.pack(">I", value))
    before = unchanged(c)
    exercise(path)
    run_all(path)
    unchanged(c, before)


def test_sample_as_processes(pristine, tmp_path):
    """A few corruptions through the real command: an exit status and at most one line."""
    d, spots = pristine
    for k, (off, value) in enumerate([(0, 0x51), (20, 0x40), (100, 0xff), (spots[1][0] + 3, 0x7f),
                                      (spots[4][0] + 8, 0x80), (spots[3][0] + 1, 0)]):
        c, path = case(d, tmp_path)
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(bytes([value]))
        before = unchanged(c)
        for argv in (["query", "-vsfpda", "-n", path], ["check", "-n", path],
                     ["info", "--backing-chain", path], ["map", path]):
            out = tool("qcow2-util", *argv)
            assert "Traceback" not in out.err and "internal error" not in out.err, out.err
            if out.returncode and argv[0] != "check":
                assert len(out.err.splitlines()) == 1, (k, argv, out.err)
        unchanged(c, before)
