"""An index shared by several kvcm replicas through a Redis-protocol store (--index redis://…).

The event sink runs as with the in-memory index but reports its effects to a Journal; each
applied batch becomes one record (its stream, seq and timestamp, and the effects), queued in
a bounded backlog and written in order by one writer task, many records per pipelined round
trip. The store (kvcm/redis_store.py) applies a record atomically and skips it when its
stream has already moved past it, so replicas may ingest the same streams.

While the store is unreachable: scoring fails fast with IndexUnavailable (the API answers
503, or empty scores with --redis-fail-open), records wait in the backlog, and a watcher
pings with exponential backoff. When the backlog is full, records are dropped and counted,
and the pods they came from are cleared once writing resumes, after what was kept: missing
entries are a lost opportunity, stale ones would send requests to the wrong pod.
"""

import asyncio
import collections
import logging

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvcm.backend import Backend, IndexUnavailable, tier_totals
from kvcm.metrics import counter
from kvcm.redis_store import RedisStore, StoreError

log = logging.getLogger("kvcm.shared_index")

HEALTH_INTERVAL = 1.0     # seconds between pings while the store is up
POSITIONS_INTERVAL = 5.0  # seconds between reads of the streams' recorded positions
BACKOFF = (0.1, 2.0)      # first and longest wait between reconnection attempts
# Records per pipelined round trip, their keys, and round trips sent ahead of their answers.
# The server runs scripts one at a time, about 2.5 µs a key, and a lookup waits behind the
# writes already sent: with the store saturated by writes, its p99 was 10.8 ms at 1,024 keys
# x 2 and 6.5 ms at 512 x 2, for 8% (in process) to 15-20% (through ZMQ) less write
# throughput. Two in flight keep the server from waiting for kvcm between round trips
# (+47% against one; benchmarks/RESULTS.md, "Shared index (Redis)").
CHUNK_RECORDS = 64
CHUNK_KEYS = 512
IN_FLIGHT = 2
MAX_BACKLOG_KEYS = 8_000_000   # bounds the backlog's memory whatever the events' sizes

_RTT_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0)
ERROR_KINDS = ("timeout", "connection", "response", "busy", "error")


class Journal:
    """The effects of the batch being applied, as the store's apply-script operations. Key
    lists travel as one argument each: comma-separated decimal bytes (the sink formats them
    in C; sequences of ints are accepted too). Engine-map writes commute with everything
    else in a batch, so all those of one namespace (and one engine block size) share one
    operation. `size` counts arguments and keys, to bound round trips and the backlog."""
    __slots__ = ("ops", "events", "size", "_mappings")

    def __init__(self):
        self.ops = []
        self.events = 0
        self.size = 0
        self._mappings = {}    # (model, keys per hash) -> (engine hash chunks, key chunks)

    def store(self, model, pod, tier, keys, n=None):
        self._entries("S", model, pod, tier, keys, n)

    def remove(self, model, pod, tier, keys, n=None):
        self._entries("R", model, pod, tier, keys, n)

    def _entries(self, op, model, pod, tier, keys, n):
        if type(keys) is not bytes:
            keys = list(keys)
            keys, n = _csv(keys), len(keys)
        self.ops += (op, model, _holder(pod, tier), keys)
        self.events += 1
        self.size += 4 + n

    def map_engine(self, model, engine_hash, keys, k=None):
        """engine_hash and its k keys, as bytes (from the sink) or as ints."""
        if type(keys) is not bytes:
            keys = list(keys)
            keys, k, engine_hash = _csv(keys), len(keys), _csv([engine_hash])
        mapping = self._mappings.get((model, k))
        if mapping is None:
            mapping = self._mappings[model, k] = ([], [])
            self.ops += ("M", model, k) + mapping
            self.size += 5
        mapping[0].append(engine_hash)
        mapping[1].append(keys)
        self.size += 1 + k

    def clear_pod(self, pod, tier, model=None):
        self.ops += ("P", pod, tier or "", model or "")
        self.events += 1
        self.size += 4

    def switch_namespace(self, model):
        self.ops += ("N", model)
        self.events += 1
        self.size += 2

    def namespace(self, model, mode, style, lora, base=None):
        self.ops += ("T", model, mode, style, "1" if lora else "0", base or "")
        self.size += 6

    def take(self):
        """(ops, events, size) of the batch, and a fresh start."""
        taken = self.ops, self.events, self.size
        self.ops, self.events, self.size, self._mappings = [], 0, 0, {}
        return taken

    def suspend(self):
        """The effects of a batch applied in slices so far, set aside while other batches
        apply; resume() takes them back."""
        mappings = self._mappings
        return self.take() + (mappings,)

    def resume(self, state):
        if self.ops:
            raise RuntimeError("resuming a batch's effects over another batch's")
        self.ops, self.events, self.size, self._mappings = state


class _Record:
    __slots__ = ("stream", "pod", "seq", "ts", "flag", "ops", "events", "size")

    def __init__(self, stream, pod, seq, ts, flag, ops, events, size):
        self.stream, self.pod, self.seq, self.ts = stream, pod, seq, ts
        self.flag, self.ops, self.events, self.size = flag, ops, events, size


class SharedIndex(Backend):
    """The shared index backend: backlog, writer, health, lookups."""

    answers_at_once = False

    def __init__(self, url, *, timeout=1.0, ttl=0, backlog_events=100_000, fail_open=False):
        self.url = url
        self.fail_open = fail_open
        self.max_backlog_events = backlog_events
        self.rtt = Histogram("kvcm_redis_call_duration_seconds", "Round trips to the index store, by call",
                             ("call",), buckets=_RTT_BUCKETS, registry=None)
        self._rtt_children = {}
        self.store = RedisStore(url, timeout=timeout, ttl=ttl, observe=self._observe)
        self.journal = Journal()
        self.up = False
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.counters = {"records_written": 0, "records_duplicate": 0, "restarts_detected": 0,
                         "records_refused": 0, "backlog_dropped_events": 0, "backlog_dropped_records": 0,
                         "entries_added": 0, "entries_removed": 0, "engine_hashes_fetched": 0,
                         "writes_refused_full": 0}
        self._backlog = collections.deque()
        self._backlog_events = 0
        self._backlog_keys = 0
        self._cleared_after_drop = set()   # pods with a clear queued after their last dropped record
        self._sink = None
        self._wake_writer = None
        self._wake_watcher = None
        self._tasks = []
        self._closing = False
        self._down_reason = "not connected yet"
        self.on_switch = None     # called with a model another replica switched to decoupled
        self._positions = {}      # stream id -> seq last applied, as read from the store
        self._positions_read = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, sink):
        """Starts the writer and the watcher; returns once the first ping has been answered
        or has failed (kvcm serves either way: /ready tells which)."""
        self._sink = sink
        self._wake_writer = asyncio.Event()
        self._wake_watcher = asyncio.Event()
        first = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.ensure_future(self._write()), asyncio.ensure_future(self._watch(first))]
        await first

    async def close(self, drain_seconds=5.0):
        """Stops the tasks, then writes what the backlog holds while the store answers, for
        at most drain_seconds; logs what is left unwritten."""
        # The client may turn a cancellation inside a call into a timeout, which the loops
        # would take for an outage: they also stop on the flag.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_seconds
        problem = None if self.up else self._down_reason
        while self._backlog and problem is None and loop.time() < deadline:
            try:
                if await self._write_backlog(deadline) == "full":
                    problem = "the store is out of memory"
            except StoreError as exc:
                problem = exc
        if self._backlog:
            log.warning("shared index: %d batch record(s) (%d events) not written at shutdown: %s",
                        len(self._backlog), self._backlog_events, problem or "out of time")
        await self.store.close()

    def ingest_hooks(self):
        # every applied batch becomes a record for the store; a restarted engine's pod is
        # cleared there (by the record), not in the local index, which holds no entries
        return {"on_applied": self.batch_done, "clears_on_restart": False, "prefetch": self.prefetch,
                "position": self.position}

    def attach(self, ingest):
        self.on_switch = ingest.resync_namespace

    # -- health ------------------------------------------------------------------------------

    @property
    def status(self):
        """Why scoring is unavailable, or None when the store is up."""
        return None if self.up else self._down_reason

    @property
    def unavailable(self):
        return self.status

    def _observe(self, call, seconds):
        child = self._rtt_children.get(call)
        if child is None:
            child = self._rtt_children[call] = self.rtt.labels(call)
        child.observe(seconds)

    def _failed(self, exc):
        self.errors[exc.kind] += 1
        if exc.kind in ("timeout", "connection"):
            if self.up:
                log.warning("shared index: lost the store %s: %s", self.store.url_shown, exc)
            self.up = False
            self._down_reason = str(exc)
            self._wake_watcher.set()

    async def _watch(self, first):
        """Pings the store: every HEALTH_INTERVAL while up, with backoff while down. Also
        brings in the namespace contracts other replicas recorded, and (every
        POSITIONS_INTERVAL) the streams' recorded positions."""
        delay = BACKOFF[0]
        while not self._closing:
            loop_time = asyncio.get_running_loop().time()
            try:
                await self.store.ping()
                contracts = await self.store.namespaces()
                if self._positions_read is None or loop_time - self._positions_read >= POSITIONS_INTERVAL:
                    self._positions = await self.store.stream_positions()
                    self._positions_read = loop_time
            except StoreError as exc:
                self._failed(exc)
                if not first.done():
                    log.warning("shared index: store %s not reachable yet: %s", self.store.url_shown, exc)
                    first.set_result(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF[1])
                continue
            for model, contract in contracts.items():
                self.adopt(model, *contract)
            if not self.up:
                log.info("shared index: connected to %s", self.store.url_shown)
                await self.store.reconnect()
                self.up = True
                self._down_reason = None
                self._wake_writer.set()
            if not first.done():
                first.set_result(None)
            delay = BACKOFF[0]
            self._wake_watcher.clear()
            try:
                await asyncio.wait_for(self._wake_watcher.wait(), HEALTH_INTERVAL)
            except asyncio.TimeoutError:
                pass

    def adopt(self, model, mode, style, lora, base=None):
        """Takes on a namespace contract recorded in the store; True when it changed ours.
        A switch to decoupled mode made elsewhere cleared the model on every pod, ours too:
        on_switch lets the ingest replay the streams that fed it."""
        before = self._sink.mode_of(model), self._sink.namespaces().get(model)
        self._sink.adopt_namespace(model, mode, style, lora, base)
        after = self._sink.mode_of(model), self._sink.namespaces().get(model)
        if before[0] == "parity" and after[0] == "decoupled" and self.on_switch is not None:
            self.on_switch(model)
        return after != before

    def position(self, stream):
        """The seq the store last applied for an ingest stream (read at most POSITIONS_INTERVAL
        ago), or None: a replica that takes a stream over continues from there, replaying
        only what no replica applied."""
        return self._positions.get(_stream_id(stream))

    # -- writes ------------------------------------------------------------------------------

    def batch_done(self, stream, seq, resync=False):
        """Queues the effects of the batch just applied for an ingest stream. The first
        record after the ingest saw the stream's engine restart (stream.restarted) clears
        the pod in the store, as the in-memory index is cleared at once."""
        for contract in self._sink.take_changed_namespaces():
            self.journal.namespace(*contract)
        ops, events, size = self.journal.take()
        if not ops:
            return
        name = _stream_id(stream)
        flag = "resync" if resync else ""
        if getattr(stream, "restarted", False):
            flag, stream.restarted = "restart", False
        self._enqueue(_Record(name, stream.pod, seq, stream.ctx.ts, flag, ops, events, size))

    def _enqueue(self, record):
        if (self._backlog_events + record.events > self.max_backlog_events
                or self._backlog_keys + record.size > MAX_BACKLOG_KEYS) and record.stream:
            self._drop(record)
            return
        self._cleared_after_drop.discard(record.pod)
        self._backlog.append(record)
        self._backlog_events += record.events
        self._backlog_keys += record.size
        if self.up:
            self._wake_writer.set()

    def _drop(self, record):
        self.counters["backlog_dropped_records"] += 1
        self.counters["backlog_dropped_events"] += record.events
        if self.counters["backlog_dropped_records"] == 1:
            log.warning("shared index: backlog full (%d events); dropping batches and clearing their "
                        "pods once the store is back", self.max_backlog_events)
        self._clear_later(record.pod)

    def _clear_later(self, pod):
        """Queues a clear of a pod some of whose batches were lost, after what is queued:
        its entries may then be missing, never stale. Outside the backlog's bound: at most
        one per pod between two of its records."""
        if pod in self._cleared_after_drop:
            return
        self._cleared_after_drop.add(pod)
        clear = Journal()
        clear.clear_pod(pod, None)
        marker = _Record("", pod, 0, 0.0, "", *clear.take())
        self._backlog.append(marker)
        self._backlog_events += marker.events
        self._backlog_keys += marker.size

    @property
    def backlog_events(self):
        return self._backlog_events

    async def _write(self):
        while not self._closing:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._backlog and self.up:
                try:
                    if await self._write_backlog() == "full":
                        # the store is full and takes no writes: records wait, in order
                        # (the backlog's bound still applies), and scoring goes on
                        await asyncio.sleep(BACKOFF[1])
                except StoreError as exc:
                    self._failed(exc)
                    break

    async def _write_backlog(self, deadline=None):
        """Writes the backlog from its head, in order, with up to IN_FLIGHT round trips sent
        and not yet answered, until it is empty, the store is down or the loop time passes
        `deadline`. Records leave the backlog only once the store has answered them.
        Returns "done", or "full" / "retry" when the store refused a record for lack of
        memory / of the script: that record and those after it stay queued (the answers
        still in flight are read, and whatever they applied is skipped when sent again)."""
        store, loop = self.store, asyncio.get_running_loop()
        chunks = collections.deque()   # records sent and not yet answered, by round trip
        sent = 0                       # how many, at the backlog's head
        outcome = "done"
        while True:
            while (outcome == "done" and len(chunks) < IN_FLIGHT and sent < len(self._backlog) and self.up
                   and (deadline is None or loop.time() < deadline)):
                chunk = self._next_chunk(sent)
                await store.send_applies([store.apply_args(r.stream, r.seq, r.ts, r.flag, r.pod, r.ops)
                                          for r in chunk])
                chunks.append(chunk)
                sent += len(chunk)
            if not chunks:
                return outcome
            chunk = chunks.popleft()
            results = await store.receive_applies()
            sent -= len(chunk)
            if outcome == "done":
                outcome = self._settle(chunk, results)

    def _next_chunk(self, skip):
        """The backlog's records after the first `skip`, as many as one round trip takes."""
        chunk, keys = [], 0
        for i in range(skip, len(self._backlog)):
            record = self._backlog[i]
            if chunk and (len(chunk) == CHUNK_RECORDS or keys + record.size > CHUNK_KEYS):
                break
            chunk.append(record)
            keys += record.size
        return chunk

    def _settle(self, chunk, results):
        """Takes the answered records out of the backlog's head and counts their results."""
        for record, result in zip(chunk, results):
            if isinstance(result, StoreError):
                self.errors[result.kind] += 1
                if result.script_missing:
                    return "retry"
                if result.out_of_memory:
                    self.counters["writes_refused_full"] += 1
                    if self.counters["writes_refused_full"] == 1:
                        log.error("shared index: the store is out of memory and refuses writes; "
                                  "batches wait in the backlog (set maxmemory-policy allkeys-lru): %s", result)
                    return "full"
            self._backlog.popleft()
            self._backlog_events -= record.events
            self._backlog_keys -= record.size
            if isinstance(result, StoreError):
                # a batch the store cannot apply at all: it is lost, and its pod cleared
                self.counters["records_refused"] += 1
                if self.counters["records_refused"] == 1:
                    log.error("shared index: the store refused a batch of %s (its pod will be "
                              "cleared): %s", record.pod, result)
                if record.stream:
                    self._clear_later(record.pod)
                continue
            status, added, removed = result
            if status == 0:
                self.counters["records_duplicate"] += 1
                continue
            self.counters["records_written"] += 1
            self.counters["restarts_detected"] += status == 2
            self.counters["entries_added"] += added
            self.counters["entries_removed"] += removed
        return "done"

    async def prefetch(self, missing):
        """Brings engine hashes other replicas recorded into the local engine-map cache
        ({namespace: [engine hash]}, from EventSink.missing_engine_hashes). Never raises: what
        stays unknown is then counted by the sink as it applies the batch."""
        if not self.up:
            return
        try:
            found = await self.store.resolve(missing)
        except StoreError as exc:
            self._failed(exc)
            return
        index = self._sink.index
        for model, resolved in found.items():
            for engine_hash, keys in zip(missing[model], resolved):
                if keys:
                    index.map_engine(model, [engine_hash], list(keys))
                    self.counters["engine_hashes_fetched"] += 1

    async def clear_pod(self, pod):
        """An operator's clear: applied at once, after nothing else. Returns the entries removed."""
        self._check_up()
        journal = Journal()
        journal.clear_pod(pod, None)
        ops, _, _ = journal.take()
        try:
            (result,) = await self.store.apply([self.store.apply_args("", 0, 0.0, "", pod, ops)])
        except StoreError as exc:
            self._failed(exc)
            raise IndexUnavailable(str(exc)) from None
        if isinstance(result, StoreError):
            raise IndexUnavailable(str(result))
        return result[2]

    # -- reads -------------------------------------------------------------------------------

    def _check_up(self):
        if not self.up:
            raise IndexUnavailable("the shared index store %s is unavailable: %s"
                                   % (self.store.url_shown, self._down_reason))

    async def lookup(self, model, keys, pods, weights, default_weight):
        """(recorded contract, {pod: (score, blocks, {tier: blocks})}); IndexUnavailable when
        the store cannot answer (at once while it is known to be down)."""
        self._check_up()
        try:
            return await self.store.lookup(model, keys, pods, weights, default_weight)
        except StoreError as exc:
            self._failed(exc)
            raise IndexUnavailable("the shared index store %s did not answer: %s"
                                   % (self.store.url_shown, exc)) from None

    async def pod_blocks(self):
        """{pod: {tier: entries}}, or None while the store cannot answer."""
        if not self.up:
            return None
        try:
            return await self.store.holder_counts()
        except StoreError as exc:
            self._failed(exc)
            return None

    # -- the backend interface (kvcm/backend.py) ------------------------------------------------

    async def score(self, model, keys, rekey, pods, scorer):
        weights, default = scorer.weights, scorer.default_weight
        try:
            contract, detailed = await self.lookup(model, keys, pods, weights, default)
            if contract[0] and self.adopt(model, *contract):
                # another replica switched the model's contract: key the request its way
                fresh = rekey()
                if list(fresh) != list(keys):
                    keys = fresh
                    contract, detailed = await self.lookup(model, keys, pods, weights, default)
        except IndexUnavailable as exc:
            if not self.fail_open:
                raise
            return keys, {}, str(exc)
        return keys, detailed, None

    async def score_keys(self, model, keys, pods, scorer):
        _, detailed = await self.lookup(model, keys, pods, scorer.weights, scorer.default_weight)
        return detailed

    async def pod_counts(self, pods):
        counts = await self.pod_blocks()
        local = set(pods)
        others = [{"pod": pod, "blocks": tiers} for pod, tiers in sorted((counts or {}).items())
                  if pod not in local]
        return counts, others

    def describe(self, listing):
        # the store's own counts, per pod: those of the streams here and those other replicas feed
        per_pod = {s["pod"]: s["blocks"] for s in listing["pods"] if s["blocks"] is not None}
        per_pod.update((p["pod"], p["blocks"]) for p in listing.get("remote", ()) if p["blocks"] is not None)
        return {"backend": self.store.url_shown, "up": self.up, "unavailable": self.status,
                "backlog_events": self.backlog_events, "capacity": None,
                "entries_by_tier": tier_totals(per_pod.values()), "pods": len(per_pod),
                "engine_map_entries": self._engine_map_entries()}

    def _engine_map_entries(self):
        return self._sink.index.stats()["engine_map_entries"] if self._sink is not None else 0

    def metric_families(self):
        # the store's own figures are the server's (INFO, /v1/pods); these are this replica's
        yield GaugeMetricFamily("kvcm_redis_up", "1 while the shared index store answers", value=int(self.up))
        yield GaugeMetricFamily("kvcm_redis_backlog_events", "Events waiting to be written to the store",
                                value=self.backlog_events)
        errors = CounterMetricFamily("kvcm_redis_errors", "Failed calls to the store, by kind", labels=("kind",))
        for kind, n in self.errors.items():
            errors.add_metric((kind,), n)
        yield errors
        for name, text in _COUNTER_HELP:
            yield counter("kvcm_redis_%s_total" % name, text, self.counters[name])
        yield GaugeMetricFamily("kvcm_index_engine_map_entries", "Engine hash -> kvcm key entries cached locally",
                                value=self._engine_map_entries())

    def collectors(self):
        return (self.rtt,)


_COUNTER_HELP = (
    ("records_written", "Event batches written to the store"),
    ("records_duplicate", "Event batches the store had already applied (skipped)"),
    ("restarts_detected", "Engine restarts the store detected (pod cleared)"),
    ("records_refused", "Event batches the store refused (e.g. out of memory)"),
    ("backlog_dropped_events", "Events dropped because the backlog was full"),
    ("entries_added", "(block, pod, tier) entries the store added"),
    ("entries_removed", "(block, pod, tier) entries the store removed or cleared"),
    ("engine_hashes_fetched", "Engine hashes learnt from the store (streams taken over)"),
    ("writes_refused_full", "Write round trips the store refused for lack of memory (retried)"))


def _csv(numbers):
    return ",".join(map(str, numbers)).encode()


def _holder(pod, tier):
    """A block field: the store splits it at its last '@', so a tier must not hold one."""
    return pod + "@" + tier.replace("@", "%40")


def _stream_id(stream):
    return "%s@%s@%d" % (_escape(stream.pod), _escape(stream.model), stream.dp_rank)


def _escape(name):
    """Connect-mode pod and model names may hold '@': escaped in stream ids so that pod "a@b"
    of model "c" and pod "a" of model "b@c" stay two streams."""
    return name.replace("%", "%25").replace("@", "%40")


__all__ = ["IndexUnavailable", "Journal", "SharedIndex"]
