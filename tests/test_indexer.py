"""kvcm as a library, without HTTP: `Indexer(load_config([...]))`, `await start()` (the ZMQ
ingest on the caller's running loop), events from real PUB sockets, `await score(...)` by
token ids, prompt or messages, `pods()`, `clear_pod()`, `await close()`. Runs on uvloop and
on the stock asyncio loop, since a router embedding kvcm may use either."""

import asyncio
import contextlib
import functools

import pytest
import tokenizers
import uvloop

import kvcm
from aio import TEST_DEADLINE, until
from kvcm import chat, tokenize
from kvcm.indexer import Indexer, load_config
from kvcm.publisher import Publisher, encode_batch
from serving import BLOCK, HASHER, PROBE_RANKS, QWEN, TOKENIZERS, free_port, offloaded, stored, tokens

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
MISTRAL = "mistralai/Mistral-Nemo-Instruct-2407"
DIRS = {QWEN: "qwen2.5-instruct", LLAMA: "llama-3.2-instruct", MISTRAL: "mistral-nemo-instruct-2407"}
PROMPT = "An index of which engine holds which KV blocks lets a router pick the warm one. " * 3
CHAT = [{"role": "user", "content": PROMPT}]
LOOPS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


def on_loops(fn):
    """Runs an async test on each event loop implementation."""
    def run(loop):
        return LOOPS[loop](asyncio.wait_for(fn(), TEST_DEADLINE))
    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return pytest.mark.parametrize("loop", sorted(LOOPS))(run)


def config(*args):
    models = [a for m, d in DIRS.items() for a in ("--tokenizer", "%s=%s" % (m, TOKENIZERS / d))]
    bind = [] if "--zmq-bind" in args else ["--zmq-bind", "tcp://127.0.0.1:*"]
    return load_config([*bind, *models, *args], environ={})


@contextlib.asynccontextmanager
async def running(*args):
    indexer = Indexer(config(*args))
    await indexer.start()
    try:
        yield indexer
    finally:
        await indexer.close()


def stream(indexer, pod, model, dp_rank=0):
    return next((s for s in indexer.pods() if (s["pod"], s["model"], s["dp_rank"]) == (pod, model, dp_rank)), None)


class Feed:
    """A PUB socket publishing one pod's batches into an Indexer, waiting until applied."""

    def __init__(self, indexer, pod, model, pub=None):
        self.indexer, self.pod, self.model = indexer, pod, model
        self.pub = pub or Publisher(indexer.ingest.bound[0], topic="kv@%s@%s" % (pod, model))

    async def connect(self):
        rank = next(PROBE_RANKS)
        probe = (self.pub.topic.encode(), bytes(8), encode_batch([], dp_rank=rank))

        def seen():
            self.pub.send_frames(probe)
            return any(s["dp_rank"] == rank for s in self.indexer.pods())
        await until(seen, "the indexer to receive from %s" % self.pub.endpoint)
        return self

    async def send(self, *events):
        seq = self.pub.publish(events)
        await until(lambda: (stream(self.indexer, self.pod, self.model) or {}).get("last_seq") == seq,
                    "%s to apply seq %d" % (self.pod, seq))

    def close(self):
        self.pub.close()


@functools.lru_cache(maxsize=None)
def reference(model):
    return tokenizers.Tokenizer.from_file(str(TOKENIZERS / DIRS[model] / "tokenizer.json"))


@pytest.fixture(autouse=True)
def _fixtures(shared):
    """Every test here reads the fixture tokenizers."""


# -- scoring ------------------------------------------------------------------------------------

@on_loops
async def test_score_by_token_ids_prompt_and_messages():
    async with running() as indexer:
        assert indexer.started
        prompt_ids, text = await indexer.tokenize(LLAMA, prompt=PROMPT)
        assert text is None and prompt_ids == reference(LLAMA).encode(PROMPT).ids
        chat_ids, rendered = await indexer.tokenize(QWEN, messages=CHAT)
        assert chat_ids == reference(QWEN).encode(rendered, add_special_tokens=False).ids
        assert rendered.endswith("<|im_start|>assistant\n")
        feeds = [await Feed(indexer, "pod-a", LLAMA).connect(), await Feed(indexer, "pod-b", QWEN).connect()]
        try:
            await feeds[0].send(stored(prompt_ids))
            await feeds[1].send(stored(chat_ids), offloaded(chat_ids, 1))
        finally:
            for f in feeds:
                f.close()
        n, m = len(prompt_ids) // BLOCK, len(chat_ids) // BLOCK
        by_prompt = await indexer.score(LLAMA, prompt=PROMPT)
        assert by_prompt == await indexer.score(LLAMA, token_ids=prompt_ids)
        assert by_prompt == {"model": LLAMA, "scores": {"pod-a": float(n)}, "blocks": n, "tokens": len(prompt_ids),
                             "matched": {"pod-a": {"blocks": n, "tokens": n * BLOCK, "tiers": {"gpu": n}}}}
        assert (await indexer.score(LLAMA, prompt=PROMPT, add_special_tokens=False))["scores"] == {}
        by_messages = await indexer.score(QWEN, messages=CHAT)
        assert by_messages == await indexer.score(QWEN, token_ids=chat_ids)
        assert by_messages["scores"] == {"pod-b": float(m)}
        assert by_messages["matched"]["pod-b"]["tiers"] == {"gpu": m, "cpu": 1}
        assert (await indexer.score(QWEN, messages=CHAT, add_generation_prompt=False))["blocks"] <= m
        assert (await indexer.score(QWEN, messages=CHAT, pods=["pod-a"]))["scores"] == {}
        assert (await indexer.score(QWEN, messages=CHAT, pods=["pod-b", "x"]))["scores"] == {"pod-b": float(m)}
        # scoring by token ids needs no tokenizer and accepts any model
        assert (await indexer.score("anything/at-all", token_ids=prompt_ids))["scores"] == {}
    assert not indexer.started


@on_loops
async def test_cache_salt_and_keys():
    async with running() as indexer:
        ids = tokens(21, 3)
        assert list(indexer.keys("m", ids)) == list(HASHER.keys(ids))
        assert list(indexer.keys("m", ids, "t")) == list(HASHER.keys(ids, [(("cache_salt", "t"),)]))
        feed = await Feed(indexer, "salted", "m").connect()
        try:
            await feed.send(stored(ids, salt="t"))
        finally:
            feed.close()
        assert (await indexer.score("m", token_ids=ids, cache_salt="t"))["scores"] == {"salted": 3.0}
        assert (await indexer.score("m", token_ids=ids))["scores"] == {}


@on_loops
async def test_pods_and_clear_pod():
    async with running() as indexer:
        ids = tokens(22, 2)
        feeds = [await Feed(indexer, pod, "m").connect() for pod in ("keep", "drop")]
        try:
            for f in feeds:
                await f.send(stored(ids), offloaded(ids, 2))
        finally:
            for f in feeds:
                f.close()
        entries = {s["pod"]: s for s in indexer.pods() if s["dp_rank"] == 0}
        assert set(entries) == {"keep", "drop"}
        for s in entries.values():
            assert (s["model"], s["blocks"], s["state"], s["last_seq"]) == ("m", {"gpu": 2, "cpu": 2}, "ok", 0)
        assert indexer.clear_pod("drop") == 4
        assert indexer.clear_pod("drop") == 0
        assert (await indexer.score("m", token_ids=ids))["scores"] == {"keep": 2.0}
        assert stream(indexer, "drop", "m") is None     # a cleared pod's streams start afresh
        assert stream(indexer, "keep", "m")["blocks"] == {"gpu": 2, "cpu": 2}


@on_loops
async def test_connect_mode_engines_from_the_configuration():
    pub = Publisher("tcp://127.0.0.1:*", topic="")         # vLLM's default: the engine binds
    try:
        async with running("--zmq-bind", "none", "--engine", "e1=%s,model=m" % pub.endpoint) as indexer:
            assert indexer.ingest.bound == []
            feed = await Feed(indexer, "e1", "m", pub=pub).connect()
            ids = tokens(23, 2)
            await feed.send(stored(ids))
            assert (await indexer.score("m", token_ids=ids))["scores"] == {"e1": 2.0}
    finally:
        pub.close()


# -- errors and lifecycle ------------------------------------------------------------------------

@on_loops
async def test_errors():
    indexer = Indexer(config())        # not started: scoring and tokenizing need no ingest
    for inputs in ({}, {"token_ids": [1], "prompt": "x"}, {"prompt": "x", "messages": CHAT},
                   {"token_ids": [1], "prompt": "x", "messages": CHAT}):
        with pytest.raises(ValueError, match="exactly one"):
            await indexer.score(QWEN, **inputs)
    for inputs in ({"prompt": "x"}, {"messages": CHAT}):
        with pytest.raises(tokenize.UnknownModel) as info:
            await indexer.score("nobody/here", **inputs)
        assert sorted(info.value.known) == sorted(DIRS) and "nobody/here" in str(info.value)
    with pytest.raises(chat.TemplateError, match="alternate"):
        await indexer.score(MISTRAL, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert (await indexer.score("nobody/here", token_ids=list(range(32))))["scores"] == {}


@on_loops
async def test_close_releases_the_ports_and_start_fails_loud_on_a_taken_one():
    endpoint = "tcp://127.0.0.1:%d" % free_port()
    async with running("--zmq-bind", endpoint) as first:
        assert first.ingest.bound == [endpoint]
        second = Indexer(config("--zmq-bind", endpoint))
        with pytest.raises(OSError, match="in use"):
            await second.start()
        assert not second.started
    async with running("--zmq-bind", endpoint) as again:      # the port is free again
        assert again.ingest.bound == [endpoint]


def test_the_package_exports_the_library_api():
    """Issue 4 "Library use": `kvcm.Indexer(config)`; DESIGN.md §1: __init__.py holds the
    public re-exports."""
    from kvcm import indexer as module
    assert getattr(kvcm, "Indexer", None) is module.Indexer
    assert getattr(kvcm, "load_config", None) is module.load_config
