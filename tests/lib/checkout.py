"""This checkout: its top directory, version and virtual environments."""
import os

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(TOP, ".venv", "bin")      # make build: launchers, pytest, vermin
VENV_PYTHON = os.path.join(VENV_BIN, "python3")
VENV36 = os.path.join(TOP, ".venv36")              # make py36: dom0's Python 3.6 + XenAPI
PY36 = os.path.join(VENV36, "bin", "python")
with open(os.path.join(TOP, "VERSION")) as _f:
    VERSION = _f.read().strip()
