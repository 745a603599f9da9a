"""The NBD server, driven by real clients (qemu-io, qemu-img, nbdcopy, nbdinfo, fio)
and by a raw socket for what no well-behaved client sends."""
import json
import os
import struct
import subprocess
import time

import pytest

from smtap.tapdisk import control
from smtap.tapdisk import driver as drv

from lib.engine import (IHAVEOPT, IO_BACKENDS, NBD_LOOPS, Raw, have_io_uring, image_file,
                        nbd_loop_env, nbd_map, nbd_uri, qemu_io)
from lib.procs import run, wait_for
from lib.sizes import MiB
from lib.qcow2 import QCOW2_DISKS, check_images
from lib.vhd import VHD_DISKS


def pattern_file(path, size):
    data = bytes((i * 7 + i // 4096) & 0xff for i in range(65536)) * (size // 65536)
    path.write_bytes(data)
    return str(path)


# -- data integrity with real clients ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["aio", "ram"])
def test_write_with_one_client_read_with_others(serve, tmp_path, kind):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    os.truncate(img, 32 * MiB)
    s = serve("%s:%s" % (kind, img))
    out = qemu_io(s.uri, "write -P 0xab 0 1M", "write -P 0xcd 5000 70000",
                  "write -P 0x11 31M 1M", "flush").output
    assert "wrote 1048576/1048576" in out
    # nbdcopy out, compare with a local reference built the same way
    ref = bytearray(32 * MiB)
    ref[0:MiB] = b"\xab" * MiB
    ref[5000:75000] = b"\xcd" * 70000
    ref[31 * MiB:] = b"\x11" * MiB
    (tmp_path / "ref.img").write_bytes(bytes(ref))
    run("nbdcopy", s.uri, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == bytes(ref)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "ref.img", s.uri)
    # and a different file copied in through the engine reads back identical
    src = pattern_file(tmp_path / "src.img", 32 * MiB)
    run("nbdcopy", src, s.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri)


def test_block_status_reports_holes(serve, tmp_path):
    s = serve("ram:%s?size=%d" % (tmp_path / "none", 64 * MiB))
    assert nbd_map(s.uri) == [(0, 64 * MiB, 3)]
    qemu_io(s.uri, "write -P 1 8M 1M", "write -P 2 40M 64k")
    assert nbd_map(s.uri) == [(0, 8 * MiB, 3), (8 * MiB, MiB, 0), (9 * MiB, 31 * MiB, 3),
                              (40 * MiB, 65536, 0), (40 * MiB + 65536, 24 * MiB - 65536, 3)]
    info = json.loads(run("nbdinfo", "--no-content", "--json", s.uri).stdout)["exports"][0]
    assert info["export-size"] == 64 * MiB
    assert info["can_trim"] and info["can_zero"] and info["can_fua"] and info["can_multi_conn"]
    assert info["can_fast_zero"] and info["can_flush"] and not info["is_read_only"]


def test_trim_and_write_zeroes(serve, tmp_path):
    img = tmp_path / "d.img"
    pattern_file(img, 16 * MiB)
    s = serve("aio:%s" % img)
    blocks = os.stat(img).st_blocks
    qemu_io(s.uri, "discard 1M 2M", "write -z 8M 1M", "write -z -u 12M 1M")
    out = qemu_io(s.uri, "read -P 0 8M 1M", "read -P 0 12M 1M").output
    assert "Pattern verification failed" not in out
    assert os.stat(img).st_blocks < blocks      # holes were punched in the file
    kinds = {(o, l): t for o, l, t in nbd_map(s.uri)}
    assert kinds.get((1 * MiB, 2 * MiB)) == 3 or any(
        o <= MiB and o + l >= 3 * MiB and t & 1 for (o, l), t in kinds.items())
    # the rest of the data is untouched
    data = img.read_bytes()
    ref = (tmp_path / "ref")
    pattern_file(ref, 16 * MiB)
    refdata = ref.read_bytes()
    assert data[:MiB] == refdata[:MiB] and data[3 * MiB:8 * MiB] == refdata[3 * MiB:8 * MiB]


def test_fua_and_flush_reach_the_file(serve, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * MiB))
    s = serve("aio:%s" % img)
    qemu_io(s.uri, "write -f -P 0x5a 0 64k")        # FUA
    assert img.read_bytes()[:65536] == b"\x5a" * 65536
    qemu_io(s.uri, "write -P 0x6b 1M 64k", "flush")
    assert img.read_bytes()[MiB:MiB + 65536] == b"\x6b" * 65536


def test_read_only_export(serve, tmp_path):
    img = tmp_path / "d.img"
    pattern_file(img, 4 * MiB)
    s = serve("aio:%s" % img, "-R")
    info = json.loads(run("nbdinfo", "--no-content", "--json", s.uri).stdout)["exports"][0]
    assert info["is_read_only"]
    out = qemu_io(s.uri, "write -P 1 0 4k", check=False).output
    assert "Operation not permitted" in out or "Permission denied" in out or "read-only" in out
    pattern_file(tmp_path / "r", 4 * MiB)
    assert img.read_bytes() == (tmp_path / "r").read_bytes()


def test_several_clients_at_once(serve, tmp_path):
    s = serve("ram:%s?size=%d" % (tmp_path / "x", 64 * MiB))
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P %d %dM 8M" % (i + 1, 8 * i),
                               s.uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(6)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
    fio = run("fio", "--name=r", "--ioengine=nbd", "--uri=" + s.uri, "--rw=randread", "--bs=4k",
              "--iodepth=16", "--numjobs=2", "--size=64M", "--runtime=1", "--time_based",
              "--output-format=json")
    jobs = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"]
    assert all(j["error"] == 0 and j["read"]["io_bytes"] > 0 for j in jobs)
    for i in range(6):
        out = qemu_io(s.uri, "read -P %d %dM 8M" % (i + 1, 8 * i)).output
        assert "Pattern verification failed" not in out


def test_export_name_and_list(serve, tmp_path):
    s = serve("ram:%s?size=%d" % (tmp_path / "x", MiB), "-e", "vdi-1")
    assert run("nbdinfo", "--no-content", nbd_uri(s.nbd_path, "vdi-1")).returncode == 0
    bad = run("nbdinfo", "--no-content", nbd_uri(s.nbd_path, "other"), check=False)
    assert bad.returncode != 0
    listed = run("nbdinfo", "--no-content", "--list", "--json", s.uri).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["vdi-1"]


def test_tcp_listener(serve, tmp_path):
    s = serve("ram:%s?size=%d" % (tmp_path / "x", MiB), "--tcp", "127.0.0.1:0")
    host, port = s.tcp.rsplit(":", 1)
    uri = "nbd://%s:%s/" % (host, port)
    qemu_io(uri, "write -P 9 0 64k")
    assert "Pattern verification failed" not in qemu_io(s.uri, "read -P 9 0 64k").output


def test_served_by_tap_ctl_create(make_tap, tmp_path):
    img = tmp_path / "d.img"
    pattern_file(img, 8 * MiB)
    tap = make_tap("aio:%s" % img)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), tap.uri)


# -- the loop's C part (tapdisk/smtap_nbd.c) and Python's ----------------------------------
def _mixed_session(c, structured):
    """Pipelined writes (FUA on one), a flush, pipelined reads, then what the C part
    hands to Python (an unaligned write, a trim, a read past the end) and reads again:
    every reply checked. A read's reply is a chunk on a structured connection; what
    succeeds without data is a simple reply on either (the protocol allows it; a client
    reads 16 bytes instead of 20, in one call: libnbd takes a chunk's header in two).
    Returns (reads, writes, sectors read, sectors written)."""
    def done(handle, datalen=0):
        if structured and datalen:
            flags, rtype, h, payload = c.chunk()
            assert (flags, h, rtype) == (1, handle, 1), rtype   # OFFSET_DATA, done
            assert struct.unpack_from(">Q", payload)[0] == offsets[handle]
            return payload[8:]
        err, h, data = c.simple_reply(datalen)
        assert (err, h) == (0, handle)
        return data
    offsets = {}
    burst = b""
    for i in range(8):
        burst += struct.pack(">IHHQQI", 0x25609513, 1 if i == 7 else 0, 1, 10 + i,
                             i * 4096, 4096) + bytes([i + 1]) * 4096
    c.s.sendall(burst)
    got = sorted(c.simple_reply()[1] for _ in range(8))
    assert got == list(range(10, 18))
    c.request(3, 20, 0, 0)                              # flush
    done(20)
    burst = b""
    for i in range(8):
        offsets[30 + i] = i * 4096
        burst += struct.pack(">IHHQQI", 0x25609513, 0, 0, 30 + i, i * 4096, 4096)
    c.s.sendall(burst)
    for i in range(8):                                  # in order: here, one by one
        h = 30 + i
        data = done(h, 4096)
        assert data == bytes([i + 1]) * 4096
    c.request(1, 40, 100, 17, payload=b"u" * 17)        # unaligned (O_DIRECT: Python's)
    done(40)
    c.request(4, 41, 65536, 4096)                       # trim: Python's
    done(41)
    c.request(0, 42, 4 * MiB - 512, 1024)               # past the end: EINVAL
    if structured:
        assert c.chunk()[:3] == (1, 2 ** 15 + 1, 42)
    else:
        assert c.simple_reply()[:2] == (22, 42)
    for h, off in ((43, 0), (44, 4096), (45, 65536)):  # and back to the fast path
        offsets[h] = off
        c.request(0, h, off, 4096)
        data = done(h, 4096)
        expect = (b"\1" * 100 + b"u" * 17 + b"\1" * (4096 - 117) if off == 0 else
                  bytes(4096) if off == 65536 else b"\2" * 4096)
        assert data == expect
    return 8 + 3, 8 + 1, (8 * 4096 + 3 * 4096) // 512, (8 * 4096) // 512


@pytest.mark.parametrize("direct", [True, False], ids=["odirect", "buffered"])
def test_reads_writes_and_flushes_on_both_loops_with_exact_counters(make_tap, smtap_root,
                                                                   nbd_loop, direct):
    """A raw disk, on a simple and a structured connection: every reply right, the
    accounting exact, and `served_c` in tap-ctl stats shows which loop answered."""
    img = image_file(smtap_root / "d.img", 4 * MiB)
    tap = make_tap("aio:" + img, flags=0 if direct else drv.OPEN_NO_O_DIRECT)
    totals = [0, 0, 0, 0]
    for structured in (False, True):
        c = Raw(tap.nbd_path)
        c.greet()
        if structured:
            c.structured()
        c.go()
        totals = [a + b for a, b in zip(totals, _mixed_session(c, structured))]
        c.close()
    client = control.Client(tap.pid)
    assert wait_for(lambda: client.stats(tap.minor)["nbd"]["clients"] == 0)
    stats = client.stats(tap.minor)
    reads, writes, secs_read, secs_written = totals
    assert stats["secs"] == [secs_read, secs_written]
    assert stats["images"][0]["hits"] == [reads, writes]
    assert stats["images"][0]["fail"] == [0, 0]
    assert stats["reqs_outstanding"] == 0
    served_c = stats["nbd"]["served_c"]
    if nbd_loop == "c":
        assert served_c >= 2 * 12, stats        # most of them (a connection's first is
    else:                                       # Python's, and what C hands it)
        assert served_c == 0, stats


# -- a raw client: what well-behaved clients never send ---------------------------------
def test_unknown_option_and_command_get_errors(serve, tmp_path):
    s = serve("ram:%s?size=%d" % (tmp_path / "x", MiB))
    c = Raw(s.nbd_path)
    c.greet()
    c.option(99, b"junk")
    opt, rtype, _ = c.reply()
    assert (opt, rtype) == (99, 2 ** 31 + 1)           # NBD_REP_ERR_UNSUP
    c.option(7, b"\0\0")                               # GO, truncated
    assert c.reply()[1] == 2 ** 31 + 3                 # NBD_REP_ERR_INVALID
    c.option(10, struct.pack(">II", 0, 0))             # SET_META_CONTEXT without structured
    assert c.reply()[1] == 2 ** 31 + 3
    assert c.go() == MiB
    c.request(42, 1, 0, 512)                           # unknown command
    assert c.simple_reply()[:2] == (22, 1)             # EINVAL
    c.request(0, 2, MiB - 512, 1024)                   # read past the end
    assert c.simple_reply()[:2] == (22, 2)
    c.request(7, 3, 0, 512)                            # BLOCK_STATUS, no context
    assert c.simple_reply()[:2] == (22, 3)
    c.request(1, 4, 0, 4, payload=b"abcd")             # the connection still serves
    assert c.simple_reply()[:2] == (0, 4)
    c.request(0, 5, 0, 4)
    assert c.simple_reply(4) == (0, 5, b"abcd")
    c.request(2, 6, 0, 0)                              # DISC
    c.close()


# the disks the garbage tests run on: memory, a VHD and a VHD chain, qcow2 and a qcow2 chain
GARBAGE_DISKS = dict(VHD_DISKS, ram=lambda root, size: "ram:%s?size=%d" % (root / "x", size))
GARBAGE_DISKS.update(QCOW2_DISKS)


@pytest.mark.parametrize("disk", sorted(GARBAGE_DISKS))
@pytest.mark.parametrize("garbage", [
    b"\xff" * 64,                                       # bad client flags
    struct.pack(">I", 3) + b"GARBAGE!" * 8,             # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 0xfffffff0),  # absurd length
])
def test_garbage_handshake_does_not_hurt_the_server(serve, tmp_path, garbage, disk):
    s = serve(GARBAGE_DISKS[disk](tmp_path, 4 * MiB))
    c = Raw(s.nbd_path)
    c.recv(18)
    c.s.sendall(garbage)
    with pytest.raises((EOFError, ConnectionError)):
        c.recv(1)                                       # the server hangs up on it
    c.close()
    assert run("nbdinfo", "--size", s.uri).stdout.strip() == str(4 * MiB)
    s.stop()
    check_images(tmp_path)


# and a client vanishing with I/O queued, on each back end (ram answers in the turn)
# (a raw disk: on the NBD loop's C part and on Python's alone)
VANISHING = [("ram", "auto", "c")] + [(d, b, "c") for d in sorted(VHD_DISKS) + sorted(QCOW2_DISKS)
                                      for b in IO_BACKENDS] + [
    ("aio", b, n) for b in IO_BACKENDS for n in NBD_LOOPS]


@pytest.mark.parametrize("disk,backend,loop", VANISHING)
def test_garbage_request_and_vanishing_client(serve, tmp_path, monkeypatch, disk, backend, loop):
    if backend == "io_uring" and not have_io_uring():
        pytest.skip("no io_uring here")
    monkeypatch.setenv("SMTAP_IO", backend)
    monkeypatch.setenv(*nbd_loop_env(loop))
    disks = dict(GARBAGE_DISKS, aio=lambda root, size: "aio:" + image_file(root / "d.img", size))
    s = serve(disks[disk](tmp_path, 64 * MiB))
    c = Raw(s.nbd_path)
    c.greet()
    c.go()
    c.s.sendall(b"\x00" * 28)                           # bad request magic: hang up
    with pytest.raises((EOFError, ConnectionError)):
        c.recv(1)
    c.close()
    # a client that dies in the middle of a write payload and one killed mid-fio
    c = Raw(s.nbd_path)
    c.greet()
    c.go()
    c.request(1, 1, 0, 65536, payload=b"x" * 1000)
    c.close()
    fio = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd", "--uri=" + s.uri, "--rw=randread",
                            "--bs=64k", "--iodepth=32", "--size=64M", "--runtime=30",
                            "--time_based"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    fio.kill()
    fio.wait()
    out = qemu_io(s.uri, "write -P 3 0 1M", "read -P 3 0 1M").output
    assert "Pattern verification failed" not in out
    assert s.proc.poll() is None
    s.stop()
    check_images(tmp_path)


def test_pipelined_requests_simple_replies(serve, tmp_path):
    """Many requests in one send, answered all (out of order is allowed, here in order)."""
    s = serve("ram:%s?size=%d" % (tmp_path / "x", MiB))
    c = Raw(s.nbd_path)
    c.greet()
    c.go()
    reqs = b""
    for i in range(64):
        reqs += struct.pack(">IHHQQI", 0x25609513, 0, 1, 1000 + i, i * 4096, 4096) + \
            bytes([i]) * 4096
    for i in range(64):
        reqs += struct.pack(">IHHQQI", 0x25609513, 0, 0, 2000 + i, i * 4096, 4096)
    c.s.sendall(reqs)
    got = {}
    for _ in range(64):
        err, handle, _ = c.simple_reply()
        assert err == 0
        got[handle] = True
    for _ in range(64):
        err, handle, data = c.simple_reply(4096)
        assert err == 0 and data == bytes([handle - 2000]) * 4096
    c.close()


@pytest.mark.parametrize("kind,backend,loop", [("ram", "auto", "c")] + [
    (k, b, "c") for k in ("vhd", "vhd-chain3", "qcow2", "qcow2-chain3") for b in IO_BACKENDS]
    + [(k, b, n) for k in ("aio", "aio-D") for b in IO_BACKENDS for n in NBD_LOOPS])
def test_fio_pipelined_writes_verify(serve, tmp_path, monkeypatch, kind, backend, loop):
    """fio keeps 32 mixed-size writes in flight, then reads every block back and checks it
    (on each I/O back end: the queued path's; a raw disk, O_DIRECT or not, on the NBD
    loop's C part and on Python's alone)."""
    if backend == "io_uring" and not have_io_uring():
        pytest.skip("no io_uring here")
    monkeypatch.setenv("SMTAP_IO", backend)
    monkeypatch.setenv(*nbd_loop_env(loop))
    flags = ("-D",) if kind == "aio-D" else ()
    kind = kind.split("-D")[0]
    if kind.startswith(("vhd", "qcow2")):
        params = dict(VHD_DISKS, **QCOW2_DISKS)[kind](tmp_path, 16 * MiB)
    else:
        img = tmp_path / "d.img"
        img.write_bytes(b"")
        os.truncate(img, 16 * MiB)
        params = "%s:%s" % (kind, img)
    s = serve(params, *flags)
    out = run("fio", "--name=v", "--ioengine=nbd", "--uri=" + s.uri, "--rw=randwrite",
              "--bsrange=512-128k", "--bs_unaligned", "--iodepth=32", "--size=16M",
              "--verify=crc32c", "--verify_state_save=0", "--do_verify=1", "--verify_fatal=1",
              "--output-format=json")
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 15 * MiB
    assert job["read"]["io_bytes"] == job["write"]["io_bytes"]     # all read back, verified
    s.stop()
    check_images(tmp_path)
