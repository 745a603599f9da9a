"""The engine's log file (settings.tapdisk_log_file()), shared by every tapdisk, kept
across rotation.

logrotate renames the file away; at its next record each tapdisk sees that the path no
longer names the file it has open (WatchedFileHandler) and reopens the path, moving its
stderr (where an unhandled thread traceback goes) along with it. So no copytruncate (it
loses what is written between the copy and the truncation) and no signal to send.
"""
import logging
import os
from logging.handlers import WatchedFileHandler


class _Handler(WatchedFileHandler):
    def _open(self):
        stream = WatchedFileHandler._open(self)
        os.dup2(stream.fileno(), 2)
        return stream


def handler(path, fmt):
    """A handler appending to path (made with its directory), stderr following it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = _Handler(path)
    h.setFormatter(logging.Formatter(fmt))
    return h
