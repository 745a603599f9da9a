"""Tests that need the machine to themselves while `make test` runs the suite on
pytest-xdist workers: every test holds the run's lock shared, a test marked `alone`
(pytest.ini) holds it exclusively, so the other workers wait between two of their tests.
A run without workers takes no lock (nothing runs beside a test).
Tests that must not run at the same time as each other, but may beside others, share
an xdist_group (make test's --dist loadgroup: one worker runs a group in turn)."""
import contextlib
import fcntl
import os

import pytest

# Guests under TCG (a boot takes a core): one at a time; the demo's --guest too.
GUEST_BOOTS = pytest.mark.xdist_group("guests")
# make py36 (it makes .venv36 when missing) and make rpm: once per run, not per worker.
PY36_BUILDS = pytest.mark.xdist_group("py36")


def lock_path(config, basetemp):
    """The run's lock file, beside the workers' own base directories (a worker's basetemp
    is <run's>/<worker id>), removed with them; None but in a worker (a pytest run by a
    test inherits the environment, not this)."""
    if not hasattr(config, "workerinput"):
        return None
    return os.path.join(os.path.dirname(str(basetemp)), "alone.lock")


@contextlib.contextmanager
def held(path, exclusive):
    if path is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)                    # and the lock with it
