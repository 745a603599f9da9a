"""Logging as on a host: the drivers of the host profile (the RPM's) through syslog
(facility local2: dom0's rsyslog writes /var/log/SMlog, rotates it, may forward it),
never appending to SMlog; the engine's own log rotated by the package's logrotate file
under running tapdisks.

The tests listen on <root>/dev/log themselves, as rsyslog's imuxsock does.
"""
import os
import re
import socket

import pytest

from lib.checkout import PY36, TOP, VENV_PYTHON
from lib.install import DRIVER_INFO_CALL, make_install
from lib.procs import run
from smtap.toolstack import hostroot

PYTHONS = [VENV_PYTHON] + ([PY36] if os.access(PY36, os.X_OK) else [])
LOCAL2_INFO = 18 * 8 + 6


def bare_env(root):
    """Only PATH and SMTAP_ROOT, none of the test run's environment."""
    return {"PATH": os.environ["PATH"], "SMTAP_ROOT": str(root)}


@pytest.fixture
def syslogd(smtap_root):
    """A datagram socket at <root>/dev/log: what the drivers send, message by message."""
    path = os.path.join(str(smtap_root), "dev", "log")
    os.makedirs(os.path.dirname(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)

    def received():
        out = []
        while True:
            try:
                out.append(sock.recv(65536).decode())
            except socket.timeout:
                return out
    yield received
    sock.close()


def test_driver_logs_through_syslog_on_a_host(smtap_root, syslogd):
    root = make_install(smtap_root, target="install-host")
    run([os.path.join(root, "opt/xensource/sm/ramSR"), DRIVER_INFO_CALL], env=bare_env(root))
    messages = syslogd()
    assert messages, "the driver sent nothing to syslog"
    for m in messages:
        assert re.match(r"<(\d+)>smtap: \[(\d+)\] sr_get_driver_info sr=- vdi=- [A-Z]+ ", m), m
    assert any(m.startswith("<%d>" % LOCAL2_INFO) for m in messages), messages
    assert not os.path.exists(os.path.join(root, "var/log/SMlog"))


def test_driver_error_with_traceback_is_one_message_per_line(smtap_root, syslogd):
    root = make_install(smtap_root, target="install-host")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from smtap.sm import log\n"
            "log.setup(); log.set_context('vdi_attach', 'a' * 36, 'b' * 36)\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('attach failed')\n"
            % os.path.join(root, "opt/smtap/lib"))
    run([VENV_PYTHON, "-c", code], env=bare_env(root))
    messages = syslogd()
    assert len(messages) > 3 and all("\n" not in m for m in messages), messages
    assert messages[0].startswith("<%d>smtap: [" % (18 * 8 + 3))        # local2.err
    assert "vdi_attach sr=aaaaaaaa vdi=bbbbbbbb ERROR attach failed" in messages[0]
    assert "ZeroDivisionError" in messages[-1]
    pid = re.match(r"<\d+>smtap: (\[\d+\])", messages[0]).group(1)
    assert all(m.split(": ", 1)[1].startswith(pid) for m in messages), messages


def test_driver_log_is_a_file_under_the_root_in_the_dev_profile(smtap_root, syslogd):
    root = make_install(smtap_root)
    run([os.path.join(root, "opt/xensource/sm/ramSR"), DRIVER_INFO_CALL], env=bare_env(root))
    with open(os.path.join(root, "var/log/SMlog")) as f:
        assert " sr_get_driver_info sr=- vdi=- " in f.read()
    assert syslogd() == []


ROTATE_THEN_WRITE = r"""
import logging, os, sys
sys.path.insert(0, sys.argv[1])
from smtap.tapdisk import logfile
path = sys.argv[2]
log = logging.getLogger("t")
log.addHandler(logfile.handler(path, "%(message)s"))
log.warning("before")
os.write(2, b"stderr before\n")
os.rename(path, path + ".1")
log.warning("after")
os.write(2, b"stderr after\n")
"""


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: os.path.basename(os.path.dirname(
    os.path.dirname(p))))
def test_engine_log_follows_rotation_with_stderr(tmp_path, python):
    path = str(tmp_path / "log" / "tapdisk.log")
    run([python, "-c", ROTATE_THEN_WRITE, TOP, path], env={"PATH": os.environ["PATH"]})
    with open(path + ".1") as f:
        assert f.read() == "before\nstderr before\n"
    with open(path) as f:
        assert f.read() == "after\nstderr after\n"


def installed_tap_ctl(root, python, *args):
    return run([python, os.path.join(root, "opt/smtap/bin/tap-ctl")] + list(args),
               env=bare_env(root)).stdout


def logrotate(root, state):
    """The package's /etc/logrotate.d/smtap, as the host's logrotate runs it (-f: now)."""
    with open(os.path.join(root, "etc/logrotate.d/smtap")) as f:
        conf = f.read()
    assert "/var/log/smtap/*.log {" in conf
    local = os.path.join(root, "logrotate.conf")
    with open(local, "w") as f:
        f.write(conf.replace("/var/log/smtap/", os.path.join(root, "var/log/smtap/")))
    run(["logrotate", "-f", "-s", state, local])


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: os.path.basename(os.path.dirname(
    os.path.dirname(p))))
def test_engine_log_rotated_under_running_tapdisks(smtap_root, python):
    """Two real logrotate cycles (rename, then compress) while two tapdisks run: each
    one's next lines land in the new file, none in a rotated one."""
    root = make_install(smtap_root, target="install-host", python=python)
    img = os.path.join(root, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    for _ in range(2):
        installed_tap_ctl(root, python, "create", "-a", "ram:" + img)
    tapdisks = [(int(p), m) for p, m in re.findall(r"pid=(\d+) minor=(\d+)",
                                                   installed_tap_ctl(root, python, "list"))]
    assert len(tapdisks) == 2
    log = os.path.join(root, "var/log/smtap/tapdisk.log")
    state = os.path.join(root, "logrotate.state")

    def lines_of(path):
        if path.endswith(".gz"):
            return run("zcat", path).stdout
        with open(path) as f:
            return f.read()

    for cycle in (1, 2):
        logrotate(root, state)
        rotated = sorted(os.listdir(os.path.dirname(log)))
        assert "tapdisk.log.1" in rotated and (cycle == 1 or "tapdisk.log.2.gz" in rotated), \
            rotated
        before = {n: lines_of(os.path.join(os.path.dirname(log), n)) for n in rotated
                  if n != "tapdisk.log"}
        for pid, minor in tapdisks:
            installed_tap_ctl(root, python, "pause", "-p", str(pid), "-m", minor)
            installed_tap_ctl(root, python, "unpause", "-p", str(pid), "-m", minor)
        text = lines_of(log)
        for pid, minor in tapdisks:
            assert re.search(r"tapdisk\[%d\] INFO \S+: minor %s paused" % (pid, minor), text), text
        after = {n: lines_of(os.path.join(os.path.dirname(log), n)) for n in before}
        assert after == before                      # nothing more in a rotated file
    for pid, minor in tapdisks:
        installed_tap_ctl(root, python, "destroy", "-p", str(pid), "-m", minor)
        assert hostroot.wait_dead(pid)
