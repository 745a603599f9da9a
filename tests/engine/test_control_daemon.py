"""The tapdisk daemon's control socket: spawn, malformed requests, exit paths."""
import errno
import os
import signal
import socket
import struct
import time

import pytest

from smtap import names, settings
from smtap.tapdisk import control

from lib.engine import tap_ctl
from lib.procs import wait_for


@pytest.fixture
def tapdisk(smtap_root):
    pid = control.spawn()
    yield pid
    try:
        control.Client(pid, io_timeout=10).exit()
    except OSError:
        pass


def raw_exchange(pid, data, shut=True):
    """Send raw bytes; return the reply bytes (until the daemon closes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(control.ctl_path(pid))
    sock.sendall(data)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    chunks = []
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def error_of(reply):
    assert len(reply) == control.SIZE
    msg = control.unpack(reply)
    assert msg["type"] == control.ERROR
    return msg["error"], msg["message"]


def test_spawn_prints_ctl_path_and_logs_to_file(smtap_root):
    proc = tap_ctl("spawn")
    pid = int(proc.stdout.strip())
    assert proc.stderr == ""
    assert os.path.exists(control.ctl_path(pid))
    assert control.Client(pid).get_pid() == pid
    with open(settings.tapdisk_log_file()) as f:
        assert "serving %s" % control.ctl_path(pid) in f.read()
    control.Client(pid).exit()
    assert wait_for(lambda: not os.path.exists(control.ctl_path(pid)))


@pytest.mark.parametrize("data,why", [
    (b"", "short"),
    (struct.pack("=HH", control.PID, 0), "short"),
    (control.pack(control.PID) + b"extra", "longer"),
    (struct.pack("=HH", 0xabcd, 1) + bytes(540), "unsupported"),
    (struct.pack("=HH", 26, 1) + bytes(540), "unsupported"),   # XENBLKIF_DISCONNECT
    (struct.pack("=HH", control.PID_RSP, 1) + bytes(540), "unsupported"),
    (bytes(range(256)) * 2 + bytes(range(32)), "unsupported"),   # garbage: type 0x100
    (struct.pack("=HH4xIII", control.OPEN, 1, 0, 0, 0) + b"x" * 524, "malformed"),
])
def test_malformed_requests_get_an_error_and_daemon_keeps_serving(tapdisk, data, why):
    err, message = error_of(raw_exchange(tapdisk, data))
    assert err == errno.EINVAL
    assert why in message
    assert control.Client(tapdisk).get_pid() == tapdisk


def test_partial_message_times_out_with_error(tapdisk):
    # The client sends half a message and waits: the daemon gives up after its
    # receive timeout with an error reply, not a hang or a crash.
    start = time.monotonic()
    err, message = error_of(raw_exchange(tapdisk, bytes(100), shut=False))
    assert err == errno.EINVAL and "short message: 100 of 544" in message
    assert time.monotonic() - start < 10
    assert control.Client(tapdisk).get_pid() == tapdisk


def test_requests_on_unknown_minors_are_refused(tapdisk):
    client = control.Client(tapdisk)
    for call, err in ((lambda: client.open(3, "aio:/nonexistent"), errno.ENODEV),
                      (lambda: client.pause(3), errno.ENODEV),
                      (lambda: client.resume(3), errno.ENODEV),
                      (lambda: client.close(3), errno.ENODEV),
                      (lambda: client.detach(3), errno.ENODEV),
                      (lambda: client.stats(3), errno.ENODEV),
                      (lambda: client.disk_info(3), errno.ENODEV),
                      (lambda: client.attach(3), errno.ENODEV)):   # not allocated
        with pytest.raises(control.ControlError) as exc:
            call()
        assert exc.value.errno == err, exc.value
    assert client.list() == [] and client.list_minors() == []
    assert client.stats() == []


def test_bad_open_trailer_is_refused(tapdisk):
    request = control.pack(control.OPEN, 1, flags=control.FLAG_EXTRA, path="aio:/x")
    err, message = error_of(raw_exchange(tapdisk, request + struct.pack("=I", 3) + b"{]"))
    assert err == errno.EINVAL and "trailer" in message
    assert control.Client(tapdisk).get_pid() == tapdisk


def test_many_concurrent_pid_requests(tapdisk):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        pids = list(pool.map(lambda _: control.Client(tapdisk).get_pid(), range(200)))
    assert pids == [tapdisk] * 200


def test_sigterm_exits_cleanly_and_removes_socket(tapdisk):
    os.kill(tapdisk, signal.SIGTERM)
    assert wait_for(lambda: not os.path.exists(control.ctl_path(tapdisk)))
    with open(settings.tapdisk_log_file()) as f:
        log = f.read()
    assert "stopping: SIGTERM" in log and "exited" in log
    assert tap_ctl("list").stdout == ""


def test_exit_message(tapdisk):
    control.Client(tapdisk).exit()
    assert wait_for(lambda: not os.path.exists(control.ctl_path(tapdisk)))
    with pytest.raises(control.ControlError) as exc:
        control.Client(tapdisk).get_pid()
    assert exc.value.errno in (errno.ENOENT, errno.ECONNREFUSED)


def test_spawn_failure_is_reported(smtap_root):
    # A runtime directory that cannot be created: the daemon says why and exits.
    (smtap_root / "run").write_text("not a directory")
    proc = tap_ctl("spawn", check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("tap-ctl spawn: tapdisk failed to start:")
    assert len(proc.stderr.splitlines()) == 1


def _sockets():
    return sorted(n for n in os.listdir(settings.runtime_dir()) if n != names.MINORS)


def test_sigterm_with_an_open_vbd_closes_it_and_releases_the_minor(make_tap, smtap_root):
    tap = make_tap("null:/dev/null?size=1048576")
    assert _sockets() == [names.ctl_name(tap.pid), names.nbd_name(tap.pid, tap.minor)]
    os.kill(tap.pid, signal.SIGTERM)
    assert wait_for(lambda: _sockets() == [])
    from smtap.tapdisk import minors
    minors.free(tap.minor)      # the dead tapdisk's hold is gone


def test_force_shutdown_of_all_minors_exits(make_tap, smtap_root):
    tap = make_tap("null:/dev/null?size=1048576")
    client = control.Client(tap.pid)
    reply = client.call(control.FORCE_SHUTDOWN, control.ALL, control.CLOSE_RSP)
    assert reply["error"] == 0
    assert wait_for(lambda: _sockets() == [])
    assert tap_ctl("list").stdout.splitlines() == ["minor=%d" % tap.minor]
    tap_ctl("free", "-m", tap.minor)


def test_detach_of_the_last_minor_is_answered_while_other_requests_finish(make_tap):
    """The last minor detached, the daemon exits once its reply went out, whatever
    other connections finish meanwhile: a thread asks the tapdisk for its pid again and
    again while the minor closes and detaches, 30 times. (Each handler thread acted on
    the daemon's "exit requested" after its own reply: one of another request ending
    between the detach's handler and its reply stopped the daemon first, and tap-ctl
    destroy failed with "closed the connection during detach (0 of 544 bytes)".)"""
    import threading
    for _ in range(30):
        tap = make_tap("null:/dev/null?size=1048576")
        stop = threading.Event()

        def hammer():
            client = control.Client(tap.pid, io_timeout=10)
            while not stop.is_set():
                try:
                    client.get_pid()
                except control.ControlError:
                    return              # gone: it exited
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            client = control.Client(tap.pid, io_timeout=10)
            client.close(tap.minor)
            client.detach(tap.minor)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert wait_for(lambda: not os.path.exists(control.ctl_path(tap.pid)))
        tap_ctl("free", "-m", tap.minor)


def test_attach_twice_and_minor_held_elsewhere(make_tap, smtap_root):
    tap = make_tap("null:/dev/null?size=1048576")
    client = control.Client(tap.pid)
    with pytest.raises(control.ControlError) as exc:
        client.attach(tap.minor)
    assert exc.value.errno == errno.EEXIST
    other = control.spawn()
    with pytest.raises(control.ControlError) as exc:
        control.Client(other).attach(tap.minor)
    assert exc.value.errno == errno.EBUSY and "held by another tapdisk" in str(exc.value)
    control.Client(other).exit()
    with pytest.raises(control.ControlError) as exc:
        client.open(tap.minor, "null:/dev/null?size=1048576")
    assert exc.value.errno == errno.EALREADY
