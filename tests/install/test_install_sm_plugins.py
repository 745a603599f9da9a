"""smtap-sm-plugins (run by the RPM's %post and triggers): the drop-in keeps the host's
whole list, read as XAPI reads it.

XAPI reads xapi.conf, then every entry of xapi.conf.d (any name, dotfiles too) in byte
order; a later sm-plugins replaces the earlier one; matching quotes around a value are
stripped. Each case: a host config, --write, then what XAPI would end up with.
"""
import os

import pytest

from lib.checkout import TOP, VENV_PYTHON
from lib.install import (LINSTOR_DROPIN, STOCK_SM_PLUGINS, confd, dropin, host_env,
                         make_install, stock_host)
from lib.procs import run


@pytest.fixture
def host(tmp_path):
    """An installed host-profile tree (the host root) with a ramSR launcher and an
    upstream-like FileSR that is not ours; no xapi.conf yet."""
    root = make_install(tmp_path / "host", target="install-host")
    smdir = os.path.join(root, "opt/xensource/sm")
    with open(os.path.join(TOP, "bin", "launcher.in")) as f:
        launcher = f.read()
    with open(os.path.join(smdir, "ramSR"), "w") as f:
        f.write(launcher)
    with open(os.path.join(smdir, "FileSR"), "w") as f:
        f.write("#!/usr/bin/python3\nimport SR\n")
    assert not os.path.exists(os.path.join(root, "etc/xapi.conf.d/smtap.conf"))
    return root


def helper(root, *args, check=True):
    return run([VENV_PYTHON, os.path.join(root, "opt/smtap/bin/smtap-sm-plugins")] + list(args),
               env=host_env(root), check=check)


def conf(root, name, text):
    path = os.path.join(root, "etc", name)
    with open(path, "w") as f:
        f.write(text)


def test_stock_83_host_with_linstor(host):
    """The real 8.3 files: linstor's drop-in (read before ours) is kept, and ours is
    what XAPI ends up with."""
    stock_host(host)
    helper(host, "--write")
    assert dropin(host) == STOCK_SM_PLUGINS + ["linstor", "ram"]
    assert helper(host).stdout.split() == STOCK_SM_PLUGINS + ["linstor", "ram"]
    assert helper(host, "--check").returncode == 0
    assert confd(host) == sorted([LINSTOR_DROPIN[0], "smtap.conf", "ssh-auto-mode.conf",
                                  "tracing.conf"])
    assert not [n for n in os.listdir(os.path.join(host, "etc")) if "tmp" in n]


def test_site_list_is_kept_and_write_is_idempotent(host):
    conf(host, "xapi.conf", "sm-plugins = ext nfs  # site: only these\n")
    conf(host, "xapi.conf.d/10-site.conf", "sm-plugins = ext lvm iso\n")
    helper(host, "--write")
    path = os.path.join(host, "etc/xapi.conf.d/smtap.conf")
    before = os.stat(path)
    helper(host, "--write")
    after = os.stat(path)
    assert dropin(host) == ["ext", "lvm", "iso", "ram"]
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_every_entry_is_read_in_byte_order(host):
    """Not only *.conf: dotfiles, backups, any name; byte order (uppercase first)."""
    conf(host, "xapi.conf", "sm-plugins = ext\n")
    conf(host, "xapi.conf.d/.hidden", "sm-plugins = ext nfs\n")
    conf(host, "xapi.conf.d/Zsite", "sm-plugins = ext nfs lvm\n")    # 'Z' < 'a' < 's'
    conf(host, "xapi.conf.d/a-site.conf.rpmsave", "sm-plugins = ext nfs lvm iso\n")
    helper(host, "--write")
    assert dropin(host) == ["ext", "nfs", "lvm", "iso", "ram"]
    # A file sorting after ours wins over it: --check says so, naming ram.
    conf(host, "xapi.conf.d/smtap.conf.rpmnew", "sm-plugins = ext\n")
    out = helper(host, "--check", check=False)
    assert out.returncode == 1 and "ram" in out.stderr and "smtap.conf.rpmnew" in out.stderr
    assert helper(host).stdout.split() == ["ext"]


def test_quotes_comments_and_spacing_as_xapi_parses_them(host):
    conf(host, "xapi.conf", 'sm-plugins="ext nfs lvm"   # quoted\n'
                            "  other = 'x'\n")
    helper(host, "--write")
    assert dropin(host) == ["ext", "nfs", "lvm", "ram"]
    conf(host, "xapi.conf.d/20-q", "\tsm-plugins =   'iso  udev'\t\n")
    helper(host, "--write")
    assert dropin(host) == ["iso", "udev", "ram"]
    conf(host, "xapi.conf.d/30-q", 'sm-plugins = "ext nfs\n')         # not matching: kept
    helper(host, "--write")
    assert dropin(host) == ['"ext', "nfs", "ram"]
    os.unlink(os.path.join(host, "etc/xapi.conf.d/30-q"))
    conf(host, "xapi.conf.d/40-q", "sm-plugins = EXT Ram\n")           # case-insensitive
    helper(host, "--write")
    assert dropin(host) == ["EXT", "Ram"]
    assert helper(host, "--check").returncode == 0


def test_wildcard(host):
    conf(host, "xapi.conf", "sm-plugins = *\n")
    helper(host, "--write")
    assert dropin(host) == ["*", "ram"]


@pytest.mark.parametrize("case", ["no-xapi-conf", "no-assignment", "unreadable-entry"])
def test_nothing_written_when_the_host_list_cannot_be_computed(host, case):
    """XAPI with no sm-plugins registers no type: a drop-in written then would unregister
    every stock one once xapi.conf comes back. Nothing is written, one line says why,
    and a drop-in already there is left as it was."""
    os.makedirs(os.path.join(host, "etc/xapi.conf.d"), exist_ok=True)
    if case != "no-xapi-conf":
        conf(host, "xapi.conf", "# no sm-plugins here\nother = 1\n")
    if case == "unreadable-entry":
        conf(host, "xapi.conf", "sm-plugins = ext\n")
        os.mkdir(os.path.join(host, "etc/xapi.conf.d/50-dir"))       # XAPI cannot read it
    out = helper(host, "--write", check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "not written" in out.stderr, out.stderr
    assert "smtap.conf" not in confd(host)
    conf(host, "xapi.conf.d/smtap.conf", "sm-plugins = ext ram\n")
    before = open(os.path.join(host, "etc/xapi.conf.d/smtap.conf")).read()
    assert helper(host, "--write", check=False).returncode == 1
    assert open(os.path.join(host, "etc/xapi.conf.d/smtap.conf")).read() == before
    assert not [n for n in confd(host) if n not in ("smtap.conf", "50-dir")]


KILLED_AT_RENAME = r"""
import os, sys
from smtap import xapiconf
def rename(src, dst):
    sys.stdout.write("%s\n%s\n" % (src, dst))
    sys.stdout.flush()
    os.kill(os.getpid(), 9)
os.rename = rename
xapiconf.main(["--write"])
"""


def test_killed_writer_leaves_nothing_xapi_reads(host):
    """kill -9 at the worst moment (the new content complete, not yet renamed): the
    leftover is outside xapi.conf.d, and the next run replaces it."""
    stock_host(host)
    helper(host, "--write")
    before = confd(host), open(os.path.join(host, "etc/xapi.conf.d/smtap.conf")).read()
    conf(host, "xapi.conf.d/A-site.conf", "sm-plugins = ext nfs\n")    # after linstor's
    env = host_env(host, PYTHONPATH=os.path.join(host, "opt/smtap/lib"))
    proc = run(VENV_PYTHON, "-c", KILLED_AT_RENAME, env=env, check=False)
    assert proc.returncode == -9
    tmp, target = proc.stdout.split()
    assert os.path.dirname(tmp) == os.path.join(host, "etc") and os.path.exists(tmp)
    assert target == os.path.join(host, "etc/xapi.conf.d/smtap.conf")
    assert confd(host) == sorted(before[0] + ["A-site.conf"])
    assert open(target).read() == before[1]
    helper(host, "--write")
    assert dropin(host) == ["ext", "nfs", "ram"]
    assert not os.path.exists(tmp)


def test_check_reports_a_later_dropin_that_drops_ours(host):
    conf(host, "xapi.conf", "sm-plugins = ext\n")
    helper(host, "--write")
    assert helper(host, "--check").returncode == 0
    conf(host, "xapi.conf.d/zz-site.conf", "sm-plugins = ext nfs\n")
    out = helper(host, "--check", check=False)
    assert out.returncode == 1 and "ram" in out.stderr
    assert helper(host).stdout.split() == ["ext", "nfs"]


def test_dev_install_simulates_a_stock_host(tmp_path):
    """`make install` (the development profile) gives a root without xapi-core the 8.3
    xapi.conf, and the drop-in from it; an existing xapi.conf is kept."""
    dest = make_install(tmp_path / "d")
    with open(os.path.join(dest, "etc/xapi.conf")) as f:
        assert "sm-plugins=%s\n" % " ".join(STOCK_SM_PLUGINS) in f.read()
    assert dropin(dest)[:len(STOCK_SM_PLUGINS)] == STOCK_SM_PLUGINS
    conf(dest, "xapi.conf", "sm-plugins = ext\n")
    make_install(dest)
    assert open(os.path.join(dest, "etc/xapi.conf")).read() == "sm-plugins = ext\n"
    assert dropin(dest)[0] == "ext" and "ram" in dropin(dest)
