"""Durations as llm-d's simulator writes them: Go's `time.Duration` text (`10ms`, `1.5s`,
`250us`, `1m30s`), or a bare number of milliseconds (its older integer form)."""

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_BARE_NUMBER = re.compile(r"^[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?$")


def duration(text):
    """The text as seconds (a float >= 0); ValueError when it is not a duration."""
    text = text.strip()
    if _BARE_NUMBER.match(text):
        return float(text) * 1e-3
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError("not a duration: %r (write e.g. 10ms, 1.5s, 250us)" % text)
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def format_duration(seconds):
    """Seconds written as Go writes a time.Duration: `0s`, `250µs`, `100ms`, `1.5s`."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return "%g%s" % (round(seconds / scale, 9), unit)
    return "%gns" % round(seconds * 1e9, 3)
