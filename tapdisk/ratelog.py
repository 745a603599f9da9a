"""Log lines a client can trigger at will (refusals, accept failures), at a bounded rate:
at most one per interval per RateLog; those held back are counted into the next one."""
import threading
import time


class RateLog(object):
    def __init__(self, logger, interval=10.0):
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def warning(self, fmt, *args):
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._held += 1
                return
            held, self._held = self._held, 0
            self._next = now + self.interval
        if held:
            fmt += " (and %d more since the last such message)" % held
        self.logger.warning(fmt, *args)
