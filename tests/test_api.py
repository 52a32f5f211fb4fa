"""The HTTP API of DESIGN.md §5 against kvcm.serve.Service running in-process on uvloop (a
background thread): real HTTP over TCP on 127.0.0.1, real ZMQ publishers, the real fixture
tokenizers. Each test publishes under pod and model names of its own, so tests sharing a
service do not see each other's blocks."""

import functools
import json
import os
import re
import urllib.parse
import uuid

import pytest
import tokenizers
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st
from zmq.utils.monitor import recv_monitor_message

from kvcm._core import BlockHasher
from kvcm.publisher import block_removed, block_stored
from netns import ExternalHost
from serving import (BLOCK, HASHER, QWEN, TOKENIZERS, Client, Engine, InProcess, free_port, offloaded, removed,
                     stored, tokens, until)

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
MISTRAL = "mistralai/Mistral-Nemo-Instruct-2407"
FIXTURE_DIRS = {QWEN: "qwen2.5-instruct", LLAMA: "llama-3.2-instruct", MISTRAL: "mistral-nemo-instruct-2407"}
TOKENIZER_ARGS = [a for model, d in FIXTURE_DIRS.items() for a in ("--tokenizer", "%s=%s" % (model, TOKENIZERS / d))]
ADMIN_TOKEN = "s3cret-admin"
CHAT = [{"role": "system", "content": "You route requests."},
        {"role": "user", "content": "Which pod holds the longest prefix of this conversation? " * 4}]


def start(*args, host="127.0.0.1"):
    return InProcess(*TOKENIZER_ARGS, "--log-level", "error", *args, host=host)


@pytest.fixture(scope="module")
def kvcm(shared):
    service = start("--trust-request-chat-template")
    yield service
    service.close()


@pytest.fixture
def client(kvcm):
    return kvcm.client


@pytest.fixture
def engine(kvcm):
    """engine(pod, model) -> a connected Engine, closed after the test."""
    made = []

    def make(pod, model, **kw):
        made.append(Engine(kvcm.client, kvcm.zmq_endpoint, pod, model, **kw).connect())
        return made[-1]
    yield make
    for e in made:
        e.close()


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


@functools.lru_cache(maxsize=None)
def reference_tokenizer(model):
    return tokenizers.Tokenizer.from_file(str(TOKENIZERS / FIXTURE_DIRS[model] / "tokenizer.json"))


def reference_ids(model, text, add_special_tokens=True):
    """Token ids by the `tokenizers` library itself from the fixture's tokenizer.json."""
    return reference_tokenizer(model).encode(text, add_special_tokens=add_special_tokens).ids


# -- /v1/score by token ids -------------------------------------------------------------------

@pytest.mark.parametrize("model", ["never-published/anything", QWEN, "x"])
@pytest.mark.parametrize("n", [0, 15, 16, 70])
def test_score_by_token_ids_accepts_any_model_and_scores_nothing_unpublished(client, model, n):
    ids = list(range(1000, 1000 + n))
    assert client.score(model, token_ids=ids) == {
        "model": model, "scores": {}, "blocks": n // BLOCK, "tokens": n, "matched": {}}


def test_score_by_token_ids_walks_each_pods_run_from_block_0_with_tier_weights(client, engine):
    model = unique("api-runs")
    ids = tokens(1, 4, tail=5)
    a, b, c, d = (engine(unique(p), model) for p in "abcd")
    a.send(stored(ids))                                    # gpu, all 4 blocks
    b.send(stored(ids[:2 * BLOCK]), offloaded(ids, 1))     # gpu 0-1, and cpu for block 0
    c.send(stored(ids, medium="CPU"))                      # cpu, all 4
    d.send(stored(ids, 2))                                 # blocks 2-3 only: no block 0
    result = client.score(model, token_ids=ids)
    assert result["blocks"] == 4 and result["tokens"] == len(ids)
    assert result["scores"] == pytest.approx({a.pod: 4.0, b.pod: 2.0, c.pod: 3.2})
    assert result["matched"] == {
        a.pod: {"blocks": 4, "tokens": 64, "tiers": {"gpu": 4}},
        b.pod: {"blocks": 2, "tokens": 32, "tiers": {"gpu": 2, "cpu": 1}},
        c.pod: {"blocks": 4, "tokens": 64, "tiers": {"cpu": 4}},
    }
    # a removal in the middle of a run ends it there
    a.send(removed(ids, [1]))
    assert client.score(model, token_ids=ids)["matched"][a.pod]["blocks"] == 1


@pytest.mark.parametrize("pods, expected", [
    (["{a}"], {"{a}"}),
    (["{a}", "{b}"], {"{a}", "{b}"}),
    (["{b}", "nobody"], {"{b}"}),
    (["nobody"], set()),
    (None, {"{a}", "{b}"}),
])
def test_score_pods_filter(client, engine, pods, expected):
    model = unique("api-filter")
    ids = tokens(2, 3)
    a, b = engine(unique("a"), model), engine(unique("b"), model)
    a.send(stored(ids))
    b.send(stored(ids[:BLOCK]))
    names = {"{a}": a.pod, "{b}": b.pod}
    body = {} if pods is None else {"pods": [names.get(p, p) for p in pods]}
    result = client.score(model, token_ids=ids, **body)
    assert set(result["scores"]) == {names[p] for p in expected}
    assert set(result["matched"]) == set(result["scores"])


def test_cache_salt_scores_only_the_salted_chain(client, engine):
    model = unique("api-salt")
    ids = tokens(3, 3)
    salted, plain = engine(unique("salted"), model), engine(unique("plain"), model)
    salted.send(stored(ids, salt="tenant-a"))
    plain.send(stored(ids))
    assert set(client.score(model, token_ids=ids, cache_salt="tenant-a")["scores"]) == {salted.pod}
    assert set(client.score(model, token_ids=ids)["scores"]) == {plain.pod}
    assert client.score(model, token_ids=ids, cache_salt="tenant-b")["scores"] == {}


# -- /v1/score by prompt and by messages ------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog near the riverbank at dawn, " * 3


@pytest.mark.parametrize("model", [LLAMA, MISTRAL])
def test_score_by_prompt_follows_add_special_tokens(client, engine, model):
    with_bos = client.tokenize(model, prompt=PROMPT)["token_ids"]
    without = client.tokenize(model, prompt=PROMPT, add_special_tokens=False)["token_ids"]
    assert with_bos == reference_ids(model, PROMPT) and without == reference_ids(model, PROMPT, False)
    assert with_bos[1:] == without and with_bos[0] != without[0]       # the BOS token
    pod_bos, pod_plain = engine(unique("bos"), model), engine(unique("plain"), model)
    pod_bos.send(stored(with_bos))
    pod_plain.send(stored(without))
    default = client.score(model, prompt=PROMPT)
    assert set(default["scores"]) == {pod_bos.pod}
    assert default["tokens"] == len(with_bos) and default["blocks"] == len(with_bos) // BLOCK
    assert default["scores"][pod_bos.pod] == len(with_bos) // BLOCK
    assert set(client.score(model, prompt=PROMPT, add_special_tokens=True)["scores"]) == {pod_bos.pod}
    assert set(client.score(model, prompt=PROMPT, add_special_tokens=False)["scores"]) == {pod_plain.pod}


CUSTOM_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}" \
                  "{% if add_generation_prompt %}<assistant>{% endif %}"
TOOL = {"type": "function", "function": {"name": "pick_pod", "description": "Chooses a pod",
                                        "parameters": {"type": "object", "properties": {}}}}
KWARGS_TEMPLATE = "{{ greeting }}|{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize("options, rendered", [
    ({}, None),
    ({"add_generation_prompt": False}, None),
    ({"chat_template": CUSTOM_TEMPLATE},
     "<system>%s</system><user>%s</user><assistant>" % (CHAT[0]["content"], CHAT[1]["content"])),
    ({"chat_template": CUSTOM_TEMPLATE, "add_generation_prompt": False},
     "<system>%s</system><user>%s</user>" % (CHAT[0]["content"], CHAT[1]["content"])),
    ({"chat_template": KWARGS_TEMPLATE, "chat_template_kwargs": {"greeting": "hej"}},
     "hej|%s%s" % (CHAT[0]["content"], CHAT[1]["content"])),
    ({"tools": [TOOL]}, None),
], ids=["default", "no-generation-prompt", "template", "template-no-generation-prompt", "kwargs", "tools"])
def test_score_and_tokenize_by_messages_render_the_chat_template(client, engine, options, rendered):
    out = client.tokenize(QWEN, messages=CHAT, **options)
    text = out["prompt"]
    if rendered is not None:
        assert text == rendered
    else:
        assert text.startswith("<|im_start|>system\nYou route requests.")
        assert "<|im_end|>\n<|im_start|>user\n" + CHAT[1]["content"] + "<|im_end|>\n" in text
        assert text.endswith("<|im_start|>assistant\n") != (options.get("add_generation_prompt") is False)
        assert ('"name": "pick_pod"' in text) == ("tools" in options)
    assert out["token_ids"] == reference_ids(QWEN, text, add_special_tokens=False)
    assert out["count"] == len(out["token_ids"]) and out["model"] == QWEN
    salt = unique("salt")               # other tests store these conversations too
    pod = engine(unique("chat"), QWEN)
    pod.send(stored(out["token_ids"], salt=salt))
    by_messages = client.score(QWEN, messages=CHAT, cache_salt=salt, **options)
    assert by_messages == client.score(QWEN, token_ids=out["token_ids"], cache_salt=salt)
    assert by_messages["scores"] == {pod.pod: len(out["token_ids"]) // BLOCK}


@pytest.mark.parametrize("model", [QWEN, LLAMA, MISTRAL])
@pytest.mark.parametrize("text", ["hello world", "é ü 中文 🙂 " * 3, "long prompt " * 500],
                         ids=["short", "unicode", "over-4096-chars"])
def test_tokenize_prompt_matches_the_tokenizer_files(client, model, text):
    for flag in (True, False):
        out = client.tokenize(model, prompt=text, add_special_tokens=flag)
        assert out == {"model": model, "token_ids": reference_ids(model, text, flag),
                       "count": len(reference_ids(model, text, flag))}
    assert client.tokenize(model, prompt=text)["token_ids"] == reference_ids(model, text, True)


# -- the llm-d endpoints ----------------------------------------------------------------------

def test_llmd_endpoints_score_nothing_as_null_and_pods_as_a_map(client, engine):
    assert client.ok("POST", "/score_completions", {"model": QWEN, "prompt": "hi"}) is None
    short = client.ok("POST", "/score_chat_completions",
                      {"model": QWEN, "messages": [{"role": "user", "content": "hi"}],
                       "chat_template": "{{ messages[0].content }}"})
    assert short == {"podScores": None, "templated_messages": "hi"}
    ids = client.tokenize(QWEN, prompt=PROMPT)["token_ids"]
    chat = client.tokenize(QWEN, messages=CHAT)
    pod = engine(unique("llmd"), QWEN)
    pod.send(stored(ids), stored(chat["token_ids"]))
    assert client.ok("POST", "/score_completions", {"model": QWEN, "prompt": PROMPT}) == {
        pod.pod: len(ids) // BLOCK}
    assert client.ok("POST", "/score_chat_completions", {"model": QWEN, "messages": CHAT}) == {
        "podScores": {pod.pod: len(chat["token_ids"]) // BLOCK}, "templated_messages": chat["prompt"]}


# -- request validation -----------------------------------------------------------------------

INVALID = [
    ("/v1/score", {"model": "m"}, ["'token_ids'", "'prompt'", "'messages'"]),
    ("/v1/score", {"model": "m", "token_ids": [1], "prompt": "x"}, ["'token_ids'", "'prompt'", "'messages'"]),
    ("/v1/score", {"model": "m", "prompt": "x", "messages": []}, ["'token_ids'", "'prompt'", "'messages'"]),
    ("/v1/score", {"token_ids": [1]}, ["'model'"]),
    ("/v1/score", {"model": 5, "token_ids": [1]}, ["'model'"]),
    ("/v1/score", {"model": "m", "token_ids": "1,2"}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [1, -2]}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [1, "2"]}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [1.5]}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [True]}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [2 ** 64]}, ["'token_ids'"]),
    ("/v1/score", {"model": "m", "token_ids": [1], "pods": "a"}, ["'pods'"]),
    ("/v1/score", {"model": "m", "token_ids": [1], "pods": [1]}, ["'pods'"]),
    ("/v1/score", {"model": "m", "token_ids": [1], "cache_salt": 7}, ["'cache_salt'"]),
    ("/v1/score", {"model": QWEN, "prompt": 5}, ["'prompt'"]),
    ("/v1/score", {"model": QWEN, "prompt": "x", "add_special_tokens": "no"}, ["'add_special_tokens'"]),
    ("/v1/score", {"model": QWEN, "messages": "hi"}, ["'messages'"]),
    ("/v1/score", {"model": QWEN, "messages": ["hi"]}, ["'messages'"]),
    ("/v1/score", {"model": QWEN, "messages": CHAT, "chat_template_kwargs": "x"}, ["'chat_template_kwargs'"]),
    ("/v1/score", {"model": QWEN, "messages": CHAT, "add_generation_prompt": "yes"}, ["'add_generation_prompt'"]),
    ("/v1/score", {"model": QWEN, "messages": CHAT, "chat_template": 1}, ["'chat_template'"]),
    ("/v1/score", [1, 2], ["JSON object"]),
    ("/v1/score", b'{"model": "m", ', ["JSON"]),
    ("/v1/tokenize", {"model": QWEN}, ["'prompt'", "'messages'"]),
    ("/v1/tokenize", {"model": QWEN, "token_ids": [1]}, ["'prompt'", "'messages'"]),
    ("/v1/tokenize", {"model": QWEN, "prompt": "x", "messages": CHAT}, ["'prompt'", "'messages'"]),
    ("/v1/hash", {"model": "m"}, ["'token_ids'"]),
    ("/v1/hash", {"model": "m", "token_ids": [1], "cache_salt": []}, ["'cache_salt'"]),
    ("/score_completions", {"model": QWEN}, ["'prompt'"]),
    ("/score_completions", {"prompt": "x"}, ["'model'"]),
    ("/score_chat_completions", {"model": QWEN}, ["'messages'"]),
    ("/score_chat_completions", {"model": QWEN, "messages": {}}, ["'messages'"]),
    ("/v1/engines", {"endpoint": "tcp://127.0.0.1:1"}, ["'name'"]),
    ("/v1/engines", {"name": "e"}, ["'endpoint'"]),
    ("/v1/engines", {"name": "e", "endpoint": "tcp://127.0.0.1:1", "model": 3}, ["'model'"]),
    ("/v1/engines", {"name": "e", "endpoint": "not-an-endpoint"}, ["not-an-endpoint"]),
    ("/v1/engines", {"name": "e", "endpoint": "tcp://127.0.0.1:1", "replay": "udp://x"}, ["udp://x"]),
]


@pytest.mark.parametrize("path, body, names", INVALID,
                         ids=["%s-%d" % (p.strip("/").replace("/", "-"), i) for i, (p, _, _) in enumerate(INVALID)])
def test_invalid_requests_are_400_naming_the_field(client, path, body, names):
    reply = client.post(path, body)
    assert reply.status == 400, reply
    message = reply.error
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("path, body", [
    ("/v1/score", {"prompt": "x"}),
    ("/v1/score", {"messages": CHAT}),
    ("/v1/tokenize", {"prompt": "x"}),
    ("/v1/tokenize", {"messages": CHAT}),
    ("/score_completions", {"prompt": "x"}),
    ("/score_chat_completions", {"messages": CHAT}),
])
def test_unknown_model_for_text_is_404_listing_the_known_models(client, path, body):
    reply = client.post(path, dict(body, model="nobody/has-this"))
    assert reply.status == 404, reply
    message = reply.error
    assert "nobody/has-this" in message
    for model in FIXTURE_DIRS:
        assert model in message, message


def mistral_alternation_message():
    template = json.loads((TOKENIZERS / FIXTURE_DIRS[MISTRAL] / "tokenizer_config.json").read_text())["chat_template"]
    return re.search(r'raise_exception\("([^"]*alternate[^"]*)"\)', template).group(1)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no ' + messages[0].content + ' here') }}", "^no one here$"),
    ("{% for m in messages %}", "template"),
    ("{{ 1 / 0 }}", "division by zero"),
])
def test_a_request_template_that_fails_is_400(client, template, message):
    reply = client.post("/v1/tokenize", {"model": QWEN, "messages": [{"role": "user", "content": "one"}],
                                         "chat_template": template})
    assert reply.status == 400, reply
    assert re.search(message, reply.error), reply


@pytest.mark.parametrize("path", ["/v1/score", "/v1/tokenize", "/score_chat_completions"])
def test_a_template_error_is_400_with_the_templates_message(client, path):
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    reply = client.post(path, {"model": MISTRAL, "messages": messages})
    assert reply.status == 400, reply
    assert reply.error == mistral_alternation_message()
    # the same model renders a conversation that alternates
    ok = client.post(path, {"model": MISTRAL, "messages": messages[:1]})
    assert ok.status == 200, ok


# -- /v1/hash -----------------------------------------------------------------------------------

@pytest.mark.parametrize("salt", [None, "tenant-a"])
@pytest.mark.parametrize("n", [15, 16, 50])
def test_hash_in_parity_gives_vllms_block_hashes(client, salt, n):
    ids = tokens(4, 0, tail=n)
    body = {"model": unique("api-hash"), "token_ids": ids}
    if salt is not None:
        body["cache_salt"] = salt
    out = client.ok("POST", "/v1/hash", body)
    extra = None if salt is None else [(("cache_salt", salt),)]
    assert out == {"model": body["model"], "mode": "parity", "keys": list(HASHER.keys(ids, extra))}
    assert len(out["keys"]) == n // BLOCK


@pytest.fixture(scope="module")
def decoupled(shared):
    service = start("--hash-mode", "kvcm", "--hash-seed", "7")
    yield service
    service.close()


@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_hash_in_kvcm_mode_is_decoupled_and_scores_by_it(decoupled, salt):
    client = decoupled.client
    model = unique("api-decoupled")
    ids = tokens(5, 3)
    body = {"model": model, "token_ids": ids}
    if salt is not None:
        body["cache_salt"] = salt
    out = client.ok("POST", "/v1/hash", body)
    hasher = BlockHasher("kvcm", "7", BLOCK, namespace=model)
    assert out == {"model": model, "mode": "decoupled",
                   "keys": list(hasher.keys(ids, None if salt is None else [[salt]]))}
    # events hashed any way at all (here: vLLM's sha256 chain) land on those keys
    with Engine(client, decoupled.zmq_endpoint, unique("pod"), model) as pod:
        pod.connect()
        pod.send(stored(ids, salt=salt))
        assert client.score(model, token_ids=ids, **({} if salt is None else {"cache_salt": salt}))["scores"] == {
            pod.pod: 3.0}


# -- /v1/pods and DELETE /v1/pods/{pod} -----------------------------------------------------------

def test_pods_has_one_entry_per_stream_with_blocks_per_tier(client, engine):
    pod, model, other_model = unique("10.0.0.7:8000"), unique("api-pods"), unique("api-pods-b")
    ids = tokens(6, 3)
    e = engine(pod, model)
    e.send(stored(ids), dp_rank=0)                       # 3 gpu
    e.send(offloaded(ids, 2), dp_rank=0)                 # + 2 cpu
    e.send(stored(tokens(7, 2)), dp_rank=1)              # + 2 gpu from rank 1
    f = engine(pod, other_model)
    f.send(stored(tokens(8, 1)), seq=41)                 # + 1 gpu in another namespace
    entries = {(s["model"], s["dp_rank"]): s for s in client.streams(pod)}
    assert set(entries) == {(model, 0), (model, 1), (other_model, 0)}
    for (m, rank), s in entries.items():
        assert s["pod"] == pod
        assert s["blocks"] == {"gpu": 6, "cpu": 2}       # the pod's blocks, every namespace
        assert s["state"] == "ok" and s["gaps"] == 0 and s["replays"] == 0
        assert isinstance(s["last_event_age_s"], float) and s["last_event_age_s"] >= 0
    assert entries[(model, 0)]["last_seq"] == 1
    assert entries[(model, 1)]["last_seq"] == 0
    assert entries[(other_model, 0)]["last_seq"] == 41
    # a gap with no replay endpoint: counted, and the stream is degraded
    f.send(stored(tokens(9, 1)), seq=45)
    s = client.stream(pod, other_model)
    assert (s["last_seq"], s["gaps"], s["state"]) == (45, 1, "degraded")


def test_lora_blocks_score_under_the_lora_name_and_count_for_the_pod(client, engine):
    pod, model, adapter = unique("lora-pod"), unique("api-lora-base"), unique("adapter")
    base_ids, lora_ids = tokens(10, 2), tokens(11, 3)
    e = engine(pod, model)
    e.send(stored(base_ids), stored(lora_ids, lora_name=adapter))
    [entry] = client.streams(pod)
    assert entry["blocks"] == {"gpu": 5}
    # LoRA namespaces are always decoupled, rooted at the adapter's name
    out = client.ok("POST", "/v1/hash", {"model": adapter, "token_ids": lora_ids})
    assert out["mode"] == "decoupled"
    assert out["keys"] == list(BlockHasher("kvcm", None, BLOCK, namespace=adapter).keys(lora_ids))
    assert client.score(adapter, token_ids=lora_ids)["scores"] == {pod: 3.0}
    assert client.score(model, token_ids=lora_ids)["scores"] == {}
    assert client.score(model, token_ids=base_ids)["scores"] == {pod: 2.0}


@pytest.mark.parametrize("path, field", [("/v1/score", "scores"), ("/score_completions", None),
                                         ("/score_chat_completions", "podScores"), ("/v1/tokenize", "token_ids")])
def test_a_lora_adapter_is_scored_by_text_with_its_base_models_tokenizer(client, engine, path, field):
    """vLLM's rule: an adapter without a tokenizer of its own uses its base model's. The base
    is the model of the stream that published the adapter's blocks."""
    pod, adapter = unique("lora-text"), unique("sql-adapter")
    body = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT_TEXT}
    with_base = client.ok("POST", path if path != "/v1/score" else "/v1/tokenize", dict(body, model=QWEN))
    assert client.post(path, dict(body, model=adapter)).status == 404, "not yet published"
    ids = client.ok("POST", "/v1/tokenize", dict(body, model=QWEN))["token_ids"]
    engine(pod, QWEN).send(stored(ids, lora_name=adapter))
    reply = client.ok("POST", path, dict(body, model=adapter))
    blocks = float(len(ids) // BLOCK)
    if path == "/v1/tokenize":
        assert reply == dict(with_base, model=adapter)
    elif path == "/score_completions":
        assert reply == {pod: blocks}
    else:
        assert reply[field] == {pod: blocks}
    assert pod not in client.score(QWEN, token_ids=ids)["scores"], "the adapter's blocks are its own"


PROMPT_TEXT = "Route this request to the engine that already holds the longest prefix of it. " * 6


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "text/plain; charset=utf-8"])
def test_json_bodies_labelled_as_curl_d_or_plain_text_are_accepted(client, content_type):
    body = json.dumps({"model": QWEN, "token_ids": list(range(40))}).encode()
    reply = client.post_as("/v1/score", body, content_type)
    assert reply.status == 200, reply
    assert reply.json["blocks"] == 2


def test_other_declared_types_are_415_and_a_missing_body_is_400(client):
    body = json.dumps({"model": QWEN, "token_ids": [1, 2]}).encode()
    assert client.post_as("/v1/score", body, "application/xml").status == 415
    reply = client.post_as("/v1/score", None, None)
    assert reply.status == 400 and "body is empty" in reply.error


@pytest.mark.parametrize("pod", ["10.0.0.8:8000", "team/a b%"], ids=["host-port", "needs-quoting"])
def test_delete_pod_clears_it_and_only_it(client, engine, pod):
    pod, model = unique(pod), unique("api-delete")
    ids = tokens(12, 3)
    gone, stays = engine(pod, model), engine(unique("stays"), model)
    gone.send(stored(ids), offloaded(ids, 1))
    stays.send(stored(ids))
    assert set(client.score(model, token_ids=ids)["scores"]) == {gone.pod, stays.pod}
    out = client.ok("DELETE", "/v1/pods/" + urllib.parse.quote(pod, safe=""))
    assert out == {"pod": pod, "removed": 4}
    assert set(client.score(model, token_ids=ids)["scores"]) == {stays.pod}
    assert client.streams(pod) == []            # its stream state went too
    assert client.ok("DELETE", "/v1/pods/" + urllib.parse.quote(pod, safe="")) == {"pod": pod, "removed": 0}
    # the pod's later events index again, from a new baseline
    gone.send(stored(ids))
    assert client.score(model, token_ids=ids)["scores"] == {gone.pod: 3.0, stays.pod: 3.0}
    (s,) = client.streams(pod)
    assert (s["batches"], s["gaps"], s["restarts"], s["blocks"]) == (1, 0, 0, {"gpu": 3})


# -- admin authorization ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(shared):
    service = start("--admin-token", ADMIN_TOKEN, host="0.0.0.0")
    yield service
    service.close()


@pytest.fixture(scope="module")
def open_admin(shared):
    service = start(host="0.0.0.0")
    yield service
    service.close()


@pytest.fixture(scope="module")
def external_host():
    """A client with a non-loopback address of its own (tests/netns.py)."""
    reason = ExternalHost.skip_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    host = ExternalHost()
    yield host
    host.close()


ADMIN_REQUESTS = [
    ("DELETE", "/v1/pods/somebody", None, 200),
    ("POST", "/v1/engines", {"name": "{name}", "endpoint": "tcp://127.0.0.1:9"}, 201),
    ("DELETE", "/v1/engines/nobody", None, 404),      # authorized, then: no such engine
    # Dynamo's indexer API (kvcm/dynamo.py): registering a worker adds an engine
    ("POST", "/register", {"instance_id": "{id}", "endpoint": "tcp://127.0.0.1:9", "model_name": "m",
                           "block_size": BLOCK}, 201),
    ("POST", "/unregister", {"instance_id": "{id}", "model_name": "m"}, 404),
]
_INSTANCE_IDS = iter(range(1000, 1 << 32))
AUTH_CASES = [
    # (service, client address, Authorization header, expected status or None = the request's own)
    ("guarded", "loopback", None, 401),
    ("guarded", "loopback", "Bearer wrong-token", 403),
    ("guarded", "loopback", "Bearer", 401),
    ("guarded", "loopback", "Basic " + ADMIN_TOKEN, 401),
    ("guarded", "loopback", "Bearer " + ADMIN_TOKEN, None),
    ("guarded", "loopback", "bearer " + ADMIN_TOKEN, None),
    ("guarded", "external", "Bearer " + ADMIN_TOKEN, None),
    ("guarded", "external", None, 401),
    ("open_admin", "loopback", None, None),
    ("open_admin", "external", None, 403),
    ("open_admin", "external", "Bearer anything", 403),
]


@pytest.mark.parametrize("method, path, body, allowed", ADMIN_REQUESTS,
                         ids=["delete-pod", "add-engine", "remove-engine", "register", "unregister"])
@pytest.mark.parametrize("which, address, auth, status", AUTH_CASES,
                         ids=["-".join(str(x) for x in case[:3])[:60] for case in AUTH_CASES])
def test_admin_endpoints_need_the_token_or_loopback(request, method, path, body, allowed, which, address, auth, status):
    service = request.getfixturevalue(which)
    client = Client("127.0.0.1", service.port) if address == "loopback" else request.getfixturevalue("external_host")
    if body is not None:
        fresh = {"{name}": unique("engine"), "{id}": next(_INSTANCE_IDS)}
        body = {k: fresh.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    headers = {"Authorization": auth} if auth else None
    if address == "loopback":
        reply = client.request(method, path, body, headers=headers)
    else:
        reply = client.request(service.port, method, path, body, headers=headers)
    expected = allowed if status is None else status
    assert reply.status == expected, reply
    if expected in (401, 403):
        reply.error
    if expected == 401:
        assert reply.headers["www-authenticate"].lower().startswith("bearer"), reply.headers


# -- POST /v1/engines, DELETE /v1/engines/{name} (connect mode) ---------------------------------

def disconnected(monitor):
    while True:
        try:
            if recv_monitor_message(monitor, zmq.NOBLOCK)["event"] == zmq.EVENT_DISCONNECTED:
                return True
        except zmq.Again:
            return False


def test_engines_registered_at_run_time_feed_the_index_until_removed(client):
    name, model = unique("engine"), unique("api-engines")
    ids = tokens(13, 2)
    with Engine(client, "tcp://127.0.0.1:*", name, model, topic="") as e:
        created = client.post("/v1/engines", {"name": name, "endpoint": e.pub.endpoint, "model": model})
        assert created.status == 201 and created.json == {"engine": name}, created
        listed = client.ok("GET", "/v1/engines")["engines"]
        assert {"name": name, "endpoint": e.pub.endpoint, "replay": None, "model": model} in listed
        e.connect()
        e.send(stored(ids))
        assert client.score(model, token_ids=ids)["scores"] == {name: 2.0}

        again = client.post("/v1/engines", {"name": name, "endpoint": "tcp://127.0.0.1:9"})
        assert again.status == 400 and name in again.error, again

        monitor = e.pub.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        assert client.ok("DELETE", "/v1/engines/" + name) == {"engine": name, "removed": True}
        until(lambda: disconnected(monitor), "kvcm to close its SUB socket to the engine")
        assert name not in [x["name"] for x in client.ok("GET", "/v1/engines")["engines"]]
        assert client.score(model, token_ids=ids)["scores"] == {name: 2.0}    # its blocks stay
        gone = client.delete("/v1/engines/" + name)
        assert gone.status == 404 and name in gone.error, gone


def test_an_engine_entry_without_model_takes_the_topics(client):
    name, model = unique("engine"), unique("api-engines-topic")
    ids = tokens(14, 1)
    with Engine(client, "tcp://127.0.0.1:*", name, model, topic="kv@ignored-pod@" + model) as e:
        assert client.post("/v1/engines", {"name": name, "endpoint": e.pub.endpoint}).status == 201
        try:
            e.connect()
            e.send(stored(ids))
            assert client.score(model, token_ids=ids)["scores"] == {name: 1.0}
        finally:
            client.delete("/v1/engines/" + name)


# -- health, readiness, metrics, routing errors -------------------------------------------------------

@pytest.mark.parametrize("path, body", [("/health", {"status": "ok"}), ("/ready", {"status": "ready"})])
def test_health_and_ready(client, path, body):
    assert client.ok("GET", path) == body
    head = client.request("HEAD", path)
    assert head.status == 200 and head.body == b""


def sample(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_ingest_index_and_requests(client, engine):
    model = unique("api-metrics")
    ids = tokens(15, 4)
    before = client.metrics()
    engine(unique("m"), model).send(stored(ids))
    for _ in range(3):
        client.score(model, token_ids=ids)
    assert client.post("/v1/score", {"model": model}).status == 400
    client.tokenize(QWEN, prompt="count me")
    after = client.metrics()

    def delta(name, **labels):
        return (sample(after, name, **labels) or 0) - (sample(before, name, **labels) or 0)
    assert delta("kvcm_ingest_blocks_stored_total") >= 4
    assert sample(after, "kvcm_index_blocks") >= 4
    assert delta("kvcm_http_request_duration_seconds_count", endpoint="/v1/score", method="POST", status="200") >= 3
    assert delta("kvcm_http_request_duration_seconds_count", endpoint="/v1/score", method="POST", status="400") >= 1
    assert delta("kvcm_http_lane_requests_total") >= 3     # the token-id requests took the core's lane
    assert delta("kvcm_tokenize_duration_seconds_count", model=QWEN) >= 1
    assert sample(after, "kvcm_hash_parity_mismatch_total") == 0
    assert sample(after, "kvcm_hash_parity_verified_total") >= 1
    assert sample(after, "kvcm_index_capacity_blocks") == 10_000_000
    assert sample(after, "kvcm_namespaces", mode="parity") >= 1


def test_metrics_labels_do_not_grow_with_request_contents(client):
    """Bounded everything (DESIGN §10): junk paths and model names a client makes up must not
    become label values."""
    junk = [unique("nobody-model") for _ in range(3)]
    for model in junk:
        assert client.post("/v1/tokenize", {"model": model, "prompt": "x"}).status == 404
        assert client.post("/v1/score", {"model": model, "prompt": "x"}).status == 404
    assert client.get("/" + unique("junk-path")).status == 404
    text = client.get("/metrics").body.decode()
    for model in junk:
        assert model not in text
    assert "junk-path" not in text


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/nope", 404, None),
    ("GET", "/v1", 404, None),
    ("GET", "/v1/pods/a/b", 404, None),
    ("GET", "/v1/score", 405, "POST"),
    ("PUT", "/v1/tokenize", 405, "POST"),
    ("POST", "/v1/pods", 405, "GET, HEAD"),
    ("DELETE", "/health", 405, "GET, HEAD"),
    ("GET", "/v1/pods/x", 405, "DELETE"),
    ("PUT", "/v1/engines", 405, "GET, HEAD, POST"),
    ("POST", "/v1/engines/x", 405, "DELETE"),
])
def test_unknown_paths_and_methods_are_json_errors(client, method, path, status, allow):
    reply = client.request(method, path, {} if method in ("POST", "PUT") else None)
    assert reply.status == status, reply
    reply.error
    assert reply.headers.get("allow") == allow


# -- a publisher with another seed --------------------------------------------------------------------

def test_a_seed_mismatch_switches_the_namespace_to_decoupled_loudly_and_keeps_scoring(shared, caplog):
    """Engines hashing with PYTHONHASHSEED=42 while kvcm expects the default: the first
    verifiable event reveals it; the namespace turns decoupled, the mismatch is counted once,
    the earlier parity entries are rebuilt from the replay endpoint that pod has, and scoring
    by token ids finds both pods."""
    replay = "tcp://127.0.0.1:%d" % free_port()
    early = unique("parity-pod")
    service = start("--replay-endpoint", "%s=%s" % (early, replay))
    try:
        client = service.client
        model, untouched = unique("api-seed"), unique("api-seed-other")
        ids = tokens(16, 3)
        seeded = BlockHasher("sha256", "42", BLOCK)
        with Engine(client, service.zmq_endpoint, early, model, replay_endpoint=replay) as a, \
                Engine(client, service.zmq_endpoint, unique("seed-42"), model) as b, \
                Engine(client, service.zmq_endpoint, unique("other"), untouched) as c:
            for e in (a, b, c):
                e.connect()
            a.send(stored(ids))
            c.send(stored(ids))
            assert client.score(model, token_ids=ids)["scores"] == {a.pod: 3.0}
            assert sample(client.metrics(), "kvcm_hash_parity_mismatch_total") == 0

            b.send(stored(ids[:2 * BLOCK], hasher=seeded))
            b.send(stored(ids, 2, hasher=seeded))          # chained on the seed-42 parent
            metrics = client.metrics()
            assert sample(metrics, "kvcm_hash_parity_mismatch_total") == 1
            warnings = [r.getMessage() for r in caplog.records
                        if r.levelname == "WARNING" and r.name == "kvcm.events" and model in r.getMessage()]
            assert len(warnings) == 1 and "--hash-seed '42'" in warnings[0], warnings
            assert sample(metrics, "kvcm_namespaces", mode="decoupled") == 1
            assert client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})["mode"] == "decoupled"
            assert client.ok("POST", "/v1/hash", {"model": untouched, "token_ids": ids})["mode"] == "parity"
            until(lambda: client.score(model, token_ids=ids)["scores"] == {a.pod: 3.0, b.pod: 3.0},
                  "both pods to score in the decoupled namespace (pod %s via replay)" % a.pod)
            assert client.score(untouched, token_ids=ids)["scores"] == {c.pod: 3.0}
            assert client.stream(a.pod, model)["replays"] >= 1
    finally:
        service.close()


# -- configuration reaching the API ------------------------------------------------------------------

@pytest.fixture(scope="module")
def configured(shared):
    service = start("--tier-weights", "gpu=1,cpu=0.5,storage=0.25", "--max-body", "1KiB", "--block-size", "8")
    yield service
    service.close()


def test_tier_weights_and_block_size_from_the_configuration(configured):
    client = configured.client
    model = unique("api-weights")
    ids = [(i * 31) % 50_000 for i in range(32)]
    keys = list(BlockHasher("sha256", None, 8).keys(ids))
    with Engine(client, configured.zmq_endpoint, unique("tiered"), model) as e:
        e.connect()
        e.send(block_stored(keys, None, ids, 8),
               block_stored(keys[:2], None, [], 0, medium="CPU"),
               block_stored(keys[:1], None, [], 0, medium="STORAGE"),
               block_stored(keys[3:], keys[2], [], 0, medium="STORAGE"))
        e.send(block_removed(keys))                    # every gpu copy goes
        result = client.score(model, token_ids=ids)
    assert result["blocks"] == 4 and result["tokens"] == 32
    # block 0: cpu+storage -> 0.5; block 1: cpu -> 0.5; block 2: nothing left: the run ends
    assert result["scores"] == pytest.approx({e.pod: 1.0})
    assert result["matched"] == {e.pod: {"blocks": 2, "tokens": 16, "tiers": {"cpu": 2, "storage": 1}}}


def test_max_body_from_the_configuration(configured):
    big = {"model": "m", "token_ids": list(range(400))}
    reply = configured.client.post("/v1/score", big)
    assert reply.status == 413, reply
    reply.error
    assert configured.client.score("m", token_ids=list(range(40)))["blocks"] == 5


# -- property-based: any JSON body on any endpoint is answered, never with a 500 --------------------

_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
            | st.text(max_size=12))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4), max_leaves=12)
_TEMPLATES = st.sampled_from(["{{ messages[0].content }}", "{% for m in messages %}{{ m.role }}{% endfor %}",
                              "{{ raise_exception('no') }}", "{{ x | nofilter }}", "{% for %}", "{{ 1 / 0 }}",
                              "{{ messages[0]['content'] * 3 }}", "{{ tools | tojson }}", "{{ 'a' * 10**9 }}"])
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _JSON},
                                           optional={"content": st.text(max_size=30) | _JSON,
                                                     "tool_calls": _JSON, "name": _JSON}), max_size=4)
_FIELDS = {
    "model": st.sampled_from([QWEN, LLAMA, "nobody/unknown"]) | _JSON,
    "prompt": st.text(max_size=60) | _JSON,
    "messages": _MESSAGES | _JSON,
    "token_ids": st.lists(st.integers(-5, 2**64 + 5), max_size=40) | _JSON,
    "pods": st.lists(st.text(max_size=8), max_size=3) | _JSON,
    "cache_salt": st.text(max_size=8) | _JSON,
    "add_special_tokens": _JSON,
    "add_generation_prompt": _JSON,
    "continue_final_message": _JSON,
    "chat_template": _TEMPLATES | _JSON,
    "chat_template_kwargs": st.dictionaries(st.text(max_size=8), _JSON, max_size=3) | _JSON,
    "tools": _JSON,
    "documents": _JSON,
    # registration bodies: never a real endpoint (the fuzzer must not make kvcm dial anywhere)
    "name": st.text(max_size=8) | _JSON,
    "endpoint": st.text(max_size=20).filter(lambda t: "://" not in t) | st.integers(),
    "replay": st.text(max_size=20).filter(lambda t: "://" not in t),
}
_ENDPOINTS = {
    "/v1/score": ["model", "prompt", "messages", "token_ids", "pods", "cache_salt", "add_special_tokens",
                  "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                  "tools", "documents"],
    "/score_completions": ["model", "prompt", "add_special_tokens"],
    "/score_chat_completions": ["model", "messages", "chat_template", "chat_template_kwargs",
                                "add_generation_prompt", "continue_final_message", "tools", "documents"],
    "/v1/tokenize": ["model", "prompt", "messages", "add_special_tokens", "chat_template", "chat_template_kwargs",
                     "add_generation_prompt", "tools"],
    "/v1/hash": ["model", "token_ids", "cache_salt"],
    "/v1/engines": ["name", "endpoint", "replay", "model"],
}


@st.composite
def _requests(draw):
    path = draw(st.sampled_from(sorted(_ENDPOINTS)))
    kind = draw(st.sampled_from(["fields", "fields", "json", "bytes"]))
    if kind == "fields":
        names = draw(st.lists(st.sampled_from(_ENDPOINTS[path]), unique=True, max_size=6))
        body = json.dumps({name: draw(_FIELDS[name]) for name in names}).encode()
    elif kind == "json":
        body = json.dumps(draw(_JSON)).encode()
    else:
        body = draw(st.binary(max_size=40))
    return path, body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_requests())
def test_fuzz_json_bodies_of_every_endpoint(client, request):
    path, body = request
    reply = client.request("POST", path, body, headers={"Content-Type": "application/json"})
    assert reply.status in (200, 201, 400, 404, 415, 422), (path, body[:300], reply)
    if reply.status >= 400:
        reply.error                      # the JSON error shape
    else:
        json.loads(reply.body)
        if path == "/v1/engines":        # a registration that passed: undo it
            name = json.loads(body)["name"]
            assert client.delete("/v1/engines/" + urllib.parse.quote(name, safe="")).status == 200
