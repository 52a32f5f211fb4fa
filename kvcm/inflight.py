"""A bound on the tokenizing work in flight, and giving its memory back afterwards.

Tokenizing is the one request path whose memory grows with the request: the `tokenizers`
library needs about 80 bytes per character of prompt while it encodes (offsets, alignments,
token strings), so four concurrent 8 MB prompts take 2.5 GB. InflightLimit admits work by
count and by characters; what does not fit is refused at once (the API answers 503 with
Retry-After) rather than queued, so a burst of huge prompts cannot hold memory or delay the
requests behind it. A request alone is always admitted, whatever its size: the body limit
bounds it.

glibc keeps freed memory in its arenas (one per thread that allocated), so after large work
the process would stay at its peak. When a large admission ends and no other large one is in
flight, the heap is trimmed (malloc_trim) a moment later, off the event loop, once the
response built from it has been sent and freed too.
"""

import asyncio
import ctypes
import threading

__all__ = ["Busy", "InflightLimit", "trim_heap"]

TRIM_AFTER = 1 << 20     # characters: admissions at least this large trim the heap when done
TRIM_DELAY = 1.0         # seconds after such an admission ends (its response is sent by then)


class Busy(Exception):
    """The work would go over the in-flight bound; try again shortly."""


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None      # not glibc


_trim = _malloc_trim()


def trim_heap():
    """Returns the free memory of every malloc arena to the OS (glibc); False elsewhere."""
    if _trim is None:
        return False
    _trim(0)
    return True


class InflightLimit:
    """At most `max_requests` admissions and `max_chars` characters at once (thread-safe)."""

    def __init__(self, max_requests, max_chars, *, trim_after=TRIM_AFTER, trim_delay=TRIM_DELAY):
        if max_requests < 1 or max_chars < 1:
            raise ValueError("in-flight limits must be positive")
        self.max_requests = max_requests
        self.max_chars = max_chars
        self.trim_after = trim_after
        self.trim_delay = trim_delay
        self.requests = 0
        self.chars = 0
        self.refused = 0
        self.trims = 0
        self._large = 0          # admissions of at least trim_after characters in flight
        self._trim_timer = None
        self._lock = threading.Lock()

    def admit(self, chars):
        """A Ticket for `chars` characters of work (use it as a context manager), or Busy."""
        with self._lock:
            if self.requests and (self.requests >= self.max_requests or self.chars + chars > self.max_chars):
                self.refused += 1
                raise Busy(self._why(chars))
            self.requests += 1
            self.chars += chars
            if chars >= self.trim_after:
                self._large += 1
        return Ticket(self, chars)

    def _why(self, chars):
        if self.requests >= self.max_requests:
            return "tokenizing is busy: %d requests in flight, the limit is %d" % (self.requests, self.max_requests)
        return ("tokenizing is busy: %d characters in flight, %d more would pass the limit of %d"
                % (self.chars, chars, self.max_chars))

    def _resize(self, ticket, chars):
        with self._lock:
            growth = chars - ticket.chars
            if growth > 0 and self.requests > 1 and self.chars + growth > self.max_chars:
                self.refused += 1
                raise Busy(self._why(growth))
            self.chars += growth
            if ticket.chars < self.trim_after <= chars:
                self._large += 1
            ticket.chars = chars

    def _release(self, ticket):
        with self._lock:
            self.requests -= 1
            self.chars -= ticket.chars
            if ticket.chars < self.trim_after:
                return
            self._large -= 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return           # used outside a loop: nothing to schedule on
        if self._trim_timer is None:
            self._trim_timer = loop.call_later(self.trim_delay, self._trim_soon, loop)

    def _trim_soon(self, loop):
        self._trim_timer = None
        if self._large:
            return           # the last large admission to end schedules the trim
        self.trims += 1
        loop.run_in_executor(None, trim_heap)


class Ticket:
    """Admitted work; grow() when its size turns out larger (a rendered chat prompt)."""

    __slots__ = ("limit", "chars", "_open")

    def __init__(self, limit, chars):
        self.limit = limit
        self.chars = chars
        self._open = True

    def grow(self, chars):
        """Re-sizes the ticket to `chars` when that is more; Busy if it no longer fits."""
        if chars > self.chars:
            self.limit._resize(self, chars)

    def release(self):
        if self._open:
            self._open = False
            self.limit._release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
