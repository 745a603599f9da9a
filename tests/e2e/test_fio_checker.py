"""The snapshot-consistency checker used with fio (lib.fs.check_fio_blocks) accepts
what fio writes and catches a torn or misplaced block."""
import pytest

from lib.fs import check_fio_blocks
from lib.procs import run


def test_checker_accepts_fio_blocks_and_catches_torn_ones(tmp_path):
    image = tmp_path / "img"
    run("fio", "--name=w", "--filename=" + str(image), "--size=1M", "--bs=4k", "--rw=randwrite",
        "--verify=crc32c", "--verify_state_save=0", "--do_verify=0", "--number_ios=128",
        "--output=/dev/null", cwd=str(tmp_path), timeout=60)
    good, zero = check_fio_blocks(str(image))
    assert good + zero == 256 and 64 <= good <= 128
    data = bytearray(image.read_bytes())
    blocks = [o for o in range(0, len(data), 4096) if any(data[o:o + 4096])]
    a, b = blocks[0], blocks[1]

    torn = bytearray(data)                 # the second half of block a from block b
    torn[a + 2048:a + 4096] = data[b + 2048:b + 4096]
    (tmp_path / "torn").write_bytes(torn)
    with pytest.raises(AssertionError, match="torn"):
        check_fio_blocks(str(tmp_path / "torn"))

    moved = bytearray(data)                # block b's content at a's offset
    moved[a:a + 4096] = data[b:b + 4096]
    (tmp_path / "moved").write_bytes(moved)
    with pytest.raises(AssertionError, match="holds the block of offset"):
        check_fio_blocks(str(tmp_path / "moved"))
