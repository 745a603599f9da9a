"""The RPM's scriptlets and triggers, run for real by `rpm --root <empty dir>` (on
Python 3.6, as dom0's /usr/bin/python3): the sm-plugins drop-in is computed on the host
from XCP-ng 8.3's files, rewritten when xapi-core or xcp-ng-linstor come, change or go,
never written when it cannot be computed, and removed with the package.

xapi-core and xcp-ng-linstor are stand-ins built here, carrying the real 8.3 files
(xapi.conf and xapi-core's own drop-ins; LINSTOR's drop-in).
"""
import os

import pytest

from lib.install import (DROPIN, LINSTOR_DROPIN, STOCK_SM_PLUGINS, XAPI_CONF_83,
                         XAPI_CORE_DROPINS, confd, dropin, fake_rpm, py36_prefix, rpm_root,
                         tree)
from lib.runlock import PY36_BUILDS

pytestmark = [pytest.mark.rpm, PY36_BUILDS,
              pytest.mark.skipif(py36_prefix() is None, reason="no Python 3.6 (make py36)")]

# The list before 8.3 added largeblock: what an xapi-core update changes.
OLDER = [t for t in STOCK_SM_PLUGINS if t != "largeblock"]


@pytest.fixture(scope="session")
def fakes(tmp_path_factory):
    top = tmp_path_factory.mktemp("fake-rpms")
    core = dict(("/etc/xapi.conf.d/" + n, t) for n, t in XAPI_CORE_DROPINS)
    return {
        "xapi-core-1": fake_rpm(top, "xapi-core", "1", dict(core, **{
            "/etc/xapi.conf": XAPI_CONF_83.replace(" ".join(STOCK_SM_PLUGINS),
                                                   " ".join(OLDER))})),
        "xapi-core-2": fake_rpm(top, "xapi-core", "2", dict(core, **{
            "/etc/xapi.conf": XAPI_CONF_83})),
        "linstor": fake_rpm(top, "xcp-ng-linstor", "1", {
            "/etc/xapi.conf.d/" + LINSTOR_DROPIN[0]: LINSTOR_DROPIN[1]}),
    }


def test_drop_in_follows_xapi_core_and_linstor(built_rpm, fakes, tmp_path):
    root = tmp_path / "root"
    rpm_root(root, "-i", "--nodeps", fakes["xapi-core-1"])
    out = rpm_root(root, "-i", "--nodeps", built_rpm)
    assert dropin(root) == OLDER + ["ram"], out.stdout + out.stderr
    assert "restart the toolstack" in out.stdout and "warning" not in out.stdout + out.stderr
    assert confd(root) == sorted(["smtap.conf", "ssh-auto-mode.conf", "tracing.conf"])
    # Owned, not carried: rpm lists it, rpm -V (contents) does not judge it.
    files = rpm_root(root, "-ql", "smtap").stdout.split()
    assert DROPIN in files
    assert rpm_root(root, "-q", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", "smtap") \
        .stdout.count(DROPIN + " g") == 1
    rpm_root(root, "-V", "--nodeps", "smtap")

    # xapi-core updated (8.3 adds largeblock): the trigger rewrites ours from it.
    out = rpm_root(root, "-U", "--nodeps", fakes["xapi-core-2"])
    assert dropin(root) == STOCK_SM_PLUGINS + ["ram"], out.stdout + out.stderr

    # LINSTOR's drop-in (read before ours) repeats the whole list, adds linstor.
    out = rpm_root(root, "-i", "--nodeps", fakes["linstor"])
    assert dropin(root) == STOCK_SM_PLUGINS + ["linstor", "ram"], out.stdout + out.stderr
    out = rpm_root(root, "-e", "--nodeps", "xcp-ng-linstor")
    assert dropin(root) == STOCK_SM_PLUGINS + ["ram"], out.stdout + out.stderr

    # Removed with the package; nothing of ours left in the host's directories.
    before = tree(root)
    out = rpm_root(root, "-e", "--nodeps", "smtap")
    assert "xe-toolstack-restart" in out.stdout
    assert dropin(root) is None and confd(root) == ["ssh-auto-mode.conf", "tracing.conf"]
    left = tree(root)
    assert not [p for p in left if "smtap" in p], sorted(p for p in left if "smtap" in p)
    assert left <= before


def test_nothing_written_when_it_cannot_be_computed(built_rpm, fakes, tmp_path):
    """The scriptlet's computation fails on purpose (no xapi-core: no xapi.conf): the
    install goes on, says why, writes nothing; xapi-core arriving fires the trigger."""
    root = tmp_path / "root"
    out = rpm_root(root, "-i", "--nodeps", built_rpm)
    assert dropin(root) is None
    assert "smtap.conf not written" in out.stderr and "warning" in out.stdout, \
        out.stdout + out.stderr
    assert os.listdir(os.path.join(str(root), "etc/xapi.conf.d")) == []
    assert not [n for n in os.listdir(os.path.join(str(root), "etc")) if "smtap" in n]
    rpm_root(root, "-q", "smtap")
    out = rpm_root(root, "-i", "--nodeps", fakes["xapi-core-2"])
    assert dropin(root) == STOCK_SM_PLUGINS + ["ram"], out.stdout + out.stderr
