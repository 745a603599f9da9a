"""The ram driver: what it costs (nothing until written), what it accepts (the suite's
sizes, declared options) and how it says no (a clear error at open)."""
import os

import pytest

from lib.engine import image_file, nbd_map, qemu_io, tap_ctl
from lib.fs import tmpfs, used
from lib.procs import memory_of, run
from lib.sizes import MiB, TiB


def test_an_empty_ram_disk_reserves_nothing(make_tap, smtap_root):
    small = make_tap("ram:%s?size=%d" % (smtap_root / "a", MiB))
    huge = make_tap("ram:%s?size=%d" % (smtap_root / "b", 4 * TiB))
    base = memory_of(small.pid)["VmRSS"]
    assert memory_of(huge.pid)["VmRSS"] - base < 4 * MiB      # was 128 MiB of bookkeeping
    qemu_io(huge.uri, "write -P 0x5a 3T 1M", "write -P 0x6b 4095G 64k")
    qemu_io(huge.uri, "read -P 0x5a 3T 1M", "read -P 0x6b 4095G 64k", "read -P 0 2T 1M")
    assert memory_of(huge.pid)["VmRSS"] - base < 8 * MiB
    assert nbd_map(huge.uri) == [(0, 3 * TiB, 3), (3 * TiB, MiB, 0),
                                 (3 * TiB + MiB, 1023 * 1024 * MiB - MiB, 3),
                                 (4095 * 1024 * MiB, 65536, 0),
                                 (4095 * 1024 * MiB + 65536, 1024 * MiB - 65536, 3)]


@pytest.mark.parametrize("size, expected", [("64M", 64 * MiB), ("64MiB", 64 * MiB),
                                            ("2G", 2 << 30), ("1048576", MiB)])
def test_sizes_take_the_suites_suffixes(make_tap, smtap_root, size, expected):
    tap = make_tap("ram:%s?size=%s&budget=1M" % (smtap_root / "x", size))
    assert run("nbdinfo", "--size", tap.uri).stdout.strip() == str(expected)


@pytest.mark.parametrize("params, words", [
    ("ram:{dir}", ["directory"]),
    ("ram:{dir}/missing", ["size="]),                       # nothing to take the size from
    ("ram:{dir}/x?size=64Q", ["size", "64Q"]),
    ("ram:{dir}/x?size=0", ["size", "positive"]),
    ("ram:{dir}/x?size=1M&budget=lots", ["budget", "lots"]),
    ("ram:{dir}/x?size=1M&sise=2M", ["unknown option", "sise"]),
    ("ram:{dir}/x?size=1M&budjet=1", ["unknown option 'budjet'", "accepted: budget,"]),
    ("ram:{dir}/x?size=1M&writeback=maybe", ["writeback", "maybe"]),
    ("ram:{img}?shared=1", ["tmpfs"]),                      # shared: the pages of a RAM file
    ("ram:{shm}/s.img?shared=1&writeback=1", ["writeback"]),
    ("ram:{shm}/s.img?shared=1&size=2M", ["size"]),
    ("ram:{shm}/missing?shared=1", ["No such file"]),
])
def test_bad_ram_params_are_refused_at_open(smtap_root, params, words):
    img = image_file(smtap_root / "d.img", MiB)
    shm = tmpfs(smtap_root / "shm", 4 * MiB)
    image_file(shm / "s.img", MiB)
    proc = tap_ctl("create", "-a", params.format(dir=smtap_root, img=img, shm=shm),
                   check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert tap_ctl("list").stdout == ""                      # nothing left running


def test_shared_serves_the_files_pages(make_tap, smtap_root):
    """shared=1: writes land in the tmpfs file, holes stay holes (reading them allocates
    nothing), trim frees the file's pages, a full tmpfs is ENOSPC (not a dead tapdisk)."""
    shm = tmpfs(smtap_root / "shm", 6 * MiB)
    path = shm / "disk.img"
    os.truncate(image_file(path, 0), 16 * MiB)
    tap = make_tap("ram:%s?shared=1" % path)
    qemu_io(tap.uri, "write -P 0x71 1M 1M", "write -P 0x72 3000 1000")
    with open(path, "rb") as f:                       # in the file at once, no flush
        data = f.read()
    assert data[MiB:2 * MiB] == b"\x71" * MiB and data[3000:4000] == b"\x72" * 1000
    before = used(shm)
    assert 1 * MiB < before < 3 * MiB
    run("nbdcopy", tap.uri, "null:")                  # read it all, holes included
    assert used(shm) == before
    qemu_io(tap.uri, "discard 1M 1M")
    assert used(shm) <= before - MiB + 4096
    out = qemu_io(tap.uri, "write -P 0x73 4M 8M", check=False).output       # past the tmpfs
    assert "No space left on device" in out
    assert tap_ctl("list").stdout.count("state=0") == 1            # alive and serving
    qemu_io(tap.uri, "read -P 0x72 3000 1000", "read -P 0 1M 1M")
    qemu_io(tap.uri, "write -P 0x74 12M 1M", "read -P 0x74 12M 1M")  # room again: works
    tap.destroy()
    with open(path, "rb") as f:
        data = f.read()
    assert data[12 * MiB:13 * MiB] == b"\x74" * MiB and data[3000:4000] == b"\x72" * 1000
