"""`--fake-metrics`: values `/metrics` reports instead of the real ones (llm-d's simulator's
feature, with its JSON keys), so a router's metric-driven logic can be tested against any
load picture without producing that load.

- `running-requests`, `waiting-requests`, `kv-cache-usage`: a number, or a function of time
  written `FUNC:START:END:PERIOD` (`oscillate` a sine between START and END, `ramp` from
  START to END over one period then END, `rampreset` the ramp again every period,
  `squarewave` START for the first half of every period, END for the second), re-evaluated
  every `--fake-metrics-refresh-interval`; the request counts are whole numbers;
- `*-buckets-values` and the token histograms: sample counts per bucket, from the first
  bucket (trailing zeros may be left out); each bucket's samples sit on its upper bound (the
  +Inf bucket's one above the last bound), which gives the histogram's sum;
- `request-success-total`: requests per finish reason; `total-prompt-tokens` and
  `total-generation-tokens` (else the sums of the prompt and generation histograms);
  `prefix-cache-hits` and `prefix-cache-queries` (together); `loras`: the
  `vllm:lora_requests_info` samples, `{"running", "waiting", "timestamp"}` each.

`POST /admin/config` with `{"fake-metrics": {...}}` changes some of them (`merged`): an
absent or null key keeps its value, `[]`/`{}` clears a list or map.
"""

import math

import orjson

from kvcm.sim.durations import duration, format_duration
from kvcm.sim.histograms import LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

FUNCTIONS = ("oscillate", "ramp", "rampreset", "squarewave")
FINISH_REASONS = ("stop", "length", "tool_calls", "remote_decode", "cache_threshold")
GAUGES = ("running-requests", "waiting-requests", "kv-cache-usage")
# bucket-count lists over fixed boundaries, with the boundaries
LATENCY_HISTOGRAMS = {
    "ttft-buckets-values": TTFT_BUCKETS,
    "tpot-buckets-values": TPOT_BUCKETS,
    "request-tpot-buckets-values": TPOT_BUCKETS,
    "e2erl-buckets-values": LATENCY_BUCKETS,
    "queue-time-buckets-values": LATENCY_BUCKETS,
    "inf-time-buckets-values": LATENCY_BUCKETS,
    "prefill-time-buckets-values": LATENCY_BUCKETS,
    "decode-time-buckets-values": LATENCY_BUCKETS,
}
# bucket-count lists over vLLM's 1-2-5 token buckets
TOKEN_HISTOGRAMS = ("request-prompt-tokens", "request-generation-tokens", "request-params-max-tokens",
                    "request-max-generation-tokens")
COUNTERS = ("total-prompt-tokens", "total-generation-tokens", "prefix-cache-hits", "prefix-cache-queries")
KEYS = frozenset(GAUGES + tuple(LATENCY_HISTOGRAMS) + TOKEN_HISTOGRAMS + COUNTERS +
                 ("request-success-total", "loras"))


class Generated:
    """A gauge that follows FUNC:START:END:PERIOD."""

    __slots__ = ("function", "start", "end", "period")

    def __init__(self, text):
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError("expected a number or FUNC:START:END:PERIOD, got %r" % text)
        self.function = parts[0]
        if self.function not in FUNCTIONS:
            raise ValueError("unknown function %r (expected one of %s)" % (self.function, ", ".join(FUNCTIONS)))
        self.start, self.end = float(parts[1]), float(parts[2])
        self.period = duration(parts[3])
        if self.start < 0 or self.end < 0:
            raise ValueError("start and end must not be negative")
        if self.period <= 0:
            raise ValueError("the period must be positive")

    def at(self, t):
        start, end, period = self.start, self.end, self.period
        if self.function == "oscillate":
            return (start + end) / 2 + (end - start) / 2 * math.sin(2 * math.pi * t / period)
        if self.function == "ramp":
            return end if t >= period else start + t / period * (end - start)
        if self.function == "rampreset":
            return start + (t % period) / period * (end - start)
        return start if t % period < period / 2 else end

    def text(self):
        return "%s:%g:%g:%s" % (self.function, self.start, self.end, format_duration(self.period))


def _gauge(key, value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        generated = Generated(value)
        if key == "kv-cache-usage" and not (generated.start <= 1 and generated.end <= 1):
            raise ValueError("kv-cache-usage start and end must be between 0 and 1")
        return generated
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number or FUNC:START:END:PERIOD")
    if value < 0 or (key == "kv-cache-usage" and value > 1):
        raise ValueError("must be %s" % ("between 0 and 1" if key == "kv-cache-usage" else "non-negative"))
    return float(value)


def _counts(value, limit=None):
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError("must be a list of non-negative integers")
    if limit is not None and len(value) > limit:
        raise ValueError("has %d values for %d buckets" % (len(value), limit))
    return tuple(value)


def _count(value):
    if type(value) is not int or value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _success(value):
    if not isinstance(value, dict):
        raise ValueError("must be an object of finish reason: count")
    out = dict.fromkeys(FINISH_REASONS, 0)
    for reason, count in value.items():
        if reason not in FINISH_REASONS:
            raise ValueError("invalid finish reason %r (valid: %s)" % (reason, ", ".join(FINISH_REASONS)))
        out[reason] = _count(count)
    return out


def _loras(value):
    if not isinstance(value, list):
        raise ValueError("must be a list of {running, waiting, timestamp}")
    out = []
    for item in value:
        if isinstance(item, str):         # llm-d's YAML form: one JSON string per entry
            item = orjson.loads(item)
        if not isinstance(item, dict):
            raise ValueError("entries must be objects {running, waiting, timestamp}")
        running, waiting, stamp = item.get("running", ""), item.get("waiting", ""), item.get("timestamp", 0)
        if not isinstance(running, str) or not isinstance(waiting, str) or isinstance(stamp, bool) \
                or not isinstance(stamp, (int, float)):
            raise ValueError("entries must be {running: str, waiting: str, timestamp: number}")
        out.append((running, waiting, float(stamp)))
    return tuple(out)


def _normalize(key, value):
    if key in GAUGES:
        return _gauge(key, value)
    if key in LATENCY_HISTOGRAMS:
        return _counts(value, len(LATENCY_HISTOGRAMS[key]) + 1)
    if key in TOKEN_HISTOGRAMS:
        return _counts(value)
    if key in COUNTERS:
        return _count(value)
    if key == "request-success-total":
        return _success(value)
    return _loras(value)


class FakeMetrics:
    """A validated --fake-metrics value (immutable)."""

    def __init__(self, values):
        if not isinstance(values, dict):
            raise ValueError("--fake-metrics must be a JSON object")
        self._values = {}
        for key, value in values.items():
            if key not in KEYS:
                raise ValueError("--fake-metrics: unknown key %r" % key)
            if value is None:
                continue
            try:
                self._values[key] = _normalize(key, value)
            except (ValueError, TypeError) as exc:
                raise ValueError("--fake-metrics %s: %s" % (key, exc)) from None
        hits, queries = self._values.get("prefix-cache-hits"), self._values.get("prefix-cache-queries")
        if (hits is None) != (queries is None):
            raise ValueError("--fake-metrics: prefix-cache-hits and prefix-cache-queries go together")
        if hits is not None and hits > queries:
            raise ValueError("--fake-metrics: prefix-cache-hits may not exceed prefix-cache-queries")

    def merged(self, partial):
        """A new FakeMetrics: this one with the keys of `partial` that are not null replaced."""
        return FakeMetrics({**self.as_json(), **{k: v for k, v in partial.items() if v is not None}})

    def get(self, key, default=None):
        return self._values.get(key, default)

    def gauge(self, key, elapsed, refresh):
        """A gauge's value `elapsed` seconds after start, as refreshed every `refresh` seconds."""
        value = self._values.get(key, 0.0)
        if isinstance(value, Generated):
            t = math.floor(elapsed / refresh) * refresh if refresh > 0 else elapsed
            value = value.at(t)
            if key != "kv-cache-usage":
                value = float(int(value))
        return value

    def as_json(self):
        out = {}
        for key, value in self._values.items():
            if isinstance(value, Generated):
                value = value.text()
            elif key == "loras":
                value = [{"running": r, "waiting": w, "timestamp": t} for r, w, t in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[key] = value
        return out

    def __eq__(self, other):
        return isinstance(other, FakeMetrics) and self.as_json() == other.as_json()

    def __repr__(self):
        return "FakeMetrics(%r)" % self.as_json()
