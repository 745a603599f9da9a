"""qcow2 images for the engine tests (made with qcow2-util, data written through
smtap.formats) and their checks (qemu-img and qcow2-util)."""
from lib.engine import image_file
from lib.procs import run
from lib.sizes import MiB
from lib.vhd import check_vhds, tool


def qcow2_util(*args, **kw):
    return tool("qcow2-util", *args, **kw)


def qcow2_chain(root, size, depth, name="q", raw_base=False):
    """A chain of `depth` images under root: qcow2-util create (or a raw base file), then
    snapshots of the one before, each level holding data of its own as vhd_chain does.
    Returns the leaf."""
    from smtap.formats import qcow2 as Q
    paths = []
    for level in range(depth):
        path = str(root / ("%s%d.%s" % (name, level, "raw" if raw_base and not level else "qcow2")))
        if level:
            qcow2_util("snapshot", "-n", path, "-p", paths[-1],
                       *(["-m"] if raw_base and level == 1 else []), check=0)
        elif raw_base:
            image_file(path, size)
        else:
            qcow2_util("create", "-n", path, "-s", size >> 20, check=0)
        data = [(off, bytes([0x10 + level]) * (MiB // 2)) for off in range(level * MiB, size,
                                                                          depth * MiB)]
        if path.endswith(".raw"):
            with open(path, "r+b") as f:
                for off, piece in data:
                    f.seek(off)
                    f.write(piece)
        else:
            with Q.Image(path, writable=True) as img:
                for off, piece in data:
                    img.write(piece, off)
        paths.append(path)
    return paths[-1]


# the qcow2 disks the engine's generic tests also run on: one image, and a chain of two
# qcow2 images on a raw base
QCOW2_DISKS = {
    "qcow2": lambda root, size: "qcow2:" + qcow2_chain(root, size, 1),
    "qcow2-chain3": lambda root, size: "qcow2:" + qcow2_chain(root, size, 3, raw_base=True),
}


def qcow2_check(path):
    """qemu-img check finds nothing wrong with path, nor does qcow2-util check."""
    out = run("qemu-img", "check", "-f", "qcow2", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    qcow2_util("check", "-n", path, check=0)


def check_images(root):
    """Every VHD and qcow2 image under root checks clean (what the engine wrote is valid)."""
    check_vhds(root)
    for path in sorted(root.glob("*.qcow2")):
        qcow2_check(path)


def qemu_view(path, work):
    """What qemu reads of an image (qemu-img convert -O raw through a file under work)."""
    out = work / "view.raw"
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data
