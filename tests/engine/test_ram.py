"""The ram driver: what it costs (nothing until written), what it accepts (the suite's
sizes, declared options) and how it says no (a clear error at open)."""
import pytest

from enginelib import memory_of, nbd_map, run, tap_ctl

MiB = 1 << 20
TiB = 1 << 40


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run(*(args + [uri])).stdout
    assert "fail" not in out.lower(), out
    return out


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
    ("ram:{dir}/x?size=1M&writeback=maybe", ["writeback", "maybe"]),
])
def test_bad_ram_params_are_refused_at_open(smtap_root, params, words):
    proc = tap_ctl("create", "-a", params.format(dir=smtap_root), check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert tap_ctl("list").stdout == ""                      # nothing left running
