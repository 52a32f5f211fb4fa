"""Several kvcm replicas sharing one index in a real redis-server (--index redis://…): what one
replica ingests, another scores; replicas fed the same engine stream leave the state a single
kvcm would; the key layout other tools read (llm-d's, see kvcm/redis_store.py); TTLs; engine restarts
and stale batches judged by the store itself; namespace contracts travelling through the store.

Everything is real: redis-server, ZMQ publishers, HTTP over TCP, `kvcm serve` subprocesses or
kvcm.serve.Service in-process. Writes to the store are asynchronous (a replica's ingest only
queues them), so after publishing the tests poll for the state they expect, never for time."""

import contextlib
import shutil
import subprocess

import pytest

from aio import poll_until
from kvcm._core import BlockHasher
from kvcm.publisher import all_blocks_cleared, encode_batch
from serving import (BLOCK, HASHER, QWEN, TOKENIZERS, Engine, InProcess, Serve, offloaded, removed, stored,
                     tokens)

REDIS_CLI = shutil.which("redis-cli")
TS = 1_700_000_000.0        # batch timestamps are given, so identical batches are byte-identical


@pytest.fixture
def stack():
    """Closes what a test opened (replicas, engines), last first, whatever the outcome."""
    with contextlib.ExitStack() as s:
        yield s


@pytest.fixture
def replica(redis_server, stack):
    """replica(*flags) -> an in-process kvcm on the test's redis-server."""
    def start(*args):
        return stack.enter_context(contextlib.closing(InProcess("--index", redis_server.url, *args)))
    return start


def engine(stack, kvcm, pod, model=QWEN):
    """A connected Engine publishing to one kvcm (in-process or subprocess)."""
    e = stack.enter_context(Engine(kvcm.client, kvcm.zmq_endpoint, pod, model))
    return e.connect()


def publish(e, payload, seq):
    """Sends one pre-encoded batch and waits until that kvcm applied it locally (the store
    write may still be on its way)."""
    e.pub.publish_raw(payload, seq=seq)
    e.client.caught_up(e.pod, e.model, seq)


def counter(client, name):
    return client.metrics().get((name, ()), 0.0)


def scores_become(client, model, ids, expected, what):
    """Polls /v1/score until its scores are `expected`; returns the whole result."""
    def check():
        result = client.score(model, token_ids=ids)
        return result if result["scores"] == expected else None
    return poll_until(check, what)


class Raw:
    """The store as an operator reads it: the real redis-cli (--raw) when it is installed,
    else the redis client; the same answers either way."""

    def __init__(self, server):
        self.server = server
        self.client = server.client()

    def _cli(self, *args):
        out = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.server.port), "--raw", *args],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        assert not out.startswith(("ERR", "WRONGTYPE")), out
        return out.splitlines()

    def hgetall(self, key):
        if REDIS_CLI is None:
            return self.client.hgetall(key)
        lines = self._cli("HGETALL", key)
        return dict(zip(lines[0::2], lines[1::2]))

    def get(self, key):
        if REDIS_CLI is None:
            return self.client.get(key)
        lines = self._cli("GET", key)
        return lines[0] if lines and lines[0] else None

    def type(self, key):
        if REDIS_CLI is None:
            return self.client.type(key)
        return self._cli("TYPE", key)[0]

    def ttl(self, key):
        if REDIS_CLI is None:
            return self.client.ttl(key)
        return int(self._cli("TTL", key)[0])

    def keys(self, pattern):
        if REDIS_CLI is None:
            return sorted(self.client.scan_iter(match=pattern))
        return sorted(self._cli("--scan", "--pattern", pattern))


# -- 1. one replica ingests, another scores ------------------------------------------------------

PROMPT = "Replicas share one index: what one of them ingests, every other one can score. " * 6


def test_a_replica_scores_what_another_replica_ingested(shared, redis_server):
    """Two `kvcm serve` processes on one redis-server: the engine publishes to A's ZMQ bind
    only, and B — which never received an event — scores A's pod, by token ids and by a prompt
    it tokenizes itself, exactly as A does; B lists the pod as remote with its counts."""
    a = Serve.standard("--index", redis_server.url, "--log-level", "warning")
    b = None
    try:
        b = Serve.standard("--index", redis_server.url, "--log-level", "warning")
        a.wait_ready()
        b.wait_ready()
        pod = "10.0.0.1:8000"
        ids = a.client.tokenize(QWEN, prompt=PROMPT)["token_ids"]
        n = len(ids) // BLOCK
        assert n >= 4
        other = tokens(2, 2)
        with Engine(a.client, a.zmq_endpoint, pod, QWEN) as e:
            e.connect()
            e.send(stored(ids), stored(other))
            e.send(offloaded(ids, 2))

            full = {"gpu": n, "cpu": 2}
            def offload_landed():
                result = b.client.score(QWEN, token_ids=ids)
                return result if result["matched"].get(pod, {}).get("tiers") == full else None
            from_b = poll_until(offload_landed, "B to score A's pod with the offloaded blocks")
            assert from_b == {"model": QWEN, "scores": {pod: float(n)}, "blocks": n, "tokens": len(ids),
                              "matched": {pod: {"blocks": n, "tokens": n * BLOCK, "tiers": full}}}
            # one store, one answer: A (which ingested) says the same
            assert a.client.score(QWEN, token_ids=ids) == from_b
            # B tokenizes the prompt itself and finds the same pod
            assert b.client.score(QWEN, prompt=PROMPT)["scores"] == {pod: float(n)}
            assert b.client.score(QWEN, token_ids=other)["scores"] == {pod: 2.0}

            # B ingests nothing: no streams of its own, A's pod is remote with the store's counts
            pods_b = b.client.ok("GET", "/v1/pods")
            assert pods_b["pods"] == []
            assert pods_b["remote"] == [{"pod": pod, "blocks": {"gpu": n + 2, "cpu": 2}}]
            # A ingests that pod: it is a local stream there (with the store's counts), not remote
            pods_a = a.client.ok("GET", "/v1/pods")
            assert pods_a["remote"] == []
            [mine] = [s for s in pods_a["pods"] if s["dp_rank"] == 0]
            assert (mine["pod"], mine["last_seq"], mine["blocks"]) == (pod, 1, {"gpu": n + 2, "cpu": 2})
    finally:
        for server in (a, b):
            if server is not None:
                server.close()


# -- 2. two replicas fed the same engine stream -------------------------------------------------

def test_replicas_ingesting_the_same_stream_leave_the_state_of_one_kvcm(redis_server, replica, stack):
    """vLLM publishes to every subscriber: two replicas receive byte-identical batches (same
    seq, same ts). The store applies each batch once — the other replica's copy is a counted
    duplicate — and ends as an in-memory kvcm fed the same batches: same scores, same counts."""
    r1, r2 = replica(), replica()
    memory = stack.enter_context(contextlib.closing(InProcess()))
    p1, p2 = "10.0.0.11:8000", "10.0.0.12:8000"
    a, b, c = tokens(21, 4), tokens(22, 2), tokens(23, 3)
    history = {
        p1: [[stored(a), stored(b)],
             [offloaded(a, 3)],
             [removed(a, [3]), removed(b, [1])],
             [stored(a)],                                   # block 3 back, the rest already held
             [removed(a, [0], medium="CPU")]],
        p2: [[stored(a[:2 * BLOCK]), stored(c)],
             [all_blocks_cleared(), stored(b)]],            # a clear, then a store, in one batch
    }
    kvcms = (r1, r2, memory)
    engines = {pod: [engine(stack, k, pod) for k in kvcms] for pod in history}
    batches = 0
    for pod, payloads in history.items():
        for seq, events in enumerate(payloads):
            payload = encode_batch(events, ts=TS + seq)     # encoded once, sent to all three
            for e in engines[pod]:
                publish(e, payload, seq)
            batches += 1

    def settled():
        # every batch a replica applied has become a store record, written or skipped
        return all(counter(r.client, "kvcm_redis_records_written_total")
                   + counter(r.client, "kvcm_redis_records_duplicate_total") == batches for r in (r1, r2))
    poll_until(settled, "both replicas to write or skip all %d batches" % batches)
    written = sum(counter(r.client, "kvcm_redis_records_written_total") for r in (r1, r2))
    duplicates = sum(counter(r.client, "kvcm_redis_records_duplicate_total") for r in (r1, r2))
    assert duplicates > 0
    assert (written, duplicates) == (batches, batches)     # each batch applied exactly once

    for ids in (a, b, c, a[:BLOCK], a + b):
        want = memory.client.score(QWEN, token_ids=ids)
        for r in (r1, r2):
            assert r.client.score(QWEN, token_ids=ids) == want, ids[:3]
    # and the state compared is not a trivial one: p1 holds a's blocks 0-3 on gpu, 1-2 on cpu
    assert memory.client.score(QWEN, token_ids=a)["matched"] == {
        p1: {"blocks": 4, "tokens": 4 * BLOCK, "tiers": {"gpu": 4, "cpu": 2}}}
    for pod in history:
        want = memory.client.streams(pod)[0]["blocks"]
        for r in (r1, r2):
            assert r.client.streams(pod)[0]["blocks"] == want, pod
    assert memory.client.streams(p1)[0]["blocks"] == {"gpu": 5, "cpu": 2}
    assert memory.client.streams(p2)[0]["blocks"] == {"gpu": 2}


# -- 3. the key layout, as redis-cli shows it ----------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "kvcm"])
def test_the_store_uses_the_llm_d_key_layout(redis_server, replica, stack, mode):
    """`<model>@<key>` is a hash with one `<pod>@<tier>` field per holder (valued with the
    holder's current epoch); in decoupled mode `engine:<model>@<engine hash>` names the kvcm
    key each published block maps to; nothing expires without --redis-ttl."""
    r = replica("--hash-mode", mode)
    raw = Raw(redis_server)
    pod, model = "10.0.0.3:8000", QWEN
    ids = tokens(31, 3)
    engine_hashes = list(HASHER.keys(ids))                      # what stored() publishes
    e = engine(stack, r, pod, model)
    publish(e, encode_batch([stored(ids)], ts=TS), 0)
    publish(e, encode_batch([offloaded(ids, 3)], ts=TS + 1), 1)

    hashed = r.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})
    keys = hashed["keys"]
    assert len(keys) == 3
    if mode == "auto":
        assert (hashed["mode"], keys) == ("parity", engine_hashes)   # parity: the engine's own hashes
    else:
        assert hashed["mode"] == "decoupled"
        assert keys == list(BlockHasher("kvcm", None, BLOCK, namespace=model).keys(ids))
        assert keys != engine_hashes

    block_keys = ["%s@%d" % (model, k) for k in keys]
    fields = {"%s@gpu" % pod, "%s@cpu" % pod}
    poll_until(lambda: all(set(raw.hgetall(k)) == fields for k in block_keys),
               "both tiers of %s in every block hash" % pod)
    epochs = raw.hgetall("kvcm:epoch:" + model)
    assert set(epochs) == fields
    for key in block_keys:
        assert raw.type(key) == "hash"
        assert raw.hgetall(key) == epochs          # each holder's entry carries its current epoch
        assert raw.ttl(key) == -1                  # no --redis-ttl: kept until removed
    assert raw.hgetall("kvcm:count:" + model) == {"%s@gpu" % pod: "3", "%s@cpu" % pod: "3"}
    assert raw.hgetall("kvcm:ns:" + model)["mode"] == ("parity" if mode == "auto" else "decoupled")
    stream = raw.hgetall("kvcm:stream:%s@%s@0" % (pod, model))
    assert stream["seq"] == "1" and float(stream["ts"]) == TS + 1

    if mode == "auto":
        assert raw.keys("engine:*") == []          # parity needs no engine-hash map
    else:
        assert raw.keys("engine:*") == sorted("engine:%s@%d" % (model, h) for h in engine_hashes)
        for h, key in zip(engine_hashes, keys):
            name = "engine:%s@%d" % (model, h)
            assert raw.type(name) == "string"
            assert raw.get(name) == "%s@%d" % (model, key)
            assert raw.ttl(name) == -1


# -- 4. --redis-ttl ----------------------------------------------------------------------------

def test_redis_ttl_expires_block_and_engine_keys_and_a_store_refreshes_it(redis_server, replica, stack):
    """--redis-ttl bounds how long block and engine-hash keys outlive their last store (memory
    stays bounded when engines vanish without removing anything); every store renews it."""
    r = replica("--hash-mode", "kvcm", "--redis-ttl", "100")
    raw = Raw(redis_server)
    pod, model = "10.0.0.4:8000", QWEN
    ids = tokens(41, 3)
    e = engine(stack, r, pod, model)
    payload = encode_batch([stored(ids)], ts=TS)
    publish(e, payload, 0)
    keys = r.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})["keys"]
    block_keys = ["%s@%d" % (model, k) for k in keys]
    engine_keys = ["engine:%s@%d" % (model, h) for h in HASHER.keys(ids)]
    poll_until(lambda: all(raw.get(k) for k in engine_keys) and all(raw.hgetall(k) for k in block_keys),
               "the block and engine keys")
    for key in block_keys + engine_keys:
        assert 0 < raw.ttl(key) <= 100, key
    assert scores_become(r.client, model, ids, {pod: 3.0}, "the pod to score")

    # the TTL counts from the last store: storing the blocks again pushes it back up
    client = redis_server.client()
    for key in block_keys + engine_keys:
        assert client.expire(key, 30)
    publish(e, encode_batch([stored(ids)], ts=TS + 1), 1)
    poll_until(lambda: all(30 < raw.ttl(k) <= 100 for k in block_keys + engine_keys),
               "the store of the same blocks to refresh every TTL")
    assert r.client.score(model, token_ids=ids)["scores"] == {pod: 3.0}


# -- 5. engine restarts and stale batches, judged by the store -------------------------------------

def test_the_store_detects_an_engine_restart_and_ignores_stale_batches(redis_server, replica, stack):
    """The store keeps each stream's last (seq, ts): a stream whose seq goes back with a newer
    timestamp is a new engine process and clears the pod — even when the replica that receives
    the new process never saw the old one; a batch sent again (same seq and ts), or a late batch
    of the old process, changes nothing."""
    ra, rb = replica(), replica()
    pod = "10.0.0.5:8000"
    old, fresh, later = tokens(51, 3), tokens(52, 2), tokens(53, 3)
    ea, eb = engine(stack, ra, pod), engine(stack, rb, pod)

    # the first process, received by replica A only
    publish(ea, encode_batch([stored(old)], ts=TS), 0)
    publish(ea, encode_batch([offloaded(old, 2)], ts=TS + 1), 1)
    scores_become(rb.client, QWEN, old, {pod: 3.0}, "B to score the old process's blocks")

    # the restarted engine (seq 0 again, a newer ts), received by replica B only
    publish(eb, encode_batch([stored(fresh)], ts=TS + 10), 0)
    scores_become(rb.client, QWEN, fresh, {pod: 2.0}, "B to score the new process's blocks")
    # the clear and the new batch are one atomic script: the old prefix is gone in both tiers
    for r in (ra, rb):
        assert r.client.score(QWEN, token_ids=old)["scores"] == {}
        assert r.client.score(QWEN, token_ids=fresh)["scores"] == {pod: 2.0}
    assert counter(rb.client, "kvcm_redis_restarts_detected_total") == 1
    assert rb.client.stream(pod, QWEN)["restarts"] == 0        # B never saw the old process: the store did
    assert rb.client.streams(pod)[0]["blocks"] == {"gpu": 2}

    # the new process goes on: a store, then a removal
    stored_later = encode_batch([stored(later)], ts=TS + 11)
    publish(eb, stored_later, 1)
    publish(eb, encode_batch([removed(later, [1, 2])], ts=TS + 12), 2)
    scores_become(rb.client, QWEN, later, {pod: 1.0}, "the removal of blocks 1 and 2")

    # the store batch arrives again after the removal (a replayed or re-delivered copy)
    duplicates = counter(rb.client, "kvcm_redis_records_duplicate_total")
    publish(eb, stored_later, 1)
    poll_until(lambda: counter(rb.client, "kvcm_redis_records_duplicate_total") == duplicates + 1,
               "the store to skip the repeated batch")
    # a late batch of the old process, with a seq past the new one's, reaches replica A
    stale = encode_batch([stored(old), stored(later)], ts=TS + 2)
    duplicates_a = counter(ra.client, "kvcm_redis_records_duplicate_total")
    publish(ea, stale, 5)
    poll_until(lambda: counter(ra.client, "kvcm_redis_records_duplicate_total") == duplicates_a + 1,
               "the store to skip the old process's late batch")
    for r in (ra, rb):
        assert r.client.score(QWEN, token_ids=later)["scores"] == {pod: 1.0}   # the removal holds
        assert r.client.score(QWEN, token_ids=old)["scores"] == {}            # the old prefix stays gone
        assert r.client.score(QWEN, token_ids=fresh)["scores"] == {pod: 2.0}
    assert counter(rb.client, "kvcm_redis_restarts_detected_total") == 1
    assert counter(ra.client, "kvcm_redis_restarts_detected_total") == 0
    assert rb.client.streams(pod)[0]["blocks"] == {"gpu": 3}


# -- 6. namespace contracts travel through the store -------------------------------------------------

def test_a_switch_to_decoupled_mode_reaches_a_replica_that_saw_no_event(redis_server, replica, stack):
    """Engines hashing with PYTHONHASHSEED=42 while kvcm expects it unset: replica A finds the
    mismatch and keys the model with its own hashes (decoupled). Replica B got no event at all;
    the contract A recorded in the store makes B key requests the same way and find A's pod."""
    ra, rb = replica(), replica()
    pod, model, untouched = "10.0.0.6:8000", QWEN, "other/model"
    ids = tokens(61, 3)
    assert rb.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})["mode"] == "parity"

    seeded = BlockHasher("sha256", "42", BLOCK)
    e = engine(stack, ra, pod, model)
    publish(e, encode_batch([stored(ids[:2 * BLOCK], hasher=seeded)], ts=TS), 0)
    publish(e, encode_batch([stored(ids, 2, hasher=seeded)], ts=TS + 1), 1)   # chained on a seeded parent
    f = engine(stack, ra, pod + "-b", untouched)
    publish(f, encode_batch([stored(ids)], ts=TS), 0)                          # verifies: stays parity
    decoupled_keys = list(BlockHasher("kvcm", None, BLOCK, namespace=model).keys(ids))
    assert ra.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids}) == {
        "model": model, "mode": "decoupled", "keys": decoupled_keys}

    # B scores the tokens: the store's contract re-keys the request, and A's pod is found
    scores_become(rb.client, model, ids, {pod: 3.0}, "B to find A's pod in the decoupled namespace")
    poll_until(lambda: rb.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})["mode"] == "decoupled",
               "B's /v1/hash to report decoupled mode")
    assert rb.client.ok("POST", "/v1/hash", {"model": model, "token_ids": ids})["keys"] == decoupled_keys
    assert rb.client.score(model, token_ids=ids[:BLOCK])["scores"] == {pod: 1.0}
    # the other model's contract is parity, here and there
    for r in (ra, rb):
        assert r.client.ok("POST", "/v1/hash", {"model": untouched, "token_ids": ids}) == {
            "model": untouched, "mode": "parity", "keys": list(HASHER.keys(ids))}
        assert r.client.score(untouched, token_ids=ids)["scores"] == {pod + "-b": 3.0}


def test_a_replica_scores_a_lora_by_text_with_the_base_model_another_replica_learnt(replica, stack):
    """The base model of a LoRA adapter travels with its namespace contract: a replica that
    never saw the adapter's events still scores it by prompt, with the base's tokenizer."""
    tokenizer = ("--tokenizer", "%s=%s" % (QWEN, TOKENIZERS / "qwen2.5-instruct"))
    a, b = replica(*tokenizer), replica(*tokenizer)
    prompt = "Which engine already holds the longest cached prefix of this prompt? " * 4
    ids = a.client.tokenize(QWEN, prompt=prompt)["token_ids"]
    engine(stack, a, "pa").send(stored(ids, lora_name="sql-adapter"))
    blocks = float(len(ids) // BLOCK)
    poll_until(lambda: b.client.post("/v1/score", {"model": "sql-adapter", "prompt": prompt}).status == 200,
               "replica B to adopt the adapter's namespace and its base model")
    assert b.client.score("sql-adapter", prompt=prompt)["scores"] == {"pa": blocks}
