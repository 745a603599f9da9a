"""qcow2 cluster allocation in process (smtap.formats.qcow2): where the search for a
free cluster starts, the spare clusters of lazy mode."""
import os

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2ops


def test_the_free_hint_follows_the_allocations(tmp_path, monkeypatch):
    """Each allocation starts its search where the last one ended: the scan of the
    refcount blocks from the free hint stays short however many clusters are in use
    (the hint once stayed on the header, and every allocation rescanned them all)."""
    path = str(tmp_path / "a.qcow2")
    qcow2ops.create(path, 1 << 30)
    with Q.Image(path, writable=True, lazy=True) as img:
        scanned = []
        next_free = img._next_free

        def counting(cluster):
            found = next_free(cluster)
            scanned.append(found - cluster)
            return found
        monkeypatch.setattr(img, "_next_free", counting)
        hosts = []
        for _ in range(200):
            got, _ = img.alloc_data(1)
            hosts += got
        assert hosts == sorted(set(hosts))
        # (past the spare clusters the last allocation left)
        spare = img._spare[1] if img._spare else 0
        assert img.free_hint == (hosts[-1] >> img.cluster_bits) + 1 + spare
        # one search per reservation (SPARE clusters more each), found where it starts
        assert 2 <= len(scanned) <= 200 // Q.SPARE + 2, scanned
        assert max(scanned[1:]) == 0, scanned


class _Counting(object):
    """The image's file, counting refcount writes and extensions."""

    def __init__(self, io, img_of):
        self.io, self.img_of = io, img_of
        self.truncates = self.rc_writes = 0

    def __getattr__(self, name):
        return getattr(self.io, name)

    def truncate(self, size):
        self.truncates += 1
        return self.io.truncate(size)

    def pwritev(self, writes):
        img = self.img_of()
        blocks = set(img.reftable[ri] & Q.REFT_OFFSET_MASK for ri in img._rb)
        self.rc_writes += sum(1 for _, off in writes
                              if off >> img.cluster_bits << img.cluster_bits in blocks)
        return self.io.pwritev(writes)


def test_lazy_allocations_at_the_end_share_one_refcount_write_and_extension(tmp_path):
    """In lazy mode, an allocation that extends the file takes Q.SPARE clusters more:
    the next ones are handed out without a refcount write or an extension of their
    own, in order, reading zeros (alloc_data's second value: where zeros start); freed
    clusters below are reused first. Without lazy, each allocation writes its own."""
    path = str(tmp_path / "a.qcow2")
    qcow2ops.create(path, 1 << 30)
    for lazy in (True, False):
        holder = []
        io = _Counting(Q.open_file(path, True), lambda: holder[0])
        img = Q.Image(path, writable=True, lazy=lazy, io=io)
        holder.append(img)
        try:
            hosts, _ = img.alloc_data(1)
            truncates, rc_writes = io.truncates, io.rc_writes
            for _ in range(Q.SPARE + 1):
                got, zeros_from = img.alloc_data(1)
                assert got[0] >= zeros_from     # (past where the file reads zeros)
                hosts += got
            steps = [b - a for a, b in zip(hosts, hosts[1:])]
            assert steps == [img.cluster_size] * (Q.SPARE + 1)
            if lazy:
                # SPARE from the first one's spare, the last one a new reservation
                assert (io.truncates - truncates, io.rc_writes - rc_writes) == (1, 1)
                img.free_clusters([(hosts[3], img.cluster_size)])
                assert img.alloc_data(1)[0] == [hosts[3]]       # reused first
            else:
                assert io.truncates - truncates == Q.SPARE + 1
                assert io.rc_writes - rc_writes == Q.SPARE + 1
        finally:
            img.close()
        os.unlink(path)
        qcow2ops.create(path, 1 << 30)


def test_close_gives_the_spare_clusters_back(tmp_path):
    """Data written in lazy mode, closed: no cluster leaks (the spare ones are freed),
    the file ends at its last cluster in use, the data reads back."""
    path = str(tmp_path / "a.qcow2")
    qcow2ops.create(path, 1 << 30)
    with Q.Image(path, writable=True, lazy=True) as img:
        for k in range(5):
            img.write(bytes([k + 1]) * 4096, k << 20)
        assert img._spare is not None
        cs = img.cluster_size
    res = qcow2check.check(path)
    assert (res.corruptions, res.leaks, res.check_errors) == (0, 0, 0), res.messages
    assert os.path.getsize(path) == res.image_end_offset
    with Q.Image(path) as img:
        assert [img.read(k << 20, 4096) for k in range(5)] == [bytes([k + 1]) * 4096
                                                               for k in range(5)]
        assert os.path.getsize(path) % cs == 0

