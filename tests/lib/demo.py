"""`make demo`'s module run as a user runs it (a root of its own, no SMTAP_ROOT), and its
output read back step by step."""
import os
import re

from lib.checkout import TOP, VENV_PYTHON
from lib.procs import run

STEP = re.compile(r"^\[ *\d+\.\d{3} s\] (?P<what>.+) \.\.\. (?P<status>ok|FAILED)(?: -> .*)?$")


def run_demo(*args, timeout=300):
    """(the finished process, the root it said it used)."""
    env = {k: v for k, v in os.environ.items() if k != "SMTAP_ROOT"}
    proc = run(VENV_PYTHON, "-m", "smtap.toolstack.demo", *args, check=False, cwd=TOP, env=env,
               timeout=timeout)
    m = re.match(r"smtap demo: .+ on the local toolstack, root (\S+)\n", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return proc, m.group(1)


def steps(output):
    """[(what, "ok" or "FAILED")] of the demo's step lines."""
    return [(m.group("what"), m.group("status")) for m in map(STEP.match, output.splitlines())
            if m]
