"""A VBD as a real block device (nbdfuse + loop): a file system survives a re-attach; a
device in use is never torn down unless forced; detach acts only on what it proves is
its own (a loop number reused by another device is left alone); leftovers of a crash
are cleared by the next attach."""
import os
import signal
import subprocess
import time

import pytest

from lib.engine import image_file
from lib.procs import run, wait_for
from lib.sizes import MiB
from smtap import settings
from smtap.tapdisk import blockdev


@pytest.fixture
def attached(serve):
    """attach(served, name) -> (dev, mount_dir); every device detached at the end."""
    dirs = []

    def attach(served, name):
        mount_dir = os.path.join(settings.runtime_dir(), "nbdfuse", name)
        dev = blockdev.attach(served.nbd_path, "", mount_dir)
        dirs.append(mount_dir)
        return dev, mount_dir

    yield attach
    for mount_dir in dirs:
        try:
            blockdev.detach(mount_dir, force=True)
        except Exception:
            pass


@pytest.fixture
def point(smtap_root):
    """A mount point under the root (smtap_root's cleanup unmounts what is left)."""
    path = smtap_root / "mnt"
    path.mkdir()
    return path


def gone(mount_dir):
    return (not blockdev.loops(mount_dir) and not blockdev.mounted(mount_dir)
            and not blockdev.nbdfuse_pids(mount_dir) and not os.path.exists(mount_dir))


def test_filesystem_on_vbd_survives_reattach(serve, attached, tmp_path, point):
    img = image_file(tmp_path / "fs.img", 64 * MiB)
    served = serve("aio:%s" % img)
    dev, mount_dir = attached(served, "fs1")
    assert dev.startswith("/dev/loop") and blockdev.loops(mount_dir) == [dev]
    run("mkfs.ext4", "-q", "-F", dev)
    payload = os.urandom(3 << 20)
    run("mount", dev, point)
    try:
        (point / "a.bin").write_bytes(payload)
        (point / "dir").mkdir()
        (point / "dir" / "b.txt").write_text("hello tapdisk\n")
    finally:
        run("umount", point)
    blockdev.detach(mount_dir)
    assert gone(mount_dir)

    # the data went through the engine into the image file
    served.stop()
    served = serve("aio:%s" % img, minor=5)
    dev, mount_dir = attached(served, "fs2")
    run("fsck.ext4", "-n", "-f", dev)
    run("mount", "-o", "ro", dev, point)
    try:
        assert (point / "a.bin").read_bytes() == payload
        assert (point / "dir" / "b.txt").read_text() == "hello tapdisk\n"
    finally:
        run("umount", point)
    blockdev.detach(mount_dir)
    assert gone(mount_dir)


def test_attach_to_missing_socket_fails_clean(smtap_root, tmp_path):
    mount_dir = os.path.join(settings.runtime_dir(), "nbdfuse", "none")
    with pytest.raises(blockdev.BlockdevError):
        blockdev.attach(str(tmp_path / "no.sock"), "", mount_dir, timeout=10)
    assert not blockdev.mounted(mount_dir)


def test_mounted_device_is_refused_untouched_then_detaches(serve, attached, tmp_path, point):
    """Failed before: detach ran losetup -d, then hung 30 s on fusermount -u and failed,
    leaving a half-detached device."""
    served = serve("aio:%s" % image_file(tmp_path / "d.img", 32 * MiB))
    dev, mount_dir = attached(served, "busy")
    run("mkfs.ext4", "-q", "-F", dev)
    run("mount", dev, point)
    start = time.monotonic()
    with pytest.raises(blockdev.Busy) as e:
        blockdev.detach(mount_dir)
    assert time.monotonic() - start < 5
    assert "mounted on %s" % point in str(e.value)
    assert blockdev.loops(mount_dir) == [dev] and blockdev.mounted(mount_dir)
    (point / "still.txt").write_text("works\n")           # the device still works
    os.sync()
    run("umount", point)
    blockdev.detach(mount_dir)
    assert gone(mount_dir)


def test_device_held_open_is_refused(serve, attached, tmp_path):
    served = serve("aio:%s" % image_file(tmp_path / "d.img", 8 * MiB))
    dev, mount_dir = attached(served, "held")
    holder = subprocess.Popen(["sleep", "60"], stdin=open(dev, "rb"))
    try:
        with pytest.raises(blockdev.Busy) as e:
            blockdev.detach(mount_dir)
        assert "pid %d (sleep)" % holder.pid in str(e.value)
        assert blockdev.loops(mount_dir) == [dev]
    finally:
        holder.kill()
        holder.wait()
    blockdev.detach(mount_dir)
    assert gone(mount_dir)


@pytest.mark.alone          # the freed loop number must come back to it
def test_loop_number_reused_by_another_device_is_left_alone(serve, attached, tmp_path):
    """Failed before: detach by the remembered /dev/loopN detached the other device."""
    a = serve("aio:%s" % image_file(tmp_path / "a.img", 8 * MiB, b"A"))
    b = serve("aio:%s" % image_file(tmp_path / "b.img", 8 * MiB, b"B"))
    dev_a, dir_a = attached(a, "a")
    run("losetup", "-d", dev_a)                        # A's loop device goes behind its back
    assert wait_for(lambda: not blockdev.loops(dir_a))
    dev_b, dir_b = attached(b, "b")
    assert dev_b == dev_a                              # the lowest free number: reused
    blockdev.detach(dir_a)
    assert gone(dir_a)
    assert blockdev.loops(dir_b) == [dev_b] and blockdev.mounted(dir_b)
    with open(dev_b, "rb") as f:
        assert f.read(4096) == b"B" * 4096


def test_forced_detach_of_a_mounted_device(serve, attached, tmp_path, point):
    served = serve("aio:%s" % image_file(tmp_path / "d.img", 32 * MiB))
    dev, mount_dir = attached(served, "forced")
    run("mkfs.ext4", "-q", "-F", dev)
    run("mount", dev, point)
    blockdev.detach(mount_dir, force=True)
    assert not blockdev.mounted(mount_dir) and not blockdev.nbdfuse_pids(mount_dir)
    with pytest.raises(OSError):                       # the file system lost its disk
        with open(os.path.join(str(point), "x"), "wb") as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    if run("umount", point, check=False).returncode:
        run("umount", "-l", point)
    assert wait_for(lambda: not blockdev.loops(mount_dir))   # freed at its last close


@pytest.mark.parametrize("leftover", ["mounted", "nbdfuse-killed", "loop"])
def test_attach_clears_what_a_crash_left(serve, attached, tmp_path, leftover):
    served = serve("aio:%s" % image_file(tmp_path / "d.img", 8 * MiB, b"x"))
    mount_dir = os.path.join(settings.runtime_dir(), "nbdfuse", "crash")
    if leftover == "loop":
        blockdev.attach(served.nbd_path, "", mount_dir)
    else:
        blockdev.mount(served.nbd_path, "", mount_dir)
    if leftover == "nbdfuse-killed":
        (pid,) = blockdev.nbdfuse_pids(mount_dir)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not blockdev.nbdfuse_pids(mount_dir))
    dev, _ = attached(served, "crash")
    assert blockdev.loops(mount_dir) == [dev]
    with open(dev, "rb") as f:
        assert f.read(512) == b"x" * 512
    blockdev.detach(mount_dir)
    assert gone(mount_dir)
