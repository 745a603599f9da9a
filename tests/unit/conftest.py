"""The fast tier: no root, no daemons, no build (README "Tests"); also what the RPM's
%check runs, with dom0's Python 3.6, against the installed library."""
import pytest


@pytest.fixture(autouse=True)
def unit_root(tmp_path_factory, monkeypatch):
    """SMTAP_ROOT: a fresh empty directory, so that no settings path is the machine's."""
    root = tmp_path_factory.mktemp("root")
    monkeypatch.setenv("SMTAP_ROOT", str(root))
    return root
