"""Fuzzing the parser: a valid VHD with random bytes changed (metadata mostly) or cut
short gives a clear error or valid data: never another exception, a hang, or a write to
the file. The command lines run in-process here (hypothesis drives hundreds of cases),
and as real processes for a sample."""
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtap.formats import vhd as V
from lib.sizes import MiB
from lib.vhd import fingerprint, vhd_util, vhd_util_here

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A differencing disk (locators, batmap, bitmaps, a full block) on a base."""
    d = tmp_path_factory.mktemp("fuzz")
    vhd_util("create", "-n", d / "p.vhd", "-s", 8, check=0)
    with V.VHD(str(d / "p.vhd"), writable=True) as p:
        p.write(b"\x01" * 4096, 0)
    vhd_util("snapshot", "-n", d / "c.vhd", "-p", d / "p.vhd", check=0)
    with V.VHD(str(d / "c.vhd"), writable=True) as c:
        c.write(b"\x02" * 1024, 512)
        c.write(b"\x03" * (2 * MiB), 4 * MiB)
    return d


def corruptions():
    """[(offset, byte)] mostly in the metadata (first 8 KiB, bitmaps, the footer)."""
    hot = st.one_of(st.integers(0, 8191), st.integers(-512, -1), st.integers(0, 12 * 1024))
    return st.lists(st.tuples(hot, st.integers(0, 255)), min_size=1, max_size=12)


def exercise(path):
    """Everything a reader does; only VHDError may come out of it."""
    try:
        with V.VHD(path) as img:
            if img.dynamic:
                img.read(0, img.size if img.size <= 64 * MiB else MiB)
                img.extents(0, min(img.size, 64 * MiB))
                if img.type == V.HD_TYPE_DIFF:
                    img.parent_path()
        with V.Chain(path) as chain:
            chain.read(0, min(chain.size, 8 * MiB))
    except V.VHDError as e:
        assert e.errno and e.strerror


COMMANDS = [["check", "-n"], ["check", "-b", "-p", "-n"], ["query", "-vsfpdmaS", "-n"],
            ["read", "-p", "-n"], ["read", "-B", "-n"], ["key", "-p", "-n"],
            ["read", "-r", "0", "-c", "64", "-n"]]


def case(pristine, tmp_path):
    """A fresh copy of the pristine pair: (directory, the child's path)."""
    d = tmp_path / "case"
    shutil.rmtree(str(d), ignore_errors=True)
    d.mkdir()
    shutil.copy(str(pristine / "p.vhd"), str(d / "p.vhd"))
    shutil.copy(str(pristine / "c.vhd"), str(d / "c.vhd"))
    return d, str(d / "c.vhd")


def unchanged(d, path, before=None):
    now = fingerprint(path), fingerprint(str(d / "p.vhd"))
    assert before is None or now == before
    return now


def run_all(path):
    for argv in COMMANDS:
        ran = vhd_util_here(*(argv + [path]))
        assert isinstance(ran.returncode, int)
        assert "internal error" not in ran.err
        if ran.returncode:
            assert len(ran.err.splitlines()) == 1, (argv, ran.err)
    ran = vhd_util_here("scan", "-f", "-c", "-m", os.path.join(os.path.dirname(path), "*.vhd"))
    assert "internal error" not in ran.err


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=5000, derandomize=not os.environ.get("FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=corruptions(), cut=st.one_of(st.none(), st.integers(0, 6 * 1024 * 1024)))
def test_random_corruption_never_crashes_or_writes(pristine, tmp_path, changes, cut):
    d, path = case(pristine, tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for off, byte in changes:
            f.seek(off % size)
            f.write(bytes([byte]))
        if cut is not None and cut < size:
            f.truncate(cut)
    before = unchanged(d, path)
    exercise(path)
    run_all(path)
    unchanged(d, path, before)


@pytest.mark.parametrize("seed", range(6))
def test_corrupt_images_as_real_processes(pristine, tmp_path, seed):
    import random
    rng = random.Random(seed)
    shutil.copy(str(pristine / "p.vhd"), str(tmp_path / "p.vhd"))
    path = tmp_path / "c.vhd"
    raw = bytearray((pristine / "c.vhd").read_bytes())
    for _ in range(rng.randint(1, 6)):
        raw[rng.choice([rng.randrange(0, 8192), len(raw) - rng.randrange(1, 513)])] = \
            rng.randrange(256)
    path.write_bytes(bytes(raw))
    before = fingerprint(path)
    for argv in (["check", "-n", path], ["query", "-vsfpd", "-n", path], ["read", "-p", "-n", path],
                 ["scan", "-f", "-c", "-m", tmp_path / "*.vhd"]):
        out = vhd_util(*argv, timeout=30)
        assert "Traceback" not in out.err and "internal error" not in out.err
        assert out.returncode == 0 or len(out.err.splitlines()) == 1
    assert fingerprint(path) == before


FOOTER_FIELDS = ["features", "ff_version", "data_offset", "timestamp", "crtr_ver", "orig_size",
                 "curr_size", "geometry", "type", "saved", "hidden"]
HEADER_FIELDS = ["data_offset", "table_offset", "hdr_ver", "max_bat_size", "block_size",
                 "prt_ts", "res1"]
LOCATOR_FIELDS = ["code", "data_space", "data_len", "res", "data_offset"]
BITS = {"features": 32, "ff_version": 32, "data_offset": 64, "timestamp": 32, "crtr_ver": 32,
        "orig_size": 64, "curr_size": 64, "geometry": 32, "type": 32, "saved": 8, "hidden": 8,
        "table_offset": 64, "hdr_ver": 32, "max_bat_size": 32, "block_size": 32,
        "prt_ts": 32, "res1": 32, "code": 32, "data_space": 32, "data_len": 32, "res": 32}


def field_value(bits):
    return st.one_of(st.integers(0, (1 << bits) - 1), st.sampled_from([0, 1, 2, 3, 4, 511, 512,
                     4096, 1 << 21, 1 << 30, (1 << bits) - 1]).map(lambda v: v % (1 << bits)))


@st.composite
def field_changes(draw):
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["footer", "header", "locator", "bat"]))
        if where == "footer":
            name = draw(st.sampled_from(FOOTER_FIELDS))
        elif where == "header":
            name = draw(st.sampled_from(HEADER_FIELDS))
        elif where == "locator":
            name = (draw(st.integers(0, 7)), draw(st.sampled_from(LOCATOR_FIELDS)))
        else:
            name = draw(st.integers(0, 3))
        bits = 32 if where == "bat" else BITS[name[1] if where == "locator" else name]
        changes.append((where, name, draw(field_value(bits))))
    return changes


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=5000,
          derandomize=not os.environ.get("FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=field_changes())
def test_fields_changed_with_valid_checksums(pristine, tmp_path, changes):
    """Deeper paths: fields set to odd values and the checksums made right again."""
    import struct
    d, path = case(pristine, tmp_path)
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
    footer = V.Footer.unpack(raw[:512])
    header = V.Header.unpack(raw[512:1536])
    for where, name, value in changes:
        if where == "footer":
            setattr(footer, name, value)
        elif where == "header":
            setattr(header, name, value)
        elif where == "locator":
            setattr(header.locators[name[0]], name[1], value)
        else:
            raw[1536 + 4 * name:1540 + 4 * name] = struct.pack(">I", value)
    fraw = footer.seal()
    raw[:512] = fraw
    raw[-512:] = fraw
    raw[512:1536] = header.seal()
    with open(path, "wb") as f:
        f.write(raw)
    before = unchanged(d, path)
    exercise(path)
    run_all(path)
    unchanged(d, path, before)
