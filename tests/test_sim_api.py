"""The parts of kvcm sim's API that llm-d's simulator has, over real TCP: embeddings, render
endpoints, logprobs, tool calls, llm-d's request and response headers, `param` in errors,
the cache hit threshold, disaggregated prefill/decode, multimodal refusal, random answer
lengths."""

import base64
import random
import struct

import pytest

from kvcm.sim.lengths import answer_length, histogram_length
from sim_harness import InProcessSim

MODEL = "Qwen/Qwen3-0.6B"
WORDS = " ".join("w%d" % i for i in range(40))       # 40 word tokens: 2 full blocks of 16 + 8
USER = [{"role": "user", "content": "Tell me, kindly."}]


@pytest.fixture(scope="module")
def echo():
    with InProcessSim("--mode", "echo", "--max-model-len", "512") as s:
        yield s


# -- embeddings and render ----------------------------------------------------------------------

def _stub(tokens, dimensions):
    """llm-d's stand-in embedding, as float32 values."""
    out = []
    for i in range(dimensions):
        if i < len(tokens):
            value = 2 * (tokens[i] % 1024) / 1024 - 1
        else:
            value = 2 * (tokens[i % len(tokens)] % 256) / 256 - 1
        out.append(struct.unpack("<f", struct.pack("<f", value))[0])
    return out


def test_embeddings(echo):
    c = echo.client
    ids = c.tokens("hello world")
    out = c.ok("POST", "/v1/embeddings", {"model": MODEL, "input": ["hello world", "x"], "dimensions": 8})
    assert out["object"] == "list" and out["model"] == MODEL and [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][0]["object"] == "embedding" and out["data"][0]["embedding"] == _stub(ids, 8)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    default = c.ok("POST", "/v1/embeddings", {"input": ids})["data"][0]["embedding"]
    assert len(default) == 384 and default == _stub(ids, 384)          # token ids as they are, 384 by default
    packed = c.ok("POST", "/v1/embeddings", {"input": [ids, ids[:1]], "encoding_format": "base64",
                                            "dimensions": 4})["data"]
    assert [list(struct.unpack("<4f", base64.b64decode(d["embedding"]))) for d in packed] == [
        _stub(ids, 4), _stub(ids[:1], 4)]
    for body, param in (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": "x", "dimensions": 0},
                                                                           "dimensions"),
                        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
                        ({"input": "x", "model": "nope"}, "model")):
        reply = c.post("/v1/embeddings", body)
        assert reply.status in (400, 404) and reply.param == param, (body, reply)
    with InProcessSim("--default-embedding-dimensions", "5") as s:
        assert len(s.client.ok("POST", "/v1/embeddings", {"input": "x"})["data"][0]["embedding"]) == 5


def test_render_endpoints(echo):
    c = echo.client
    ids = c.tokens("a b c")
    assert c.ok("POST", "/v1/completions/render", {"model": MODEL, "prompt": ["a b c", "d"]}) == [
        {"token_ids": ids}, {"token_ids": c.tokens("d")}]
    assert c.ok("POST", "/v1/completions/render", {"prompt": ids}) == [{"token_ids": ids}]
    assert c.ok("POST", "/v1/chat/completions/render", {"messages": USER}) == {
        "token_ids": c.tokens("user: Tell me, kindly.\nassistant:")}
    c.post("/v1/load_lora_adapter", {"lora_name": "ad", "lora_path": "/ad"})
    assert "LoRA adapter" in c.post("/v1/completions/render", {"model": "ad", "prompt": "x"}).error
    assert c.post("/v1/chat/completions/render", {"model": "nope", "messages": USER}).status == 404


def test_generate_takes_and_gives_token_ids(echo):
    c = echo.client
    ids = c.tokens("one two three four")
    out = c.ok("POST", "/inference/v1/generate", {"token_ids": ids, "sampling_params": {"max_tokens": 3}})
    assert out["choices"] == [{"index": 0, "finish_reason": "length", "token_ids": ids[:3]}]
    assert set(out) == {"request_id", "choices", "ec_transfer_params"}
    sse = c.stream("/inference/v1/generate", {"token_ids": ids, "sampling_params": {"max_tokens": 2},
                                              "stream": True, "stream_options": {"include_usage": True}})
    first, second, usage, done = sse.events()
    sse.close()
    assert [first["choices"][0]["token_ids"], second["choices"][0]["token_ids"]] == [ids[:1], ids[1:2]]
    assert (first["choices"][0]["finish_reason"], second["choices"][0]["finish_reason"]) == (None, "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 and done == "[DONE]"
    # kv_transfer_params where vLLM sometimes puts them: sampling_params.extra_args
    prefill = c.ok("POST", "/inference/v1/generate", {"token_ids": ids, "sampling_params": {
        "max_tokens": 1, "extra_args": {"kv_transfer_params": {"do_remote_decode": True}}}})
    assert prefill["kv_transfer_params"]["do_remote_prefill"] is True
    assert prefill["choices"][0]["finish_reason"] == "remote_decode"
    for body, param in (({"sampling_params": {}}, "token_ids"), ({"token_ids": ids}, "sampling_params"),
                        ({"token_ids": [-1], "sampling_params": {}}, None)):
        reply = c.post("/inference/v1/generate", body)
        assert reply.status == 400 and reply.param == param, reply
    assert c.post("/inference/v1/generate", {"token_ids": ids, "sampling_params": {}},
                  headers={"X-Return-Error": "429"}).status == 429


# -- logprobs -------------------------------------------------------------------------------------

def _lp(position, alternative=0):
    return -1.0 - (position % 3) * 0.1 - alternative * 0.5


def test_chat_logprobs(echo):
    c = echo.client
    out = c.chat(messages=USER, logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["Tell", " me", ",", " kindly", "."]
    assert content[1] == {"token": " me", "logprob": pytest.approx(_lp(1)), "bytes": list(b" me"),
                          "top_logprobs": [{"token": " me", "logprob": pytest.approx(_lp(1)), "bytes": list(b" me")},
                                           {"token": " me_1", "logprob": pytest.approx(_lp(1, 1)),
                                            "bytes": list(b" me_1")}]}
    assert c.chat(messages=USER, logprobs=True)["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert c.chat(messages=USER)["choices"][0]["logprobs"] is None
    sse = c.stream("/v1/chat/completions", {"messages": USER, "stream": True, "logprobs": True, "top_logprobs": 1})
    chunks = [e for e in sse.events()[1:-2]]
    assert [ch["choices"][0]["logprobs"]["content"][0]["logprob"] for ch in chunks] == pytest.approx(
        [_lp(i) for i in range(5)])
    sse.close()
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21},
                                                                "top_logprobs")):
        assert c.post("/v1/chat/completions", dict(body, messages=USER)).param == param


def test_completion_logprobs(echo):
    c = echo.client
    out = c.complete(prompt="one two three", logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == ["one", " two", " three"] and lp["text_offset"] == [0, 3, 7]
    assert lp["token_logprobs"] == pytest.approx([_lp(0), _lp(1), _lp(2)])
    assert lp["top_logprobs"][2] == {" three": pytest.approx(_lp(2)), " three_1": pytest.approx(_lp(2, 1))}
    sse = c.stream("/v1/completions", {"prompt": "one two three", "stream": True, "logprobs": 0})
    pieces = [e["choices"][0]["logprobs"] for e in sse.events()[:-2]]
    assert [p["tokens"] for p in pieces] == [["one"], [" two"], [" three"]]
    assert [p["text_offset"] for p in pieces] == [[0], [3], [7]]
    sse.close()


# -- tool calls -----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather",
    "parameters": {"type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["C", "F"]},
        "hours": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3},
        "detail": {"type": "object", "required": ["level"], "properties": {"level": {"type": "boolean"},
                                                                            "note": {"type": "string"}}}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "now",
                                         "parameters": {"type": "object", "properties": {}}}}


def test_tool_calls_follow_the_schema_and_the_knobs():
    import json

    with InProcessSim("--min-tool-call-integer-param", "7", "--max-tool-call-integer-param", "9",
                      "--min-tool-call-number-param", "1", "--max-tool-call-number-param", "2",
                      "--tool-call-not-required-param-probability", "100",
                      "--object-tool-call-not-required-field-probability", "0",
                      "--tool-call-extra-call-probability", "0") as s:
        out = s.client.chat(messages=USER, tools=[WEATHER], tool_choice="required")
        [choice] = out["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert call["id"].startswith("chatcmpl-tool-") and len(call["id"]) == len("chatcmpl-tool-") + 10
        args = json.loads(call["function"]["arguments"])
        assert set(args) == {"city", "days", "unit", "hours", "detail"}        # optional ones at 100%
        assert 7 <= args["days"] <= 9 and args["unit"] in ("C", "F") and 2 <= len(args["hours"]) <= 3
        assert all(1 <= h <= 2 for h in args["hours"]) and set(args["detail"]) == {"level"}   # fields at 0%
        arg_tokens = len(s.client.tokens(call["function"]["arguments"]))
        assert out["usage"]["completion_tokens"] == arg_tokens + 3          # llm-d counts name, id and type
        # a named function is called exactly once; "none" answers with text; auto at 0%: text
        named = s.client.chat(messages=USER, tools=[WEATHER, TIME],
                              tool_choice={"type": "function", "function": {"name": "get_time"}})
        assert [c["function"] for c in named["choices"][0]["message"]["tool_calls"]] == [
            {"name": "get_time", "arguments": "{}"}]
        for choice_value in ("none", "auto"):
            plain = s.client.chat(messages=USER, tools=[WEATHER], tool_choice=choice_value, max_tokens=3)
            assert plain["choices"][0]["message"]["tool_calls"] == [] and plain["choices"][0]["message"]["content"]
    with InProcessSim("--tool-call-extra-call-probability", "100") as s:
        calls = s.client.chat(messages=USER, tools=[WEATHER, TIME])["choices"][0]["message"]["tool_calls"]
        assert len(calls) == 2                                              # every tool, at 100%


def test_streamed_tool_calls():
    with InProcessSim("--tool-call-extra-call-probability", "0") as s:
        sse = s.client.stream("/v1/chat/completions", {"messages": USER, "tools": [TIME, WEATHER], "stream": True,
                                                       "tool_choice": "required", "seed": 3})
        role, *pieces, finish, done = sse.events()
        sse.close()
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and done == "[DONE]"
        deltas = [p["choices"][0]["delta"]["tool_calls"][0] for p in pieces]
        assert {"id", "type"} <= set(deltas[0]) and "name" in deltas[0]["function"]
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])
        assert finish["choices"][0]["finish_reason"] == "tool_calls"
        whole = s.client.chat(messages=USER, tools=[TIME, WEATHER], tool_choice="required", seed=3)
        [call] = whole["choices"][0]["message"]["tool_calls"]
        assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
        assert deltas[0]["id"] == call["id"] and deltas[0]["function"]["name"] == call["function"]["name"]


@pytest.mark.parametrize("parameters, message", [
    (None, "missing properties: 'parameters'"),
    ({"type": "object"}, "an object parameter needs 'properties'"),
    ({"type": "thing"}, "'type' must be one of"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "an array parameter needs 'items'"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": [1]}}}, "'enum' must be a list of string"),
    ({"type": "object", "properties": {"a": {"type": "string", "oneOf": []}}}, "unsupported keyword 'oneOf'"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}, "minItems": -1}}},
     "'minItems' must be a non-negative integer"),
])
def test_tool_schemas_are_checked_unless_told_not_to(echo, parameters, message):
    function = {"name": "f", "description": "d"}
    if parameters is not None:
        function["parameters"] = parameters
    reply = echo.client.post("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function",
                                                                                   "function": function}]})
    assert reply.status == 400 and message in reply.error and reply.error.startswith("Tool validation failed")
    assert reply.param == "tools"
    with InProcessSim("--skip-tool-validation") as s:
        out = s.client.chat(messages=USER, tools=[{"type": "function", "function": function}], tool_choice="none",
                            max_tokens=1)
        assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_missing_named_tool_is_an_error(echo):
    reply = echo.client.post("/v1/chat/completions", {"messages": USER, "tools": [TIME],
                                                      "tool_choice": {"type": "function", "function": {"name": "x"}}})
    assert reply.status == 400 and reply.param == "tool_choice" and "'x'" in reply.error


# -- headers and errors ---------------------------------------------------------------------------

def test_request_id_headers():
    with InProcessSim("--enable-request-id-headers") as s:
        reply = s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc-1"})
        assert reply.headers["x-request-id"] == "abc-1" and reply.json["id"] == "cmpl-abc-1"
        generated = s.client.post("/v1/chat/completions", {"messages": USER, "max_tokens": 1})
        assert generated.json["id"] == "chatcmpl-" + generated.headers["x-request-id"]
        sse = s.client.stream("/v1/completions", {"prompt": "x", "max_tokens": 1, "stream": True},
                              headers={"X-Request-Id": "s-2"})
        assert sse.headers["x-request-id"] == "s-2" and sse.events()[0]["id"] == "cmpl-s-2"
        sse.close()
        assert s.client.post("/v1/embeddings", {"input": "x"}, headers={"X-Request-Id": "e"}).headers[
            "x-request-id"] == "e"
    with InProcessSim() as s:                  # off by default: neither echoed nor used
        reply = s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc"})
        assert "x-request-id" not in reply.headers and reply.json["id"] != "cmpl-abc"


def test_return_error_header(echo):
    c = echo.client
    for status in (429, 500, 503, 418):
        reply = c.post("/v1/chat/completions", {"messages": USER}, headers={"X-Return-Error": str(status)})
        assert reply.status == status and reply.error == (
            "Simulated error triggered by X-Return-Error header (code %d)" % status)
    bad = c.post("/v1/completions", {"prompt": "x"}, headers={"X-Return-Error": "soon"})
    assert bad.status == 400 and bad.error.startswith('Invalid X-Return-Error header value "soon"')
    for status in ("99", "200", "302"):
        assert c.post("/v1/completions", {"prompt": "x"}, headers={"X-Return-Error": status}).status == 400
    m = c.metrics()
    before = sum(v for (name, _), v in m.items() if name == "vllm:request_success_total")
    c.post("/v1/completions", {"prompt": "x"}, headers={"X-Return-Error": "500"})
    after = sum(v for (name, _), v in c.metrics().items() if name == "vllm:request_success_total")
    assert after == before                                       # nothing was generated


def test_pod_headers():
    with InProcessSim(environ={"POD_NAME": "sim-3", "POD_NAMESPACE": "team"}) as s:
        reply = s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert (reply.headers["x-inference-pod"], reply.headers["x-inference-port"],
                reply.headers["x-inference-namespace"]) == ("sim-3", str(s.ranks[0].port), "team")
        sse = s.client.stream("/v1/chat/completions", {"messages": USER, "max_tokens": 1, "stream": True})
        assert sse.headers["x-inference-pod"] == "sim-3"
        sse.close()
    with InProcessSim() as s:
        assert not any(h.startswith("x-inference") for h in s.client.post("/v1/completions", {"prompt": "x"}).headers)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": {"x": 1}}, "prompt"),
    ({"prompt": "x", "model": "nope"}, "model"),
    ({"prompt": "x", "cache_hit_threshold": 2}, "cache_hit_threshold"),
    ({"prompt": "x", "kv_transfer_params": {"do_remote_decode": True}, "stream": True}, "stream"),
    ({"prompt": "x", "stream_options": {}}, "stream_options"),
])
def test_errors_name_their_param(echo, body, param):
    reply = echo.client.post("/v1/completions", body)
    assert reply.status in (400, 404) and reply.param == param and reply.json["error"]["code"] == reply.status


def test_multimodal_parts_are_refused(echo):
    message = {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                           {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
    reply = echo.client.post("/v1/chat/completions", {"messages": [message]})
    assert reply.status == 400 and "multimodal inputs (image_url) are not supported" in reply.error


# -- cache hit threshold --------------------------------------------------------------------------

def test_cache_hit_threshold():
    with InProcessSim("--mode", "echo", "--global-cache-hit-threshold", "0.5") as s:
        c = s.client
        first = c.complete(prompt=WORDS, max_tokens=5)              # nothing cached: below the global 0.5
        assert first["choices"][0]["finish_reason"] == "cache_threshold" and first["choices"][0]["text"] == ""
        assert first["usage"]["completion_tokens"] == 0 and first["usage"]["prompt_tokens"] == 40
        again = c.complete(prompt=WORDS, max_tokens=5)               # its blocks were stored: 32/40 hit
        assert again["choices"][0]["finish_reason"] == "length" and again["usage"]["completion_tokens"] == 5
        assert c.complete(prompt=WORDS, max_tokens=5, cache_hit_threshold=0.9)["choices"][0][
            "finish_reason"] == "cache_threshold"                   # the request's own threshold wins
        assert c.complete(prompt="fresh words", max_tokens=1, cache_hit_threshold=0)["choices"][0][
            "finish_reason"] == "length"
        sse = c.stream("/v1/chat/completions", {"messages": USER, "stream": True,
                                                "stream_options": {"include_usage": True}})
        role, finish, usage, done = sse.events()
        sse.close()
        assert finish["choices"][0]["finish_reason"] == "cache_threshold" and usage["usage"]["completion_tokens"] == 0
        m = c.metrics()
        assert m[("vllm:request_success_total", (("finished_reason", "cache_threshold"),))] == 3
    with InProcessSim("--mode", "echo") as s:                      # the header forces it
        reply = s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 3},
                              headers={"X-Cache-Threshold-Finish-Reason": "true"})
        assert reply.json["choices"][0]["finish_reason"] == "cache_threshold"
        assert s.client.post("/v1/completions", {"prompt": "x", "max_tokens": 3}, headers={
            "X-Cache-Threshold-Finish-Reason": "false"}).json["choices"][0]["finish_reason"] != "cache_threshold"


# -- disaggregated prefill/decode -------------------------------------------------------------------

def test_prefill_answers_kv_transfer_params():
    with InProcessSim("--mode", "echo", "--block-size", "4") as s:
        out = s.client.complete(prompt="a b c d e f g h i j", max_tokens=1,
                                kv_transfer_params={"do_remote_decode": True})
        params = out["kv_transfer_params"]
        assert out["choices"][0]["finish_reason"] == "remote_decode"
        assert (params["do_remote_prefill"], params["do_remote_decode"], params["tp_size"]) == (True, False, 1)
        assert params["remote_port"] == s.ranks[0].port and params["remote_host"] == "127.0.0.1"
        assert params["remote_engine_id"] == s.client.ok("GET", "/query")["0"]["engine_id"]
        assert len(params["remote_block_ids"]) == 3 and all(type(b) is int for b in params["remote_block_ids"])
        assert "kv_transfer_params" not in s.client.complete(prompt="x", max_tokens=1)
        assert s.client.metrics()[("vllm:request_success_total", (("finished_reason", "remote_decode"),))] == 1


def test_decode_ttft_is_the_kv_transfer_time():
    def ttft_sum(*flags, **body):
        with InProcessSim("--mode", "echo", "--time-to-first-token", "80ms", *flags) as s:
            s.client.complete(prompt=WORDS, max_tokens=1, **body)
            return s.client.metrics()[("vllm:time_to_first_token_seconds_sum", ())]

    decode = {"kv_transfer_params": {"do_remote_prefill": True}}
    assert ttft_sum() == pytest.approx(0.08)                                      # local prefill
    assert ttft_sum("--kv-cache-transfer-latency", "30ms", **decode) == pytest.approx(0.03)
    assert ttft_sum("--kv-cache-transfer-time-per-token", "1ms", **decode) == pytest.approx(0.04)   # 40 tokens
    assert ttft_sum("--kv-cache-transfer-latency", "30ms", "--kv-cache-transfer-time-per-token", "1ms",
                    "--latency-calculator", "per-token", **decode) == pytest.approx(0.04)
    assert ttft_sum("--kv-cache-transfer-time-per-token", "1ms", "--latency-calculator", "constant",
                    **decode) == 0.0


# -- random answer lengths --------------------------------------------------------------------------

def test_histogram_lengths_follow_llmds_buckets():
    rng = random.Random(1)
    draws = [histogram_length(rng, 100) for _ in range(20000)]
    share = {name: sum(lo <= d <= hi for d in draws) / len(draws) for name, (lo, hi) in {
        "b0": (1, 19), "b1": (20, 39), "b2": (40, 59), "b3": (60, 79), "b4": (80, 99), "max": (100, 100)}.items()}
    for name, expected in zip(share, (0.2, 0.3, 0.2, 0.05, 0.1, 0.15)):
        assert share[name] == pytest.approx(expected, abs=0.015), (name, share)
    # beyond 101 tokens the buckets are 20 wide, the fourth stretches
    wide = [histogram_length(rng, 1000) for _ in range(5000)]
    assert all(1 <= d <= 1000 for d in wide) and any(d > 200 for d in wide)
    assert sum(61 <= d <= 960 for d in wide) / len(wide) == pytest.approx(0.05, abs=0.015)
    assert {histogram_length(rng, 4) for _ in range(200)} == {1, 2, 3, 4}
    assert answer_length(rng, 50, 4000, ignore_eos=True) == (50, "length")
    assert answer_length(rng, 50, 4000, min_tokens=50) == (50, "length")
    open_draws = [answer_length(rng, None, 4000)[0] for _ in range(5000)]
    assert 38 < sum(open_draws) / len(open_draws) < 46 and min(open_draws) >= 1


def test_random_answers_have_histogram_lengths():
    with InProcessSim("--seed", "4") as s:
        counts = [s.client.complete(prompt="p", max_tokens=10)["usage"]["completion_tokens"] for _ in range(60)]
        assert set(counts) <= set(range(1, 11)) and 10 in counts and len(set(counts)) > 3
        replies = [s.client.complete(prompt="p", max_tokens=10)["choices"][0] for _ in range(20)]
        assert all((r["finish_reason"] == "length") == (len(s.client.tokens(r["text"])) == 10) for r in replies)
