"""The format tests' helpers: the suite's VHD command lines (vhd-util, td-util) as real
processes or in this process, images' digests, and a model of what a virtual disk should
hold."""
import hashlib
import io
import os
import random

from lib.checkout import TOP, VENV_BIN as BIN           # noqa: F401  (vhdlib's names)
from lib.procs import run
from lib.sizes import MiB


def tool(prog, *args, check=None, cwd=None, env=None, timeout=60):
    """Run .venv/bin/<prog> args...: the CompletedProcess, stdout as bytes, .text and .err
    decoded. check: the exit status it must have."""
    out = run(os.path.join(BIN, prog), *args, check=False, cwd=cwd, env=env, timeout=timeout,
              text=False)
    out.text = out.stdout.decode("utf-8", "replace")
    out.err = out.stderr.decode("utf-8", "replace")
    if check is not None:
        assert out.returncode == check, (args, out.returncode, out.text, out.err)
    return out


def vhd_util(*args, **kw):
    return tool("vhd-util", *args, **kw)


def td_util(*args, **kw):
    return tool("td-util", *args, **kw)


class _Ran(object):
    def __init__(self, returncode, out, err):
        self.returncode = returncode
        self.stdout = out.getvalue().encode("utf-8") + out.buffer.getvalue()
        self.text = self.stdout.decode("utf-8", "replace")
        self.err = err.getvalue()


def here(module, *args, check=None):
    """A command line of smtap.formats (its module: vhdutil, tdutil) run in this process,
    through its run(argv, out, err): what tool() returns, with no process and none of the
    build's launchers (the unit tier). A bug raises here instead of exiting 5."""
    out, err = io.StringIO(), io.StringIO()
    out.buffer = io.BytesIO()
    ran = _Ran(module.run([str(a) for a in args], out, err), out, err)
    if check is not None:
        assert ran.returncode == check, (args, ran.returncode, ran.text, ran.err)
    return ran


def vhd_util_here(*args, **kw):
    from smtap.formats import vhdutil
    return here(vhdutil, *args, **kw)


def td_util_here(*args, **kw):
    from smtap.formats import tdutil
    return here(tdutil, *args, **kw)


def sha(path):
    with open(str(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint(path):
    st = os.stat(str(path))
    return sha(path), st.st_size, st.st_mtime_ns


class Model(object):
    """The bytes a virtual disk should hold (a bytearray), written alongside the image."""

    def __init__(self, size):
        self.data = bytearray(size)

    def write(self, img, data, offset):
        img.write(data, offset)
        self.data[offset:offset + len(data)] = data


def random_writes(rng, img, model, count, max_sectors=64, size=None):
    """count sector-aligned writes of random bytes at random places."""
    size = size or img.size
    for _ in range(count):
        n = rng.randint(1, max_sectors) * 512
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        model.write(img, rng.getrandbits(8 * n).to_bytes(n, "little"), off)


def seeded(seed):
    return random.Random(seed)


# -- VHD images for the engine tests (made with vhd-util, data written through smtap.formats)
def vhd_chain(root, size, depth, name="v"):
    """A chain of `depth` VHDs under root made with vhd-util (create, then snapshots of
    the one before), each level holding data of its own: byte 0x10 + level in half-MiB
    pieces (partly filled blocks), at offsets no other level writes. Returns the leaf."""
    from smtap.formats import vhd as V
    paths = []
    for level in range(depth):
        path = str(root / ("%s%d.vhd" % (name, level)))
        if level:
            vhd_util("snapshot", "-n", path, "-p", paths[-1], check=0)
        else:
            vhd_util("create", "-n", path, "-s", size >> 20, check=0)
        with V.VHD(path, writable=True) as img:
            for off in range(level * MiB, size, depth * MiB):
                img.write(bytes([0x10 + level]) * (MiB // 2), off)
        paths.append(path)
    return paths[-1]


def vhd_disk(root, size, depth=1):
    """"vhd:<leaf>" of a vhd_chain (depth 1: one dynamic VHD)."""
    return "vhd:" + vhd_chain(root, size, depth)


def vhd_check(path, *flags):
    """vhd-util check passes on path."""
    out = vhd_util("check", "-n", path, *flags)
    assert out.returncode == 0, out.text + out.err
    assert out.text.strip().endswith("is valid"), out.text


# the VHD disks the engine's generic tests also run on: one image, and a chain of three
VHD_DISKS = {
    "vhd": lambda root, size: vhd_disk(root, size),
    "vhd-chain3": lambda root, size: vhd_disk(root, size, 3),
}


def check_vhds(root):
    """vhd-util check passes on every VHD under root (what the engine wrote is valid)."""
    for path in sorted(root.glob("*.vhd")):
        vhd_check(path)
