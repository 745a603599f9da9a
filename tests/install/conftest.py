"""Fixtures of the install / RPM tests (helpers: tests/lib/install.py; their marker, rpm,
is declared in pytest.ini)."""
import pytest

from lib.checkout import VENV_PYTHON
from lib.install import build_rpm


@pytest.fixture(scope="session")
def built_rpm(tmp_path_factory):
    """`make rpm` once per session into its own rpmbuild top dir: the binary RPM's path."""
    return build_rpm(tmp_path_factory.mktemp("rpmbuild"))


@pytest.fixture(scope="session")
def built_rpm_local_python(tmp_path_factory):
    """The same RPM with the launchers' shebang on the venv's python3 instead of dom0's
    /usr/bin/python3 (this Debian machine's has no lxml/XenAPI): for running the
    installed drivers the way a toolstack does, by executing them."""
    return build_rpm(tmp_path_factory.mktemp("rpmbuild"), "RPM_PYTHON=%s" % VENV_PYTHON)
