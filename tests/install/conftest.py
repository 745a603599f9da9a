"""Fixtures and markers of the install / RPM tests (helpers: tests/lib/install.py)."""
import glob

import pytest

from lib.install import VERSION, VPY, make


def pytest_configure(config):
    config.addinivalue_line("markers", "rpm: builds the RPM with rpmbuild (a few seconds)")


def build_rpm(tmp_path_factory, *variables):
    top = tmp_path_factory.mktemp("rpmbuild")
    out = make("rpm", "RPMTOP=%s" % top, *variables, timeout=120)
    rpms = glob.glob(str(top / "RPMS" / "*" / ("smtap-%s-*.rpm" % VERSION)))
    assert len(rpms) == 1, out.stdout + out.stderr
    return rpms[0]


@pytest.fixture(scope="session")
def built_rpm(tmp_path_factory):
    """`make rpm` once per session into its own rpmbuild top dir: the binary RPM's path."""
    return build_rpm(tmp_path_factory)


@pytest.fixture(scope="session")
def built_rpm_local_python(tmp_path_factory):
    """The same RPM with the launchers' shebang on the venv's python3 instead of dom0's
    /usr/bin/python3 (this Debian machine's has no lxml/XenAPI): for running the
    installed drivers the way a toolstack does, by executing them."""
    return build_rpm(tmp_path_factory, "RPM_PYTHON=%s" % VPY)
