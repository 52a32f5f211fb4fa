"""GET /metrics of one simulated rank, under vLLM's metric names and buckets.

Gauges and counters are read from the engine and its KV cache at scrape time (so the
request path pays nothing for them); latencies and lengths are observed into histograms as
each request ends. The time to first token and the inter-token latencies are the values the
latency model computed (kvcm.sim.latency), as llm-d's simulator reports them; queue, prefill,
decode, inference and end-to-end times are measured. Every series has vLLM's labels
`model_name` (the first served name) and `engine` (the data-parallel rank).

With `--fake-metrics` (kvcm.sim.fakemetrics) only the fake values are reported, never the
real ones.
"""

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kvcm.sim.histograms import LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, token_buckets

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("stop", "length", "abort")     # always reported (vLLM's); others once seen
_LABELS = ("model_name", "engine")

# name, help, buckets (None: the 1-2-5 token buckets), the --fake-metrics key
_HISTOGRAMS = (
    ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS,
     "ttft-buckets-values"),
    ("tpot", "vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
     TPOT_BUCKETS, "tpot-buckets-values"),
    ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", TPOT_BUCKETS,
     "tpot-buckets-values"),
    ("request_tpot", "vllm:request_time_per_output_token_seconds",
     "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS, "request-tpot-buckets-values"),
    ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LATENCY_BUCKETS,
     "e2erl-buckets-values"),
    ("queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
     LATENCY_BUCKETS, "queue-time-buckets-values"),
    ("prefill", "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
     LATENCY_BUCKETS, "prefill-time-buckets-values"),
    ("decode", "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
     LATENCY_BUCKETS, "decode-time-buckets-values"),
    ("inference", "vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
     LATENCY_BUCKETS, "inf-time-buckets-values"),
    ("prompt_len", "vllm:request_prompt_tokens", "Number of prefill tokens processed.", None,
     "request-prompt-tokens"),
    ("generation_len", "vllm:request_generation_tokens", "Number of generation tokens processed.", None,
     "request-generation-tokens"),
    ("max_tokens", "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", None,
     "request-params-max-tokens"),
    ("max_generation", "vllm:max_num_generation_tokens",
     "Histogram of maximum number of generation tokens per request.", None, "request-max-generation-tokens"),
)


class SimMetrics:
    """The registry behind one rank's /metrics; `config` may be swapped at run time."""

    def __init__(self, config, rank):
        self.config = config
        self.labels = (config.served_model_name, str(rank))
        self.token_buckets = token_buckets(config.max_model_len)
        self.registry = CollectorRegistry(auto_describe=False)
        self._real = config.fake_metrics is None
        for attr, name, text, buckets, _ in _HISTOGRAMS:
            histogram = Histogram(name, text, _LABELS, buckets=buckets or self.token_buckets,
                                  registry=self.registry if self._real else None)
            setattr(self, attr, histogram.labels(*self.labels))

    def attach(self, engine, loras):
        """Reads the engine, its cache and the LoRA registry at scrape time."""
        collector = _EngineCollector if self._real else _FakeCollector
        self.registry.register(collector(engine, loras, self))

    def inter_token(self, seconds):
        """One computed inter-token latency."""
        self.tpot.observe(seconds)
        self.itl.observe(seconds)

    def observe(self, seq):
        """A sequence ended (finished, aborted or failed)."""
        if seq.admitted is None or seq.error is not None:
            return
        end = seq.finished
        self.queue.observe(seq.admitted - seq.arrival)
        self.inference.observe(end - seq.admitted)
        self.e2e.observe(end - seq.arrival)
        self.prompt_len.observe(len(seq.prompt))
        self.generation_len.observe(seq.generated)
        if seq.max_tokens is not None:
            self.max_tokens.observe(seq.max_tokens)
        if seq.first_token is not None:
            self.ttft.observe(seq.ttft)
            self.prefill.observe(seq.first_token - seq.admitted)
            self.decode.observe(end - seq.first_token)
            if seq.generated > 1:
                self.request_tpot.observe(seq.itl_sum / (seq.generated - 1))
        if all(s.finished is not None for s in seq.group):
            self.max_generation.observe(max(s.generated for s in seq.group))

    def render(self):
        return generate_latest(self.registry)


class _Families:
    """Builds metric families with the rank's labels."""

    def __init__(self, labels):
        self.labels = list(labels)

    def gauge(self, name, text, value):
        family = GaugeMetricFamily(name, text, labels=_LABELS)
        family.add_metric(self.labels, value)
        return family

    def counter(self, name, text, value):
        family = CounterMetricFamily(name, text, labels=_LABELS)
        family.add_metric(self.labels, value)
        return family

    def success(self, counts):
        family = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                     labels=list(_LABELS) + ["finished_reason"])
        for reason, count in counts.items():
            family.add_metric(self.labels + [reason], count)
        return family

    @staticmethod
    def cache_info(config):
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching",
                                         "prefix_caching_hash_algo"])
        info.add_metric([str(config.block_size), str(config.kv_cache_size), "True", config.hash_algo], 1)
        return info

    @staticmethod
    def lora_info(max_loras, samples):
        """vllm:lora_requests_info: one sample per (running, waiting) adapter lists, valued with
        its timestamp; max_lora is --max-loras (as vLLM and llm-d's simulator define it)."""
        family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        for running, waiting, stamp in samples:
            family.add_metric([str(max_loras), running, waiting], stamp)
        return family


class _EngineCollector:
    def __init__(self, engine, loras, metrics):
        self.engine = engine
        self.metrics = metrics
        self.families = _Families(metrics.labels)

    def collect(self):
        engine, cache, f = self.engine, self.engine.cache, self.families
        yield f.gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                      len(engine.running))
        yield f.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(engine.waiting))
        yield f.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", cache.usage)
        yield f.counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                        cache.queries)
        yield f.counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                        cache.hits)
        yield f.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", engine.prompt_tokens)
        yield f.counter("vllm:generation_tokens", "Number of generation tokens processed.", engine.generation_tokens)
        yield f.counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0)
        yield f.success({**dict.fromkeys(FINISH_REASONS, 0), **engine.finished})
        config = self.metrics.config
        yield f.cache_info(config)
        running = ",".join(sorted(n for n, k in engine.loras_running.items() if k > 0))
        waiting = ",".join(sorted(n for n, k in engine.loras_waiting.items() if k > 0))
        yield f.lora_info(config.max_loras, [(running, waiting, time.time())])


class _FakeCollector:
    """Every family from --fake-metrics (zero where it gives nothing)."""

    def __init__(self, engine, loras, metrics):
        self.metrics = metrics
        self.families = _Families(metrics.labels)
        self.start = time.monotonic()

    def collect(self):
        config, f = self.metrics.config, self.families
        fake = config.fake_metrics
        elapsed = time.monotonic() - self.start

        def gauge(key):
            return fake.gauge(key, elapsed, config.fake_metrics_refresh_interval)

        yield f.gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                      gauge("running-requests"))
        yield f.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                      gauge("waiting-requests"))
        yield f.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                      gauge("kv-cache-usage"))
        yield f.counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                        fake.get("prefix-cache-queries", 0))
        yield f.counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                        fake.get("prefix-cache-hits", 0))
        sums = {}
        for attr, name, text, buckets, key in _HISTOGRAMS:
            buckets = buckets or self.metrics.token_buckets
            counts = fake.get(key, ())
            sums[key] = sum(n * (buckets[i] if i < len(buckets) else buckets[-1] + 1) for i, n in enumerate(counts))
            yield _histogram(name, text, self.families.labels, buckets, counts, sums[key])
        yield f.counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                        fake.get("total-prompt-tokens", sums["request-prompt-tokens"]))
        yield f.counter("vllm:generation_tokens", "Number of generation tokens processed.",
                        fake.get("total-generation-tokens", sums["request-generation-tokens"]))
        yield f.counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0)
        yield f.success(fake.get("request-success-total") or dict.fromkeys(FINISH_REASONS, 0))
        yield f.cache_info(config)
        yield f.lora_info(config.max_loras, fake.get("loras") or [("", "", time.time())])


def _histogram(name, text, labels, buckets, counts, total):
    """A histogram family with `counts` samples per bucket (the last one: +Inf)."""
    family = HistogramMetricFamily(name, text, labels=_LABELS)
    cumulative, running = [], 0
    for i, bound in enumerate(buckets):
        running += counts[i] if i < len(counts) else 0
        cumulative.append((repr(float(bound)), running))
    running += counts[len(buckets)] if len(counts) > len(buckets) else 0
    cumulative.append(("+Inf", running))
    family.add_metric(labels, cumulative, total)
    return family

