"""What the storage layer does to qcow2 images: create, snapshot (a child with a
backing file), reparent (rebase -u), grow, commit (coalesce a child into its backing
file), reset (drop every cluster), on smtap.formats.qcow2.

Each leaves a valid image at every step: create writes the tables before the header
that names them (until then the file is no qcow2 image; it is removed on failure);
commit writes the backing file in lazy mode (dirty bit, see qcow2.py) and only reads
the child, so the child's view never changes and a crash leaves at most clusters a
repair frees (qemu repairs a dirty image on its next read-write open, as we do).
"""
import errno
import os
from array import array

from smtap.formats import qcow2 as Q

NO_PREALLOCATION = "off"
PREALLOCATIONS = (NO_PREALLOCATION, "metadata", "falloc", "full")
COPY_CHUNK = 8 << 20


def _layout(size, cluster_bits, refcount_order):
    """(L1 entries, refcount table clusters, refcount blocks, L1 clusters) of a new image:
    header, refcount table, refcount blocks, L1 table, in that order, as qemu."""
    cs = 1 << cluster_bits
    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    if l1_size * 8 > Q.MAX_L1_BYTES:
        raise Q.QCow2Error(errno.EFBIG, "virtual size %d needs an L1 table over %d bytes with "
                           "%d-byte clusters" % (size, Q.MAX_L1_BYTES, cs))
    l1_clusters = -(-l1_size * 8 // cs)
    rbe = cs * 8 >> refcount_order
    rt = rb = 1
    while True:
        total = 1 + rt + rb + l1_clusters
        need_rb = -(-total // rbe)
        need_rt = -(-need_rb * 8 // cs)
        if (need_rb, need_rt) == (rb, rt):
            return l1_size, rt, rb, l1_clusters
        rb, rt = need_rb, need_rt


def create(path, size, cluster_size=1 << Q.DEFAULT_CLUSTER_BITS, backing=None,
           backing_format=None, preallocation=NO_PREALLOCATION, version=3, lazy_refcounts=False,
           refcount_bits=16, hidden=0):
    """A new image of `size` bytes (rounded up to 512 as qemu does). `backing`: the
    backing file name as stored (relative names are relative to the new image's
    directory), `backing_format` "qcow2" or "raw". preallocation: off | metadata
    (L2 tables and clusters allocated, the file sparse) | falloc | full. Nothing is
    left behind on failure."""
    if cluster_size & (cluster_size - 1) or not 1 << Q.MIN_CLUSTER_BITS <= cluster_size <= \
            1 << Q.MAX_CLUSTER_BITS:
        raise Q.QCow2Error(errno.EINVAL, "invalid cluster size %d (a power of two from 512 "
                           "to 2 MiB)" % cluster_size)
    if preallocation not in PREALLOCATIONS:
        raise Q.QCow2Error(errno.EINVAL, "invalid preallocation %r (off, metadata, falloc, "
                           "full)" % preallocation)
    if version not in (2, 3):
        raise Q.QCow2Error(errno.EINVAL, "invalid compat version %r" % version)
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (version == 2 and refcount_bits != 16):
        raise Q.QCow2Error(errno.EINVAL, "invalid refcount bits %d" % refcount_bits)
    if lazy_refcounts and version < 3:
        raise Q.QCow2Error(errno.EINVAL, "lazy refcounts need compat 1.1 (version 3)")
    if size < 0 or size > Q.MAX_SIZE * 1024:
        raise Q.QCow2Error(errno.EFBIG, "invalid size %d" % size)
    if backing is not None and backing_format not in ("qcow2", "raw"):
        raise Q.QCow2Error(errno.EINVAL, "backing format %r: qcow2 or raw" % backing_format)
    size = -(-size // 512) * 512
    bits = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    l1_size, rt, rb, l1c = _layout(size, bits, order)
    cs = cluster_size
    h = Q.Header()
    h.version = version
    h.cluster_bits = bits
    h.size = size
    h.l1_size = l1_size
    h.refcount_table_offset = cs
    h.refcount_table_clusters = rt
    h.l1_table_offset = (1 + rt + rb) * cs
    h.refcount_order = order
    h.header_length = Q.V3_HEADER_LENGTH if version == 3 else Q.HEADER_V2.size
    if lazy_refcounts:
        h.compatible_features |= Q.COMPAT_LAZY_REFCOUNTS
    if backing is not None:
        h.backing_file = backing
        h.set_ext(Q.EXT_BACKING_FORMAT, backing_format.encode("ascii"))
    h.set_ext(Q.EXT_HIDDEN, bytes([1 if hidden else 0]) + bytes(7))
    header = h.pack()
    nmeta = 1 + rt + rb + l1c
    rbe = cs * 8 >> order
    table = array("Q", bytes(rt * cs))
    blocks = bytearray(rb * cs)
    for k in range(rb):
        table[k] = (1 + rt + k) * cs
    for c in range(nmeta):
        k = c // rbe
        blk = bytearray(blocks[k * cs:(k + 1) * cs])
        Q.refcount_put(blk, c % rbe, 1, order)
        blocks[k * cs:(k + 1) * cs] = blk
    f = Q.open_file(path, create=True)
    ok = False
    try:
        f.pwrite(Q._pack_u64(table), cs)
        f.pwrite(bytes(blocks), (1 + rt) * cs)
        f.truncate(h.l1_table_offset + l1_size * 8)      # a zero L1 table, as qemu
        f.flush()
        f.pwrite(header, 0)                     # last: the tables it names are written
        f.flush()
        ok = True
    finally:
        f.close()
        if not ok:
            _unlink(path)
    if preallocation != NO_PREALLOCATION:
        try:
            _preallocate(path, preallocation)
        except Exception:
            _unlink(path)
            raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _preallocate(path, mode):
    """Every guest cluster allocated: L2 tables and data contiguous, table by table."""
    with Q.Image(path, writable=True) as img:
        img.begin_write()
        cs, bits = img.cluster_size, img.cluster_bits
        nclusters = -(-img.size // cs)
        for l1i in range(len(img.l1)):
            first = l1i << img.l2_bits
            n = min(img.l2_entries, nclusters - first)
            if n <= 0:
                break
            l2 = img._alloc(1)
            data = img._alloc(n)
            img._rc_flush()
            table = array("Q", bytes(cs))
            for i in range(n):
                table[i] = (data + (i << bits)) | Q.OFLAG_COPIED
            if mode == "falloc":
                os.posix_fallocate(img.io.fd, data, n * cs)
            elif mode == "full":
                zero = bytes(min(n * cs, COPY_CHUNK))
                pos = 0
                while pos < n * cs:
                    k = min(len(zero), n * cs - pos)
                    img.io.pwrite(zero[:k], data + pos)
                    pos += k
            img.io.pwrite(Q._pack_u64(table), l2)
            img.l1[l1i] = l2 | Q.OFLAG_COPIED
        img.io.flush()
        img.io.pwrite(Q._pack_u64(img.l1), img.header.l1_table_offset)
        img.io.flush()


def backing_name(child, parent):
    """The name a child stores for its backing file: relative to the child's directory."""
    rel = os.path.relpath(os.path.realpath(parent), os.path.dirname(os.path.realpath(child)))
    return rel


def image_size(path, raw):
    """Virtual size of a qcow2 image, or the bytes of a raw file."""
    if raw:
        with Q.open_file(path) as f:
            return f.size()
    with Q.Image(path) as img:
        return img.size


def snapshot(path, parent, parent_raw=False, check_empty=True, limit=0,
             cluster_size=1 << Q.DEFAULT_CLUSTER_BITS):
    """vhd-util snapshot for qcow2: a child of `parent` (resolved against the cwd) with
    a relative backing name and its format, sized as the parent. Unless parent_raw or
    not check_empty, empty qcow2 ancestors are skipped (the child links to the first
    one holding data, sized as the given parent). Returns the backing file's path."""
    ppath = os.path.realpath(parent)
    if not os.path.exists(ppath):
        raise Q.QCow2Error(errno.ENOENT, "%s: no such parent" % parent)
    size = image_size(ppath, parent_raw)
    backing, raw = ppath, parent_raw
    if not parent_raw and check_empty:
        backing, raw = _snapshot_target(ppath)
    if limit:
        depth = 1 if raw else Q.chain_depth(backing)
        if depth + 1 > limit:
            raise Q.QCow2Error(errno.ENOSPC, "snapshot depth exceeded: current depth: %d, "
                               "limit: %d" % (depth, limit))
    create(path, size, cluster_size=cluster_size, backing=backing_name(path, backing),
           backing_format="raw" if raw else "qcow2")
    return backing


def _snapshot_target(path):
    """Walk up past qcow2 images with no data: (first one with data, it is raw)."""
    cur = path
    for _ in range(Q.MAX_CHAIN):
        with Q.Image(cur) as img:
            if img.backing_file is None or img.allocated_clusters():
                return cur, False
            nxt = img.backing_path()
            raw = img.backing_is_raw()
        if raw:
            return nxt, True
        cur = nxt
    raise Q.QCow2Error(errno.ELOOP, "%s: backing file loop" % path)


def set_parent(path, parent, parent_raw=False):
    """Reparent without copying (vhd-util modify -p, rebase -u): the backing file's name
    relative to the child's directory, and its format; a qcow2 parent must open."""
    ppath = os.path.realpath(parent)
    if not os.path.exists(ppath):
        raise Q.QCow2Error(errno.ENOENT, "%s: no such parent" % parent)
    if not parent_raw:
        Q.Image(ppath).close()
    with Q.Image(path, writable=True) as img:
        img.set_backing(backing_name(path, ppath), "raw" if parent_raw else "qcow2")


def resize(path, size):
    """Grow the virtual size (bytes, rounded up to 512)."""
    with Q.Image(path, writable=True) as img:
        img.grow(-(-size // 512) * 512)


def reset(path):
    """Every guest cluster unallocated and the space given back (vhd-util modify -z):
    the L1 table zeroed and made durable, then the refcounts of what it pointed at
    dropped, then the file cut after the last cluster in use."""
    from smtap.formats import qcow2check
    with Q.Image(path, writable=True) as img:
        img.begin_write()
        h = img.header
        img.io.pwrite(bytes(h.l1_size * 8), h.l1_table_offset)
        img.io.flush()
        img.l1 = array("Q", bytes(h.l1_size * 8))
        img._l2.clear()
        res = qcow2check.check_image(img, repair="leaks")
        if res.corruptions or res.check_errors:
            raise Q.QCow2Error(errno.EIO, "%s: reset: %d errors left" % (path, res.corruptions))
        end = img.end_offset()
        if end < img.file_size and not getattr(img.io, "is_block", False):
            img.io.truncate(max(end, h.l1_table_offset + h.l1_size * 8))
            img.file_size = img.io.size()
        img.io.flush()


# -- commit ------------------------------------------------------------------------------
class _Target(object):
    """What a commit writes into: a qcow2 image (lazy: dirty bit while writing) or a
    raw file."""

    def __init__(self, path, raw, size):
        self.path, self.raw = path, raw
        if raw:
            self.io = Q.open_file(path, writable=True)
            if self.io.size() < size:
                self.io.truncate(size)
            self.img = None
        else:
            self.img = Q.Image(path, writable=True, lazy=True)
            if self.img.size < size:
                self.img.grow(size)
            self.io = None

    def write(self, data, offset):
        if self.raw:
            self.io.pwrite(data, offset)
        else:
            self.img.write(data, offset)

    def zero(self, offset, length):
        if self.raw:
            pos = 0
            while pos < length:
                n = min(COPY_CHUNK, length - pos)
                self.io.pwrite(bytes(n), offset + pos)
                pos += n
        else:
            self.img.write_zeroes(offset, length)

    def close(self):
        if self.raw:
            self.io.flush()
            self.io.close()
        else:
            self.img.close()


def commit(path, base=None, empty=False, progress=None):
    """qemu-img commit: what the image at `path` (and the images between it and `base`,
    default its backing file) holds, written into `base`; the base grows to the
    image's size if smaller. `empty`: the image is reset afterwards (only when
    committing into its own backing file). Returns the bytes written (data and zeros).
    progress(done, total) is called as it goes."""
    with Q.Image(path) as top:
        if top.backing_file is None:
            raise Q.QCow2Error(errno.EINVAL, "%s has no backing file to commit into" % path)
        layers = [top]
        try:
            target_path, target_raw = top.backing_path(), top.backing_is_raw()
            while base is not None and not _same_file(target_path, base):
                if target_raw:
                    raise Q.QCow2Error(errno.EINVAL, "%s is not in the backing chain of %s"
                                       % (base, path))
                nxt = Q.Image(target_path)
                layers.append(nxt)
                if nxt.backing_file is None or len(layers) > Q.MAX_CHAIN:
                    raise Q.QCow2Error(errno.EINVAL, "%s is not in the backing chain of %s"
                                       % (base, path))
                target_path, target_raw = nxt.backing_path(), nxt.backing_is_raw()
            total = _copy(layers, _Target(target_path, target_raw, top.size), progress)
        finally:
            for img in layers[1:]:
                img.close()
    if empty and len(layers) == 1:
        reset(path)
    return total


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _copy(layers, target, progress):
    total = 0
    size = layers[0].size
    try:
        pos = 0
        while pos < size:
            n = min(COPY_CHUNK * 8, size - pos)
            for off, ln, kind, level in _top_extents(layers, 0, pos, n):
                if kind == Q.DATA:
                    done = 0
                    while done < ln:
                        k = min(COPY_CHUNK, ln - done)
                        target.write(layers[level].read(off + done, k), off + done)
                        done += k
                else:
                    target.zero(off, ln)
                total += ln
            pos += n
            if progress is not None:
                progress(pos, size)
    finally:
        target.close()
    return total


def _top_extents(layers, level, offset, length):
    """(offset, length, DATA | ZERO, level) of what the layers above the base hold."""
    img = layers[level]
    n = max(0, min(length, img.size - offset))
    out = []
    for off, ln, kind in (img.extents(offset, n) if n else []):
        if kind == Q.HOLE:
            if level + 1 < len(layers):
                out.extend(_top_extents(layers, level + 1, off, ln))
        else:
            out.append((off, ln, kind, level))
    if n < length and level:
        out.append((offset + n, length - n, Q.ZERO, level))     # past a smaller layer
    return out
