"""fcntl locks: re-entrant in a process, exclusive between processes."""
import os
import subprocess
import sys
import textwrap

import pytest

from smtap import settings
from smtap.sm.lock import Lock, cleanup

HOLDER = textwrap.dedent("""
    import sys
    from smtap.sm.lock import Lock
    lk = Lock(sys.argv[1], sys.argv[2])
    lk.acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lk.release()
    print("released", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def holder(smtap_root):
    procs = []

    def start(name, ns):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, name, ns], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, universal_newlines=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_layout_and_reentrance(smtap_root):
    lk = Lock("sr", "1234")
    assert lk.path == os.path.join(settings.lock_dir(), "1234", "sr")
    assert lk.path.startswith(str(smtap_root))
    with lk:
        assert lk.held() and os.path.exists(lk.path)
        with Lock("sr", "1234"):  # another object, same lock: re-entrant
            assert lk.acquire_noblock()
            lk.release()
        assert lk.held()
    assert not lk.held()
    with pytest.raises(RuntimeError):
        lk.release()


def test_other_process_is_excluded(holder):
    proc = holder("vdi", "abcd")
    lk = Lock("vdi", "abcd")
    assert not lk.acquire_noblock()
    assert Lock("vdi", "other").acquire_noblock()  # other names are independent
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "released\n"
    assert lk.acquire_noblock()
    lk.release()


def test_blocking_acquire_waits_for_the_holder(holder):
    holder("sr", "wait")
    # a blocking acquire in another process is still waiting a second later
    child = subprocess.Popen(
        [sys.executable, "-c", "from smtap.sm.lock import Lock; Lock('sr', 'wait').acquire()"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
    finally:
        child.kill()
        child.wait()


def test_bad_names_and_cleanup(smtap_root):
    with pytest.raises(ValueError):
        Lock("sr", "../etc")
    lk = Lock("vdi", "gone")
    with lk:
        cleanup("gone")  # held: kept
        assert os.path.exists(lk.path)
    cleanup("gone")
    assert not os.path.exists(os.path.dirname(lk.path))
