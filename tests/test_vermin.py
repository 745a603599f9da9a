"""dom0 runs Python 3.6: everything that ships to it must stay compatible."""
import os

from lib.checkout import TOP, VENV_BIN
from lib.procs import run


def test_dom0_code_is_python36_compatible():
    dirs = [d for d in ("sm", "tapdisk", "plugins", "smtap", "formats") if os.path.isdir(os.path.join(TOP, d))]
    out = run([os.path.join(VENV_BIN, "vermin"), "--target=3.6-", "--no-tips", "--violations"]
              + dirs, cwd=TOP, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
