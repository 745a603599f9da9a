"""A run killed with -9 leaves its host root behind (no fixture ran): the next run's
sweep removes its loop device, mount and processes, and never touches a live run's."""
import os
import shutil
import subprocess

import pytest

from lib import hosts
from smtap.toolstack import hostroot


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.alone          # a loop device of its own: not one another test waits to reuse
def test_a_dead_runs_root_is_swept_a_live_ones_kept():
    prefix = "/tmp/zq"          # roots must be short (hostroot.ROOT_MAX)
    dead, live = hostroot.short_root(prefix), hostroot.short_root(prefix)
    with open(os.path.join(dead, hostroot.OWNER_FILE), "w") as f:
        f.write("%d 1" % dead_pid())
    img = os.path.join(dead, "disk.img")
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", img], check=True)
    dev = subprocess.run(["losetup", "--show", "-f", img], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout.strip()
    point = os.path.join(dead, "mnt")
    os.mkdir(point)
    holder = None
    try:
        subprocess.run(["mount", dev, point], check=True)
        holder = subprocess.Popen(["sleep", "600"], cwd=point,      # keeps the mount busy
                                  env=dict(os.environ, SMTAP_ROOT=dead))  # (of that root)
        sleeper = subprocess.Popen(["sleep", "600"],                # a live run's process
                                   env=dict(os.environ, SMTAP_ROOT=live))
        assert hostroot.stale_roots(prefix) == [dead]
        assert hosts.sweep_stale_roots([prefix]) == [dead]
        assert not os.path.exists(dead)
        assert not hostroot.loops_under(dead) and not hostroot.mounts_under(dead)
        assert holder.wait(5) == -9
        assert os.path.isdir(live) and sleeper.poll() is None
    finally:
        for p in (holder, locals().get("sleeper")):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        hostroot.cleanup(dead)
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
