"""Log lines a remote party can trigger, at most one per reason per interval.

A publisher sending junk or a client sending bad requests must not be able to fill the
journal: the first occurrence of a reason is logged at once, later ones within `interval`
seconds are only counted, and the next line logged for that reason says how many were
suppressed meanwhile. The table of reasons is bounded; reasons are meant to be a small fixed
vocabulary (never request contents).
"""

import logging
import time

MAX_REASONS = 256


class RateLimitedLog:
    """`log(level, reason, fmt, *args)` logs through `logger` unless `reason` was logged less
    than `interval` seconds ago."""

    def __init__(self, logger, interval=60.0, clock=time.monotonic):
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last = {}        # reason -> monotonic time of its last line
        self._suppressed = {}  # reason -> lines not logged since then

    def log(self, level, reason, fmt, *args, exc_info=None):
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        if last is None and len(self._last) >= MAX_REASONS:
            self._forget_oldest()
        suppressed = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        if suppressed:
            fmt += " (%d more like this in the last %.0f s)"
            args += (suppressed, now - last)
        self._logger.log(level, fmt, *args, exc_info=exc_info)
        return True

    def warning(self, reason, fmt, *args, **kwargs):
        return self.log(logging.WARNING, reason, fmt, *args, **kwargs)

    def error(self, reason, fmt, *args, **kwargs):
        return self.log(logging.ERROR, reason, fmt, *args, **kwargs)

    def _forget_oldest(self):
        oldest = min(self._last, key=self._last.get)
        del self._last[oldest]
        self._suppressed.pop(oldest, None)
