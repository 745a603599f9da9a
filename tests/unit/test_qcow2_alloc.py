"""qcow2 cluster allocation in process (smtap.formats.qcow2): where the search for a
free cluster starts."""
from smtap.formats import qcow2 as Q
from smtap.formats import qcow2ops


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
        assert img.free_hint == (hosts[-1] >> img.cluster_bits) + 1
        assert max(scanned[10:]) == 0, scanned
