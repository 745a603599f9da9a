"""Concurrency and durability: parallel xe commands, restarts and kill -9 mid-work."""
import concurrent.futures
import os
import signal
import sqlite3
import time

import pytest

from smtap import settings


@pytest.fixture
def sr(host):
    host.start()
    return host.xe_ok("sr-create", "name-label=busy", "type=dummy")


def create_vdis(host, sr, count, prefix="v"):
    """`count` concurrent `xe vdi-create`: [(returncode, uuid or stderr)]."""
    def one(i):
        res = host.xe("vdi-create", "sr-uuid=" + sr, "name-label=%s%d" % (prefix, i),
                      "virtual-size=%dMiB" % (i + 1))
        return res.returncode, (res.stdout.strip() if res.returncode == 0 else res.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_eight_concurrent_vdi_creates(host, sr):
    results = create_vdis(host, sr, 8)
    assert [rc for rc, _ in results] == [0] * 8, results
    uuids = [u for _, u in results]
    assert len(set(uuids)) == 8
    listed = host.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal").split(",")
    assert sorted(listed) == sorted(uuids)
    for i, uuid in enumerate(uuids):     # each got its own size and name
        assert host.xe_ok("vdi-param-get", "uuid=" + uuid,
                          "param-name=virtual-size") == str((i + 1) << 20)
        assert host.xe_ok("vdi-param-get", "uuid=" + uuid, "param-name=name-label") == "v%d" % i


def test_restart_keeps_everything(host, sr):
    uuids = [u for _, u in create_vdis(host, sr, 3)]
    before = host.xe_ok("vdi-list", "params=all")
    host.restart()
    assert host.xe_ok("vdi-list", "params=all") == before
    assert sorted(host.xe_ok("vdi-list", "--minimal").split(",")) == sorted(uuids)
    assert host.xe_ok("pbd-list", "sr-uuid=" + sr, "params=currently-attached",
                      "--minimal") == "true"
    host.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=after", "virtual-size=1M")


def test_kill_9_in_the_middle_of_work_loses_no_committed_record(host, sr):
    done = create_vdis(host, sr, 4, "before")
    committed = [u for rc, u in done if rc == 0]
    assert len(committed) == 4
    # Kill the daemon while a batch of creates is running: once the first is in.
    x = host.session().xenapi
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        batch = pool.submit(create_vdis, host, sr, 8, "during")
        deadline = time.time() + 30
        while len(x.VDI.get_all()) == 4 and time.time() < deadline:
            time.sleep(0.01)
        host.stop(signal.SIGKILL)
        during = batch.result()
    assert any(rc != 0 for rc, _ in during), "the kill came too late to test anything"
    committed += [u for rc, u in during if rc == 0]
    host.cleanup()                 # leftovers of the killed daemon (drivers mid-call)
    db = sqlite3.connect(os.path.join(settings.state_dir(), "xapi.db"))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    host.start()
    listed = host.xe_ok("vdi-list", "--minimal").split(",")
    assert set(committed) <= set(listed)
    assert len(committed) >= 4
    # The toolstack is usable again: a new VDI, and the SR still lists them all.
    new = host.xe_ok("vdi-create", "sr-uuid=" + sr, "name-label=after", "virtual-size=1M")
    assert new in host.xe_ok("vdi-list", "sr-uuid=" + sr, "--minimal").split(",")
