"""kvcm sim's engine behaviours that llm-d's simulator has, over real TCP, checked through the
values the simulator reports (usage, metrics, its cache view), never through wall time:
latency calculators, the latency metrics, --on-kv-cache-full error, LoRA slots and
LoRA-aware eviction, --enable-kvcache false, --force-dummy-tokenizer."""

import pytest

from sim_harness import InProcessSim

WORDS = " ".join("w%d" % i for i in range(40))       # 40 word tokens


def ttft_of(*flags, prompt=WORDS):
    with InProcessSim("--mode", "echo", *flags) as s:
        s.client.complete(prompt=prompt, max_tokens=1)
        return s.client.metrics()[("vllm:time_to_first_token_seconds_sum", ())]


@pytest.mark.parametrize("flags, expected", [
    # unset calculator: per-token while the TTFT is 0, else the constant
    (("--prefill-overhead", "10ms", "--prefill-time-per-token", "1ms"), 0.05),
    (("--time-to-first-token", "30ms", "--prefill-overhead", "10ms", "--prefill-time-per-token", "1ms"), 0.03),
    (("--latency-calculator", "constant", "--prefill-overhead", "10ms", "--prefill-time-per-token", "1ms"), 0.0),
    (("--latency-calculator", "per-token", "--time-to-first-token", "30ms", "--prefill-time-per-token", "1ms"), 0.04),
    (("--latency-calculator", "constant", "--time-to-first-token", "30ms"), 0.03),
])
def test_latency_calculators(flags, expected):
    assert ttft_of(*flags) == pytest.approx(expected)


def test_cached_tokens_shorten_a_per_token_prefill():
    with InProcessSim("--mode", "echo", "--prefill-overhead", "2ms", "--prefill-time-per-token", "1ms") as s:
        s.client.complete(prompt=WORDS, max_tokens=1)
        again = s.client.complete(prompt=WORDS, max_tokens=1)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        # 2 + 40 ms, then 2 + 8 ms
        assert s.client.metrics()[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(0.042 + 0.010)


def test_token_latency_metrics():
    with InProcessSim("--mode", "echo", "--inter-token-latency", "5ms") as s:
        c = s.client
        c.complete(prompt="a b c d e", n=2, max_tokens=4)
        c.complete(prompt="x", max_tokens=1)
        m = c.metrics()
        # every interval, in both of vLLM's names: 2 choices x 3 intervals
        assert m[("vllm:inter_token_latency_seconds_count", ())] == 6
        assert m[("vllm:inter_token_latency_seconds_sum", ())] == pytest.approx(0.03)
        assert m[("vllm:time_per_output_token_seconds_count", ())] == 6
        # per request (sequence) with more than one token: the mean interval
        assert m[("vllm:request_time_per_output_token_seconds_count", ())] == 2
        assert m[("vllm:request_time_per_output_token_seconds_sum", ())] == pytest.approx(0.01)
        # per API request: the most tokens one of its choices generated
        assert m[("vllm:max_num_generation_tokens_count", ())] == 2
        assert m[("vllm:max_num_generation_tokens_sum", ())] == 4 + 1
        assert m[("vllm:max_num_generation_tokens_bucket", (("le", "1.0"),))] == 1


def test_over_capacity_fails_as_llmd_when_asked():
    with InProcessSim("--kv-cache-size", "6", "--block-size", "4", "--inter-token-latency", "10s",
                      "--on-kv-cache-full", "error", "--max-num-seqs", "4") as s:
        c = s.client
        holder = c.stream("/v1/completions", {"prompt": "a b c d e f g h", "max_tokens": 9, "ignore_eos": True,
                                              "stream": True})      # 4 blocks
        holder.next_events()
        message = "the kv cache does not have sufficient capacity to store this request"
        refused = c.post("/v1/completions", {"prompt": "k l m n o p q r s t u v", "max_tokens": 1})   # 3 blocks
        assert refused.status == 500 and refused.error == message and refused.json["error"]["type"] == \
            "InternalServerError"
        sse = c.stream("/v1/completions", {"prompt": "k l m n o p q r s t u v", "max_tokens": 1, "stream": True})
        assert sse.status == 500 and message in sse.body.decode() + sse._buf.decode()
        sse.close()
        never = c.post("/v1/completions", {"prompt": " ".join("z%d" % i for i in range(30)), "max_tokens": 1})
        assert never.status == 500 and never.error == message
        assert c.complete(prompt="p q r s", max_tokens=1)["usage"]["completion_tokens"] == 1   # 2 blocks fit
        m = c.metrics()
        assert m[("vllm:num_requests_waiting", ())] == 0
        assert sum(v for (n, _), v in m.items() if n == "vllm:request_success_total") == 1
        holder.close()
    with InProcessSim("--kv-cache-size", "2", "--block-size", "4") as s:       # vLLM's: 400, it can never fit
        assert s.client.post("/v1/completions", {"prompt": "a b c d e f g h i", "max_tokens": 1}).status == 400


def test_max_loras_makes_other_adapters_wait():
    with InProcessSim("--lora-modules", "a=/a", "b=/b", "--max-loras", "1", "--inter-token-latency", "10s") as s:
        c = s.client
        busy = c.stream("/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 5, "ignore_eos": True,
                                            "stream": True})
        busy.next_events()
        other = c.stream("/v1/completions", {"model": "b", "prompt": "y", "max_tokens": 1, "stream": True})
        same = c.complete(model="a", prompt="z", max_tokens=1)          # a's slot is loaded: it runs
        assert same["usage"]["completion_tokens"] == 1
        base = c.complete(prompt="base", max_tokens=1)                   # the base model never waits for a slot
        assert base["usage"]["completion_tokens"] == 1
        m = c.metrics()
        assert m[("vllm:num_requests_waiting", ())] == 1
        [labels] = [dict(k[1]) for k in m if k[0] == "vllm:lora_requests_info"]
        assert labels == {"max_lora": "1", "running_lora_adapters": "a", "waiting_lora_adapters": "b"}
        busy.close()                                                     # a is idle: b takes its slot
        assert other.events()[-1] == "[DONE]"
        other.close()
        assert s.on_loop(lambda: set(s.ranks[0].slots.loaded)) == {"b"}


def test_blocks_of_unloaded_adapters_are_evicted_first():
    with InProcessSim("--mode", "echo", "--lora-modules", "a=/a", "b=/b", "--max-loras", "1", "--block-size", "4",
                      "--kv-cache-size", "8") as s:
        c = s.client
        c.complete(prompt="p1 p2 p3 p4 p5", max_tokens=1)                # a base block, released first
        c.complete(model="a", prompt="a1 a2 a3 a4 a5", max_tokens=1)     # a's block, released later
        c.complete(model="b", prompt="b1 b2 b3 b4 b5", max_tokens=1)     # b takes a's slot: a is unloaded
        view = c.kv_cache()
        lora_of = {b["hash"]: b["lora_name"] for b in view["blocks"]}
        # by release time alone the base block would go first
        assert [lora_of[h] for h in view["eviction_order"]] == ["a", None, "b"]
        # 4 blocks: the 3 free empty ones, then one cached block is evicted: a's
        c.complete(prompt=" ".join("n%d" % i for i in range(13)), max_tokens=1)
        assert {b["lora_name"] for b in c.kv_cache()["blocks"]} == {None, "b"}
        base = c.complete(prompt="p1 p2 p3 p4 p5", max_tokens=1)
        assert base["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_kv_cache_disabled():
    with InProcessSim("--mode", "echo", "--enable-kvcache=false", "--kv-cache-size", "1") as s:
        c = s.client
        for _ in range(2):
            out = c.complete(prompt=WORDS, max_tokens=1)      # larger than the cache: there is none
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        view = c.kv_cache()
        assert view["blocks"] == [] and view["enabled"] is False
        m = c.metrics()
        assert m[("vllm:prefix_cache_queries_total", ())] == 0 and m[("vllm:kv_cache_usage_perc", ())] == 0


def test_force_dummy_tokenizer(shared):
    qwen = str(shared / "fixtures" / "tokenizers" / "qwen2.5-instruct")
    with InProcessSim("--tokenizer", qwen, "--force-dummy-tokenizer") as s:
        assert s.client.ok("POST", "/tokenize", {"prompt": "Antidisestablishmentarianism, world!",
                                                 "return_token_strs": True})["token_strs"] == [
            "Antidisestablishmentarianism", ",", "world", "!"]
    with InProcessSim("--tokenizer", qwen) as s:
        assert s.client.ok("POST", "/tokenize", {"prompt": "Antidisestablishmentarianism, world!"})["count"] > 4
