"""smtap-sm-plugins (run by the RPM's %post): the drop-in keeps the host's whole list.

XAPI reads xapi.conf then xapi.conf.d/*.conf in name order; a later sm-plugins
replaces the earlier one. Each case: a host config, --write, then what XAPI would end
up with (the effective list over every file, ours included).
"""
import os

import pytest

from installlib import STOCK_SM_PLUGINS, TOP, VPY, host_env, make_install, read_sm_plugins, run


@pytest.fixture
def host(tmp_path):
    """An installed tree (the host root) with a ramSR launcher and an upstream-like
    FileSR that is not ours."""
    root = make_install(tmp_path / "host", target="install-host")
    smdir = os.path.join(root, "opt/xensource/sm")
    with open(os.path.join(TOP, "bin", "launcher.in")) as f:
        launcher = f.read()
    with open(os.path.join(smdir, "ramSR"), "w") as f:
        f.write(launcher)
    with open(os.path.join(smdir, "FileSR"), "w") as f:
        f.write("#!/usr/bin/python3\nimport SR\n")
    os.remove(os.path.join(root, "etc/xapi.conf.d/smtap.conf"))
    return root


def helper(root, *args, check=True):
    return run([VPY, os.path.join(root, "opt/smtap/bin/smtap-sm-plugins")] + list(args),
               env=host_env(root), check=check)


def conf(root, name, text):
    path = os.path.join(root, "etc", name)
    with open(path, "w") as f:
        f.write(text)


def dropin(root):
    return read_sm_plugins(os.path.join(root, "etc/xapi.conf.d/smtap.conf"))


def test_stock_host(host):
    conf(host, "xapi.conf", "# xapi.conf\ninventory = /etc/xensource-inventory\n"
         "sm-plugins=%s\nsm-dir = /opt/xensource/sm\n" % " ".join(STOCK_SM_PLUGINS))
    helper(host, "--write")
    assert dropin(host) == STOCK_SM_PLUGINS + ["ram"]
    assert helper(host).stdout.split() == STOCK_SM_PLUGINS + ["ram"]
    assert helper(host, "--check").returncode == 0


def test_site_list_is_kept_and_write_is_idempotent(host):
    conf(host, "xapi.conf", "sm-plugins = ext nfs  # site: only these\n")
    conf(host, "xapi.conf.d/10-site.conf", "sm-plugins = ext lvm iso\n")
    helper(host, "--write")
    helper(host, "--write")
    assert dropin(host) == ["ext", "lvm", "iso", "ram"]


def test_wildcard(host):
    conf(host, "xapi.conf", "sm-plugins = *\n")
    helper(host, "--write")
    assert dropin(host) == ["*", "ram"]


def test_no_assignment_means_stock(host):
    helper(host, "--write")
    assert dropin(host) == STOCK_SM_PLUGINS + ["ram"]


def test_check_reports_a_later_dropin_that_drops_ours(host):
    conf(host, "xapi.conf", "sm-plugins = ext\n")
    helper(host, "--write")
    assert helper(host, "--check").returncode == 0
    conf(host, "xapi.conf.d/zz-site.conf", "sm-plugins = ext nfs\n")
    out = helper(host, "--check", check=False)
    assert out.returncode == 1 and "ram" in out.stderr
    assert helper(host).stdout.split() == ["ext", "nfs"]
    # A file not named *.conf is not read.
    os.rename(os.path.join(host, "etc/xapi.conf.d/zz-site.conf"),
              os.path.join(host, "etc/xapi.conf.d/zz-site.conf.rpmsave"))
    assert helper(host, "--check").returncode == 0
