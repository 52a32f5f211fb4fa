"""GET /metrics of one simulated rank, under vLLM's metric names and buckets.

Gauges and counters are read from the engine and its KV cache at scrape time (so the
request path pays nothing for them); latencies and lengths are observed into histograms as
each request ends. Every series has vLLM's labels `model_name` (the first served name) and
`engine` (the data-parallel rank).
"""

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_FINISH_REASONS = ("stop", "length", "abort")


def _token_buckets(max_model_len):
    """vLLM's 1-2-5 series up to the context length."""
    buckets, mantissa, exponent = [], (1, 2, 5), 1
    while True:
        for m in mantissa:
            value = m * exponent
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(value)
        exponent *= 10


class SimMetrics:
    """The registry behind one rank's /metrics."""

    def __init__(self, config, rank):
        self.labels = (config.served_model_name, str(rank))
        self.registry = CollectorRegistry(auto_describe=False)
        names = ("model_name", "engine")

        def histogram(name, text, buckets):
            return Histogram(name, text, names, buckets=buckets, registry=self.registry).labels(*self.labels)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _REQUEST_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", _TPOT_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", _REQUEST_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.", _REQUEST_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time spent in DECODE phase for request.", _REQUEST_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.", _REQUEST_BUCKETS)
        tokens = _token_buckets(config.max_model_len)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.generation_len = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                        tokens)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                    tokens)

    def attach(self, engine, loras):
        """Reads the engine, its cache and the LoRA registry at scrape time."""
        self.registry.register(_EngineCollector(engine, loras, self.labels))

    def observe(self, seq):
        """A sequence ended (finished or aborted after admission)."""
        if seq.admitted is None:
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
            self.ttft.observe(seq.first_token - seq.arrival)
            self.prefill.observe(seq.first_token - seq.admitted)
            self.decode.observe(end - seq.first_token)
            if seq.generated > 1:
                self.tpot.observe((end - seq.first_token) / (seq.generated - 1))

    def render(self):
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine, loras, labels):
        self.engine = engine
        self.loras = loras
        self.labels = labels

    def collect(self):
        engine, cache, labels = self.engine, self.engine.cache, list(self.labels)
        names = ["model_name", "engine"]

        def gauge(name, text, value):
            family = GaugeMetricFamily(name, text, labels=names)
            family.add_metric(labels, value)
            return family

        def counter(name, text, value):
            family = CounterMetricFamily(name, text, labels=names)
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    len(engine.running))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(engine.waiting))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", cache.usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      cache.queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      cache.hits)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", engine.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", engine.generation_tokens)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 0)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=names + ["finished_reason"])
        for reason in _FINISH_REASONS:
            success.add_metric(labels + [reason], engine.finished[reason])
        yield success
        config = engine.config
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching",
                                         "prefix_caching_hash_algo"])
        info.add_metric([str(config.block_size), str(config.kv_cache_size), "True", config.hash_algo], 1)
        yield info
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        lora.add_metric([str(len(self.loras)),     # vLLM's --max-loras; here: the adapters loaded
                         ",".join(sorted(n for n, k in engine.loras_running.items() if k > 0)),
                         ",".join(sorted(n for n, k in engine.loras_waiting.items() if k > 0))], time.time())
        yield lora
