"""`make install DESTDIR=...`: the tree as on a host, relocatable, nothing of sm/blktap."""
import os
import shutil

import pytest

from lib.checkout import TOP, VENV_PYTHON
from lib.install import (ALL_SR_TYPES, RPM_SR_TYPES, STOCK_SM_PLUGINS, UPSTREAM_PATHS,
                         driver_info, host_env, make_install, read_sm_plugins, stock_host,
                         tree)
from lib.procs import run

COMMANDS = ["tapdisk", "tap-ctl", "smtap-sm-plugins"]
PLUGINS = sorted(n for n in os.listdir(os.path.join(TOP, "plugins")) if n.startswith("smtap-"))


def test_install_lays_out_the_host_tree(tmp_path):
    dest = make_install(tmp_path / "d")
    paths = tree(dest)
    for f in ("__init__.py", "settings.py", "version.py", "xapiconf.py"):
        assert "/opt/smtap/lib/smtap/" + f in paths
    for layer in ("sm", "tapdisk", "toolstack"):
        if os.path.isdir(os.path.join(TOP, layer)):
            assert "/opt/smtap/lib/smtap/%s/__init__.py" % layer in paths
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    for c in COMMANDS:
        path = os.path.join(dest, "opt/smtap/bin", c)
        assert os.access(path, os.X_OK), c
        with open(path) as f:
            assert f.readline() == "#!%s\n" % VENV_PYTHON
    # One launcher per sm/drivers/<Type>SR.py, and nothing else in the sm dir.
    assert sorted(p for p in paths if p.startswith("/opt/xensource/sm/") and p[-1] != "/") == \
        sorted("/opt/xensource/sm/%sSR" % t for t in ALL_SR_TYPES)
    for t in ALL_SR_TYPES:
        with open(os.path.join(dest, "opt/xensource/sm", t + "SR")) as f:
            text = f.read()
        assert "smtap.sm.drivers.%sSR" % t in text and "@" not in text
    assert sorted(p for p in paths if p.startswith("/etc/xapi.d/plugins/") and p[-1] != "/") == \
        ["/etc/xapi.d/plugins/" + p for p in PLUGINS]
    for p in PLUGINS:
        with open(os.path.join(dest, "etc/xapi.d/plugins", p)) as f:
            assert "@PYTHON@" not in f.read()
    assert "/etc/xapi.conf.d/smtap.conf" in paths
    with open(os.path.join(dest, "etc/logrotate.d/smtap")) as f:
        rotate = f.read()
    assert "/var/log/smtap/*.log {" in rotate and "SMlog" not in rotate
    # Nothing the host's sm or blktap owns, but the dev-only SR types (DummySR, FileSR:
    # the toolstack tests need them; the RPM leaves them out).
    dev_only = set("/opt/xensource/sm/%sSR" % t for t in ALL_SR_TYPES if t not in RPM_SR_TYPES)
    assert set(UPSTREAM_PATHS) & paths <= dev_only


def test_install_is_idempotent(tmp_path):
    dest = tmp_path / "d"
    make_install(dest)
    before = tree(dest)
    make_install(dest)
    assert tree(dest) == before


def test_dropin_keeps_the_stock_types_and_adds_ours(tmp_path):
    dest = make_install(tmp_path / "d")
    value = read_sm_plugins(os.path.join(dest, "etc/xapi.conf.d/smtap.conf"))
    assert value[:len(STOCK_SM_PLUGINS)] == STOCK_SM_PLUGINS
    assert set(t.lower() for t in ALL_SR_TYPES) <= set(value)
    assert len(value) == len(set(value))
    # The helper the RPM's %post runs computes the same list on a host without config.
    out = run([os.path.join(dest, "opt/smtap/bin/smtap-sm-plugins")], env=host_env(dest))
    assert out.stdout.split() == value


def test_host_profile_has_only_new_types_and_no_toolstack(tmp_path):
    dest = make_install(tmp_path / "d", target="install-host")
    paths = tree(dest)
    assert sorted(p for p in paths if p.startswith("/opt/xensource/sm/") and p[-1] != "/") == \
        sorted("/opt/xensource/sm/%sSR" % t for t in RPM_SR_TYPES if t in ALL_SR_TYPES)
    assert not [p for p in paths if p.startswith("/opt/smtap/lib/smtap/toolstack")]
    assert set(os.listdir(os.path.join(dest, "opt/smtap/bin"))) == \
        set(COMMANDS + ["vhd-util", "td-util", "smtap-gc", "qcow2-util"])
    # No xapi.conf, no drop-in: xapi-core owns the one, the RPM computes the other.
    assert not [p for p in paths if p.startswith("/etc/xapi.conf")
                and p != "/etc/xapi.conf.d/"], sorted(paths)
    assert not set(UPSTREAM_PATHS) & paths


def test_a_moved_tree_runs_in_place(tmp_path):
    """Relocatable: move the DESTDIR tree; its launchers still find their library (and
    not the checkout's: a poisoned `smtap` on PYTHONPATH would be found otherwise)."""
    make_install(tmp_path / "a")
    moved = str(tmp_path / "elsewhere" / "b")
    os.makedirs(os.path.dirname(moved))
    shutil.move(str(tmp_path / "a"), moved)
    poison = tmp_path / "poison" / "smtap"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text(
        "import sys\nsys.stderr.write('POISONED smtap imported\\n')\nsys.exit(97)\n")
    root = tmp_path / "root"
    root.mkdir()
    env = host_env(root, PYTHONPATH=str(tmp_path / "poison"))
    out = run([os.path.join(moved, "opt/smtap/bin/tap-ctl"), "list"], env=env)
    assert out.stdout == "" and "POISONED" not in out.stderr
    out = run([os.path.join(moved, "opt/smtap/bin/smtap-sm-plugins")], env=env)
    assert out.stdout.split() == []            # no xapi.conf in root: XAPI registers none
    stock_host(root, linstor=False)
    out = run([os.path.join(moved, "opt/smtap/bin/smtap-sm-plugins")], env=env)
    assert out.stdout.split() == STOCK_SM_PLUGINS
    if not ALL_SR_TYPES:
        pytest.skip("no SR driver in sm/drivers yet")
    launcher = os.path.join(moved, "opt/xensource/sm", ALL_SR_TYPES[0] + "SR")
    info = driver_info(launcher, root, env=env)
    assert info["name"] and info["driver_version"]
