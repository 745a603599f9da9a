"""The suite's own rules (README "Tests"), checked with pytest itself: a hung test fails
alone, an undeclared marker is refused, and the fast tier (tests/unit) runs as an
unprivileged user from a copy of the checkout without a build."""
import configparser
import os
import re
import shutil
import sys
import tempfile

import pytest

from lib.checkout import TOP, VENV_PYTHON
from lib.procs import run

INI = os.path.join(TOP, "pytest.ini")


def pytest_in(directory, files, *args):
    """pytest (the venv's) with this checkout's pytest.ini on files written to directory."""
    for name, text in files.items():
        with open(os.path.join(str(directory), name), "w") as f:
            f.write(text)
    return run(VENV_PYTHON, "-m", "pytest", "-c", INI, "--rootdir", directory,
               "-p", "no:cacheprovider", *(list(args) + [directory]), check=False, timeout=120)


def test_every_test_has_the_default_timeout_and_a_hung_one_fails_alone(tmp_path):
    ini = configparser.ConfigParser()
    ini.read(INI)
    assert ini["pytest"]["timeout"] == "300"
    with open(os.path.join(TOP, "README.md")) as f:
        assert "fails on its own after 300 s" in f.read()
    # The same configuration with a short default: the hung test fails, the next passes.
    out = pytest_in(tmp_path, {"test_hang.py": "import time\n\n\ndef test_hangs():\n"
                                               "    time.sleep(600)\n\n\ndef test_next():\n"
                                               "    pass\n"}, "-o", "timeout=2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"\b1 failed, 1 passed\b", out.stdout), out.stdout
    assert "Timeout" in out.stdout


def test_an_undeclared_marker_is_refused(tmp_path):
    out = pytest_in(tmp_path, {"test_marks.py": "import pytest\n\n\n@pytest.mark.rpm\n"
                                                "def test_declared():\n    pass\n\n\n"
                                                "@pytest.mark.slowly\ndef test_typo():\n"
                                                "    pass\n"})
    assert out.returncode != 0
    assert "'slowly' not found in `markers` configuration option" in out.stdout + out.stderr


def _copy_ignoring(*patterns):
    return shutil.ignore_patterns("__pycache__", "*.pyc", *patterns)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as nobody")
def test_the_unit_tier_runs_as_nobody_without_a_build():
    """A copy of the checkout with no .venv, no libsmtap-aio.so, nothing the build makes,
    readable by nobody; the system's python3 with pytest beside it; as nobody."""
    work = tempfile.mkdtemp(prefix="smtap-unit-")
    try:
        os.chmod(work, 0o755)
        copy = os.path.join(work, "checkout")
        shutil.copytree(TOP, copy, ignore=_copy_ignoring(
            ".git", ".venv", ".venv36", "rpmbuild", "build", "_aio_build", "*.so", "*.so.*",
            ".pytest_cache", ".hypothesis"))
        site = os.path.join(work, "site")
        venv_site = [p for p in sys.path if p.startswith(os.path.join(TOP, ".venv"))
                     and p.endswith("site-packages")]
        shutil.copytree(venv_site[0], site, ignore=shutil.ignore_patterns(     # byte-code kept
            "pip", "pip-*", "setuptools", "setuptools-*", "pkg_resources", "_distutils_hack",
            "*.pth"))
        assert not [f for f in os.listdir(os.path.join(copy, "tapdisk")) if ".so" in f]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": site, "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": work}
        out = run(shutil.which("runuser"), "-u", "nobody", "--", "/usr/bin/python3", "-m", "pytest", "-q",
                  "-p", "no:cacheprovider", "tests/unit", check=False, cwd=copy, env=env,
                  timeout=120)
        summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert re.search(r"^\d+ passed", summary) and "error" not in summary, summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
