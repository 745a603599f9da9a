"""The C loop's block map as drivers fill it (native.BlockMap): ctypes only, no build
(the guard's wait, in the library, is tests/engine/test_nbd_c.py's)."""
from smtap.tapdisk import native

PAGE = 1 << native.MAP_PAGE_BITS


class _File(object):
    mask, fd, direct = 511, -1, False


def _entry(m, k):
    """What C's entry() reads: the page pointer, then the entry (0 for a NULL page)."""
    import ctypes
    page = m.pages[k >> native.MAP_PAGE_BITS]
    if not page:
        return 0
    return ctypes.c_longlong.from_address(page + (k & (PAGE - 1)) * 8).value


def test_sparse_map_pages_absent_shared_then_filled_and_capped():
    m = native.BlockMap(_File(), 10 * PAGE << 16, 16, max_pages=3)
    assert _entry(m, 5) == 0                            # unknown: the driver's
    m.absent(100, 3 * PAGE)                             # a partial page, 2 whole, a tail
    assert [_entry(m, k) for k in (99, 100, PAGE, 2 * PAGE, 3 * PAGE + 99)] == \
        [0, native.E_ABSENT, native.E_ABSENT, native.E_ABSENT, native.E_ABSENT]
    assert _entry(m, 3 * PAGE + 100) == 0
    assert m.pages[1] == m.pages[2]                     # the shared absent page
    m.fill(PAGE + 7, [native.E_DATA | 65536])           # a page of its own, rest absent
    assert m.pages[1] != m.pages[2]
    assert (_entry(m, PAGE + 7), _entry(m, PAGE + 8)) == (native.E_DATA | 65536,
                                                          native.E_ABSENT)
    assert _entry(m, 2 * PAGE) == native.E_ABSENT       # the shared page is untouched
    m.fill(2 * PAGE, [native.E_ZERO])                   # past max_pages (pages 0, 3
    assert _entry(m, 2 * PAGE) == 0                     # and 1 have theirs): unknown,
    assert _entry(m, 2 * PAGE + 1) == 0                 # never a stale absent
