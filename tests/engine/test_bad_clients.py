"""Clients that are many, slow or hostile: what a tapdisk spends on them stays bounded,
and its control socket, pause and destroy keep working whatever they do."""
import os
import socket
import subprocess
import time

import pytest

from smtap import settings
from smtap.tapdisk import control, nbd

from lib.engine import Raw, have_io_uring, image_file, tap_ctl
from lib.procs import memory_of, run, wait_for
from lib.sizes import MiB


def rss(pid):
    return memory_of(pid)["VmRSS"]


def connected(path, n, first_handle=0):
    """n raw clients through the handshake, each after one 4 KiB read: idle in the
    transmission phase."""
    clients = []
    for i in range(n):
        c = Raw(path)
        c.greet()
        c.go()
        c.request(0, first_handle + i, 0, 4096)
        assert c.simple_reply(4096)[:2] == (0, first_handle + i)
        clients.append(c)
    return clients


def refused(path):
    """The server hangs up on a new client at once."""
    c = Raw(path, timeout=5)
    try:
        c.recv(18)
    except (EOFError, ConnectionError):
        return True
    finally:
        c.close()
    return False


@pytest.mark.parametrize("kind,backend", [("ram", "auto"), ("aio", "io_uring"),
                                          ("aio", "libaio")])
def test_memory_per_client_is_bounded(make_tap, smtap_root, monkeypatch, kind, backend):
    """ram answers in the turn; aio's clients each have an I/O queue and buffers too."""
    if backend == "io_uring" and not have_io_uring():
        pytest.skip("no io_uring here")
    monkeypatch.setenv("SMTAP_IO", backend)
    if kind == "ram":
        tap = make_tap("ram:%s?size=%d" % (smtap_root / "x", 64 * MiB))
    else:
        tap = make_tap("aio:" + image_file(smtap_root / "x.img", 64 * MiB))
    clients = connected(tap.nbd_path, 1)          # one-time costs of a first client
    base = rss(tap.pid)
    clients += connected(tap.nbd_path, 100, 1)
    idle = rss(tap.pid) - base
    # announce a 32 MiB write, send 64 KiB of it, stall
    writer = Raw(tap.nbd_path)
    writer.greet()
    writer.go()
    before = rss(tap.pid)
    writer.request(1, 7, 0, 32 * MiB, payload=b"\x5a" * 65536)
    time.sleep(0.5)
    stalled = rss(tap.pid) - before
    print("RSS: base %d MiB, +%d KiB for 100 idle clients, +%d KiB for a stalled 32 MiB "
          "write" % (base >> 20, idle >> 10, stalled >> 10))
    assert idle < 100 * 256 * 1024                  # was ~4.3 MiB per client
    assert stalled < 2 * MiB                        # was ~40 MiB
    writer.s.sendall(b"\x5a" * (32 * MiB - 65536))  # the rest comes: written, answered
    assert writer.simple_reply()[:2] == (0, 7)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 32M", tap.uri)
    grown = rss(tap.pid) - before
    time.sleep(nbd.IDLE_RELEASE + 1.5)              # idle: the big buffers go back
    released = rss(tap.pid) - before
    print("RSS after the write +%d MiB, idle +%d MiB" % (grown >> 20, released >> 20))
    assert released < 4 * MiB + 32 * MiB            # the disk's own 32 MiB stay, of course
    assert grown - released >= 24 * MiB
    # the cap: clients past it are refused at once, the others keep working
    clients += connected(tap.nbd_path, nbd.MAX_CLIENTS - len(clients) - 1, 200)
    assert refused(tap.nbd_path)
    for c in clients[:3] + [writer]:
        c.request(0, 9, 0, 4096)
        assert c.simple_reply(4096) == (0, 9, b"\x5a" * 4096)
    for c in clients:
        c.close()
    writer.close()


def stalled_reader(path, requests=64):
    """A client that asks for `requests` MiB and never reads a byte of the replies."""
    c = Raw(path)
    c.greet()
    c.go()
    for handle in range(requests):
        c.request(0, handle, 0, MiB)
    return c


def test_a_client_that_never_reads_does_not_block_pause_or_destroy(make_tap, smtap_root):
    tap = make_tap("null:x?size=%d" % (1 << 30), timeout=30)   # request timeout 30 s
    client = control.Client(tap.pid)
    # a well-behaved client, connected and quiet: it must survive the pauses
    quiet = subprocess.Popen(["qemu-io", "-f", "raw", tap.uri], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: client.stats(tap.minor)["nbd"]["clients"] == 1)
        stalled = stalled_reader(tap.nbd_path)
        assert wait_for(lambda: client.stats(tap.minor)["reqs_outstanding"] >= 1)
        time.sleep(0.5)
        assert client.stats(tap.minor)["reqs_outstanding"] >= 1    # stuck sending replies
        started = time.monotonic()
        tap_ctl("pause", "-p", tap.pid, "-m", tap.minor)            # was: EBUSY after 30 s
        paused_in = time.monotonic() - started
        tap_ctl("unpause", "-p", tap.pid, "-m", tap.minor)
        assert paused_in < 8, paused_in
        with pytest.raises((EOFError, ConnectionError)):            # it was dropped
            while True:
                stalled.recv(1 << 20)
        stalled.close()
        hits = client.stats(tap.minor)["images"][0]["hits"][0]
        quiet.stdin.write("read -P 0 0 64k\n")
        quiet.stdin.flush()
        assert wait_for(lambda: client.stats(tap.minor)["images"][0]["hits"][0] > hits)

        stalled = stalled_reader(tap.nbd_path)
        assert wait_for(lambda: client.stats(tap.minor)["reqs_outstanding"] >= 1)
        started = time.monotonic()
        tap.destroy()                                               # was: EBUSY after 30 s
        assert time.monotonic() - started < 8
        stalled.close()
        assert tap_ctl("list").stdout == ""
        quiet.stdin.write("quit\n")
        quiet.stdin.flush()
        out = quiet.communicate(timeout=30)[0]
        assert "read 65536/65536 bytes" in out, out
    finally:
        if quiet.poll() is None:
            quiet.kill()
            quiet.wait()


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def nofile(pid, limit=None):
    """Set the soft RLIMIT_NOFILE of pid (None: back to the hard limit)."""
    if limit is None:
        limit = int(run("prlimit", "--pid", pid, "--nofile", "--output=HARD",
                        "--noheadings").stdout)
    run("prlimit", "--pid", pid, "--nofile=%d:" % limit)


def answers_while_quiet(tap):
    """tap-ctl list answers (within 10 s) and, over the 2 s around it, the tapdisk neither
    spins nor floods its log."""
    log = settings.tapdisk_log_file()
    cpu, size = cpu_seconds(tap.pid), os.path.getsize(log)
    lister = subprocess.Popen(["tap-ctl", "list"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        busy, logged = cpu_seconds(tap.pid) - cpu, os.path.getsize(log) - size
        assert busy < 0.3 and logged < 2048, (busy, logged)
        out, err = lister.communicate(timeout=8)
    finally:
        if lister.poll() is None:
            lister.kill()
            lister.wait()
    assert lister.returncode == 0 and "pid=%d minor=%d" % (tap.pid, tap.minor) in out, err


def test_out_of_descriptors_backs_off_and_keeps_answering(make_tap, smtap_root):
    tap = make_tap("null:x?size=%d" % MiB)
    limit = open_fds(tap.pid) + 24
    nofile(tap.pid, limit)
    clients = []
    try:
        while len(clients) < 64:                   # clients until the server takes no more
            c = Raw(tap.nbd_path, timeout=2)
            clients.append(c)
            try:
                c.greet()
                c.go()
            except (socket.timeout, EOFError, ConnectionError):
                break
        assert 1 < len(clients) < 64
        answers_while_quiet(tap)
        # every descriptor taken: the limit lowered under what is open, clients waiting
        nofile(tap.pid, open_fds(tap.pid) - 4)
        clients += [Raw(tap.nbd_path, timeout=2) for _ in range(3)]
        answers_while_quiet(tap)
        assert "secs" in tap_ctl("stats", "-p", tap.pid, "-m", tap.minor, timeout=10).stdout
    finally:
        for c in clients:
            c.close()
    nofile(tap.pid)                                 # descriptors again: served again
    run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", tap.uri, timeout=30)
