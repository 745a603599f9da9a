"""dom0 runs Python 3.6: everything that ships to it must stay compatible."""
import os
import subprocess

# Not `from conftest import ...`: every tests/*/conftest.py is also named conftest, and
# whichever pytest loaded last is the one in sys.modules.
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(TOP, ".venv", "bin")


def test_dom0_code_is_python36_compatible():
    dirs = [d for d in ("sm", "tapdisk", "plugins", "smtap", "formats") if os.path.isdir(os.path.join(TOP, d))]
    out = subprocess.run(
        [os.path.join(VENV_BIN, "vermin"), "--target=3.6-", "--no-tips", "--violations"] + dirs,
        cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert out.returncode == 0, out.stdout
