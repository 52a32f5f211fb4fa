"""Numbers of `kvcm bench`: latency percentiles and the spread of repeated runs.

Latencies go into an HdrHistogram (values in ns, 3 significant digits, up to 10 minutes),
so p50/p99/p99.9 come from a well-known structure rather than a hand-written sort, and
the whole distribution stays available for the report's plots. Hot loops collect raw
samples into an array and record them afterwards, so recording costs nothing while timed.

A phase that repeats gives one value per run: `Spread` reports their median with the
min–max range and a confidence note, since the machines these run on are noisy.
"""

import statistics

from hdrh.histogram import HdrHistogram

_MAX_NS = 600 * 10 ** 9
PERCENTILES = (50.0, 99.0, 99.9)


class Latency:
    """A latency distribution in ns."""

    def __init__(self, samples=()):
        self.hist = HdrHistogram(1, _MAX_NS, 3)
        self.record(samples)

    def record(self, samples):
        rec = self.hist.record_value
        for v in samples:
            rec(min(max(int(v), 1), _MAX_NS))
        return self

    def merge(self, other):
        self.hist.add(other.hist)
        return self

    @property
    def count(self):
        return self.hist.get_total_count()

    def percentile_us(self, p):
        return self.hist.get_value_at_percentile(p) / 1e3 if self.count else None

    def summary(self):
        """{"count", "p50_us", "p99_us", "p999_us", "mean_us", "max_us"}."""
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "p50_us": self.percentile_us(50), "p99_us": self.percentile_us(99),
                "p999_us": self.percentile_us(99.9), "mean_us": self.hist.get_mean_value() / 1e3,
                "max_us": self.hist.get_max_value() / 1e3}

    def cdf_us(self, points=60):
        """[(latency µs, percentile)] along the distribution (log-spaced in the tail), for plots."""
        if not self.count:
            return []
        out, seen = [], set()
        for i in range(points + 1):
            p = 100 - 100 / 10 ** (3.5 * i / points)     # 0 .. 99.97, dense towards the tail
            v = self.hist.get_value_at_percentile(p)
            if v not in seen:
                seen.add(v)
                out.append((v / 1e3, p))
        return out


class Spread:
    """One value per run of a repeated measurement."""

    def __init__(self, values):
        self.values = [v for v in values if v is not None]

    @property
    def median(self):
        return statistics.median(self.values) if self.values else None

    def note(self):
        """'3 runs, spread ±4% (min–max)', or a warning when one run is all there is."""
        v = self.values
        if not v:
            return "not measured"
        if len(v) == 1:
            return "1 run: no spread known"
        med = statistics.median(v)
        spread = (max(v) - min(v)) / 2 / med * 100 if med else 0.0
        word = "noisy: re-measure on a quiet machine" if spread > 15 else "spread"
        return "%d runs, %s ±%.0f%% (%s–%s)" % (len(v), word, spread, fmt(min(v)), fmt(max(v)))

    def to_json(self):
        return {"median": self.median, "runs": self.values, "note": self.note()}


def fmt(v):
    """A number for people: 3 significant digits, thousands separated."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int) and abs(v) < 1e6:
        return "{:,}".format(v)
    if abs(v) >= 1e6:
        return "%.2f M" % (v / 1e6)
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return "%.1f" % v if abs(v) >= 10 else "%.3g" % v
