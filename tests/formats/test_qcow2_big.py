"""A 16 TiB sparse qcow2 image (the storage layer's largest VDI) created by qcow2-util,
its last GiB written through smtap.formats.qcow2 and read back by it and by qemu."""
import json

from smtap.formats import qcow2 as Q
from lib.procs import run
from lib.sizes import GiB, MiB, TiB
from lib.vhd import tool

SIZE = 16 * TiB
PIECE = 64 * MiB


def test_16_tib_image_written_at_its_last_gib(work):
    path = work / "big.qcow2"
    tool("qcow2-util", "create", "-n", path, "-s", SIZE >> 20, check=0)
    assert path.stat().st_size < MiB
    start = SIZE - GiB
    with Q.Image(str(path), writable=True) as img:
        assert img.size == SIZE
        for k in range(GiB // PIECE):
            block = bytes([k + 1]) * PIECE
            for pos in range(0, PIECE, 8 * MiB):
                img.write(block[pos:pos + 8 * MiB], start + k * PIECE + pos)
    assert GiB <= path.stat().st_size < GiB + 8 * MiB          # sparse: data and tables
    with Q.Image(str(path)) as img:
        for k in range(GiB // PIECE):
            got = img.read(start + k * PIECE, PIECE)
            assert got == bytes([k + 1]) * PIECE, k
        assert img.read(0, MiB) == bytes(MiB)
        assert img.extents(0, SIZE) == [(0, start, Q.HOLE), (start, GiB, Q.DATA)]
    cmds = []
    for k in range(GiB // PIECE):
        cmds += ["-c", "read -q -P %d %d %d" % (k + 1, start + k * PIECE, PIECE)]
    out = run("qemu-io", "-f", "qcow2", *(cmds + ["-c", "read -q -P 0 0 1M", str(path)]))
    assert "Pattern verification failed" not in out.stdout + out.stderr
    run("qemu-img", "check", str(path))
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == SIZE
    assert tool("qcow2-util", "query", "-v", "-a", "-n", path, check=0).text == \
        "%d\n%d\n" % (SIZE >> 20, GiB // 65536)
