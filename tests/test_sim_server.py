"""kvcm sim's HTTP API over real TCP (an in-process simulator): every endpoint and its errors,
echo and random responses, SSE framing, usage and cached tokens, LoRA adapters, scheduling
limits, failure injection, metrics, and a real tokenizer."""

import hashlib

import pytest

from kvcm import tokenize
from kvcm._core import BlockHasher
from sim_harness import InProcessSim, until

MODEL = "Qwen/Qwen3-0.6B"
WORDS = " ".join("w%d" % i for i in range(40))       # 40 word tokens: 2 full blocks of 16 + 8


@pytest.fixture
def sim():
    with InProcessSim("--mode", "echo") as s:
        yield s


def error_of(reply, status):
    assert reply.status == status, reply
    return reply.error_type, reply.error


# -- models, tokenize, health ---------------------------------------------------------------------

def test_models_health_and_tokenize(sim):
    c = sim.client
    models = c.ok("GET", "/v1/models")
    assert models["object"] == "list"
    [entry] = models["data"]
    assert (entry["id"], entry["object"], entry["owned_by"], entry["root"], entry["max_model_len"]) == (
        MODEL, "model", "vllm", MODEL, 4096)
    health = c.get("/health")
    assert health.status == 200 and health.body == b""
    assert c.ok("GET", "/health/ready") == {"status": "ready"} and c.get("/ready").status == 200

    out = c.ok("POST", "/tokenize", {"prompt": "Hello, world!", "return_token_strs": True})
    assert out["token_strs"] == ["Hello", ",", "world", "!"] and out["count"] == 4 and out["max_model_len"] == 4096
    # the documented word-level ids: first 4 bytes of SHA-256, big-endian, shifted right by one
    assert out["tokens"][0] == int.from_bytes(hashlib.sha256(b"Hello").digest()[:4], "big") >> 1
    assert c.ok("POST", "/detokenize", {"tokens": out["tokens"]}) == {"prompt": "Hello , world !"}
    chat = c.ok("POST", "/tokenize", {"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert chat["tokens"] == c.tokens("system: Be brief.\nuser: Hi\nassistant:")

    assert error_of(c.post("/tokenize", {"model": "nope", "prompt": "x"}), 404) == (
        "NotFoundError", "The model `nope` does not exist.")
    assert error_of(c.post("/tokenize", {}), 400)[0] == "BadRequestError"
    assert error_of(c.post("/detokenize", {"tokens": [-1]}), 400)[1] == "Token id -1 is out of vocabulary"


def test_served_model_names():
    with InProcessSim("--model", "base/model", "--served-model-name", "alias-a", "alias-b") as s:
        c = s.client
        assert [m["id"] for m in c.ok("GET", "/v1/models")["data"]] == ["alias-a", "alias-b"]
        assert c.complete(model="alias-b", prompt="hi", max_tokens=1)["model"] == "alias-b"
        assert c.complete(prompt="hi", max_tokens=1)["model"] == "alias-a"       # no model: the first name
        assert error_of(c.post("/v1/completions", {"model": "base/model", "prompt": "x"}), 404)[0] == "NotFoundError"


# -- completions ------------------------------------------------------------------------------------

def test_echo_completion_usage_and_cached_tokens(sim):
    c = sim.client
    first = c.complete(model=MODEL, prompt=WORDS)
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-") and first["model"] == MODEL
    [choice] = first["choices"]
    assert choice["text"] == WORDS and choice["finish_reason"] == "stop" and choice["index"] == 0
    assert first["usage"] == {"prompt_tokens": 40, "completion_tokens": 40, "total_tokens": 80,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    second = c.complete(model=MODEL, prompt=WORDS, max_tokens=3)
    assert second["choices"][0]["text"] == "w0 w1 w2" and second["choices"][0]["finish_reason"] == "length"
    # the first request's 2 full prompt blocks and its 2 full output blocks are cached now
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    extended = c.complete(model=MODEL, prompt=WORDS + " " + WORDS, max_tokens=1)
    # the prompt continues with the first output's tokens: blocks 2 and 3 hit as well
    assert extended["usage"]["prompt_tokens_details"]["cached_tokens"] == 64


def test_prompt_forms_and_n(sim):
    c = sim.client
    ids = c.tokens("a b c d")
    out = c.complete(prompt=["a b", "c d e"], n=2, max_tokens=2)
    assert [(ch["index"], ch["text"]) for ch in out["choices"]] == [(0, "a b"), (1, "a b"), (2, "c d"), (3, "c d")]
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 8
    assert c.complete(prompt=ids)["choices"][0]["text"] == "a b c d"           # token ids decode
    out = c.complete(prompt=[ids[:2], ids[2:]])
    assert [ch["text"] for ch in out["choices"]] == ["a b", "c d"]


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "'max_tokens' must be an integer"),
    ({"prompt": "x", "n": True}, 400, "'n' must be an integer"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "only be defined when `stream=True`"),
    ({"prompt": "x", "cache_salt": ""}, 400, "'cache_salt' must be a non-empty string"),
    ({"prompt": {"text": "x"}}, 400, "'prompt' must be a string"),
    ({"prompt": [1, "x"]}, 400, "'prompt' must be a string"),
    ({"prompt": [-5]}, 400, "out of vocabulary"),
    ({"prompt": ""}, 400, "The decoder prompt cannot be empty"),
    ({"prompt": ["a", "b"], "n": 600}, 400, "asks for 1200 sequences; at most 1005 can be queued"),
    ({"prompt": "x", "model": "missing"}, 404, "The model `missing` does not exist."),
    ({"prompt": "x " * 4096}, 400, "maximum context length is 4096 tokens. However, your request has 4096 input"),
    ({"prompt": "x " * 4000, "max_tokens": 100}, 400,
     "'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length is 4096 tokens "
     "and your request has 4000 input tokens (100 > 4096 - 4000)."),
])
def test_completion_errors(sim, body, status, needle):
    kind, message = error_of(sim.client.post("/v1/completions", body), status)
    assert needle in message
    assert kind == {400: "BadRequestError", 404: "NotFoundError"}[status]


def test_malformed_bodies(sim):
    c = sim.client
    assert "not valid JSON" in error_of(c.post("/v1/completions", b"{nope"), 400)[1]
    assert "JSON object" in error_of(c.post("/v1/chat/completions", [1, 2]), 400)[1]
    assert error_of(c.post("/v1/chat/completions", {"messages": []}), 400)[1].startswith("'messages' must be")
    assert "string 'role'" in error_of(c.post("/v1/chat/completions", {"messages": [{"content": "x"}]}), 400)[1]
    assert c.get("/v1/completions").status == 405
    assert c.get("/nowhere").status == 404


def test_a_request_larger_than_the_kv_cache_is_refused():
    with InProcessSim("--mode", "echo", "--kv-cache-size", "2", "--block-size", "4") as s:
        message = error_of(s.client.post("/v1/completions", {"prompt": "a b c d e f g h i", "max_tokens": 1}), 400)[1]
        assert "needs 3 KV cache blocks of 4 tokens" in message and "--kv-cache-size" in message


# -- chat -------------------------------------------------------------------------------------------

def test_chat_echo_and_streaming_framing(sim):
    c = sim.client
    messages = [{"role": "user", "content": WORDS}, {"role": "user", "content": "Tell me, kindly."}]
    whole = c.chat(model=MODEL, messages=messages)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Tell me, kindly.", "tool_calls": []}
    assert whole["usage"]["prompt_tokens"] == len(c.tokens("user: %s\nuser: Tell me, kindly.\nassistant:" % WORDS))

    sse = c.stream("/v1/chat/completions", {"messages": messages, "stream": True,
                                            "stream_options": {"include_usage": True}})
    assert sse.status == 200 and sse.headers["content-type"] == "text/event-stream"
    assert sse.headers["transfer-encoding"] == "chunked"
    events = sse.events()
    assert sse.raw.endswith(b"0\r\n\r\n") and sse.body.endswith(b"data: [DONE]\n\n")
    role, *tokens, finish, usage, done = events
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]
    assert [t["choices"][0]["delta"]["content"] for t in tokens] == ["Tell", " me", ",", " kindly", "."]
    assert all(t["choices"][0]["finish_reason"] is None and t["usage"] is None for t in tokens)
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] == 48     # the same prompt again
    assert done == "[DONE]"
    assert len({e["id"] for e in events[:-1]}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    sse.close()


def test_completion_stream_without_usage(sim):
    sse = sim.client.stream("/v1/completions", {"prompt": "one two three", "stream": True, "n": 2})
    events = sse.events()
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    texts = {0: "", 1: ""}
    finishes = {}
    for e in events[:-1]:
        [choice] = e["choices"]
        assert e["object"] == "text_completion"
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "one two three", 1: "one two three"} and finishes == {0: "stop", 1: "stop"}
    sse.close()


def test_real_tokenizer_renders_and_hashes_as_vllm(shared):
    qwen = shared / "fixtures" / "tokenizers" / "qwen2.5-instruct"
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? " * 6}]
    with InProcessSim("--mode", "echo", "--tokenizer", str(qwen)) as s:
        reference = tokenize.Tokenizer(qwen)
        prompt, ids = reference.encode_chat(messages)
        out = s.client.chat(messages=messages, max_tokens=4)
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert s.client.ok("POST", "/tokenize", {"messages": messages})["tokens"] == ids
        assert out["choices"][0]["message"]["content"] == reference.backend.decode(
            reference.encode("What is the capital of France? " * 6, add_special_tokens=False)[:4])
        full = len(ids) // 16
        cached = s.client.kv_cache()["blocks"]
        prompt_keys = list(BlockHasher("sha256", None, 16).keys(ids))
        assert set(prompt_keys) <= {b["hash"] for b in cached} and len(prompt_keys) == full
        bad = s.client.post("/v1/chat/completions", {"messages": messages, "chat_template": "{{ raise_exception('no') }}"})
        assert error_of(bad, 400)[1] == "no"


# -- random mode ------------------------------------------------------------------------------------

def test_random_mode_is_seeded():
    bodies = [{"prompt": "tell me something", "max_tokens": 30}, {"prompt": "and more", "max_tokens": 30},
              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "ignore_eos": True}]

    def answers(seed):
        with InProcessSim("--seed", str(seed)) as s:
            out = [s.client.complete(**bodies[0]), s.client.complete(**bodies[1]), s.client.chat(**bodies[2])]
            return [o["choices"][0].get("text") or o["choices"][0]["message"]["content"] for o in out], out

    first, replies = answers(7)
    again, _ = answers(7)
    other, _ = answers(8)
    assert first == again and first != other
    for reply in replies[:2]:
        n = reply["usage"]["completion_tokens"]
        assert 1 <= n <= 30
        assert reply["choices"][0]["finish_reason"] == ("length" if n == 30 else "stop")
    assert replies[2]["usage"]["completion_tokens"] == 12 and replies[2]["choices"][0]["finish_reason"] == "length"
    with InProcessSim("--seed", "1") as s:      # a request's own seed fixes its answer whatever came before
        a = s.client.complete(prompt="x", max_tokens=20, seed=5)["choices"][0]["text"]
        s.client.complete(prompt="y", max_tokens=20)
        assert s.client.complete(prompt="x", max_tokens=20, seed=5)["choices"][0]["text"] == a
        n = s.client.complete(prompt="x", max_tokens=50, min_tokens=45)["usage"]["completion_tokens"]
        assert 45 <= n <= 50
        assert s.client.complete(prompt="x")["usage"]["completion_tokens"] <= 128


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_adapters(sim):
    c = sim.client
    reply = c.post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/adapters/sql"})
    assert reply.status == 200 and reply.body == b"Success: LoRA adapter 'sql' added successfully."
    assert error_of(c.post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/x"}), 400)[1] == (
        "The lora adapter 'sql' has already been loaded.")
    assert "must be provided" in error_of(c.post("/v1/load_lora_adapter", {"lora_name": "x"}), 400)[1]
    assert error_of(c.post("/v1/load_lora_adapter", {"lora_name": MODEL, "lora_path": "/p"}), 400)
    entry = c.ok("GET", "/v1/models")["data"][1]
    assert (entry["id"], entry["root"], entry["parent"]) == ("sql", "/adapters/sql", MODEL)

    out = c.complete(model="sql", prompt=WORDS, max_tokens=1)
    assert out["model"] == "sql"
    blocks = [b for b in c.kv_cache()["blocks"] if b["lora_name"] == "sql"]
    tagged = [(("lora", "sql", "/adapters/sql"),)] * 2
    assert sorted(b["hash"] for b in blocks) == sorted(BlockHasher("sha256", None, 16).keys(c.tokens(WORDS), tagged))
    assert all(b["extra_keys"] == ["sql"] for b in blocks)
    # the base model does not hit the LoRA's blocks
    assert c.complete(prompt=WORDS, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    reply = c.post("/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert reply.status == 200 and reply.body == b"Success: LoRA adapter 'sql' removed successfully."
    assert error_of(c.post("/v1/unload_lora_adapter", {"lora_name": "sql"}), 404)[1] == (
        "The lora adapter 'sql' cannot be found.")
    assert error_of(c.post("/v1/completions", {"model": "sql", "prompt": "x"}), 404)


def test_lora_modules_at_start():
    with InProcessSim("--lora-modules", "a=/p/a", "b=/p/b") as s:
        data = s.client.ok("GET", "/v1/models")["data"]
        assert [(m["id"], m["root"]) for m in data[1:]] == [("a", "/p/a"), ("b", "/p/b")]
        assert s.on_loop(lambda: [(l.id, l.name) for l in s.ranks[0].loras]) == [(1, "a"), (2, "b")]


# -- scheduling -----------------------------------------------------------------------------------

def test_running_limit_waiting_queue_and_disconnects():
    with InProcessSim("--max-num-seqs", "1", "--max-waiting-queue-length", "1", "--inter-token-latency", "50ms",
                      "--mode", "random") as s:
        c = s.client
        long = {"prompt": "busy", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        running = c.stream("/v1/completions", long)
        waiting = c.stream("/v1/completions", long)
        assert running.status == waiting.status == 200
        m = c.metrics()
        assert (m[("vllm:num_requests_running", ())], m[("vllm:num_requests_waiting", ())]) == (1, 1)
        refused = c.post("/v1/completions", {"prompt": "one more"})
        assert error_of(refused, 429) == ("RateLimitError",
                                          "the waiting queue is full (1 requests, --max-waiting-queue-length 1)")
        assert running.next_events()                          # tokens are flowing
        waiting.close()                                       # a waiting request's client leaves
        until(lambda: c.metrics()[("vllm:num_requests_waiting", ())] == 0, "the waiting request to be dropped")
        running.close()
        until(lambda: c.metrics()[("vllm:num_requests_running", ())] == 0, "the running request to be aborted")
        m = c.metrics()
        assert m[("vllm:request_success_total", (("finished_reason", "abort"),))] == 2
        assert m[("vllm:kv_cache_usage_perc", ())] == 0
        assert c.complete(prompt="free again", max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2


def test_reset_prefix_cache(sim):
    c = sim.client
    c.complete(prompt=WORDS, max_tokens=1)
    assert len(c.kv_cache()["blocks"]) == 2
    assert c.post("/reset_prefix_cache").status == 200
    assert c.kv_cache()["blocks"] == []
    assert c.complete(prompt=WORDS, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_reset_is_refused_while_a_request_runs():
    with InProcessSim("--inter-token-latency", "50ms") as s:
        sse = s.client.stream("/v1/completions", {"prompt": WORDS, "max_tokens": 1000, "ignore_eos": True,
                                                  "stream": True})
        sse.next_events()
        kind, message = error_of(s.client.post("/reset_prefix_cache"), 409)
        assert kind == "ConflictError" and "in use by running requests" in message
        sse.close()


# -- failure injection ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, status, message, param", [
    ("rate_limit", 429, "Rate limit reached for %s in organization org-xxx on requests per min (RPM): Limit 3, Used 3, "
                        "Requested 1." % MODEL, None),
    ("server_error", 503, "The server is overloaded or not ready yet.", None),
    ("invalid_api_key", 401, "Incorrect API key provided.", None),
    ("context_length", 400, "This model's maximum context length is 4096 tokens. However, your messages resulted in "
                            "4500 tokens.", "messages"),
    ("invalid_request", 400, "Invalid request: missing required parameter 'model'.", "model"),
    ("model_not_found", 404, "The model '%s-nonexistent' does not exist" % MODEL, "model")])
def test_failure_injection(kind, status, message, param):
    # llm-d's injected errors: its messages, statuses and params
    with InProcessSim("--failure-injection-rate", "100", "--failure-types", kind) as s:
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
            reply = s.client.post(path, body)
            assert error_of(reply, status)[1] == message and reply.param == param
        assert s.client.post("/tokenize", {"prompt": "x"}).status == 200     # only generation fails


def test_failure_rate_is_a_seeded_share():
    with InProcessSim("--failure-injection-rate", "50", "--seed", "3") as s:
        statuses = [s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status for _ in range(60)]
    assert 0 < statuses.count(200) < 60
    assert set(statuses) <= {200, 400, 401, 404, 429, 503}


# -- metrics ----------------------------------------------------------------------------------------

def test_metrics_follow_real_hits(sim):
    c = sim.client
    for _ in range(3):
        c.complete(prompt=WORDS, max_tokens=2)
    m = c.metrics()
    assert m[("vllm:prefix_cache_queries_total", ())] == 120
    assert m[("vllm:prefix_cache_hits_total", ())] == 64            # 2 blocks hit by each repeat
    assert m[("vllm:prompt_tokens_total", ())] == 120 and m[("vllm:generation_tokens_total", ())] == 6
    assert m[("vllm:request_success_total", (("finished_reason", "length"),))] == 3
    assert m[("vllm:time_to_first_token_seconds_count", ())] == 3
    assert m[("vllm:e2e_request_latency_seconds_count", ())] == 3
    assert m[("vllm:request_prompt_tokens_sum", ())] == 120
    assert m[("vllm:num_requests_running", ())] == 0 and m[("vllm:kv_cache_usage_perc", ())] == 0
    info = [k for k in m if k[0] == "vllm:cache_config_info"]
    assert dict(info[0][1])["block_size"] == "16" and dict(info[0][1])["num_gpu_blocks"] == "1024"
    labels = c.get("/metrics").body.decode()
    assert 'vllm:num_requests_running{engine="0",model_name="Qwen/Qwen3-0.6B"}' in labels
