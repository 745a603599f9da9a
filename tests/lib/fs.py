"""File systems and data on disks: a tmpfs, ext4 on a device, files with their sha256
read back (mounted or through debugfs), and a checker for the blocks fio writes with
--verify=crc32c."""
import hashlib
import os
import random
import struct

import crc32c as _crc32c

from lib.checkout import TOP                   # noqa: F401  (e2e_helpers' names)
from lib.procs import run, sh                  # noqa: F401
from lib.sizes import MiB


def tmpfs(path, size):
    """A tmpfs of `size` bytes mounted at path (smtap_root's teardown unmounts it)."""
    os.makedirs(str(path), exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", "size=%d" % size, "smtap-test", path)
    return path


def used(path):
    """Bytes used in the file system at path."""
    st = os.statvfs(str(path))
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def make_fs(dev, point):
    """ext4 on dev, mounted at point."""
    sh("mkfs.ext4", "-q", "-F", dev)
    sh("mount", dev, point)


def write_files(point, seed=1):
    """A few files of random data; returns {name: sha256}."""
    rng = random.Random(seed)
    files = {}
    for name, size in (("small.txt", 100), ("one.bin", MiB), ("four.bin", 4 * MiB + 123)):
        data = rng.getrandbits(8 * size).to_bytes(size, "little")
        with open(os.path.join(point, name), "wb") as f:
            f.write(data)
        files[name] = hashlib.sha256(data).hexdigest()
    os.sync()
    return files


def read_files(point, files):
    for name, digest in files.items():
        with open(os.path.join(point, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


def check_fs(dev_or_image, files):
    """e2fsck -n the image and compare each file's sha256 through debugfs (no mount)."""
    sh("e2fsck", "-f", "-n", dev_or_image)
    for name, digest in files.items():
        out = run("debugfs", "-R", "cat /" + name, dev_or_image, check=False, text=False,
                  timeout=60)
        assert hashlib.sha256(out.stdout).hexdigest() == digest, name


# --- fio's verify blocks --------------------------------------------------------------------
def crc32c(data):
    """CRC-32C (Castagnoli), as iSCSI and fio's data checksum (the crc32c package: in C,
    SSE4.2 where the CPU has it; Python's took 5 s per 16 MiB image checked)."""
    return _crc32c.crc32c(data)


FIO_MAGIC = 0xACCA
VERIFY_HEADER = struct.Struct("<HHIQQIIHHI")    # fio's struct verify_header (40 bytes)
CRC32C_HEADER = 4                               # struct vhdr_crc32 after it


def check_fio_blocks(image, bs=4096):
    """Every bs block of an image fio wrote with --verify=crc32c is either untouched
    (zeros) or one whole fio block: magic, length, its own offset, header and data
    checksums all right. A torn or misplaced block fails. Returns (written, zero)."""
    written = zero = 0
    with open(image, "rb") as f:
        offset = 0
        while True:
            blk = f.read(bs)
            if not blk:
                break
            if blk.count(0) == len(blk):
                zero += 1
            else:
                (magic, _vtype, length, _seed, boff, _s, _ns, _thread, _nio,
                 hcrc) = VERIFY_HEADER.unpack_from(blk)
                where = "block at %d" % offset
                assert magic == FIO_MAGIC and length == bs, "%s: no fio header" % where
                assert boff == offset, "%s holds the block of offset %d" % (where, boff)
                assert crc32c(blk[:VERIFY_HEADER.size - 4]) ^ 0xFFFFFFFF == hcrc, \
                    "%s: bad header checksum" % where
                (dcrc,) = struct.unpack_from("<I", blk, VERIFY_HEADER.size)
                crc = crc32c(blk[VERIFY_HEADER.size + CRC32C_HEADER:length])
                # fio's software and SSE4.2 crc32c differ by the final inversion
                assert dcrc in (crc, crc ^ 0xFFFFFFFF), \
                    "%s: torn data (crc32c mismatch)" % where
                written += 1
            offset += len(blk)
    return written, zero
