"""The driver log (settings.log_file(), upstream /var/log/SMlog); never stdout.

Each line: timestamp, pid, command, short SR and VDI uuids, level, message.
Every module's `logging.getLogger("smtap....")` lands here once setup() ran, so the
engine's client modules log into the same file when a driver calls them.
"""
import logging
import os

from smtap import settings

LOGGER = "smtap"
_log = logging.getLogger(LOGGER + ".sm")
_context = {"command": "-", "sr": "-", "vdi": "-"}


def _short(uuid):
    return uuid[:8] if uuid else "-"


class _ContextFilter(logging.Filter):
    def filter(self, record):
        record.command = _context["command"]
        record.sr = _context["sr"]
        record.vdi = _context["vdi"]
        return True


class _LogFileHandler(logging.Handler):
    """Appends each record to the log file of the current SMTAP_ROOT, creating its dirs."""

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
            path = settings.log_file()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:  # one write per record: lines of processes interleave whole
                f.write(line)
        except Exception:
            self.handleError(record)


def setup():
    """Route the smtap loggers to the log file (idempotent)."""
    root = logging.getLogger(LOGGER)
    if not any(isinstance(h, _LogFileHandler) for h in root.handlers):
        handler = _LogFileHandler()
        handler.addFilter(_ContextFilter())
        handler.setFormatter(logging.Formatter(
            "%(asctime)s [%(process)d] %(command)s sr=%(sr)s vdi=%(vdi)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        root.propagate = False  # nothing may reach a console handler on stdout


def set_context(command=None, sr_uuid=None, vdi_uuid=None):
    """Tag the following lines with the command, SR and VDI being worked on."""
    _context["command"] = command or "-"
    _context["sr"] = _short(sr_uuid)
    _context["vdi"] = _short(vdi_uuid)


debug = _log.debug
info = _log.info
warning = _log.warning
error = _log.error
exception = _log.exception  # error with the current traceback
