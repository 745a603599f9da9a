"""dom0 runs Python 3.6: everything that ships to it must stay compatible."""
import os
import subprocess

from conftest import TOP, VENV_BIN


def test_dom0_code_is_python36_compatible():
    dirs = [d for d in ("sm", "tapdisk", "plugins", "smtap") if os.path.isdir(os.path.join(TOP, d))]
    out = subprocess.run(
        [os.path.join(VENV_BIN, "vermin"), "--target=3.6-", "--no-tips", "--violations"] + dirs,
        cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert out.returncode == 0, out.stdout
