"""Format tests: each runs in its own temporary directory (images, journals, raw dumps)."""
import pytest


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(str(tmp_path))
    return tmp_path
