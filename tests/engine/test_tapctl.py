"""tap-ctl end to end: real tapdisk processes, real NBD clients."""
import json
import os
import re
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from smtap import names, settings
from smtap.tapdisk import control, minors

from lib.engine import image_file, nbd_size, nbd_uri, qemu_io, tap_ctl
from lib.hosts import tapdisks_under
from lib.procs import run, wait_for
from lib.sizes import MiB


def list_lines():
    return tap_ctl("list").stdout.splitlines()


def pid_of(minor):
    for line in list_lines():
        m = re.match(r"pid=(\d+) minor=%d\b" % minor, line)
        if m:
            return int(m.group(1))
    raise AssertionError("minor %d not listed: %s" % (minor, list_lines()))


def test_lifecycle(smtap_root):
    img = image_file(smtap_root / "disk.img", 8 * MiB, b"\xab")
    params = "ram:%s" % img
    proc = tap_ctl("create", "-a", params)
    device = proc.stdout.strip()
    assert proc.stderr == ""
    assert device == minors.marker(0) and os.path.exists(device)
    pid = pid_of(0)
    assert list_lines() == ["pid=%d minor=0 state=0 args=%s" % (pid, params)]

    uri = nbd_uri(names.nbd_path(pid, 0))
    assert nbd_size(uri) == 8 * MiB
    qemu_io(uri, "read -P 0xab 0 1M", "write -P 0x5c 1M 64k", "read -P 0x5c 1M 64k")

    stats = json.loads(tap_ctl("stats", "-p", pid, "-m", 0).stdout)
    assert stats["name"] == params
    assert stats["secs"][0] >= 2048 + 128 and stats["secs"][1] >= 128
    assert stats["reqs_outstanding"] == 0 and stats["images"]

    tap_ctl("pause", "-p", pid, "-m", 0)
    assert list_lines() == ["pid=%d minor=0 state=0x2a args=%s" % (pid, params)]
    tap_ctl("unpause", "-p", pid, "-m", 0)
    assert list_lines() == ["pid=%d minor=0 state=0 args=%s" % (pid, params)]
    qemu_io(uri, "read -P 0xab 0 1M")

    tap_ctl("destroy", "-p", pid, "-m", 0)
    assert list_lines() == []
    assert minors.allocated() == []
    assert wait_for(lambda: not tapdisks_under(smtap_root))
    assert os.listdir(settings.runtime_dir()) == ["tapdisk"]   # no socket left behind


def test_step_by_step(smtap_root):
    img = image_file(smtap_root / "disk.img", 4 * MiB)
    device = tap_ctl("allocate").stdout.strip()
    minor = int(device.rsplit("-", 1)[1])
    assert device == minors.marker(minor)
    pid = int(tap_ctl("spawn").stdout)
    assert sorted(list_lines()) == sorted(["pid=%d" % pid, "minor=%d" % minor])
    tap_ctl("attach", "-p", pid, "-m", minor)
    assert list_lines() == ["pid=%d minor=%d state=0x2" % (pid, minor)]
    # While attached the minor is held: it cannot be freed.
    proc = tap_ctl("free", "-m", minor, check=False)
    assert proc.returncode != 0 and len(proc.stderr.splitlines()) == 1
    assert "in use" in proc.stderr
    tap_ctl("open", "-p", pid, "-m", minor, "-a", "ram:" + img)
    assert list_lines() == ["pid=%d minor=%d state=0 args=ram:%s" % (pid, minor, img)]
    assert nbd_size(nbd_uri(names.nbd_path(pid, minor))) == 4 * MiB
    info = control.Client(pid).disk_info(minor)
    assert info == {"sectors": 8192, "sector_size": 512, "info": 0}
    # Detaching an open minor is refused; closing first works.
    proc = tap_ctl("detach", "-p", pid, "-m", minor, check=False)
    assert proc.returncode != 0 and "close it first" in proc.stderr
    tap_ctl("close", "-p", pid, "-m", minor)
    assert list_lines() == ["pid=%d minor=%d state=0x2" % (pid, minor)]
    tap_ctl("detach", "-p", pid, "-m", minor)
    # The last detach ends the process.
    assert wait_for(lambda: not os.path.exists(control.ctl_path(pid)))
    assert list_lines() == ["minor=%d" % minor]
    tap_ctl("free", "-m", minor)
    assert list_lines() == [] and not os.path.exists(device)


def test_close_force_and_reopen(smtap_root):
    img = image_file(smtap_root / "disk.img", 4 * MiB)
    tap_ctl("create", "-a", "ram:" + img)
    pid = pid_of(0)
    tap_ctl("close", "-p", pid, "-m", 0, "-f")
    assert list_lines() == ["pid=%d minor=0 state=0x2" % pid]
    # -e (no parent to share in a one-VBD process: the chain is opened), -D, -t pass.
    tap_ctl("open", "-p", pid, "-m", 0, "-a", "ram:" + img, "-R", "-e", 7, "-D", "-t", 30)
    info = json.loads(run("nbdinfo", "--no-content", "--json",
                          nbd_uri(names.nbd_path(pid, 0))).stdout)
    assert info["exports"][0]["is_read_only"] is True
    tap_ctl("destroy", "-p", pid, "-m", 0, "-t", 10)
    assert list_lines() == []


def test_create_with_devname_links_the_marker(smtap_root):
    img = image_file(smtap_root / "disk.img", MiB)
    dev = str(smtap_root / "td-a")
    assert tap_ctl("create", "-a", "ram:" + img, "-d", dev).stdout.strip() == dev
    assert os.readlink(dev) == minors.marker(0)
    tap_ctl("destroy", "-p", pid_of(0), "-m", 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_export_name_and_tcp_listener(smtap_root):
    img = image_file(smtap_root / "disk.img", 2 * MiB, b"\x11")
    port = free_port()
    tap_ctl("create", "-a", "ram:" + img, "-n", "vdi-uuid", "-L", "127.0.0.1:%d" % port)
    pid = pid_of(0)
    qemu_io("nbd://127.0.0.1:%d/vdi-uuid" % port, "read -P 0x11 0 64k")
    qemu_io(nbd_uri(names.nbd_path(pid, 0), "vdi-uuid"), "read -P 0x11 0 64k")
    wrong = qemu_io("nbd://127.0.0.1:%d/other" % port, "read 0 512", check=False)
    assert wrong.returncode != 0
    stats = json.loads(tap_ctl("stats", "-p", pid, "-m", 0).stdout)
    assert stats["nbd"]["tcp"][1] == port
    tap_ctl("destroy", "-p", pid, "-m", 0)


@pytest.mark.parametrize("args,reason", [
    (["-a", "ram:/nonexistent/disk.img"], "No such file"),
    (["-a", "bogus:/x"], "unknown disk type"),
    (["-a", "ram:%(img)s", "-2", "ram:%(img)s"], "secondary"),
    (["-a", "ram:%(img)s", "-C", "/tmp/cbt.log"], "changed-block tracking"),
    (["-a", "ram:%(img)s", "-L", "notaport"], "TCP address"),
])
def test_failed_create_leaves_nothing_behind(smtap_root, args, reason):
    img = image_file(smtap_root / "disk.img", MiB)
    args = [a % {"img": img} for a in args]
    proc = tap_ctl("create", *args, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and reason in proc.stderr, proc.stderr
    assert list_lines() == [] and minors.allocated() == []
    assert wait_for(lambda: not tapdisks_under(smtap_root))


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["create"], ["create", "-a", "nocolon"], ["create", "-Z"],
    ["create", "-a", "ram:/x", "-t", "soon"], ["create", "-a", "ram:/x", "extra"],
    ["destroy", "-p", "1"], ["destroy", "-m", "0"], ["free"], ["free", "-m", "x"],
    ["free", "-m", "-3"], ["list", "-z"], ["attach", "-p", "abc", "-m", "0"],
    ["open", "-p", "1", "-m", "0"], ["unpause", "-p", "1", "-m", "0", "-a", "x"],
    ["stats", "-p", "1"], ["close", "-m", "1"], ["pause"],
])
def test_bad_arguments_print_usage(smtap_root, args):
    proc = tap_ctl(*args, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "usage" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args,reason", [
    (["destroy", "-p", "999999", "-m", "0"], "cannot reach tapdisk 999999"),
    (["pause", "-p", "999999", "-m", "0"], "cannot reach tapdisk"),
    (["free", "-m", "7"], "not allocated"),
    (["stats", "-p", "999999", "-m", "3"], "cannot reach tapdisk"),
])
def test_operational_failures_are_one_line(smtap_root, args, reason):
    proc = tap_ctl(*args, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and reason in proc.stderr


def test_help(smtap_root):
    proc = tap_ctl("create", "-h")
    assert proc.stdout.startswith("usage: tap-ctl create") and "-L" in proc.stdout
    assert "-n" in proc.stdout


def test_concurrent_creates_never_collide(smtap_root):
    imgs = [image_file(smtap_root / ("d%d.img" % i), MiB) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        procs = list(pool.map(lambda img: tap_ctl("create", "-a", "ram:" + img), imgs))
    devices = sorted(p.stdout.strip() for p in procs)
    assert devices == sorted(minors.marker(m) for m in range(6))
    lines = list_lines()
    assert len(lines) == 6
    found = {}
    for line in lines:
        m = re.match(r"pid=(\d+) minor=(\d) state=0 args=ram:(.*)$", line)
        assert m, line
        found[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    assert sorted(found) == sorted(imgs)
    assert len({pid for pid, _ in found.values()}) == 6
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda pm: tap_ctl("destroy", "-p", pm[0], "-m", pm[1]),
                      found.values()))
    assert list_lines() == [] and minors.allocated() == []


def test_killed_tapdisk_is_not_listed_and_its_minor_is_freed(smtap_root):
    a = image_file(smtap_root / "a.img", MiB, b"\x0a")
    b = image_file(smtap_root / "b.img", MiB, b"\x0b")
    tap_ctl("create", "-a", "ram:" + a)
    tap_ctl("create", "-a", "ram:" + b)
    victim, survivor = pid_of(0), pid_of(1)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: "minor=0" in list_lines())
    lines = list_lines()
    assert "minor=0" in lines                       # an orphan minor, no pid
    assert not any("pid=%d" % victim in line for line in lines)
    assert "pid=%d minor=1 state=0 args=ram:%s" % (survivor, b) in lines
    assert tap_ctl("list", "-p", victim).stdout == ""
    # The survivor's minor is still held; the victim's can be reclaimed.
    assert tap_ctl("free", "-m", 1, check=False).returncode != 0
    tap_ctl("free", "-m", 0)
    assert list_lines() == ["pid=%d minor=1 state=0 args=ram:%s" % (survivor, b)]
    qemu_io(nbd_uri(names.nbd_path(survivor, 1)), "read -P 0x0b 0 64k")
    # A new VBD reuses the reclaimed minor.
    assert tap_ctl("create", "-a", "ram:" + a).stdout.strip() == minors.marker(0)
    tap_ctl("destroy", "-p", pid_of(0), "-m", 0)
    tap_ctl("destroy", "-p", survivor, "-m", 1)
    assert list_lines() == []


def test_list_filters(smtap_root):
    a = image_file(smtap_root / "a.img", MiB)
    b = image_file(smtap_root / "b.img", MiB)
    tap_ctl("create", "-a", "ram:" + a)
    tap_ctl("create", "-a", "null:" + b + "?size=1048576")
    pa, pb = pid_of(0), pid_of(1)
    assert tap_ctl("list", "-m", 1).stdout.splitlines() == [
        "pid=%d minor=1 state=0 args=null:%s" % (pb, b)]       # the image, not its options
    assert tap_ctl("list", "-t", "ram").stdout.splitlines() == [
        "pid=%d minor=0 state=0 args=ram:%s" % (pa, a)]
    assert tap_ctl("list", "-f", a).stdout.splitlines() == [
        "pid=%d minor=0 state=0 args=ram:%s" % (pa, a)]
    assert tap_ctl("list", "-p", pb).stdout.splitlines() == [
        "pid=%d minor=1 state=0 args=null:%s" % (pb, b)]
    assert tap_ctl("list", "-f", b).stdout.splitlines() == [
        "pid=%d minor=1 state=0 args=null:%s" % (pb, b)]
    assert tap_ctl("list", "-t", "vhd").stdout == ""
    stats = control.Client(pa).stats()
    assert [s["name"] for s in stats] == ["ram:" + a]
