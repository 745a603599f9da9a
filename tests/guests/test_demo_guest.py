"""`make demo`'s guest (python -m smtap.toolstack.demo --guest): a VM of the built-in
template on a ram VDI boots, writes its disk, reads it back, powers off, and the demo
still leaves nothing behind."""
import os

import pytest

from lib.demo import run_demo, steps
from smtap.toolstack import hostroot

pytestmark = pytest.mark.timeout(600)     # a boot may take 20 s on a loaded machine


def test_demo_with_a_guest(can_boot):
    proc, root = run_demo("--guest", timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = steps(proc.stdout)
    assert done and all(status == "ok" for _, status in done), proc.stdout
    names = [what for what, _ in done]
    for expected in ("VM=$(xe vm-install template=smtap-guest", "xe vm-start uuid=$VM",
                     "the guest boots, writes, reads back and powers off",
                     "xe vm-uninstall uuid=$VM --force", "nothing left behind"):
        assert any(expected in n for n in names), (expected, proc.stdout)
    assert "-> sha256 " in proc.stdout and " match" in proc.stdout
    assert not os.path.exists(root)
    assert hostroot.leftovers(root) == []
