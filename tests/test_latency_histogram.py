"""The core's LatencyHistogram (kvcm/_histogram.pxi) counts as prometheus_client's Histogram,
the independent reference, counts the same observations."""

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from kvcm._core import LatencyHistogram
from kvcm.metrics import _REQUEST_BUCKETS


def reference(bounds, values):
    histogram = Histogram("h", "h", buckets=bounds, registry=CollectorRegistry())
    for v in values:
        histogram.observe(v)
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.collect()[0].samples}
    return [samples[("h_bucket", le)] for le in [repr(float(b)) for b in bounds] + ["+Inf"]], samples[("h_sum", None)]


@pytest.mark.parametrize("seed", range(5))
def test_buckets_and_sum_are_prometheus_clients(seed):
    rng = random.Random(seed)
    # on every bound, just around it, far beyond the last, zero
    values = [b * f for b in _REQUEST_BUCKETS for f in (1.0, 0.999999, 1.000001)] + [0.0, 5.0, 1e9]
    values += [rng.expovariate(1e3) for _ in range(500)]
    rng.shuffle(values)
    h = LatencyHistogram(_REQUEST_BUCKETS)
    for v in values:
        h.observe(v)
    buckets, total = h.snapshot()
    counts, ref_sum = reference(_REQUEST_BUCKETS, values)
    assert [b for b, _ in buckets] == list(_REQUEST_BUCKETS) + [float("inf")]
    assert [c for _, c in buckets] == counts
    assert total == pytest.approx(ref_sum)


@pytest.mark.parametrize("bounds", [(), (2, 1), (1, 1), (1, float("inf"))])
def test_bounds_must_be_finite_and_ascending(bounds):
    with pytest.raises(ValueError):
        LatencyHistogram(bounds)
