"""The XenAPI classes; importing this package registers them all in objects.CLASSES."""
from smtap.toolstack.classes import (  # noqa: F401
    session, host, vm, sm, sr, pbd, vdi, vbd, task, message, secret)
