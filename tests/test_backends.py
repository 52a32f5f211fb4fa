"""Both index backends through one interface (kvcm/backend.py): the same cases, the same
answers, whether kvcm keeps the index in memory or in a real Redis-protocol store.

Batches reach a backend the way the ingest hands them over: applied by the indexer's event
sink, then given to the backend's `on_applied` ingest hook where it has one. Every read goes
through the operations that answer either at once or after a round trip."""

import asyncio

import pytest

from aio import on_uvloop
from serving import QWEN, offloaded, stored, tokens
from kvcm import _core
from kvcm.backend import IndexUnavailable, settled, then
from kvcm.config import load_config
from kvcm.indexer import Indexer
from kvcm.ingest import Ingest
from kvcm.ingest_thread import IngestThread
from kvcm.metrics import Metrics
from kvcm.publisher import encode_batch

BACKENDS = ("memory", "shared")


class Stream:
    """What a backend's ingest hook needs of an ingest stream."""

    def __init__(self, pod, model=QWEN):
        self.pod, self.model, self.dp_rank = pod, model, 0
        self.ctx = _core.StreamContext(pod, model)
        self.seq = -1


@pytest.fixture(params=BACKENDS)
def indexer(request, redis_server):
    # the in-memory cases run beside each kind of store server too: the fixture cannot ask
    # for a (parametrized) server only when it needs one
    index = "memory" if request.param == "memory" else redis_server.url
    return Indexer(load_config(["--index", index, "--zmq-bind", "none"], environ={}))


def feed(indexer, stream, *events):
    stream.seq += 1
    indexer.sink.apply(stream.ctx, encode_batch(list(events)))
    on_applied = indexer.backend.ingest_hooks().get("on_applied")
    if on_applied is not None:
        on_applied(stream, stream.seq)


async def answer(result, check, what):
    """The first answer of result() that check() accepts (a store writes a moment later)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 10.0
    while True:
        value = await settled(result())
        if check(value):
            return value
        if loop.time() > end:
            raise AssertionError("no answer with %s; the last: %r" % (what, value))
        await asyncio.sleep(0.005)


def scored(indexer, ids, pods=None):
    return lambda: indexer.lookup_tokens(QWEN, ids, pods)


@on_uvloop
async def test_scores_by_tokens_and_by_keys_agree_and_count_tiers(indexer):
    await indexer.start()
    try:
        a, b = tokens(1, 4), tokens(2, 2)
        feed(indexer, Stream("pa"), stored(a))
        pb = Stream("pb")
        feed(indexer, pb, stored(a[:32]), offloaded(a, 2))
        feed(indexer, pb, stored(b))
        result = await answer(scored(indexer, a), lambda r: set(r["scores"]) == {"pa", "pb"}, "both pods")
        assert result["matched"]["pa"] == {"blocks": 4, "tokens": 64, "tiers": {"gpu": 4}}
        assert result["matched"]["pb"]["blocks"] == 2 and result["matched"]["pb"]["tiers"]["gpu"] == 2
        assert result["blocks"] == 4 and result["tokens"] == 64
        by_keys = await settled(indexer.lookup_keys(QWEN, list(indexer.keys(QWEN, a)), ["pa"]))
        assert by_keys["matched"] == {"pa": result["matched"]["pa"]}
        assert (await settled(indexer.lookup_tokens(QWEN, tokens(3, 2))))["scores"] == {}
    finally:
        await indexer.close()


@on_uvloop
async def test_pod_counts_and_clearing_a_pod(indexer):
    await indexer.start()
    try:
        a = tokens(4, 3)
        feed(indexer, Stream("pa"), stored(a))
        feed(indexer, Stream("pb"), stored(a[:16]))
        await answer(scored(indexer, a), lambda r: set(r["scores"]) == {"pa", "pb"}, "both pods")
        counts, _ = await settled(indexer.backend.pod_counts(["pa", "pb"]))
        assert counts["pa"] == {"gpu": 3} and counts["pb"] == {"gpu": 1}
        assert await settled(indexer.forget_pod("pa")) == 3
        result = await settled(indexer.lookup_tokens(QWEN, a))
        assert set(result["scores"]) == {"pb"}
        counts, _ = await settled(indexer.backend.pod_counts(["pa", "pb"]))
        assert not counts.get("pa") and counts["pb"] == {"gpu": 1}
    finally:
        await indexer.close()


@on_uvloop
async def test_status_section_and_metrics_of_either_backend(indexer):
    await indexer.start()
    try:
        a = tokens(5, 2)
        feed(indexer, Stream("pa"), stored(a))
        await answer(scored(indexer, a), lambda r: r["scores"], "the pod")
        listing = await settled(indexer.pod_listing())
        section = indexer.backend.describe(listing)
        assert {"backend", "entries_by_tier", "pods", "engine_map_entries", "capacity"} <= set(section)
        assert indexer.unavailable is None
        text = Metrics(indexer).render().decode()
        assert "kvcm_index_engine_map_entries" in text
        assert ("kvcm_index_blocks 2.0" if indexer.backend.answers_at_once else "kvcm_redis_up 1.0") in text
    finally:
        await indexer.close()


@on_uvloop
async def test_the_synchronous_methods_need_a_backend_that_answers_at_once(indexer):
    await indexer.start()
    try:
        ids = tokens(6, 1)
        if indexer.backend.answers_at_once:
            assert indexer.score_tokens(QWEN, ids)["scores"] == {}
            assert indexer.pods() == [] and indexer.clear_pod("nobody") == 0
        else:
            for call in (lambda: indexer.score_tokens(QWEN, ids), indexer.pods, lambda: indexer.clear_pod("x")):
                with pytest.raises(RuntimeError, match="_async"):
                    call()
    finally:
        await indexer.close()


def test_the_ingest_runs_on_a_thread_where_the_backend_allows_it(indexer):
    """A backend says whether the ingest may leave the event loop (ingest_thread); the
    indexer follows it, asking nothing else of the backend."""
    assert indexer.backend.ingest_thread == (indexer.backend.journal is None)   # memory: yes; a store's client: no
    assert isinstance(indexer.ingest, IngestThread) == indexer.backend.ingest_thread
    assert isinstance(indexer.ingest, IngestThread) or isinstance(indexer.ingest, Ingest)


def test_then_chains_values_at_once_and_awaitables_later():
    assert then(2, lambda v: v * 10) == 20

    async def later(value):
        await asyncio.sleep(0)
        return value

    async def down():
        raise IndexUnavailable("store down")

    async def run():
        assert await then(later(3), lambda v: v * 10) == 30
        with pytest.raises(KeyError, match="store down"):
            await then(down(), lambda v: v, lambda exc: KeyError(str(exc)))
        with pytest.raises(IndexUnavailable):
            await then(down(), lambda v: v)
    asyncio.run(run())
