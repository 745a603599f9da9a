"""Helpers for the format tests: the command lines as subprocesses, images and models."""
import hashlib
import os
import random
import subprocess

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(TOP, ".venv", "bin")
MiB = 1 << 20


def run(prog, *args, check=None, cwd=None, env=None, timeout=60):
    """Run .venv/bin/<prog> args...; returns the CompletedProcess (bytes stdout)."""
    out = subprocess.run([os.path.join(BIN, prog)] + [str(a) for a in args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    out.text = out.stdout.decode("utf-8", "replace")
    out.err = out.stderr.decode("utf-8", "replace")
    if check is not None:
        assert out.returncode == check, (args, out.returncode, out.text, out.err)
    return out


def vhd_util(*args, **kw):
    return run("vhd-util", *args, **kw)


def td_util(*args, **kw):
    return run("td-util", *args, **kw)


def qemu(*args, check=True):
    out = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=120)
    if check:
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


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
