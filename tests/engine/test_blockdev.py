"""A VBD as a real block device (nbdfuse + loop): a file system survives a re-attach."""
import os

import pytest

from enginelib import run
from smtap import settings
from smtap.tapdisk import blockdev


@pytest.fixture
def attached(serve):
    """attach(served, name) -> dev; every device detached at the end, even on failure."""
    devs = []

    def attach(served, name):
        mount_dir = os.path.join(settings.runtime_dir(), "nbdfuse", name)
        dev = blockdev.attach(served.nbd_path, "", mount_dir)
        devs.append(dev)
        return dev

    yield attach
    for dev in devs:
        try:
            blockdev.detach(dev)
        except Exception:
            pass


def test_filesystem_on_vbd_survives_reattach(serve, attached, tmp_path):
    img = tmp_path / "fs.img"
    img.write_bytes(b"")
    os.truncate(img, 64 << 20)
    served = serve("aio:%s" % img)
    dev = attached(served, "fs1")
    assert dev.startswith("/dev/loop")
    run("mkfs.ext4", "-q", "-F", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    payload = os.urandom(3 << 20)
    run("mount", dev, mnt)
    try:
        (mnt / "a.bin").write_bytes(payload)
        (mnt / "dir").mkdir()
        (mnt / "dir" / "b.txt").write_text("hello tapdisk\n")
    finally:
        run("umount", mnt)
    blockdev.detach(dev)
    assert not os.path.exists(os.path.join(settings.runtime_dir(), "nbdfuse", "fs1", "disk"))
    assert run("losetup", "-j", os.path.join(settings.runtime_dir(), "nbdfuse", "fs1", "disk"),
               check=False).stdout.strip() == ""

    # the data went through the engine into the image file
    served.stop()
    served = serve("aio:%s" % img, minor=5)
    dev = attached(served, "fs2")
    run("fsck.ext4", "-n", "-f", dev)
    run("mount", "-o", "ro", dev, mnt)
    try:
        assert (mnt / "a.bin").read_bytes() == payload
        assert (mnt / "dir" / "b.txt").read_text() == "hello tapdisk\n"
    finally:
        run("umount", mnt)
    blockdev.detach(dev)


def test_attach_to_missing_socket_fails_clean(smtap_root, tmp_path):
    mount_dir = os.path.join(settings.runtime_dir(), "nbdfuse", "none")
    with pytest.raises(blockdev.BlockdevError):
        blockdev.attach(str(tmp_path / "no.sock"), "", mount_dir, timeout=10)
    assert not blockdev._mounted(mount_dir)
