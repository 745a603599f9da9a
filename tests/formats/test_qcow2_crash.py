"""kill -9 in the middle of qcow2 writes and of a commit: a real process writing
through smtap.formats.qcow2 kills itself (SIGKILL) at its N-th write to the file (a
hook the test controls: the file interface's pwrite), for N across the whole run.
Afterwards qemu-img check finds no corruption (leaks at most, which it repairs), and
every write the process had seen acknowledged reads back; a commit leaves the leaf's
view unchanged and completes when run again."""
import json
import os
import random
import subprocess

import pytest

from smtap.formats import qcow2 as Q
from smtap.formats import qcow2check, qcow2ops
from lib.checkout import VENV_BIN as BIN
from lib.procs import run
from lib.qcow2 import qemu_view
from lib.sizes import MiB

pytestmark = pytest.mark.timeout(600)
SIZE = 4 * MiB

# The writer: argv = mode path kill_at seed lazy; prints "ack N" after each operation
# returns; kill_at 0 = run to the end and print the number of file writes.
HOOKED = r"""
import os, signal, sys
from smtap.formats import qcow2 as Q, qcow2ops
count = [0]
kill_at = int(sys.argv[3])
def hit():
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
pwrite, pwritev, truncate = Q.File.pwrite, Q.File.pwritev, Q.File.truncate
def hooked_pwrite(self, buf, off):
    hit()
    pwrite(self, buf, off)
def hooked_pwritev(self, reqs):
    for buf, off in reqs:
        hit()
        pwrite(self, buf, off)
def hooked_truncate(self, size):
    hit()
    truncate(self, size)
Q.File.pwrite, Q.File.pwritev, Q.File.truncate = hooked_pwrite, hooked_pwritev, hooked_truncate
"""

WRITER = HOOKED + r"""
import random
from tests_ops import ops
mode, path, seed, lazy = sys.argv[1], sys.argv[2], int(sys.argv[4]), sys.argv[5] == "1"
img = Q.Image(path, writable=True, lazy=lazy)
for i, op in enumerate(ops(seed)):
    kind, off, n, value = op
    if kind == "write":
        img.write(bytes([value]) * n, off)
    elif kind == "zero":
        img.write_zeroes(off, n)
    else:
        img.discard(off, n)
    if lazy:
        img.flush()
    print("ack %d" % i, flush=True)
img.close()
print("writes %d" % count[0], flush=True)
"""

COMMITTER = HOOKED + r"""
qcow2ops.commit(sys.argv[2])
print("writes %d" % count[0], flush=True)
"""

OPS = r"""
import random
def ops(seed):
    rng = random.Random(seed)
    out = []
    for i in range(40):
        kind = rng.choice(["write"] * 6 + ["zero", "discard"])
        n = rng.choice([512, 4096, 65536, 100000, 300000])
        off = rng.randrange(0, (SIZE - n) // 512) * 512
        out.append((kind, off, n, i + 1))
    return out
SIZE = %d
""" % SIZE


def apply(model, op, cluster):
    kind, off, n, value = op
    if kind == "write":
        model[off:off + n] = bytes([value]) * n
    elif kind == "zero":
        model[off:off + n] = bytes(n)
    else:                                       # whole clusters only read zeros afterwards
        first, last = -(-off // cluster) * cluster, (off + n) // cluster * cluster
        if first < last:
            model[first:last] = bytes(last - first)


def ops(seed):
    scope = {}
    exec(OPS, scope)
    return scope["ops"](seed)


def run_hooked(work, script, *args):
    (work / "tests_ops.py").write_text(OPS)
    env = dict(os.environ, PYTHONPATH=str(work))
    return subprocess.run([os.path.join(BIN, "python3"), "-c", script] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(work),
                          universal_newlines=True, timeout=120)


def qemu_check(path):
    """qemu-img check: no corruption (0 clean, 3 leaks only); returns the exit status."""
    out = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert out.returncode in (0, 3), (out.returncode, out.stdout, out.stderr)
    assert not json.loads(out.stdout).get("corruptions")
    return out.returncode


def sectors_match(actual, before, after):
    """Every sector holds what the acknowledged writes made it, or the in-flight one's."""
    for s in range(0, len(actual), 512):
        a = actual[s:s + 512]
        if a != before[s:s + 512] and a != after[s:s + 512]:
            return s
    return None


@pytest.mark.parametrize("lazy,cluster,backing", [(False, 65536, False), (True, 65536, False),
                                                 (False, 512, True)])
def test_kill_during_writes(work, lazy, cluster, backing):
    """512-byte clusters: refcount blocks added and the refcount table moved mid-run."""
    seed = 11
    base = work / "base.raw"
    if backing:
        base.write_bytes(random.Random(3).getrandbits(8 * SIZE).to_bytes(SIZE, "little"))
    pristine = work / "pristine.qcow2"
    qcow2ops.create(str(pristine), SIZE, cluster_size=cluster,
                    backing="base.raw" if backing else None,
                    backing_format="raw" if backing else None)
    initial = bytearray(base.read_bytes() if backing else bytes(SIZE))
    path = work / "disk.qcow2"
    path.write_bytes(pristine.read_bytes())
    out = run_hooked(work, WRITER, "w", path, 0, seed, int(lazy))
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.split()[-1])
    assert total > 100
    models = [bytes(initial)]
    for op in ops(seed):
        m = bytearray(models[-1])
        apply(m, op, cluster)
        models.append(bytes(m))
    assert qemu_view(path, work) == models[-1]
    leaks = 0
    points = sorted(set(range(1, total + 1, max(1, total // 12))) | {1, 2, 3, total})
    for kill_at in points:
        path.write_bytes(pristine.read_bytes())
        out = run_hooked(work, WRITER, "w", path, kill_at, seed, int(lazy))
        assert out.returncode == -9, (kill_at, out.returncode, out.stderr)
        acked = len([l for l in out.stdout.split("\n") if l.startswith("ack")])
        if qemu_check(path) == 3:
            leaks += 1
        res = qcow2check.check(str(path))
        assert not res.corruptions and not res.check_errors, (kill_at, res.messages)
        bad = sectors_match(qemu_view(path, work), models[acked], models[min(acked + 1, len(models) - 1)])
        assert bad is None, (kill_at, acked, bad)
        with Q.Image(str(path), writable=True):     # a dirty image is repaired here
            pass
        if lazy or qemu_check(path):
            qcow2check.check(str(path), repair="all")
        assert qemu_check(path) == 0
    assert leaks                                     # some kill points did leave leaks


def test_kill_during_commit(work):
    """raw base <- parent (64 KiB clusters) <- child (4 KiB clusters): committing the child
    copies-on-write in the parent from the base; killed anywhere, the leaf's view is the
    same and the parent checks clean once repaired; run again, the commit completes."""
    base = work / "base.raw"
    base.write_bytes(random.Random(4).getrandbits(8 * SIZE).to_bytes(SIZE, "little"))
    parent, child = work / "parent.qcow2", work / "child.qcow2"
    qcow2ops.create(str(parent), SIZE, backing="base.raw", backing_format="raw")
    with Q.Image(str(parent), writable=True) as img:
        img.write(b"\x01" * 300000, 100000)
        img.write_zeroes(2 * MiB, 128 << 10)
    qcow2ops.create(str(child), SIZE, cluster_size=4096, backing="parent.qcow2",
                    backing_format="qcow2")
    with Q.Image(str(child), writable=True) as img:
        rng = random.Random(8)
        for i in range(60):
            n = rng.choice([4096, 8192, 20000])
            img.write(bytes([i + 2]) * n, rng.randrange(0, SIZE - n))
        img.write_zeroes(MiB, 64 << 10)
    leaf = qemu_view(child, work)
    saved = parent.read_bytes(), child.read_bytes()
    out = run_hooked(work, COMMITTER, "c", child, 0, 0, 0)
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.split()[-1])
    assert qemu_view(parent, work) == leaf
    for kill_at in sorted(set(range(1, total + 1, max(1, total // 12))) | {1, total}):
        parent.write_bytes(saved[0])
        child.write_bytes(saved[1])
        out = run_hooked(work, COMMITTER, "c", child, kill_at, 0, 0)
        assert out.returncode == -9, (kill_at, out.stderr)
        assert child.read_bytes() == saved[1]
        assert qemu_view(child, work) == leaf, kill_at
        qemu_check(parent)
        with Q.Image(str(parent)) as img:
            assert img.dirty or kill_at == 1         # lazy: repaired on the next open
        qcow2ops.commit(str(child))
        assert qemu_view(parent, work) == leaf, kill_at
        assert qemu_check(parent) == 0
