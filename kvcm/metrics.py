"""Prometheus metrics (GET /metrics).

Ingest, index and scoring figures are read from the counters the core, the transport and
the Indexer already keep, at scrape time, so the event path pays nothing for them. Only HTTP
requests and tokenizer calls are observed as they happen, into histograms.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kvcm._core import MAX_PODS, MAX_TIERS, LatencyHistogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Requests are answered in tens of microseconds; tokenizing long prompts takes milliseconds.
_REQUEST_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                    50e-3, 100e-3, 250e-3, 1.0)
_TOKENIZE_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 1.0)

# EventSink counters -> (metric, help, labels) for those that are not drops.
_SINK_COUNTERS = {
    "batches": ("kvcm_ingest_applied_batches_total", "Event batches applied to the index", None),
    "blocks_stored": ("kvcm_ingest_blocks_stored_total", "(block, pod, tier) entries added by events", None),
    "blocks_removed": ("kvcm_ingest_blocks_removed_total", "(block, pod, tier) entries removed by events", None),
    "parity_verified": ("kvcm_hash_parity_verified_total", "BlockStored runs from block 0 whose hashes kvcm recomputed and matched", None),
    "parity_mismatch": ("kvcm_hash_parity_mismatch_total", "BlockStored runs whose hashes did not match kvcm's configuration", None),
    "block_size_decoupled": ("kvcm_hash_block_size_decoupled_total", "Namespaces switched to decoupled mode by a block size mismatch", None),
    "offload_unresolved": ("kvcm_ingest_offload_unresolved_total", "Token-less BlockStored hashes kvcm could not resolve", None),
    "remove_unresolved": ("kvcm_ingest_remove_unresolved_total", "BlockRemoved hashes kvcm could not resolve", None),
    "namespaces_evicted": ("kvcm_ingest_namespaces_evicted_total",
                           "Namespaces forgotten, with their entries, to make room in a full namespace table", None),
}
# Indexer.score_counts -> (metric, help)
_SCORE_COUNTERS = {
    "requests": ("kvcm_score_requests_total", "Scoring requests answered"),
    "warm": ("kvcm_score_warm_requests_total", "Scoring requests where some pod held the prompt's first block"),
}
# The routes that score: their request latencies are the scoring latency.
SCORE_ENDPOINTS = ("/v1/score", "/score_completions", "/score_chat_completions")
_EVENT_TYPES = {"events_stored": "BlockStored", "events_removed": "BlockRemoved",
                "events_cleared": "AllBlocksCleared", "events_unknown_tag": "unknown"}


class Metrics:
    """The registry behind /metrics, reading from an Indexer."""

    def __init__(self, indexer):
        self.start_time = time.time()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_IndexerCollector(indexer, self.start_time))
        for collector in indexer.backend.collectors():
            self.registry.register(collector)
        self.requests = _RequestLatencies()
        self.registry.register(self.requests)
        self.tokenize = Histogram(
            "kvcm_tokenize_duration_seconds", "Prompt tokenization and chat rendering",
            ("model",), buckets=_TOKENIZE_BUCKETS, registry=self.registry)
        self.templates_stopped = Counter(
            "kvcm_template_renders_stopped", "Chat template renders stopped at a limit (time, output, memory)",
            ("limit",), registry=self.registry)

    def watch_lane(self, lane):
        """Exports how many requests the scoring lane (kvcm/_score_lane.pxi) answered."""
        self.registry.register(_LaneCollector(lane))

    def watch_busy_polls(self, http):
        """Exports how the event loop's spins after answers ended (HttpServer.busy_polls)."""
        self.registry.register(_BusyPollCollector(http))

    def observe_request(self, endpoint, method, status, seconds):
        self.requests.observe(endpoint, method, status, seconds)

    def timed_tokenize(self, model):
        return _Timer(self.tokenize.labels(model))

    def render(self):
        return generate_latest(self.registry)

    def latency_buckets(self, endpoints=SCORE_ENDPOINTS):
        """{upper bound: cumulative count} of the successful requests to endpoints, summed
        over methods (the request histogram's buckets, +inf included)."""
        out = {}
        for (endpoint, _, status), histogram in list(self.requests.by_labels.items()):
            if endpoint in endpoints and 200 <= status < 300:
                for bound, count in histogram.snapshot()[0]:
                    out[bound] = out.get(bound, 0) + count
        return out


class _LaneCollector:
    def __init__(self, lane):
        self.lane = lane

    def collect(self):
        yield counter("kvcm_http_lane_requests_total",
                      "Token-id scoring requests the core's lane answered (the rest took the general path)",
                      self.lane.served)


class _BusyPollCollector:
    def __init__(self, http):
        self.http = http

    def collect(self):
        family = CounterMetricFamily(
            "kvcm_http_busy_polls", "Spins of the event loop after an answer (--busy-poll-us), by how they "
            "ended: an event for the loop arrived, the budget ran out, or the connection's next request "
            "arrived and the spin read it", labels=("outcome",))
        for outcome, count in zip(("event", "timeout", "read"), self.http.busy_polls):
            family.add_metric((outcome,), count)
        yield family


class _RequestLatencies:
    """kvcm_http_request_duration_seconds: a core LatencyHistogram per (endpoint, method,
    status), observed on every answer (a locked Python histogram would cost more than a
    lane answer's own work), collected as one Prometheus histogram family."""

    def __init__(self):
        self.by_labels = {}

    def observe(self, endpoint, method, status, seconds):
        histogram = self.histogram(endpoint, method, status)
        if histogram is not None:
            histogram.observe(seconds)

    def histogram(self, endpoint, method, status):
        """The histogram of those labels, made on first use; None once there are 1,024
        (endpoints are route patterns: few; the table stays bounded)."""
        histogram = self.by_labels.get((endpoint, method, status))
        if histogram is None and len(self.by_labels) < 1024:
            histogram = self.by_labels[(endpoint, method, status)] = LatencyHistogram(_REQUEST_BUCKETS)
        return histogram

    def collect(self):
        family = HistogramMetricFamily("kvcm_http_request_duration_seconds", "HTTP requests by endpoint and status",
                                       labels=("endpoint", "method", "status"))
        for (endpoint, method, status), histogram in list(self.by_labels.items()):
            buckets, total = histogram.snapshot()
            family.add_metric([endpoint, method, str(status)],
                              [(floatToGoString(bound), count) for bound, count in buckets], total)
        yield family


def quantile(q, buckets):
    """The q-quantile (0 < q < 1) of a histogram given as {upper bound: cumulative count}, as
    Prometheus' histogram_quantile estimates it (linear within a bucket; the highest finite
    bound when it falls in +inf); None when the histogram is empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class _Timer:
    __slots__ = ("child", "start")

    def __init__(self, child):
        self.child = child

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.child.observe(time.perf_counter() - self.start)


class _IndexerCollector:
    def __init__(self, indexer, start_time):
        self.indexer = indexer
        self.start_time = start_time

    def collect(self):
        yield GaugeMetricFamily("kvcm_start_time_seconds", "When this kvcm started (Unix time)",
                                value=self.start_time)
        yield from self._scoring()
        yield from self._sink()
        yield from self._transport()
        yield from self._tokenizing()
        yield from self.indexer.backend.metric_families()
        if self.indexer.state is not None:
            yield from self._snapshots(self.indexer.state)

    def _scoring(self):
        counts = self.indexer.score_counts
        for name, (metric, text) in _SCORE_COUNTERS.items():
            yield counter(metric, text, counts[name])
        memo = self.indexer.sink.key_memo
        blocks = CounterMetricFamily("kvcm_key_memo_blocks_total",
                                     "Blocks of scoring requests whose key the memo gave (hit) or that were "
                                     "hashed and entered (miss), --key-memo-blocks", labels=("result",))
        blocks.add_metric(("hit",), memo.hits)
        blocks.add_metric(("miss",), memo.misses)
        yield blocks
        yield GaugeMetricFamily("kvcm_key_memo_capacity_blocks", "Blocks the key memo holds at most (0: off)",
                                value=memo.capacity)

    def _sink(self):
        counters = self.indexer.sink.counters
        for name, (metric, text, _) in _SINK_COUNTERS.items():
            yield counter(metric, text, counters.get(name, 0))
        events = CounterMetricFamily("kvcm_ingest_events_total", "KV events applied, by type", labels=("type",))
        for name, label in _EVENT_TYPES.items():
            events.add_metric((label,), counters.get(name, 0))
        yield events
        drops = CounterMetricFamily("kvcm_ingest_event_drops_total",
                                    "KV events dropped while decoding or applying, by reason", labels=("reason",))
        for name, value in counters.items():
            if name.startswith("drop_"):
                drops.add_metric((name[5:],), value)
        yield drops
        modes = GaugeMetricFamily("kvcm_namespaces", "Model and LoRA namespaces by hash mode", labels=("mode",))
        by_mode = {"parity": 0, "decoupled": 0}
        for info in self.indexer.sink.namespaces().values():
            by_mode[info["mode"]] += 1
        for mode, n in by_mode.items():
            modes.add_metric((mode,), n)
        yield modes

    def _transport(self):
        counters = self.indexer.ingest.counters
        for name, value in counters.items():
            if isinstance(value, dict):
                continue
            yield counter("kvcm_ingest_%s_total" % name, "ZMQ ingest: %s" % name.replace("_", " "), value)
        drops = CounterMetricFamily("kvcm_ingest_message_drops_total",
                                    "ZMQ messages dropped before decoding, by reason", labels=("reason",))
        for reason, value in counters.get("drops_by_reason", {}).items():
            drops.add_metric((reason,), value)
        yield drops
        tables = dict(self.indexer.ingest.tables())
        tables["namespaces"] = self.indexer.index.namespaces
        tables["tiers"] = (len(self.indexer.index.tiers), MAX_TIERS)
        tables["pods"] = (self.indexer.index.pods, MAX_PODS)
        yield GaugeMetricFamily("kvcm_ingest_streams", "Event streams (pod, model, dp rank) seen",
                                value=tables["streams"][0])
        entries = GaugeMetricFamily("kvcm_name_table_entries", "Names in each bounded table", labels=("table",))
        capacity = GaugeMetricFamily("kvcm_name_table_capacity", "Capacity of each bounded name table",
                                     labels=("table",))
        for table, (n, cap) in sorted(tables.items()):
            entries.add_metric((table,), n)
            capacity.add_metric((table,), cap)
        yield entries
        yield capacity

    def _tokenizing(self):
        inflight = self.indexer.inflight
        yield GaugeMetricFamily("kvcm_tokenize_inflight_requests", "Requests tokenizing now (--tokenize-max-inflight)",
                                value=inflight.requests)
        yield GaugeMetricFamily("kvcm_tokenize_inflight_chars",
                                "Characters of prompt being tokenized now (--tokenize-max-inflight-chars)",
                                value=inflight.chars)
        yield counter("kvcm_tokenize_refused_total", "Tokenizing requests refused with 503: too much in flight",
                       inflight.refused)
        yield counter("kvcm_heap_trims_total", "Times freed heap memory was returned to the OS after large work",
                       inflight.trims)
        pool = self.indexer.templates
        if pool is None:
            return
        yield GaugeMetricFamily("kvcm_template_workers", "Live worker processes for request chat templates",
                                value=len(pool.pids))
        for name, text in (("renders", "Request chat templates rendered by the workers"),
                           ("killed", "Template workers killed (a render ran past its time, or the worker died)"),
                           ("start_failures", "Template workers that failed to start")):
            yield counter("kvcm_template_worker_%s_total" % name, text, pool.counters[name])

    def _snapshots(self, state):
        for name, value in state.counters.items():
            yield counter("kvcm_%s_total" % name, "Index snapshots: %s" % name.replace("_", " "), value)
        last = state.last
        figures = (("kvcm_snapshot_duration_seconds", "Time the last snapshot written took", last["duration_s"]),
                   ("kvcm_snapshot_size_bytes", "Size of the last snapshot written", last["size_bytes"]),
                   ("kvcm_snapshot_age_seconds", "Time since the last good snapshot was written",
                    None if last["good_at"] is None else max(0.0, time.time() - last["good_at"])),
                   ("kvcm_restore_duration_seconds", "Time loading the snapshot took at start",
                    last["restore_duration_s"]),
                   ("kvcm_restore_entries", "Entries loaded from the snapshot at start", last["entries_restored"]))
        for metric, text, value in figures:
            if value is not None:
                yield GaugeMetricFamily(metric, text, value=value)


def counter(name, text, value):
    # prometheus_client appends _total itself
    return CounterMetricFamily(name[:-6] if name.endswith("_total") else name, text, value=value)
