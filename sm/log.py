"""The driver log; never stdout.

In the host profile (the RPM), through syslog as sm's util.SMlog does: facility local2
(dom0's rsyslog writes it to /var/log/SMlog, rotates it, may forward it), one message
per line, tagged "smtap: [pid]". In the dev profile (the checkout, `make install`: the
local toolstack and the tests), appended to settings.log_file() under the root.

Each line: pid, command, short SR and VDI uuids, level, message (and a timestamp in the
file; syslog adds its own). Every module's `logging.getLogger("smtap....")` lands here
once setup() ran, so the engine's client modules log into the same place when a driver
calls them.
"""
import logging
import os
import socket

from smtap import settings

LOGGER = "smtap"
IDENT = "smtap"
FACILITY_LOCAL2 = 18
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
_log = logging.getLogger(LOGGER + ".sm")
_context = {"command": "-", "sr": "-", "vdi": "-"}
_LINE = "[%(process)d] %(command)s sr=%(sr)s vdi=%(vdi)s %(levelname)s %(message)s"


def _short(uuid):
    return uuid[:8] if uuid else "-"


class _ContextFilter(logging.Filter):
    def filter(self, record):
        record.command = _context["command"]
        record.sr = _context["sr"]
        record.vdi = _context["vdi"]
        return True


class _DriverLogHandler(logging.Handler):
    """Each record to syslog or to the log file of the current SMTAP_ROOT (creating its
    directories), wherever settings.log_file() says at the time."""

    def __init__(self):
        logging.Handler.__init__(self)
        self._file_format = logging.Formatter("%(asctime)s " + _LINE)
        self._syslog_format = logging.Formatter(_LINE)
        self._sock = None

    def emit(self, record):
        try:
            path = settings.log_file()
            if path is None:
                self._syslog(record)
                return
            line = self._file_format.format(record) + "\n"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:  # one write per record: lines of processes interleave whole
                f.write(line)
        except Exception:
            self.handleError(record)

    def _syslog(self, record):
        """One datagram per line, as util.SMlog does; lost, as there, if no daemon listens."""
        pri = "<%d>%s: " % (FACILITY_LOCAL2 * 8 + _SEVERITY.get(record.levelno, 6), IDENT)
        text = self._syslog_format.format(record)
        head = text.split("\n", 1)[0]
        prefix = head[:head.index("]") + 1] if head.startswith("[") else ""
        address = settings.syslog_socket()
        for i, line in enumerate(text.split("\n")):
            data = (pri + (line if i == 0 else prefix + " " + line)).encode("utf-8", "replace")
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, address)
            except OSError:
                return


def setup():
    """Route the smtap loggers to the driver log (idempotent)."""
    root = logging.getLogger(LOGGER)
    if not any(isinstance(h, _DriverLogHandler) for h in root.handlers):
        handler = _DriverLogHandler()
        handler.addFilter(_ContextFilter())
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
