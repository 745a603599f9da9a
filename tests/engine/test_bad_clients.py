"""Clients that are many, slow or hostile: what a tapdisk spends on them stays bounded,
and its control socket, pause and destroy keep working whatever they do."""
import time

from smtap.tapdisk import nbd

from enginelib import Raw, memory_of, run

MiB = 1 << 20


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


def test_memory_per_client_is_bounded(make_tap, smtap_root):
    tap = make_tap("ram:%s?size=%d" % (smtap_root / "x", 64 * MiB))
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
