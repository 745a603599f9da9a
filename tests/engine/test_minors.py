"""Minor allocation: marker files, directory lock, per-minor holds."""
import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest

from smtap.tapdisk import minors


def test_allocate_is_first_free_and_free_removes(smtap_root):
    assert [minors.allocate() for _ in range(3)] == [0, 1, 2]
    assert os.path.exists(minors.marker(1))
    minors.free(1)
    assert not os.path.exists(minors.marker(1))
    assert minors.allocated() == [0, 2]
    assert minors.allocate() == 1       # the hole is reused first
    assert minors.marker(0).startswith(str(smtap_root))


def test_free_errors(smtap_root):
    with pytest.raises(OSError) as exc:
        minors.free(5)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        minors.free(minors.MAX_MINOR)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        minors.Hold(3)
    assert exc.value.errno == errno.ENODEV


def _allocate_many(count, queue):
    queue.put([minors.allocate() for _ in range(count)])


def test_concurrent_allocations_never_collide(smtap_root):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(25, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    got = [m for _ in procs for m in queue.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(got) == list(range(200))
    assert minors.allocated() == list(range(200))


HOLDER = """
import sys, time
from smtap.tapdisk import minors
h = minors.Hold(int(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_held_minor_cannot_be_freed_until_holder_dies(smtap_root):
    minor = minors.allocate()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(minor)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OSError) as exc:
            minors.free(minor)
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(OSError) as exc:
            minors.Hold(minor)
        assert exc.value.errno == errno.EBUSY
        assert os.path.exists(minors.marker(minor))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    minors.free(minor)      # a crashed holder's minor can be reclaimed
    assert minors.allocated() == []


def test_free_released_waits_out_a_dying_holder(smtap_root):
    """The one EBUSY wait (SM's reap, tap-ctl create's undo): False while a live
    tapdisk holds the minor, True once its holder is gone, even if it dies meanwhile."""
    minor = minors.allocate()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(minor)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert minors.free_released(minor, timeout=0.3) is False
        assert os.path.exists(minors.marker(minor))
        killer = threading.Timer(0.3, holder.send_signal, (signal.SIGKILL,))
        killer.start()
        assert minors.free_released(minor, timeout=10) is True
    finally:
        holder.kill()
        holder.wait()
    assert minors.allocated() == []
    assert minors.free_released(minor) is True        # not allocated: nothing to wait for
    with pytest.raises(OSError) as exc:
        minors.free_released(minors.MAX_MINOR)
    assert exc.value.errno == errno.EINVAL


def test_hold_release_and_reuse(smtap_root):
    minor = minors.allocate()
    hold = minors.Hold(minor)
    hold.release()
    hold.release()          # idempotent
    minors.Hold(minor).release()
    minors.free(minor)
