"""kvcm sim's scheduler and latency model: the formulas (computed values, not timings), the
configuration's checks, first-come-first-served admission under KV pressure, shutdown."""

import random
import re

import pytest

from kvcm.sim.config import parse_args
from kvcm.sim.durations import duration
from kvcm.sim.latency import Latency
from kvcm.sim.settings import ConfigError, SimConfig
from sim_harness import InProcessSim, until


def test_durations():
    assert duration("10ms") == pytest.approx(0.01)
    assert duration("1.5s") == 1.5 and duration("250us") == pytest.approx(250e-6) and duration("2m") == 120
    assert duration("20") == pytest.approx(0.02)              # a bare number is milliseconds (llm-d)
    for bad in ("", "fast", "-1ms", "1 parsec"):
        with pytest.raises(ValueError):
            duration(bad)


def test_time_to_first_token():
    rng = random.Random(0)
    per_token = Latency(SimConfig(prefill_overhead=0.01, prefill_time_per_token=0.001))
    assert per_token.time_to_first_token(rng, 100, 0, 1) == pytest.approx(0.11)
    assert per_token.time_to_first_token(rng, 100, 100, 1) == pytest.approx(0.01)   # fully cached: overhead only
    constant = Latency(SimConfig(time_to_first_token=0.5, prefill_overhead=0.01, prefill_time_per_token=0.001))
    assert constant.time_to_first_token(rng, 100, 0, 1) == 0.5                    # a constant TTFT wins
    assert Latency(SimConfig(inter_token_latency=0.02)).inter_token(rng, 1) == pytest.approx(0.02)


def test_load_factor_grows_linearly_to_max_num_seqs():
    latency = Latency(SimConfig(time_to_first_token=1.0, inter_token_latency=0.1, time_factor_under_load=3.0,
                                max_num_seqs=5))
    rng = random.Random(0)
    assert [latency.time_to_first_token(rng, 0, 0, n) for n in (1, 2, 3, 5)] == pytest.approx([1.0, 1.5, 2.0, 3.0])
    assert latency.inter_token(rng, 5) == pytest.approx(0.3)
    single = Latency(SimConfig(time_to_first_token=1.0, time_factor_under_load=3.0, max_num_seqs=1))
    assert single.time_to_first_token(rng, 0, 0, 1) == 1.0


def test_jitter_is_seeded_and_clamped():
    latency = Latency(SimConfig(time_to_first_token=1.0, time_to_first_token_std_dev=0.3,
                                prefill_overhead=0.1, prefill_time_std_dev=1.0))
    draws = [latency.time_to_first_token(random.Random(seed), 0, 0, 1) for seed in range(200)]
    assert len(set(draws)) > 100 and all(0.3 <= d <= 1.7 for d in draws)
    assert draws == [latency.time_to_first_token(random.Random(seed), 0, 0, 1) for seed in range(200)]
    computed = Latency(SimConfig(prefill_overhead=0.1, prefill_time_std_dev=1.0))
    wide = [computed.time_to_first_token(random.Random(seed), 0, 0, 1) for seed in range(200)]
    assert min(wide) == pytest.approx(0.03) and max(wide) == pytest.approx(0.17)   # ±70% of the mean


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "0"], "--block-size must be at least 1"),
    (["--time-to-first-token", "1s", "--time-to-first-token-std-dev", "400ms"], "at most 30%"),
    (["--inter-token-latency", "10ms", "--inter-token-latency-std-dev", "5ms"], "at most 30%"),
    (["--zmq-endpoint", "localhost:5557"], "expected tcp://HOST:PORT"),
    (["--replay-endpoint", "tcp://nowhere"], "expected tcp://HOST:PORT"),
    (["--port", "65535", "--data-parallel-size", "2"], "goes past port 65535"),
    (["--lora-modules", "Qwen/Qwen3-0.6B=/p"], "already a served model name"),
    (["--lora-modules", "a=/p", "a=/q"], "--lora-modules a: the name is given twice"),
])
def test_invalid_configurations(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)


def test_defaults_are_designs():
    c = parse_args([])
    assert (c.port, c.model, c.served_model_names, c.tokenizer) == (8000, "Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B",), None)
    assert (c.max_model_len, c.max_num_seqs, c.max_waiting_queue_length, c.mode) == (4096, 5, 1000, "random")
    assert (c.block_size, c.kv_cache_size, c.hash_algo, c.hash_seed) == (16, 1024, "sha256", None)
    assert (c.zmq_endpoint, c.topic, c.pod_id, c.replay_endpoint) == ("tcp://127.0.0.1:5557", "kv@{pod}@{model}",
                                                                      None, None)
    assert (c.event_format, c.data_parallel_size, c.failure_injection_rate) == ("map", 1, 0.0)
    assert c.topic_for(c.pod_for(8003)) == "kv@127.0.0.1:8003@Qwen/Qwen3-0.6B"


def test_admission_is_first_come_first_served_under_kv_pressure():
    # 6 blocks of 4 tokens; the holder's second token is 10 s away, so it holds its blocks
    # until its client leaves
    with InProcessSim("--kv-cache-size", "6", "--block-size", "4", "--inter-token-latency", "10s",
                      "--max-num-seqs", "4") as s:
        c = s.client
        holder = c.stream("/v1/completions", {"prompt": "a b c d e f g h", "max_tokens": 9, "ignore_eos": True,
                                              "stream": True})      # 8 + 8 positions: 4 blocks
        holder.next_events()
        fits = c.complete(prompt="p q r s t u v w", max_tokens=1)     # 2 blocks: the 2 left
        assert fits["usage"]["completion_tokens"] == 1
        blocker = c.stream("/v1/completions", {"prompt": "k l m n o p q r s t u v", "max_tokens": 1,
                                               "stream": True})      # 3 blocks: it waits
        behind = c.stream("/v1/completions", {"prompt": "y", "max_tokens": 1, "stream": True})
        # 1 block would fit, but it is behind the blocked one
        m = c.metrics()
        assert (m[("vllm:num_requests_waiting", ())], m[("vllm:num_requests_running", ())]) == (2, 1)
        holder.close()                                          # the holder's client leaves: both run
        assert blocker.events()[-1] == "[DONE]" and behind.events()[-1] == "[DONE]"
        until(lambda: c.metrics()[("vllm:kv_cache_usage_perc", ())] == 0, "every block to be released")
        for sse in (blocker, behind):
            sse.close()


def test_shutdown_ends_every_request():
    s = InProcessSim("--inter-token-latency", "10s")
    sse = s.client.stream("/v1/completions", {"prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True})
    sse.next_events()
    s.close()
    with pytest.raises((AssertionError, ConnectionError)):     # cut: no terminating chunk
        sse.events()
    engine = s.engine()
    assert not engine.running and not engine.waiting and engine.cache.used == 0
    sse.close()
