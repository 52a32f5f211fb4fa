"""Index backends: where kvcm keeps block -> pods, behind one interface.

Two exist: the in-memory index of this process (kvcm/memory_backend.py) and a Redis-protocol
store shared by replicas (kvcm/shared_index.py); kvcm/backends.py picks one from `--index`.
The indexer, the HTTP API, the status page and the metrics use the operations of `Backend`
and never ask which backend they have; a third backend is one more module and one more row
of kvcm/backends.py.

An operation answers at once where it can (the in-memory index: a value) and after a round
trip where it must (a shared store: an awaitable). `then()` chains the next step either way,
so the in-memory path, which every scoring request takes, never makes a coroutine.
"""

import inspect


class IndexUnavailable(Exception):
    """The index cannot answer now (a shared store is down or slow); worth retrying."""


def then(result, step, on_unavailable=None):
    """step(result) at once when result is a value; when it is an awaitable, a coroutine that
    awaits it first. With on_unavailable, an IndexUnavailable from the awaitable is raised as
    on_unavailable(exc) instead (e.g. an HTTP 503)."""
    if inspect.isawaitable(result):
        return _later(result, step, on_unavailable)
    return step(result)


async def _later(awaitable, step, on_unavailable):
    try:
        value = await awaitable
    except IndexUnavailable as exc:
        if on_unavailable is None:
            raise
        raise on_unavailable(exc) from None
    return step(value)


async def settled(result):
    """The value of an operation's result, awaited if it is an awaitable."""
    return await result if inspect.isawaitable(result) else result


def tier_totals(per_pod):
    """{tier: entries} summed over per-pod {tier: entries} maps, tiers sorted."""
    totals = {}
    for tiers in per_pod:
        for tier, n in tiers.items():
            totals[tier] = totals.get(tier, 0) + n
    return dict(sorted(totals.items()))


class Backend:
    """The operations of an index backend. "Now or later" results are values or awaitables
    of them (see then()); a backend whose results are all values says so with
    answers_at_once, and only such a backend serves the indexer's synchronous methods."""

    answers_at_once = True
    journal = None          # the kvcm._core Journal EventSink records applied effects into, if wanted
    snapshots = False       # whether the index lives in this process, so that kvcm.state keeps it
    local_index = None      # the kvcm._core Index that scores at once in this process, if any
                            # (the scoring lane of kvcm/http.py walks it directly)
    # whether the ingest may run on a thread of its own (kvcm/ingest_thread.py): the backend
    # takes applied batches from any thread and needs no event loop for them; else the ingest
    # runs on the event loop, with the backend's client
    ingest_thread = False

    def ingest_hooks(self):
        """Keyword arguments for kvcm.ingest.Ingest: how streams hand batches to the backend."""
        return {}

    def attach(self, ingest):
        """Called once the ingest that feeds this backend exists."""

    async def start(self, sink):
        """Connects (kvcm serves even when a store is down: `unavailable` says why)."""

    async def close(self):
        pass

    @property
    def unavailable(self):
        """Why the backend cannot answer now, or None."""
        return None

    def score(self, model, keys, rekey, pods, scorer):
        """(keys, {pod: (score, blocks, {tier: blocks})}, note), now or later. rekey() gives
        the request's keys anew, should the model's keying change meanwhile (another replica
        switched its hash mode); note says why the answer is empty when the backend could not
        look (else None). IndexUnavailable when it cannot answer."""
        raise NotImplementedError

    def score_keys(self, model, keys, pods, scorer):
        """{pod: (score, blocks, {tier: blocks})} for keys already computed, now or later."""
        raise NotImplementedError

    def pod_counts(self, pods):
        """({pod: {tier: entries}} for `pods` and, where the backend knows them, every other
        pod; or None while it cannot count) and the pods only other replicas feed,
        [{"pod", "blocks"}], or None when there are no other replicas. Now or later."""
        raise NotImplementedError

    def clear_pod(self, pod):
        """Forgets every entry of the pod; the number removed, now or later."""
        raise NotImplementedError

    def describe(self, listing):
        """The "index" section of /v1/status; listing is the indexer's pods() answer."""
        raise NotImplementedError

    def dump(self):
        """A dump of the whole index in slices (kvcm._core's IndexDump), for snapshots."""
        raise NotImplementedError

    def load(self, tables, chunks):
        """Replaces the index with a dump's content, whole or not at all (ValueError)."""
        raise NotImplementedError

    def metric_families(self):
        """Prometheus metric families of the backend, for /metrics."""
        return ()

    def collectors(self):
        """prometheus_client collectors of the backend to register with /metrics."""
        return ()
