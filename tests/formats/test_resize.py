"""resize: fast within the presized BAT, journalled with data blocks moved out of the way
of the grown BAT; kill -9 at every step of a journalled resize, then revert: the image
is exactly what it was (or, not reverted, it refuses to open: never a corrupt file)."""
import os
import signal
import subprocess
import time

import pytest

from smtap.formats import vhd as V
from lib.checkout import VENV_BIN
from lib.sizes import MiB
from lib.vhd import Model, random_writes, seeded, sha, vhd_util


def filled(name, mb, seed=1, **create):
    vhd_util("create", "-n", name, "-s", mb, *sum((["-" + k, v] for k, v in create.items()), []),
             check=0)
    model = Model(mb * MiB)
    with V.VHD(name, writable=True) as img:
        random_writes(seeded(seed), img, model, 40, size=mb * MiB)
        for blk in range(mb // 2):          # every block allocated: the BAT's growth moves some
            model.write(img, bytes([blk + 1]) * 512, blk * 2 * MiB + 1024)
    return model


def view(path, length):
    with V.Chain(str(path)) as chain:
        return chain.read(0, length)


def test_fast_resize(work):
    model = filled("d.vhd", 10, S=100)
    assert vhd_util("query", "-S", "-n", "d.vhd", check=0).text == "100\n"
    vhd_util("resize", "--debug", "-s", 50, "-n", "d.vhd", "-f", check=0)
    assert vhd_util("query", "-v", "-n", "d.vhd", check=0).text == "50\n"
    assert view("d.vhd", 10 * MiB) == bytes(model.data)
    assert not any(view("d.vhd", 50 * MiB)[10 * MiB:])
    vhd_util("check", "-n", "d.vhd", check=0)
    out = vhd_util("resize", "-s", 200, "-n", "d.vhd", "-f")
    assert out.returncode == 22 and out.text.startswith("resize failed: -22")


@pytest.mark.parametrize("snapshot", [False, True])
def test_journalled_resize_moves_blocks(work, snapshot):
    model = filled("d.vhd", 8)
    name = "d.vhd"
    if snapshot:                            # a child: its locators move with the metadata
        vhd_util("snapshot", "-n", "c.vhd", "-p", "d.vhd", check=0)
        with V.VHD("c.vhd", writable=True) as c:
            model.write(c, b"\x77" * 4096, 3 * MiB)
        name = "c.vhd"
    with V.VHD(name) as img:
        first = min(o for o in img.bat if o != V.DD_BLK_UNUSED)
    vhd_util("resize", "-s", 4096, "-n", name, "-j", "j", check=0)
    assert not os.path.exists("j")
    assert vhd_util("query", "-vS", "-n", name, check=0).text == "4096\n4096\n"
    with V.VHD(name) as img:
        assert min(o for o in img.bat if o != V.DD_BLK_UNUSED) > first      # blocks moved
        assert img.end_of_headers() > first * 512
    assert view(name, 8 * MiB) == bytes(model.data)
    vhd_util("check", "-n", name, check=0)
    with V.VHD(name, writable=True) as img:            # and it still takes new blocks
        img.write(b"\x42" * 512, 4000 * MiB)
    with V.Chain(name) as chain:
        assert chain.read(4000 * MiB - 512, 1536) == bytes(512) + b"\x42" * 512 + bytes(512)
    vhd_util("check", "-n", name, check=0)


POINTS = ["journal", "begin", "moved", "moved#3", "metadata", "end", "footer"]
GROWN = 2 * 1024 * 1024 - 2     # MB: a 4 MiB BAT, over the first three data blocks


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_mid_resize_then_revert(work, point):
    model = filled("d.vhd", 8, seed=2)
    original = sha("d.vhd")
    marker = work / "at-hook"
    env = dict(os.environ, SMTAP_VHD_HOOK="%s:%s" % (point, marker))
    proc = subprocess.Popen([os.path.join(VENV_BIN, "vhd-util"), "resize", "-s", str(GROWN), "-n",
                             "d.vhd", "-j", "j"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "resize never reached %s" % point
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.exists("j")
    if point not in ("journal", "footer"):     # mid-way: disabled, refused, not misread
        with pytest.raises(V.VHDError):
            V.VHD("d.vhd")
        assert vhd_util("check", "-n", "d.vhd").returncode != 0
    vhd_util("revert", "--debug", "-n", "d.vhd", "-j", "j", check=0)
    assert not os.path.exists("j")
    assert sha("d.vhd") == original
    vhd_util("check", "-n", "d.vhd", check=0)
    assert view("d.vhd", 8 * MiB) == bytes(model.data)


def test_upstream_failure_points_revert_themselves(work):
    """VHD_UTIL_TEST_FAIL_RESIZE_*: vhd-util stops there (exit EINVAL) like upstream's."""
    filled("d.vhd", 8)
    original = sha("d.vhd")
    env = dict(os.environ, VHD_UTIL_TEST_FAIL_RESIZE_DATA_MOVED="1")
    out = vhd_util("resize", "-s", 1024, "-n", "d.vhd", "-j", "j", env=env)
    assert out.returncode == 22 and "Failing at VHD_UTIL_TEST_FAIL_RESIZE_DATA_MOVED" in out.text
    vhd_util("revert", "-n", "d.vhd", "-j", "j", check=0)
    assert sha("d.vhd") == original


def test_resize_refusals(work):
    filled("d.vhd", 8)
    out = vhd_util("resize", "-s", 4, "-n", "d.vhd", "-j", "j")
    assert out.returncode == 38 and not os.path.exists("j")          # ENOSYS: no shrinking
    vhd_util("revert", "-n", "d.vhd", "-j", "j", check=2)             # ENOENT: no journal
    vhd_util("create", "-n", "f.vhd", "-s", 4, "-r", check=0)
    with V.VHD("f.vhd", writable=True) as f:
        f.write(b"\x01" * 512, 4 * MiB - 512)
    vhd_util("resize", "-s", 8, "-n", "f.vhd", "-j", "j", check=0)     # fixed: grows in place
    assert os.path.getsize("f.vhd") == 8 * MiB + 512
    with V.VHD("f.vhd") as f:
        assert f.read(4 * MiB - 512, 1024) == b"\x01" * 512 + bytes(512)
    vhd_util("check", "-n", "f.vhd", check=0)
