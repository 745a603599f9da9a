"""qcow2 consistency check and repair, as `qemu-img check [-r leaks|all]` does them.

Every reference to a host cluster is counted (header, L1 and L2 tables, data and
compressed clusters, the refcount table and blocks, internal snapshots' tables,
consistent bitmaps) and compared with the stored refcounts:
- stored > references: a leak (wasted space, no harm); -r leaks decrements in place;
- stored < references: a corruption (the cluster could be handed out again);
- tables or clusters outside the file or not aligned, COPIED flags that do not match
  the refcount: corruptions.
-r all rebuilds the refcount structure from the references when a refcount is too
low (a new table and blocks past everything in use, then the header switched to them
in one write: until then the old structure stands), drops table entries pointing
outside the file, fixes the COPIED flags, and clears the dirty (and corrupt) bits.
"""
import errno
import struct
from array import array

from smtap.formats import qcow2 as Q


class Result(object):
    """What qemu's BdrvCheckResult holds (the same names, as --output=json prints)."""

    def __init__(self):
        self.corruptions = self.leaks = self.check_errors = 0
        self.corruptions_fixed = self.leaks_fixed = 0
        self.image_end_offset = self.total_clusters = self.allocated_clusters = 0
        self.fragmented_clusters = self.compressed_clusters = 0
        self.messages = []          # qemu's stderr lines
        self.dirty = False

    def error(self, text):
        self.corruptions += 1
        self.messages.append(text)

    def json(self, filename):
        out = {"filename": filename, "format": "qcow2", "check-errors": self.check_errors}
        for key, value in (("image-end-offset", self.image_end_offset),
                           ("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        return out


class _Refs(object):
    """References per host cluster: an array over the file, a dict past its end."""

    def __init__(self, nclusters):
        self.n = nclusters
        self.counts = array("I", bytes(4 * nclusters))
        self.beyond = {}

    def inc(self, c):
        if c < self.n:
            self.counts[c] += 1
        else:
            self.beyond[c] = self.beyond.get(c, 0) + 1

    def get(self, c):
        return self.counts[c] if c < self.n else self.beyond.get(c, 0)

    def highest(self):
        top = max(self.beyond) if self.beyond else -1
        for c in range(self.n - 1, top, -1):
            if self.counts[c]:
                return c
        return top


class _Walk(object):
    """One pass over an image's metadata, counting references."""

    def __init__(self, img, result, fix_errors):
        self.img, self.res, self.fix = img, result, fix_errors
        self.cs = img.cluster_size
        self.bits = img.cluster_bits
        self.file_size = img.file_size
        self.refs = _Refs(-(-self.file_size // self.cs))
        self.next_contiguous = 0
        self.l1_fixes = {}                  # L1 index -> new entry (active table)
        self.l2_fixes = {}                  # L2 table offset -> {index: new entry}

    def inside(self, off, n):
        return off + n <= self.file_size

    def inc(self, off, n, what):
        """Count [off, off + n); False (an error) if it lies outside the file."""
        if n <= 0:
            return True
        if not self.inside(off, n) and off >= self.file_size:
            self.res.error("ERROR %s at %#x is outside the image file" % (what, off))
            return False
        first, last = off >> self.bits, (off + n - 1) >> self.bits
        for c in range(first, last + 1):
            self.refs.inc(c)
        return True

    def l1(self, offset, size, active):
        img = self.img
        if not size:
            return
        if offset % self.cs:
            self.res.error("ERROR l1 table offset %#x is not cluster aligned" % offset)
            return
        self.inc(offset, size * 8, "L1 table")
        table = Q._unpack_u64(img._read_table(offset, size * 8))
        for i, e in enumerate(table):
            l2off = e & Q.OFFSET_MASK
            if not l2off:
                continue
            if e & Q.L1E_RESERVED and active:
                self.res.error("ERROR L1 entry %d has reserved bits set: %#x" % (i, e))
            if l2off % self.cs:
                self.res.error("ERROR l2_offset=%#x: Table is not cluster aligned; L1 entry "
                               "corrupted" % l2off)
                if active and self.fix:
                    self.l1_fixes[i] = 0
                continue
            if not self.inside(l2off, self.cs):
                self.res.error("ERROR l2_offset=%#x: L2 table outside the image file" % l2off)
                if active and self.fix:
                    self.l1_fixes[i] = 0
                continue
            self.inc(l2off, self.cs, "L2 table")
            self.l2(l2off, Q._unpack_u64(img.io.pread(self.cs, l2off)), active)

    def l2(self, l2off, table, active):
        img, res = self.img, self.res
        self.next_contiguous = 0                # per table, as qemu counts fragments
        for i, e in enumerate(table):
            if not e:
                continue
            t = Q.cluster_type(e)
            if t != Q.COMPRESSED and e & Q.L2E_RESERVED:
                res.error("ERROR found l2 entry with reserved bits set: %x" % e)
            if t == Q.COMPRESSED:
                if e & Q.OFLAG_COPIED:
                    res.error("ERROR: coffset=%#x: copied flag must never be set for "
                              "compressed clusters" % (e & ~Q.OFLAG_COPIED))
                    if active and self.fix:
                        self.l2_fix(l2off, i, e & ~Q.OFLAG_COPIED)
                off, n = img.compressed_extent(e)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                start = off & ~511
                if not self.inc(start, off + n - start, "compressed cluster") and active and self.fix:
                    self.l2_fix(l2off, i, Q.OFLAG_ZERO if img.version >= 3 else 0)
                continue
            if t not in (Q.NORMAL, Q.ZERO_ALLOC):
                continue
            off = e & Q.OFFSET_MASK
            if off % self.cs:
                res.error("ERROR offset=%#x: Cluster is not properly aligned; L2 entry corrupted"
                          % off)
                if active and self.fix:
                    self.l2_fix(l2off, i, Q.OFLAG_ZERO if img.version >= 3 else 0)
                continue
            if not self.inside(off, self.cs) and off >= self.file_size:
                res.error("ERROR offset=%#x: cluster is outside the image file; L2 entry "
                          "corrupted" % off)
                if active and self.fix:
                    self.l2_fix(l2off, i, Q.OFLAG_ZERO if img.version >= 3 else 0)
                continue
            if active:
                res.allocated_clusters += 1
                if self.next_contiguous and off != self.next_contiguous:
                    res.fragmented_clusters += 1
                self.next_contiguous = off + self.cs
            self.inc(off, self.cs, "data cluster")

    def l2_fix(self, l2off, i, entry):
        self.l2_fixes.setdefault(l2off, {})[i] = entry

    def snapshots(self):
        """The snapshot table and every snapshot's L1 table (their clusters are shared)."""
        img, h = self.img, self.img.header
        if not h.nb_snapshots:
            return
        pos = h.snapshots_offset
        head = struct.Struct(">QIHHIIQII")
        total = 0
        for k in range(h.nb_snapshots):
            raw = img._read_table(pos + total, head.size)
            l1off, l1size, idlen, namelen, _, _, _, _, extra = head.unpack(raw)
            if extra > 1 << 16:
                self.res.error("ERROR snapshot %d: extra data too large" % k)
                return
            size = head.size + extra + idlen + namelen
            total += (size + 7) & ~7
            if total > 64 << 20:
                self.res.error("ERROR snapshot table too large")
                return
            if l1size * 8 > Q.MAX_L1_BYTES:
                self.res.error("ERROR snapshot %d: L1 table too large" % k)
                continue
            self.l1(l1off, l1size, False)
        self.inc(pos, total, "snapshot table")

    def bitmaps(self):
        """The bitmap directory, tables and data, when the extension is consistent
        (qemu ignores inconsistent bitmaps: their clusters then count as leaks)."""
        img, h = self.img, self.img.header
        ext = h.ext(Q.EXT_BITMAPS)
        if ext is None or len(ext) < 24 or not h.autoclear_features & Q.AUTOCLEAR_BITMAPS:
            return
        nb, _, dsize, doff = struct.unpack(">IIQQ", ext[:24])
        if dsize > 64 << 20 or doff % self.cs:
            self.res.error("ERROR bitmap directory invalid")
            return
        self.inc(doff, dsize, "bitmap directory")
        raw = img._read_table(doff, dsize)
        pos = 0
        ent = struct.Struct(">QIIBBHI")
        for _ in range(nb):
            if pos + ent.size > len(raw):
                self.res.error("ERROR bitmap directory truncated")
                return
            toff, tsize, _, _, _, namelen, extra = ent.unpack_from(raw, pos)
            pos += (ent.size + extra + namelen + 7) & ~7
            if tsize * 8 > Q.MAX_L1_BYTES or toff % self.cs:
                self.res.error("ERROR bitmap table invalid")
                continue
            self.inc(toff, tsize * 8, "bitmap table")
            for e in Q._unpack_u64(img._read_table(toff, tsize * 8)):
                off = e & Q.OFFSET_MASK
                if off:
                    self.inc(off, self.cs, "bitmap data")

    def refcount_structure(self):
        """The refcount table and blocks; False if a block is unusable (rebuild)."""
        img, h = self.img, self.img.header
        ok = True
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        img._load_reftable()
        for ri, e in enumerate(img.reftable):
            off = e & Q.REFT_OFFSET_MASK
            if not off:
                continue
            if off % self.cs:
                self.res.error("ERROR refcount block %d is not cluster aligned; refcount table "
                               "entry corrupted" % ri)
                ok = False
                continue
            if not self.inside(off, self.cs):
                self.res.error("ERROR refcount block %d is outside image" % ri)
                ok = False
                continue
            self.inc(off, self.cs, "refcount block")
        return ok


def _stored(img, c, usable):
    """The stored refcount of cluster c (0 where the structure cannot say)."""
    ri = c >> img.rb_bits
    if ri >= len(img.reftable):
        return 0
    off = img.reftable[ri] & Q.REFT_OFFSET_MASK
    if not off or ri not in usable:
        return 0
    return img._rc_get_in(img._rb_load(ri), c & (img.rb_entries - 1))


def _usable_blocks(img):
    return set(ri for ri, e in enumerate(img.reftable)
               if e & Q.REFT_OFFSET_MASK and not (e & Q.REFT_OFFSET_MASK) % img.cluster_size
               and (e & Q.REFT_OFFSET_MASK) + img.cluster_size <= img.file_size)


def check_image(img, repair=None):
    """Check an open image (writable for a repair: "leaks" or "all"); a Result.
    A repair runs the check again afterwards and reports what is left."""
    res = Result()
    res.dirty = img.dirty
    try:
        _check(img, res, repair)
    except (Q.QCow2Error, OSError) as e:
        res.check_errors += 1
        res.messages.append("ERROR: %s" % (e.strerror or e))
    if repair and (res.corruptions_fixed or res.leaks_fixed or img.dirty or img.corrupt):
        fixed_c, fixed_l = res.corruptions_fixed, res.leaks_fixed
        again = Result()
        try:
            _check(img, again, None)
        except (Q.QCow2Error, OSError) as e:
            again.check_errors += 1
            again.messages.append("ERROR: %s" % (e.strerror or e))
        if not again.corruptions and not again.check_errors:
            _clear_bits(img, Q.INCOMPAT_DIRTY | Q.INCOMPAT_CORRUPT)
        again.corruptions_fixed, again.leaks_fixed = fixed_c, fixed_l
        again.repaired_messages = res.messages
        again.fixed_before = (res.corruptions, res.leaks)
        return again
    return res


def _check(img, res, repair):
    cs = img.cluster_size
    img.file_size = img.io.size()
    img._rb.clear()
    img.reftable = None
    img._load_reftable()
    walk = _Walk(img, res, repair == "all")
    h = img.header
    res.total_clusters = -(-img.size // cs)
    walk.inc(0, cs, "header")
    walk.l1(h.l1_table_offset, h.l1_size, True)
    walk.snapshots()
    walk.bitmaps()
    struct_ok = walk.refcount_structure()
    if repair == "all" and (walk.l1_fixes or walk.l2_fixes):
        _apply_table_fixes(img, walk)
        res.corruptions_fixed += sum(len(v) for v in walk.l2_fixes.values()) + len(walk.l1_fixes)
        res2 = Result()                         # references again, without what was dropped
        walk = _Walk(img, res2, False)
        walk.inc(0, cs, "header")
        walk.l1(h.l1_table_offset, h.l1_size, True)
        walk.snapshots()
        walk.bitmaps()
        struct_ok = walk.refcount_structure() and struct_ok
    refs = walk.refs
    usable = _usable_blocks(img)
    highest = refs.highest()
    top = max(refs.n, highest + 1)
    low, leaks = [], []
    end = -1
    for c in range(top):
        stored = _stored(img, c, usable)
        want = refs.get(c)
        if stored or want:
            end = c
        if stored == want:
            continue
        if stored < want:
            res.error("ERROR cluster %d refcount=%d reference=%d" % (c, stored, want))
            low.append(c)
        else:
            res.leaks += 1
            res.messages.append("Leaked cluster %d refcount=%d reference=%d" % (c, stored, want))
            leaks.append((c, want))
    res.image_end_offset = (end + 1) * cs
    copied = _copied_errors(img, refs, res)
    if not repair:
        return
    if repair == "all" and (low or not struct_ok or max(refs.counts or [0]) > img.refcount_max):
        _rebuild(img, refs)
        res.corruptions_fixed += len(low) + (0 if struct_ok else 1)
        res.leaks_fixed += len(leaks)
    elif leaks:
        for c, want in leaks:
            img._rc_set(c, want)
        img._rc_flush()
        img.io.flush()
        res.leaks_fixed += len(leaks)
    if repair == "all" and copied:
        _fix_copied(img, copied)
        res.corruptions_fixed += len(copied)


def _copied_errors(img, refs, res):
    """L1/L2 entries whose COPIED flag does not say "refcount is 1": [(where, entry)]."""
    out = []
    for i, e in enumerate(img.l1):
        off = e & Q.OFFSET_MASK
        if not off or off % img.cluster_size or off + img.cluster_size > img.file_size:
            continue
        one = refs.get(off >> img.cluster_bits) == 1
        if bool(e & Q.OFLAG_COPIED) != one:
            res.error("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d"
                      % (i, e, refs.get(off >> img.cluster_bits)))
            out.append((("l1", i), (e | Q.OFLAG_COPIED) if one else (e & ~Q.OFLAG_COPIED)))
        table = Q._unpack_u64(img.io.pread(img.cluster_size, off))
        for j, x in enumerate(table):
            if Q.cluster_type(x) not in (Q.NORMAL, Q.ZERO_ALLOC):
                continue
            xoff = x & Q.OFFSET_MASK
            if xoff % img.cluster_size or xoff >= img.file_size:
                continue
            rc = refs.get(xoff >> img.cluster_bits)
            if bool(x & Q.OFLAG_COPIED) != (rc == 1):
                res.error("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d" % (x, rc))
                out.append((("l2", off, j), (x | Q.OFLAG_COPIED) if rc == 1
                            else (x & ~Q.OFLAG_COPIED)))
    return out


def _fix_copied(img, fixes):
    writes = []
    for where, entry in fixes:
        if where[0] == "l1":
            img.l1[where[1]] = entry
            writes.append((struct.pack(">Q", entry), img.header.l1_table_offset + where[1] * 8))
        else:
            writes.append((struct.pack(">Q", entry), where[1] + where[2] * 8))
    img.io.pwritev(writes)
    img._l2.clear()
    img.io.flush()


def _apply_table_fixes(img, walk):
    """Drop table entries pointing outside the file (they read as zeros then)."""
    writes = []
    for l2off, changes in walk.l2_fixes.items():
        for i, entry in changes.items():
            writes.append((struct.pack(">Q", entry), l2off + i * 8))
    for i, entry in walk.l1_fixes.items():
        img.l1[i] = entry
        writes.append((struct.pack(">Q", entry), img.header.l1_table_offset + i * 8))
    img.io.pwritev(writes)
    img._l2.clear()
    img.io.flush()


def _rebuild(img, refs):
    """A new refcount structure holding the counted references, placed past every
    cluster in use: blocks and table written and made durable, then the header (one
    write), then durable again. The old structure's clusters become free."""
    cs, bits, rbe = img.cluster_size, img.cluster_bits, img.rb_entries
    # the old structure is not referenced by the new one: only what the walk counted
    # besides it stays in use
    h = img.header
    counts = array("I", refs.counts)
    beyond = dict(refs.beyond)
    old_table = (h.refcount_table_offset, h.refcount_table_clusters)
    for c in range(old_table[0] >> bits, (old_table[0] >> bits) + old_table[1]):
        if c < len(counts) and counts[c]:
            counts[c] -= 1
    for e in img.reftable:
        off = e & Q.REFT_OFFSET_MASK
        if off and not off % cs and off + cs <= img.file_size:
            counts[off >> bits] -= 1
    highest = max([c for c in range(len(counts)) if counts[c]][-1:] + list(beyond) + [0])
    start = max(highest + 1, -(-img.file_size // cs))
    nblocks, tclusters = 0, 1
    while True:
        end = start + nblocks + tclusters
        ranges = set(c >> img.rb_bits for c in range(len(counts)) if counts[c])
        ranges |= set(c >> img.rb_bits for c in beyond)
        ranges |= set(range(start >> img.rb_bits, ((end - 1) >> img.rb_bits) + 1))
        need_t = -(-(max(ranges) + 1) * 8 // cs)
        if len(ranges) == nblocks and need_t == tclusters:
            break
        nblocks, tclusters = len(ranges), need_t
    if tclusters * cs > Q.MAX_REFTABLE_BYTES:
        raise Q.QCow2Error(errno.EFBIG, "%s: the rebuilt refcount table would be too large"
                           % img.path)
    table = array("Q", bytes(tclusters * cs))
    blocks = {}
    for k, r in enumerate(sorted(ranges)):
        blocks[r] = bytearray(cs)
        table[r] = (start + k) << bits
    for c in range(len(counts)):
        if counts[c]:
            img._rc_put(blocks[c >> img.rb_bits], c & (rbe - 1), min(counts[c], img.refcount_max))
    for c, n in beyond.items():
        img._rc_put(blocks[c >> img.rb_bits], c & (rbe - 1), min(n, img.refcount_max))
    for c in range(start, end):
        img._rc_put(blocks[c >> img.rb_bits], c & (rbe - 1), 1)
    writes = [(bytes(blocks[r]), (start + k) << bits) for k, r in enumerate(sorted(ranges))]
    toff = (start + nblocks) << bits
    writes.append((Q._pack_u64(table), toff))
    if end << bits > img.file_size:
        img._extend(end << bits)
    img.io.pwritev(writes)
    img.io.flush()
    h.refcount_table_offset, h.refcount_table_clusters = toff, tclusters
    img.io.pwrite(struct.pack(">QI", toff, tclusters), 48)
    img.io.flush()
    img.reftable = table
    img._rb.clear()
    img._rc_dirty = {}
    img.free_hint = 0


def _clear_bits(img, bits):
    h = img.header
    if h.version < 3 or not h.incompatible_features & bits:
        return
    h.incompatible_features &= ~bits
    img.io.pwrite(struct.pack(">Q", h.incompatible_features), 72)
    img.io.flush()


def check(path, repair=None):
    """Check (and repair) the image at path: a Result. EINVAL and friends for what
    cannot be opened at all."""
    img = Q.Image(path, writable=bool(repair), repair_dirty=False)
    try:
        return check_image(img, repair)
    finally:
        img.close()


def summary(res, out):
    """qemu-img check's human summary (stdout)."""
    if getattr(res, "repaired_messages", None) is not None:
        fixed_c, fixed_l = res.corruptions_fixed, res.leaks_fixed
        out.write("The following inconsistencies were found and repaired:\n\n"
                  "    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed "
                  "image now...\n" % (fixed_l, fixed_c))
    if not res.corruptions and not res.leaks and not res.check_errors:
        out.write("No errors were found on the image.\n")
    else:
        if res.corruptions:
            out.write("\n%d errors were found on the image.\nData may be corrupted, or further "
                      "writes to the image may corrupt it.\n" % res.corruptions)
        if res.leaks:
            out.write("\n%d leaked clusters were found on the image.\nThis means waste of disk "
                      "space, but no harm to data.\n" % res.leaks)
        if res.check_errors:
            out.write("\n%d internal errors have occurred during the check.\n" % res.check_errors)
    if res.total_clusters and res.allocated_clusters:
        t = float(res.total_clusters)
        a = float(res.allocated_clusters)
        out.write("%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n"
                  % (res.allocated_clusters, res.total_clusters, a * 100 / t,
                     res.fragmented_clusters * 100 / a, res.compressed_clusters * 100 / a))
    if res.image_end_offset:
        out.write("Image end offset: %d\n" % res.image_end_offset)


def exit_status(res):
    """qemu-img check's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only."""
    if res.check_errors:
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0
