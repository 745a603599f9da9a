"""sm/dirsr.py's table of VDI file formats by extension: raw sizes from the file, VHD
sizes from its metadata as vhd-util reports them (also while a tapdisk holds it open,
its trailing footer poisoned)."""
import os

import pytest

from smtap import names
from smtap.sm import dirsr
from smtap.tapdisk import tapctl
from lib.engine import nbd_uri, qemu_io
from lib.sizes import MiB
from lib.vhd import vhd_util


def test_raw_sizes_are_the_file_length_and_its_blocks(tmp_path):
    path = str(tmp_path / "a.raw")
    dirsr.file_format(path).create(path, 8 * MiB)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 65536)
    st = os.stat(path)
    assert dirsr.file_sizes(path) == (8 * MiB, st.st_blocks * 512) and st.st_blocks
    with pytest.raises(FileExistsError):
        dirsr.file_format(path).create(path, MiB)


def test_vhd_sizes_are_what_vhd_util_reports(smtap_root):
    path = str(smtap_root / "a.vhd")
    dirsr.file_format(path).create(path, 20 * MiB)
    assert dirsr.file_format(path).disk_type == "vhd"
    with pytest.raises(OSError):
        dirsr.file_format(path).create(path, MiB)       # never over an existing file
    pid, minor, _ = tapctl.create("vhd:" + path)
    try:
        qemu_io(nbd_uri(names.nbd_path(pid, minor)), "write -P 1 3M 3M")
        with open(path, "rb") as f:                     # open: the trailing footer poisoned
            f.seek(-512, os.SEEK_END)
            assert f.read() == b"\xc7" * 512
        size, used = dirsr.file_sizes(path)
    finally:
        tapctl.destroy(pid, minor)
    virtual, phys = vhd_util("query", "-v", "-s", "-n", path, check=0).text.split()
    assert (size, used) == (int(virtual) * MiB, int(phys)) == (20 * MiB, used)
    assert used > 4 * MiB                               # two blocks written
    assert dirsr.file_sizes(path) == (size, used)
