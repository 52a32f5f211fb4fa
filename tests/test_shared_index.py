"""The shared index against a real Redis-protocol server: the index operations (the same
seeded operation lists as test_index.py's differential run) and whole event streams give the
same answers as the in-memory index; the store's own rules (compare-and-set stream positions,
restarts, resyncs, epochs, TTLs, the engine map); the library API over it."""

import asyncio
import random

import pytest

from aio import on_uvloop
from serving import QWEN, offloaded, removed, stored, tokens
from test_index import NAMESPACES, PODS, SCORER_CONFIGS, _rounded, random_ops

from kvcm import _core
from kvcm.config import load_config
from kvcm.indexer import Indexer
from kvcm.publisher import all_blocks_cleared, block_stored, encode_batch
from kvcm.redis_store import RedisStore
from kvcm.backend import IndexUnavailable
from kvcm.shared_index import Journal, SharedIndex

UNIT = ({}, 1.0)   # weights for lookup_prefix: every tier weighs 1


class StoreIndex:
    """Index's operations over a RedisStore, each one apply or lookup round trip, so that the
    index suite's operation lists run against both backends."""

    def __init__(self, url):
        self.store = RedisStore(url)

    async def _apply(self, fill):
        journal = Journal()
        fill(journal)
        ops, _, _ = journal.take()
        (result,) = await self.store.apply([self.store.apply_args("", 0, 0.0, "", "", ops)])
        assert not isinstance(result, Exception), result
        return result

    async def store_keys(self, ns, pod, tier, keys):
        return (await self._apply(lambda j: j.store(ns, pod, tier, list(keys))))[1]

    async def remove(self, ns, pod, tier, keys):
        return (await self._apply(lambda j: j.remove(ns, pod, tier, list(keys))))[2]

    async def clear_pod(self, pod, tier=None, ns=None):
        return (await self._apply(lambda j: j.clear_pod(pod, tier, ns)))[2]

    async def clear_namespace(self, ns):
        # the store clears a namespace only when switching it to decoupled mode: forget the
        # recorded mode first so that every clear here is such a switch
        await self.store._client.delete("kvcm:ns:" + ns)
        await self._apply(lambda j: j.switch_namespace(ns))

    async def lookup_prefix(self, ns, keys, pods=None):
        _, found = await self.store.lookup(ns, list(keys), _pods(pods), *UNIT)
        return {pod: (blocks, tiers) for pod, (_, blocks, tiers) in found.items()}

    async def score_detailed(self, scorer, ns, keys, pods=None):
        _, found = await self.store.lookup(ns, list(keys), _pods(pods), scorer.weights, scorer.default_weight)
        return found

    async def score(self, scorer, ns, keys, pods=None):
        return {pod: score for pod, (score, _, _) in (await self.score_detailed(scorer, ns, keys, pods)).items()}


def _pods(pods):
    return None if pods is None else list(pods)


async def _apply_both(memory, scorers, shared, op):
    name, args, kwargs = op
    if name in ("score", "score_detailed"):
        scorer = scorers[args[0]]
        want = getattr(scorer, name)(memory, *args[1:], **kwargs)
        got = await getattr(shared, name)(scorer, *args[1:], **kwargs)
        return _rounded(got), _rounded(want)
    if name == "clear_namespace":
        memory.clear_namespace(*args)
        await shared.clear_namespace(*args)
        return None, None          # the store does not count what a switch clears
    if name == "forget_namespaces":    # the local table's business: in the store, a clear
        memory.forget_namespaces(*args)
        for ns in set(args[0]):
            await shared.clear_namespace(ns)
        return None, None
    want = getattr(memory, name)(*args, **kwargs)
    got = await getattr(shared, "store_keys" if name == "store" else name)(*args, **kwargs)
    return got, want


@pytest.mark.parametrize("seed", [1, 2, 3])
@on_uvloop
async def test_index_operations_match_the_in_memory_index(redis_server, seed):
    # capacity is the store's business (maxmemory): no evictions on the in-memory side
    memory = _core.Index(max_blocks=10**6)
    scorers = [_core.Scorer(*a, **k) for a, k in SCORER_CONFIGS]
    shared = StoreIndex(redis_server.url)
    try:
        hits = 0
        for i, op in enumerate(random_ops(seed, 1200, 40)):
            got, want = await _apply_both(memory, scorers, shared, op)
            assert got == want, (i, op)
            hits += bool(want) and op[0] in ("lookup_prefix", "score", "score_detailed")
            if i % 200 == 199:
                assert await shared.store.holder_counts() == memory.stats()["pods"], i
        assert hits > 50   # the run looked up blocks that were there, not only misses
    finally:
        await shared.store.close()


# -- whole event streams: EventSink with a journal + SharedIndex vs the in-memory sink ---------

class _Stream:
    """What SharedIndex.batch_done needs of an ingest stream."""

    def __init__(self, pod, model, dp_rank=0):
        self.pod, self.model, self.dp_rank = pod, model, dp_rank
        self.ctx = _core.StreamContext(pod, model)


class Pair:
    """The same batches applied to an in-memory sink and to a shared one."""

    def __init__(self, url, **sink_options):
        self.memory = _core.Index()
        self.memory_sink = _core.EventSink(self.memory, **sink_options)
        self.shared = SharedIndex(url)
        self.cache = _core.Index()
        self.sink = _core.EventSink(self.cache, journal=self.shared.journal, **sink_options)
        self.streams = {}

    async def start(self):
        await self.shared.start(self.sink)

    def send(self, pod, events, model=QWEN, ts=None):
        key = (pod, model)
        if key not in self.streams:
            self.streams[key] = (_Stream(pod, model), _core.StreamContext(pod, model), [0])
        stream, memory_ctx, seq = self.streams[key]
        payload = encode_batch(events, ts=ts)
        self.memory_sink.apply(memory_ctx, payload)
        self.sink.apply(stream.ctx, payload)
        self.shared.batch_done(stream, seq[0])
        seq[0] += 1

    async def synced(self):
        while self.shared.backlog_events:
            await asyncio.sleep(0.005)

    def send_prompts(self, prompts, pods, trim):
        """Per prompt, round-robin over `pods`: a batch storing it, then one removing the
        blocks at the positions `trim`."""
        for i, ids in enumerate(prompts):
            pod = pods[i % len(pods)]
            self.send(pod, [stored(ids)])
            self.send(pod, [removed(ids, trim)])

    async def compare(self, model, prompts, pods_filters=(None,), shared=None):
        """The shared index (or another replica's, `shared`) answers as the in-memory one."""
        await self.synced()
        shared = shared or self.shared
        scorer = _core.Scorer()
        for ids in prompts:
            keys = self.memory_sink.keys_for(model, ids)
            assert list(self.sink.keys_for(model, ids)) == list(keys)
            for pods in pods_filters:
                want = _rounded(scorer.score_detailed(self.memory, model, keys, pods))
                _, got = await shared.lookup(model, list(keys), pods, scorer.weights, scorer.default_weight)
                assert _rounded(got) == want, (model, pods)
        assert await shared.pod_blocks() == self.memory.stats()["pods"]

    async def close(self):
        await self.shared.close()


def _workload(rnd, pods, prompts):
    """A random but plausible event sequence: prefixes stored, offloaded, removed, cleared."""
    for _ in range(120):
        pod = rnd.choice(pods)
        ids = rnd.choice(prompts)
        blocks = len(ids) // 16
        r = rnd.random()
        if r < 0.45:
            yield pod, [stored(ids[:16 * rnd.randint(1, blocks)])]
        elif r < 0.6:
            yield pod, [offloaded(ids, rnd.randint(1, blocks))]
        elif r < 0.85:
            yield pod, [removed(ids, sorted(rnd.sample(range(blocks), rnd.randint(1, 2))),
                                medium=rnd.choice(("GPU", "CPU")))]
        elif r < 0.9:
            yield pod, [all_blocks_cleared()]
        else:
            yield pod, [stored(ids), removed(ids, [blocks - 1])]


@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize("hash_mode", ["auto", "kvcm"])
@on_uvloop
async def test_event_streams_give_the_in_memory_answers(redis_server, seed, hash_mode):
    rnd = random.Random(seed)
    prompts = [tokens(seed * 100 + i, rnd.randint(2, 8)) for i in range(6)]
    pods = ["pod-%d" % i for i in range(4)]
    pair = Pair(redis_server.url, hash_mode=hash_mode)
    await pair.start()
    try:
        for pod, events in _workload(rnd, pods, prompts):
            pair.send(pod, events)
        await pair.compare(QWEN, prompts, (None, ["pod-1", "pod-2"], []))
        want_mode = "decoupled" if hash_mode == "kvcm" else "parity"
        assert (await pair.shared.store.namespaces())[QWEN][0] == want_mode
    finally:
        await pair.close()


@on_uvloop
async def test_a_mode_switch_a_lora_and_large_engine_blocks_give_the_in_memory_answers(redis_server):
    pair = Pair(redis_server.url)
    await pair.start()
    other = _core.BlockHasher("sha256", "42", 16)   # engines on another seed: auto switches
    try:
        ids = tokens(1, 6)
        pair.send("pa", [stored(ids)])
        pair.send("pb", [stored(ids, hasher=other)])
        pair.send("pb", [stored(ids + tokens(2, 2), 6, hasher=other)])
        pair.send("pc", [stored(ids, lora_name="sql-lora")])
        pair.send("pc", [removed(ids, [3])])
        # an engine with 32-token blocks: each engine hash maps to two kvcm keys
        big = tokens(3, 8)
        hashes = [1000 + i for i in range(4)]
        pair.send("pd", [block_stored(hashes[:2], None, big[:64], 32)])
        pair.send("pd", [block_stored(hashes[2:], hashes[1], big[64:], 32)])
        pair.send("pd", [removed_hashes(hashes[3:])])
        await pair.compare(QWEN, [ids, ids + tokens(2, 2), big], (None, ["pb", "pd"]))
        await pair.compare("sql-lora", [ids])
        recorded = await pair.shared.store.namespaces()
        assert recorded[QWEN][0] == "decoupled" and recorded["sql-lora"] == ("decoupled", "unknown", True, QWEN)
        # the engine map went to the store too: another replica resolves pd's hashes
        keys = list(pair.sink.keys_for(QWEN, big))
        assert await pair.shared.store.resolve({QWEN: hashes}) == {QWEN: [tuple(keys[2 * i:2 * i + 2]) for i in range(4)]}
    finally:
        await pair.close()


def removed_hashes(hashes):
    from kvcm.publisher import block_removed
    return block_removed(hashes)


# -- the store's rules ------------------------------------------------------------------------

def _record(store, stream, seq, ts, fill, flag="", pod="pa"):
    journal = Journal()
    fill(journal)
    ops, _, _ = journal.take()
    return store.apply_args(stream, seq, ts, flag, pod, ops)


@on_uvloop
async def test_a_stream_position_moves_by_compare_and_set(redis_server):
    store = RedisStore(redis_server.url)
    s = "pa@m@0"
    k = [11, 12, 13]
    try:
        results = await store.apply([
            _record(store, s, 5, 100.0, lambda j: j.store("m", "pa", "gpu", k)),
            _record(store, s, 5, 100.0, lambda j: j.remove("m", "pa", "gpu", k)),       # duplicate
            _record(store, s, 3, 99.0, lambda j: j.remove("m", "pa", "gpu", k)),        # older
            _record(store, s, 6, 101.0, lambda j: j.remove("m", "pa", "gpu", k[2:])),   # next
        ])
        assert results == [(1, 3, 0), (0, 0, 0), (0, 0, 0), (1, 0, 1)]
        _, found = await store.lookup("m", k, None, *UNIT)
        assert found == {"pa": (2.0, 2, {"gpu": 2})}
        assert redis_server.client().hgetall("kvcm:stream:" + s) == {"seq": "6", "ts": "101.0"}
        # a lower seq with a newer timestamp: the engine restarted, its old entries go first
        (result,) = await store.apply([_record(store, s, 0, 200.0, lambda j: j.store("m", "pa", "gpu", [99]))])
        assert result == (2, 1, 2)
        assert (await store.lookup("m", k, None, *UNIT))[1] == {}
        assert (await store.lookup("m", [99], None, *UNIT))[1] == {"pa": (1.0, 1, {"gpu": 1})}
        # the previous process's batches, delivered late by a lagging replica, are ignored
        (late,) = await store.apply([_record(store, s, 7, 150.0, lambda j: j.store("m", "pa", "gpu", k))])
        assert late == (0, 0, 0)
        # a resync re-applies retained history and leaves the position where it was
        (again,) = await store.apply([_record(store, s, 0, 200.0, lambda j: j.store("m", "pa", "cpu", [99]), "resync")])
        assert again == (1, 1, 0)
        assert redis_server.client().hgetall("kvcm:stream:" + s) == {"seq": "0", "ts": "200.0"}
        # a restart the ingest saw clears the pod even when the new process's first batch to
        # reach the store has a higher seq (its first batches carried nothing to write)...
        (seen,) = await store.apply([_record(store, s, 4, 300.0, lambda j: j.store("m", "pa", "gpu", [7]), "restart")])
        assert seen == (2, 1, 2)
        assert (await store.lookup("m", [99], None, *UNIT))[1] == {}
        # ...but not when the store already has newer batches (a lagging replica's report)
        (lagging,) = await store.apply([_record(store, s, 1, 250.0, lambda j: j.store("m", "pa", "gpu", [8]), "restart")])
        assert lagging == (0, 0, 0)
        assert (await store.lookup("m", [7], None, *UNIT))[1] == {"pa": (1.0, 1, {"gpu": 1})}
    finally:
        await store.close()


@on_uvloop
async def test_clears_invalidate_entries_without_touching_block_keys(redis_server):
    store = RedisStore(redis_server.url)
    raw = redis_server.client()
    try:
        await store.apply([_record(store, "", 0, 0, lambda j: (j.store("m", "pa", "gpu", [1, 2]),
                                                              j.store("m", "pa", "cpu", [1]),
                                                              j.store("m", "pb", "gpu", [1])))])
        (result,) = await store.apply([_record(store, "", 0, 0, lambda j: j.clear_pod("pa", "gpu"))])
        assert result[2] == 2
        # the fields stay until overwritten or expired, but no longer count
        assert set(raw.hgetall("m@1")) == {"pa@gpu", "pa@cpu", "pb@gpu"}
        assert (await store.lookup("m", [1, 2], None, *UNIT))[1] == {
            "pa": (1.0, 1, {"cpu": 1}), "pb": (1.0, 1, {"gpu": 1})}
        assert await store.holder_counts() == {"pa": {"cpu": 1}, "pb": {"gpu": 1}}
        # storing again makes the entry current with the new epoch
        await store.apply([_record(store, "", 0, 0, lambda j: j.store("m", "pa", "gpu", [1]))])
        assert (await store.lookup("m", [1, 2], ["pa"], *UNIT))[1] == {"pa": (1.0, 1, {"gpu": 1, "cpu": 1})}
        # an epoch hash lost (say, evicted) never brings cleared entries back: tokens are fresh
        raw.delete("kvcm:epoch:m")
        assert (await store.lookup("m", [1], None, *UNIT))[1] == {}
    finally:
        await store.close()


@on_uvloop
async def test_a_ttl_applies_to_block_and_engine_keys(redis_server):
    store = RedisStore(redis_server.url, ttl=120)
    raw = redis_server.client()
    try:
        await store.apply([_record(store, "", 0, 0, lambda j: (j.store("m", "pa", "gpu", [5]),
                                                              j.map_engine("m", 77, [5])))])
        assert 0 < raw.ttl("m@5") <= 120
        assert 0 < raw.ttl("engine:m@77") <= 120
        assert raw.get("engine:m@77") == "m@5"
        assert raw.ttl("kvcm:epoch:m") == -1     # bookkeeping never expires
    finally:
        await store.close()


# -- the library API over a shared index ---------------------------------------------------------

@on_uvloop
async def test_the_indexer_scores_through_the_store_and_reports_an_outage(redis_server):
    indexer = Indexer(load_config(["--index", redis_server.url, "--zmq-bind", "none"], environ={}))
    await indexer.start()
    try:
        assert not indexer.backend.answers_at_once and indexer.unavailable is None
        with pytest.raises(RuntimeError, match="score_tokens_async"):
            indexer.score_tokens(QWEN, [1] * 16)
        ids = tokens(4, 3)
        stream = _Stream("pa", QWEN)
        indexer.sink.apply(stream.ctx, encode_batch([stored(ids)]))
        indexer.backend.batch_done(stream, 0)
        while indexer.backend.backlog_events:
            await asyncio.sleep(0.005)
        result = await indexer.score_tokens_async(QWEN, ids)
        assert result["scores"] == {"pa": 3.0} and result["matched"]["pa"]["tokens"] == 48
        assert (await indexer.pods_async())["remote"] == [{"pod": "pa", "blocks": {"gpu": 3}}]
        redis_server.kill()
        with pytest.raises(IndexUnavailable):
            await indexer.score_tokens_async(QWEN, ids)
        assert indexer.unavailable is not None
    finally:
        await indexer.close()


def test_a_replica_taking_over_a_decoupled_stream_resolves_parents_through_the_store(redis_server):
    """Replica A saw the start of a stream; its engine then publishes to replica B (a
    failover). B has never seen the engine hashes the next events name as parents and
    removals: it fetches them from the store instead of dropping the events or replaying."""
    from aio import poll_until
    from serving import Engine, InProcess

    a = InProcess("--index", redis_server.url, "--hash-mode", "kvcm")
    b = InProcess("--index", redis_server.url, "--hash-mode", "kvcm")
    try:
        ids = tokens(9, 6)
        with Engine(a.client, a.zmq_endpoint, "pa", QWEN) as to_a:
            to_a.connect()
            to_a.send(stored(ids[:48]))
        poll_until(lambda: b.client.score(QWEN, token_ids=ids)["scores"] == {"pa": 3.0}, "A's blocks in the store")
        with Engine(b.client, b.zmq_endpoint, "pa", QWEN) as to_b:
            to_b.connect()
            to_b.send(stored(ids, 3), seq=1)       # parent: block 2, which only A saw
            to_b.send(removed(ids, [4]), seq=2)    # a block of this batch: known to B
            to_b.send(removed(ids, [1]), seq=3)    # a block of A's batch
        poll_until(lambda: a.client.score(QWEN, token_ids=ids)["matched"].get("pa", {}).get("blocks") == 1,
                   "B's events applied on top of A's")
        # block 4 removed too: the run from block 0 stops at block 1 either way; check it held
        assert b.client.score(QWEN, token_ids=ids[:16 * 4])["matched"] == {
            "pa": {"blocks": 1, "tokens": 16, "tiers": {"gpu": 1}}}
        raw = redis_server.client()
        keys = b.client.ok("POST", "/v1/hash", {"model": QWEN, "token_ids": ids})["keys"]
        assert set(raw.hgetall("%s@%d" % (QWEN, keys[3]))) == {"pa@gpu"}   # stored by B, chained right
        assert raw.hgetall("%s@%d" % (QWEN, keys[4])) == {}
        metrics = b.client.metrics()
        assert metrics[("kvcm_redis_engine_hashes_fetched_total", ())] >= 2
        assert metrics[("kvcm_ingest_event_drops_total", (("reason", "unknown_parent"),))] == 0
        assert metrics[("kvcm_ingest_remove_unresolved_total", ())] == 0
    finally:
        a.close()
        b.close()


@on_uvloop
async def test_a_lookup_over_more_holders_than_one_call_can_ask_for(redis_server):
    """Past block 0 the lookup asks only for the fields of the pods still in their run, in
    one HMGET; with over 1000 such fields it reads whole blocks instead. Both ways agree
    with the in-memory walk."""
    memory = _core.Index()
    store = RedisStore(redis_server.url)
    chain = [5000 + i for i in range(4)]
    journal = Journal()
    try:
        for p in range(1100):
            pod, held = "p%04d" % p, chain[:1 + p % 4]
            for tier in (("gpu", "cpu") if p % 3 == 0 else ("gpu",)):
                memory.store("m", pod, tier, held)
                journal.store("m", pod, tier, list(held))
        ops, _, _ = journal.take()
        (result,) = await store.apply([store.apply_args("", 0, 0.0, "", "", ops)])
        assert result[1] == memory.stats()["entries"]
        scorer = _core.Scorer()
        for pods in (None, ["p0003", "p0007", "p0010"]):
            want = _rounded(scorer.score_detailed(memory, "m", chain, pods))
            _, got = await store.lookup("m", chain, pods, scorer.weights, scorer.default_weight)
            assert _rounded(got) == want
        assert len(want) == 3 and len(got) == 3
    finally:
        await store.close()


def test_a_replica_taking_over_a_stream_replays_only_what_no_replica_applied(redis_server):
    """A's stream reached seq 2 in the store; batches 3 and 4 reached no replica; B, started
    afterwards, first sees seq 5. B continues from the store's position: it asks the
    engine's replay endpoint for 3 onwards (not from 0, and not nothing)."""
    from aio import free_port, poll_until
    from serving import Engine, InProcess

    replay = "tcp://127.0.0.1:%d" % free_port()
    ids = tokens(21, 6)
    a = InProcess("--index", redis_server.url)
    b = None
    with Engine(a.client, a.zmq_endpoint, "pa", QWEN, replay_endpoint=replay) as engine:
        try:
            engine.connect()
            for i in range(3):
                engine.send(stored(ids[:16 * (i + 1)], i))
            poll_until(lambda: redis_server.client().hget("kvcm:stream:pa@%s@0" % QWEN, "seq") == "2",
                       "seq 2 in the store")
            a, first = None, a
            first.close()
            for i in (3, 4):      # published while no replica listened
                engine.pub.publish_raw(encode_batch([stored(ids[:16 * (i + 1)], i)]), seq=i, deliver=False)
            b = InProcess("--index", redis_server.url, "--replay-endpoint", "pa=" + replay)
            engine.client = b.client
            engine.pub.socket.connect(b.zmq_endpoint)   # a PUB may connect to several SUBs
            engine.connect()
            engine.send(stored(ids, 5), seq=5)
            poll_until(lambda: b.client.score(QWEN, token_ids=ids)["scores"] == {"pa": 6.0},
                       "all six blocks, 3 and 4 by replay")
            stream = b.client.stream("pa", QWEN)
            assert stream["replays"] == 1 and stream["missed_batches"] == 0, stream
            # the replay started at 3: nothing the store had applied came again
            assert b.client.metrics()[("kvcm_redis_records_duplicate_total", ())] == 0
        finally:
            for replica in (a, b):
                if replica is not None:
                    replica.close()


@on_uvloop
async def test_a_full_store_holds_writes_back_in_order_and_still_answers_lookups(redis_server):
    """Under maxmemory with noeviction the server refuses writes: records wait in the
    backlog (none is dropped, nothing applies out of order), lookups go on, and once the
    server takes writes again everything applies."""
    from aio import until

    raw = redis_server.client()
    policy = raw.config_get("maxmemory-policy")["maxmemory-policy"]
    pair = Pair(redis_server.url)
    await pair.start()
    try:
        before = tokens(5, 2)
        pair.send("pa", [stored(before)])
        await pair.synced()
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", 1)
        ids = tokens(6, 4)
        pair.send("pa", [stored(ids)])
        pair.send("pa", [removed(ids, [3]), removed(before, [1])])
        await until(lambda: pair.shared.counters["writes_refused_full"] > 0, "a write refused")
        assert pair.shared.backlog_events == 3
        _, found = await pair.shared.lookup(QWEN, list(pair.sink.keys_for(QWEN, before)), None, *UNIT)
        assert found == {"pa": (2.0, 2, {"gpu": 2})}
        raw.config_set("maxmemory", 0)
        await pair.compare(QWEN, [before, ids])
        assert pair.shared.counters["records_refused"] == 0
    finally:
        raw.config_set("maxmemory", 0)
        raw.config_set("maxmemory-policy", policy)
        await pair.close()


@on_uvloop
async def test_the_writer_loads_a_flushed_script_again_and_loses_no_batch(redis_server):
    """SCRIPT FLUSH (or a server that forgot its scripts) answers NOSCRIPT to the round trips
    in flight: their records stay queued, the script is loaded, and they apply in order."""
    raw = redis_server.client()
    pair = Pair(redis_server.url)
    await pair.start()
    try:
        first = tokens(40, 3)
        pair.send("pa", [stored(first)])
        await pair.synced()
        raw.script_flush()
        prompts = [tokens(41 + i, 8) for i in range(50)]
        pair.send_prompts(prompts, ["p0", "p1", "p2", "p3"], [5])   # many round trips, two in flight
        await pair.compare(QWEN, [first] + prompts)
        assert pair.shared.counters["records_refused"] == 0
        assert pair.shared.counters["records_written"] == 1 + 2 * len(prompts)
        assert pair.shared.errors["response"] >= 1     # the NOSCRIPT answers, counted
    finally:
        await pair.close()


@on_uvloop
async def test_closing_with_round_trips_in_flight_still_writes_every_batch_in_order(redis_server):
    """close() cancels the writer, maybe while it waits for answers; the records it had sent
    stay queued, and the drain sends them again on a new connection, in order."""
    from aio import until

    pair = Pair(redis_server.url)
    await pair.start()
    prompts = [tokens(90 + i, 64) for i in range(200)]   # round trips of 16 records, 1,024 keys
    try:
        pair.send_prompts(prompts, ["p0", "p1", "p2"], [2, 60])
        # the first answers are in: the writer now keeps round trips in flight
        await until(lambda: pair.shared.counters["records_written"], "a first write", 20.0)
        assert pair.shared.backlog_events
    finally:
        await pair.close()
    assert pair.shared.backlog_events == 0
    reader = SharedIndex(redis_server.url)      # another replica: this one is closed
    await reader.start(_core.EventSink(_core.Index(), journal=reader.journal))
    try:
        await pair.compare(QWEN, prompts, shared=reader)
    finally:
        await reader.close()


def test_the_sink_hands_the_journal_keys_as_decimal_text_at_both_ends_of_the_u64_range():
    class Recorder(Journal):
        def store(self, model, pod, tier, keys, n=None):
            self.seen = (keys, n)
            super().store(model, pod, tier, keys, n)

    journal = Recorder()
    sink = _core.EventSink(_core.Index(), journal=journal)
    ctx = _core.StreamContext("pa", QWEN)
    extremes = [0, 2**64 - 1, 10, 2**63]
    # a parent: parity keys taken as the engine's, unverified
    sink.apply(ctx, encode_batch([block_stored(extremes, 7, list(range(64)), 16)]))
    assert journal.seen == (b"0,18446744073709551615,10,9223372036854775808", 4)
    assert journal.take()[2] == 4 + 4


@on_uvloop
async def test_valkey_and_unix_socket_urls_reach_the_server(redis_server, tmp_path):
    """--index takes valkey:// as redis:// and unix:///path?db=N for a local socket."""
    from redis_server import start_server

    socket_path = "/tmp/kvcm-%s.sock" % tmp_path.name[-12:]   # socket paths are short
    local = start_server("--unixsocket", socket_path, "--unixsocketperm", "700")
    try:
        for url in (redis_server.url.replace("redis://", "valkey://"), "unix://%s?db=2" % socket_path):
            store = RedisStore(url)
            try:
                await store.apply([_record(store, "", 0, 0, lambda j: j.store("m", "pa", "gpu", [1, 2]))])
                assert (await store.lookup("m", [1, 2, 3], None, *UNIT))[1] == {"pa": (2.0, 2, {"gpu": 2})}
            finally:
                await store.close()
        assert local.client(db=2).hgetall("m@1") != {}     # database 2 of the socket's server
        assert local.client().exists("m@1") == 0
    finally:
        local.close()
