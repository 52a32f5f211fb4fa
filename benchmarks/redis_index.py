#!/usr/bin/env python3
"""Benchmarks of the shared index (--index redis://...) against the in-memory one, in one run.

    python benchmarks/redis_index.py                   # all: lookup ingest memory serve (~4 min)
    python benchmarks/redis_index.py ingest --repeats 5
    python benchmarks/redis_index.py --json            # one JSON object instead of the tables

The benchmark starts its own redis-server (REDIS_SERVER, default `redis-server` on PATH) on a
free 127.0.0.1 port, persistence off (--save "" --appendonly no) in a temporary directory of
its own, and stops it at the end. Everything runs in this process on one uvloop event loop,
as `kvcm serve` does; the server is a separate process, so on a 2-core machine kvcm and Redis
each have a core. Nothing is pinned.

- lookup: a 256-key request against 16 pods holding prefixes of one 4096-token chain (pod i
  the first min(256, 20 (i + 1)) blocks: 4 pods all 256; 2,584 entries), put in through
  EventSink.apply as vLLM's events. In-memory Scorer.score_detailed; RedisStore.lookup (one
  EVALSHA) and, from INFO latencystats / commandstats, the script's time inside the server;
  a PING floor; end to end Indexer.score_tokens (memory) and Indexer.score_tokens_async
  (shared). Then 16 lookups in flight at once (throughput), and probe scripts that do parts
  of the lookup script's work (where the server's time goes).
- ingest: the same pre-encoded batches (kvcm.publisher.encode_batch of 8 BlockStored events
  of 16 blocks, 32 pods, round-robin) into an in-memory Index by EventSink.apply, and through
  EventSink(journal=...) + SharedIndex.batch_done into the redis-server, timed until every
  record is written and the backlog is empty; parity (auto) and decoupled (kvcm) hash modes;
  also with all batches applied first (the writer alone, and the longest event-loop stall it
  causes), with a client looking up back to back meanwhile, and with --redis-ttl (an EXPIRE
  per stored key, a TTL on every engine key).
- memory: INFO memory used_memory before and after storing 200,000 blocks for 1 pod, then the
  same blocks for 3 more pods; and 200,000 blocks in decoupled mode (an engine-hash key each).
- serve: the whole path through `kvcm serve` subprocesses (kvcm bench's servers, engines and
  HTTP client, kvcm/bench/): 16 engines per server sending 819,200 blocks over ZMQ into
  an in-memory server, one shared replica, and two shared replicas at once (blocks/s until
  every batch is applied and, shared, written); publish -> visible on the same replica and
  from replica A to replica B; /v1/score (4096 tokens, 16 pods) on replica B idle, while
  replica A ingests 100 k blocks/s (paced publishers) and at full speed, against the
  in-memory server. Fresh servers per round.

Reporting is run.py's (a table per benchmark; --json: one JSON object with every row).
Latency percentiles are over all calls of a case, LOOKUP_CALLS in all, made in --repeats
rounds in which the cases take turns; ingest values are medians over --repeats runs; memory is
one run; serve values are medians over --repeats rounds of per-round percentiles. kvcm CPU is
this process's CPU time (time.process_time; serve: the servers' /proc/PID/stat), redis-server
CPU its threads' (/proc/PID/task/*/schedstat). Results: benchmarks/RESULTS.md, "Shared index
(Redis)".
"""
import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import redis  # noqa: E402
import uvloop  # noqa: E402

import run  # noqa: E402  (the core benchmarks: reporting helpers and workloads)
from kvcm import _core, redis_store  # noqa: E402
from kvcm.bench import load, phases as bench_phases, targets as bench_targets  # noqa: E402
from kvcm.bench.engines import Background, Engines  # noqa: E402
from kvcm.bench.workload import Query, Spec, Stream as BenchStream, Workload  # noqa: E402
from kvcm.config import load_config  # noqa: E402
from kvcm.indexer import Indexer  # noqa: E402
from kvcm.publisher import block_stored, encode_batch  # noqa: E402
from kvcm.shared_index import CHUNK_KEYS, CHUNK_RECORDS, SharedIndex  # noqa: E402
from redis.asyncio.connection import Connection as RespConnection  # noqa: E402  (its RESP packing)
from run import BLOCK, NS, pc, row  # noqa: E402

REDIS_SERVER = os.environ.get("REDIS_SERVER", "redis-server")
JSON = False          # --json: one JSON object at the end instead of the tables
RESULTS = []          # every benchmark's report, for --json
DEADLINE = 60.0       # seconds any one wait may take before the run fails


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def pod_name(i):
    return "10.0.0.%d:8000" % (i + 1)


def report(bench, rows, **info):
    """run.py's table, or (with --json) kept for the JSON object printed at the end."""
    RESULTS.append({"bench": bench, **info, "rows": rows})
    if JSON:
        return
    cols = ("case", "value", "p99", "unit", "note")
    cells = [[run._fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("\n== %s ==" % bench)
    for line in [list(cols), ["-" * w for w in widths]] + cells:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    if info:
        print("  " + json.dumps(info))
    sys.stdout.flush()


def percentiles(samples):
    s = sorted(samples)
    return s[len(s) // 2], s[len(s) * 99 // 100], sum(s) / len(s)


# ---- the server -----------------------------------------------------------------------------


class RedisServer:
    """redis-server on a free 127.0.0.1 port, no persistence, in a temporary directory."""

    def __init__(self, binary=REDIS_SERVER):
        self.dir = tempfile.mkdtemp(prefix="kvcm-bench-redis-")
        path = shutil.which(binary)
        if path is None:
            raise SystemExit("redis_index.py: %s not found (apt-get install redis-server, or set REDIS_SERVER)"
                             % binary)
        self.version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
        for _ in range(5):  # a free port can be taken between choosing it and binding it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.log = open(os.path.join(self.dir, "server.log"), "ab")
            self.proc = subprocess.Popen(
                [path, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--protected-mode", "no"],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
            if self._wait():
                break
            self.log.close()
        else:
            raise RuntimeError("redis-server did not start: %s" % self.tail())
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.sync = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=30)

    def _wait(self):
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
            try:
                if probe.ping():
                    return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
            finally:
                probe.close()
        self.proc.kill()
        self.proc.wait()
        return False

    def tail(self):
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def cpu_ns(self):
        """CPU time of every thread of the server, ns (schedstat: nanosecond resolution)."""
        total = 0
        for tid in os.listdir("/proc/%d/task" % self.proc.pid):
            with open("/proc/%d/task/%s/schedstat" % (self.proc.pid, tid)) as f:
                total += int(f.read().split()[0])
        return total

    def reset_stats(self):
        self.sync.config_resetstat()

    def command_stats(self):
        """{command: (calls that succeeded, usec)} since the last reset (INFO commandstats;
        commands that scripts call are counted under their own names too; a failed call is an
        EVALSHA answered NOSCRIPT before redis-py loads the script)."""
        return {k[len("cmdstat_"):]: (v["calls"] - v.get("failed_calls", 0), v["usec"])
                for k, v in self.sync.info("commandstats").items()}

    def latency_stats(self):
        """{command: {"p50": µs, "p99": µs, "p99.9": µs}} since the last reset: INFO latencystats,
        Redis 7's per-command HdrHistogram (latency-tracking, on by default)."""
        return {k[len("latency_percentiles_usec_"):]: v for k, v in self.sync.info("latencystats").items()}

    def flush(self):
        """FLUSHALL SYNC: freed before it answers (Valkey 8 frees in the background by default,
        which would show in used_memory afterwards)."""
        self.sync.execute_command("FLUSHALL", "SYNC")

    def used_memory(self):
        return self.sync.info("memory")["used_memory"]

    def close(self):
        self.sync.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the pieces of kvcm a stream needs -------------------------------------------------------


class Stream:
    """What SharedIndex.batch_done reads of kvcm.ingest's stream (no engine restart here)."""
    __slots__ = ("pod", "model", "dp_rank", "ctx", "restarted")

    def __init__(self, pod, model=NS):
        self.pod, self.model, self.dp_rank, self.restarted = pod, model, 0, False
        self.ctx = _core.StreamContext(pod, model)


async def drained(shared, records):
    """Waits until the shared index has written `records` records and its backlog is empty."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    c = shared.counters
    while shared.backlog_events or c["records_written"] + c["records_duplicate"] + c["records_refused"] < records:
        if loop.time() > end:
            raise RuntimeError("the shared index did not drain: backlog %d events, counters %s, errors %s"
                               % (shared.backlog_events, c, shared.errors))
        await asyncio.sleep(0.002)   # uvloop's timers have 1 ms resolution: shorter would spin
    if c["records_duplicate"] or c["records_refused"] or any(shared.errors.values()):
        raise RuntimeError("unexpected store results: counters %s, errors %s" % (c, shared.errors))


def new_config(*args):
    return load_config(list(args), environ={})  # no KVCM_* variables


# ---- 1. lookup ------------------------------------------------------------------------------

LOOKUP_PODS, LOOKUP_TOKENS = 16, 4096
LOOKUP_CALLS, LOOKUP_WARMUP = 2000, 100   # calls per case in all (over --repeats rounds), warm-up calls
CONCURRENT, CONCURRENT_ROUNDS = 16, 20
PROBE_CALLS = 150   # in all, over --repeats rounds
PACK_CALLS = 300
# Scripts taking the lookup script's arguments (RedisStore.lookup_args: the model first, the
# keys comma-joined last) that do part of its work, to split its server-side time: the call,
# the walk of HGETALLs, and the walk plus splitting each field into pod and tier.
_PROBE_KEYS = "local blocks = string.gmatch(ARGV[#ARGV], '[^,]+')\n"
PROBES = (
    ("return at once (the call and its arguments)", "return 1"),
    ("HGETALL every block key, nothing else",
     _PROBE_KEYS + "for k in blocks do redis.call('HGETALL', ARGV[1] .. '@' .. k) end return 1"),
    ("HGETALL every block key + split each field into pod and tier",
     _PROBE_KEYS + "local n = 0\nfor k in blocks do\n"
     "  local fields = redis.call('HGETALL', ARGV[1] .. '@' .. k)\n"
     "  for j = 1, #fields, 2 do\n"
     "    local at = fields[j]:match('^.*()@')\n"
     "    local pod, tier = fields[j]:sub(1, at - 1), fields[j]:sub(at + 1)\n"
     "    n = n + 1\n  end\nend\nreturn n"),
    ("kvcm's lookup script (redis_store._LOOKUP)", redis_store._LOOKUP),
)


def lookup_depth(i):
    return min(LOOKUP_TOKENS // BLOCK, 20 * (i + 1))


def lookup_pod(i):
    return "10.1.0.%d:8000" % (i + 1)


def lookup_workload():
    """(tokens, their 256 vLLM block hashes, [(pod, payload)]): pod i announces the first
    lookup_depth(i) blocks in one BlockStored event with a nil parent and its token ids."""
    rng = random.Random(4096)
    tokens = run.random_tokens(rng, LOOKUP_TOKENS)
    hashes = list(_core.BlockHasher("sha256", block_size=BLOCK).keys(tokens))
    payloads = [(lookup_pod(i), encode_batch([block_stored(hashes[:lookup_depth(i)], None,
                                                           tokens[:lookup_depth(i) * BLOCK])], ts=1.7e9))
                for i in range(LOOKUP_PODS)]
    return tokens, hashes, payloads


async def time_calls(fn, n, clock, is_async):
    out = []
    if is_async:
        for _ in range(n):
            t0 = pc()
            await fn()
            t1 = pc()
            out.append(t1 - t0 - clock)
    else:
        for _ in range(n):
            t0 = pc()
            fn()
            t1 = pc()
            out.append(t1 - t0 - clock)
    return out


async def bench_lookup(server, repeats):
    tokens, hashes, payloads = lookup_workload()
    entries = sum(lookup_depth(i) for i in range(LOOKUP_PODS))

    server.flush()
    mem = Indexer(new_config())
    shared = Indexer(new_config("--index", server.url))  # --redis-timeout 1 as by default
    await shared.shared.start(shared.sink)  # Indexer.start() minus the ZMQ ingest
    try:
        for pod, payload in payloads:  # nil parents and token ids: auto mode verifies them
            mem.sink.apply(_core.StreamContext(pod, NS), payload)
            stream = Stream(pod)
            shared.sink.apply(stream.ctx, payload)
            shared.shared.batch_done(stream, 0)
        await drained(shared.shared, LOOKUP_PODS)
        assert mem.sink.counters["parity_verified"] == LOOKUP_PODS, mem.sink.counters
        assert mem.index.stats()["entries"] == entries == shared.shared.counters["entries_added"]

        keys = mem.keys(NS, tokens)
        assert list(keys) == hashes and list(shared.keys(NS, tokens)) == hashes
        miss_keys = run.random_keys(9, len(keys))
        store, scorer = shared.shared.store, mem.scorer
        weights, default = scorer.weights, scorer.default_weight
        expected = mem.score_tokens(NS, tokens)
        got = await shared.score_tokens_async(NS, tokens)
        assert got == expected, (got, expected)
        assert sorted(expected["scores"].values()) == sorted(float(lookup_depth(i)) for i in range(LOOKUP_PODS))
        contract, detailed = await store.lookup(NS, keys, None, weights, default)
        assert contract[0] == "parity", contract
        assert detailed == scorer.score_detailed(mem.index, NS, keys, None)

        # (case, callable, whether it returns a coroutine)
        cases = [
            ("memory: Scorer.score_detailed, 256 keys", lambda: scorer.score_detailed(mem.index, NS, keys, None),
             False),
            ("redis: RedisStore.lookup, 256 keys (1 EVALSHA)", lambda: store.lookup(NS, keys, None, weights, default),
             True),
            ("redis: RedisStore.lookup, miss at block 0", lambda: store.lookup(NS, miss_keys, None, weights, default),
             True),
            ("redis: RedisStore.ping (round-trip floor)", store.ping, True),
            ("memory: Indexer.score_tokens, 4096 tokens", lambda: mem.score_tokens(NS, tokens), False),
            ("redis: Indexer.score_tokens_async, 4096 tokens", lambda: shared.score_tokens_async(NS, tokens), True),
            ("Indexer.keys, 4096 tokens (part of both)", lambda: mem.keys(NS, tokens), False),
        ]
        clock = run._clock_cost_ns()
        for _, fn, is_async in cases:  # warm-up
            await time_calls(fn, LOOKUP_WARMUP, clock, is_async)
        per_round = LOOKUP_CALLS // repeats
        samples = {case: [] for case, _, _ in cases}     # every call's wall time, pooled over rounds
        cpu = {case: 0 for case, _, _ in cases}          # this process's CPU time
        rcpu = {case: 0 for case, _, _ in cases}         # redis-server's
        # per round: the EVALSHA's latencystats percentiles; commandstats summed over rounds
        server_side = {case: [] for case, _, _ in cases[1:3]}
        server_stats = {case: collections.Counter() for case in server_side}
        las = []
        for _ in range(repeats):  # the cases take turns, so background load hits them alike
            las.append(loadavg())
            for case, fn, is_async in cases:
                if case in server_side:
                    server.reset_stats()
                cpu0, rcpu0 = time.process_time_ns(), server.cpu_ns()
                samples[case] += await time_calls(fn, per_round, clock, is_async)
                cpu[case] += time.process_time_ns() - cpu0
                rcpu[case] += server.cpu_ns() - rcpu0
                if case in server_side:
                    stats, lat = server.command_stats(), server.latency_stats()
                    assert stats["evalsha"][0] == per_round, stats["evalsha"]
                    server_side[case].append(lat["evalsha"])
                    for command, (calls, usec) in stats.items():
                        server_stats[case][command, "calls"] += calls
                        server_stats[case][command, "usec"] += usec
        n = per_round * repeats
        rows = []
        smean = lambda case: server_stats[case]["evalsha", "usec"] / server_stats[case]["evalsha", "calls"]  # noqa
        for case, _, _ in cases:
            p50, p99, mean = percentiles(samples[case])
            note = "mean %.1f µs; kvcm CPU %.1f µs/call" % (mean / 1e3, cpu[case] / n / 1e3)
            if case.startswith("redis"):
                note += "; redis-server CPU %.1f µs/call" % (rcpu[case] / n / 1e3)
            rows.append(row(case, p50 / 1e3, "µs", p99=p99 / 1e3, note=note))
            if case in server_side:
                st = server_stats[case]
                rows.append(row("  server side: the EVALSHA in redis-server",
                                statistics.median(x["p50"] for x in server_side[case]), "µs",
                                p99=statistics.median(x["p99"] for x in server_side[case]),
                                note="INFO latencystats; mean %.1f µs (commandstats); %.0f HGETALL per call inside, "
                                     "%.2f µs each" % (smean(case), st["hgetall", "calls"] / n,
                                                       st["hgetall", "usec"] / max(1, st["hgetall", "calls"]))))
        full, miss = cases[1][0], cases[2][0]
        mean = lambda xs: sum(xs) / len(xs) / 1e3  # noqa: E731
        rows.append(row("redis: lookup - server side (means): client, network, wake-ups",
                        mean(samples[full]) - smean(full), "µs",
                        note="miss at block 0: %.1f µs" % (mean(samples[miss]) - smean(miss))))
        rows.append(row("redis: server side per block walked ((full - miss) / 255, means)",
                        (smean(full) - smean(miss)) * 1e3 / (len(keys) - 1), "ns"))
        rows.append(row("score_tokens_async (redis) / score_tokens (memory), p50",
                        percentiles(samples[cases[5][0]])[0] / percentiles(samples[cases[4][0]])[0], "x"))

        # throughput: CONCURRENT lookups in flight at once (the server runs scripts one at a time)
        lookup = cases[1][1]
        await asyncio.gather(*(lookup() for _ in range(CONCURRENT)))
        rcpu0, t0 = server.cpu_ns(), pc()
        for _ in range(CONCURRENT_ROUNDS):
            await asyncio.gather(*(lookup() for _ in range(CONCURRENT)))
        ns, rcpu = pc() - t0, server.cpu_ns() - rcpu0
        done = CONCURRENT * CONCURRENT_ROUNDS
        rows.append(row("redis: throughput, %d RedisStore.lookup in flight at once" % CONCURRENT, done / ns * 1e9,
                        "lookups/s", note="%d lookups in %.2f s; redis-server CPU %.0f%% of a core"
                        % (done, ns / 1e9, rcpu / ns * 100)))

        # the client's share: redis-py packing the lookup's EVALSHA, in-process, nothing sent
        packer = RespConnection()
        command = ["EVALSHA", "0" * 40, 0] + redis_store.RedisStore.lookup_args(NS, list(keys), None, weights, default)
        pack_ns = percentiles(await time_calls(lambda: packer.pack_command(*command), PACK_CALLS, clock, False))
        rows.append(row("redis: client side: redis-py packing the lookup's EVALSHA (%d arguments)" % len(command),
                        pack_ns[0] / 1e3, "µs", p99=pack_ns[1] / 1e3,
                        note="in-process, nothing sent, back to back; %.2f µs per argument"
                        % (pack_ns[0] / 1e3 / len(command))))


        # where the server's time goes: probe scripts over the same 256 keys (commandstats means)
        args = redis_store.RedisStore.lookup_args(NS, list(keys), None, weights, default)
        shas = [server.sync.script_load(script) for _, script in PROBES]
        probe_usec = collections.Counter()
        for _ in range(repeats):  # the probes take turns too
            for sha in shas:
                server.sync.evalsha(sha, 0, *args)
                server.reset_stats()
                for _ in range(PROBE_CALLS // repeats):
                    server.sync.evalsha(sha, 0, *args)
                calls, usec = server.command_stats()["evalsha"]
                assert calls == PROBE_CALLS // repeats
                probe_usec[sha] += usec
        for (name, _), sha in zip(PROBES, shas):
            calls = PROBE_CALLS // repeats * repeats
            rows.append(row("  probe script: " + name, probe_usec[sha] / calls, "µs",
                            note="mean of %d EVALSHA (commandstats)" % calls))
        report("lookup", rows, pods=LOOKUP_PODS, keys=len(keys), entries=entries, calls=n, rounds=repeats,
               loadavg=las)
    finally:
        await shared.shared.close()


# ---- 2. ingest ------------------------------------------------------------------------------

INGEST_PODS, INGEST_BATCHES, EVENTS_PER_BATCH = 32, 48, 8   # 32 x 48 x 8 x 16 = 196,608 blocks
INGEST_TTL = 3600
TTL_CASE = "redis, --redis-ttl %d" % INGEST_TTL
TURN_S = 0.0002   # kvcm.ingest.Ingest's default turn_seconds: the loop is yielded this often


def chain_batches(seed, pods, batches_per_pod, nil_first_parent, events_per_batch=EVENTS_PER_BATCH,
                  hashes_seed=None):
    """[(pod index, seq, payload)], round-robin over pods: each pod's batches are one chain of
    events of 16 fresh random block hashes, each event's parent the previous event's last hash.
    The first event's parent is random (auto mode then stores it as is: no verification) or,
    with nil_first_parent, nil (a root: what decoupled mode needs to chain the rest). 256 token
    ids per event, from 16 random lists. `hashes_seed` fixes the hashes apart from the pods, so
    several pods can announce the same blocks."""
    rng = random.Random(seed)
    toks = [run.random_tokens(rng, BLOCK * BLOCK) for _ in range(16)]
    chains = []
    for p in range(pods):
        hrng = random.Random(hashes_seed if hashes_seed is not None else seed * 1000 + p)
        parent = None if nil_first_parent else hrng.getrandbits(64)
        batches = []
        for b in range(batches_per_pod):
            events = []
            for e in range(events_per_batch):
                hashes = [hrng.getrandbits(64) for _ in range(BLOCK)]
                events.append(block_stored(hashes, parent, toks[(b * events_per_batch + e) % 16], BLOCK))
                parent = hashes[-1]
            batches.append(encode_batch(events, ts=1.7e9 + b))
        chains.append(batches)
    return [(p, b, chains[p][b]) for b in range(batches_per_pod) for p in range(pods)]


def apply_memory(batches, pods, mode):
    index = _core.Index(max_blocks=10_000_000)
    sink = _core.EventSink(index, BLOCK, "sha256", None, mode)
    ctxs = [_core.StreamContext(pod_name(p), NS) for p in range(pods)]
    cpu0, t0 = time.process_time_ns(), pc()
    for p, _, payload in batches:
        sink.apply(ctxs[p], payload)
    ns, cpu = pc() - t0, time.process_time_ns() - cpu0
    return ns, cpu, sink.counters, index.stats()["entries"]


class PackTimer:
    """Times redis-py's asyncio Connection.pack_commands, the synchronous encoding of every
    pipelined round trip (SharedIndex's writer), by wrapping it while active."""

    def __init__(self):
        self.ns = []
        self._original = None

    def __enter__(self):
        original = self._original = RespConnection.pack_commands
        ns = self.ns

        def pack_commands(conn, commands):
            t0 = pc()
            out = original(conn, commands)
            if commands and commands[0][0] == "EVALSHA":   # the writer's, not the watcher's
                ns.append(pc() - t0)
            return out
        RespConnection.pack_commands = pack_commands
        return self

    def __exit__(self, *exc):
        RespConnection.pack_commands = self._original


async def apply_shared(server, batches, pods, mode, interleave=True, pod_offset=0, flush=True, prefill=(),
                       during=None, ttl=0):
    """Applies batches through a fresh SharedIndex (and EventSink with its journal) and waits
    until every record is written. interleave: yield the loop every TURN_S, as kvcm.ingest
    does, so the writer overlaps the apply; else apply everything, then let the writer drain
    the backlog (timed on its own, with a task measuring the longest loop stall). prefill:
    [(pod, payload)] applied and written first, untimed; during(store, stop): a coroutine run
    from the start until everything is written (then `stop` is set), its result in "during";
    ttl: --redis-ttl (seconds; 0: none)."""
    if flush:
        server.flush()
    shared = SharedIndex(server.url, backlog_events=10 ** 9, ttl=ttl)  # timeout 1 s as kvcm's default
    sink = _core.EventSink(_core.Index(max_blocks=10_000_000), BLOCK, "sha256", None, mode, journal=shared.journal)
    await shared.start(sink)
    streams = [Stream(pod_name(p + pod_offset)) for p in range(pods)]
    try:
        for pod, payload in prefill:
            stream = Stream(pod)
            sink.apply(stream.ctx, payload)
            shared.batch_done(stream, 0)
        await drained(shared, len(prefill))
        before, added = shared.counters["records_written"], shared.counters["entries_added"]
        stop = asyncio.Event()
        side = None if during is None else asyncio.ensure_future(during(shared.store, stop))
        server.reset_stats()
        stalls = []
        ticker = None
        with PackTimer() as packing:
            rcpu0, cpu0, t0 = server.cpu_ns(), time.process_time_ns(), pc()
            turn = t0
            for p, seq, payload in batches:
                stream = streams[p]
                sink.apply(stream.ctx, payload)
                shared.batch_done(stream, seq)
                if interleave and pc() - turn > TURN_S * 1e9:
                    await asyncio.sleep(0)
                    turn = pc()
            t_applied = pc()
            if not interleave:
                async def tick():
                    last = pc()
                    while True:
                        await asyncio.sleep(0)
                        now = pc()
                        stalls.append(now - last)
                        last = now
                ticker = asyncio.ensure_future(tick())
            await drained(shared, before + len(batches))
            t_end = pc()
        if ticker is not None:
            ticker.cancel()
        out = {"ns": t_end - t0, "apply_ns": t_applied - t0, "drain_ns": t_end - t_applied,
               "cpu_ns": time.process_time_ns() - cpu0, "server_cpu_ns": server.cpu_ns() - rcpu0,
               "counters": dict(shared.counters), "sink": sink.counters}
        out["packing"] = packing.ns
        out["counters"]["records_written"] -= before
        out["counters"]["entries_added"] -= added
        if side is not None:
            stop.set()
            out["during"] = await side
        stats = server.command_stats()
        out["evalsha"] = stats.get("evalsha", (0, 0))
        out["script_exists"] = stats.get("script|exists", (0, 0))[0]  # redis-py's, before each pipeline
        out["max_stall_ns"] = max(stalls) if stalls else None
        out["stall_p99_ns"] = percentiles(stalls)[1] if stalls else None
        return out
    finally:
        await shared.close()


async def bench_ingest(server, repeats):
    workloads = {"auto": chain_batches(21, INGEST_PODS, INGEST_BATCHES, False),
                 "kvcm": chain_batches(21, INGEST_PODS, INGEST_BATCHES, True)}
    blocks = INGEST_PODS * INGEST_BATCHES * EVENTS_PER_BATCH * BLOCK
    nbatches = INGEST_PODS * INGEST_BATCHES
    apply_memory(workloads["auto"], INGEST_PODS, "auto")  # warm-up: fault the index's pages in
    tokens, hashes, prefill = lookup_workload()

    async def lookups(store, stop):
        """One client's lookups back to back (the lookup benchmark's 256-key request) until stop."""
        out = []
        while not stop.is_set():
            t0 = pc()
            _, detailed = await store.lookup(NS, hashes, None, {"gpu": 1.0, "cpu": 0.8}, 1.0)
            out.append(pc() - t0)
            assert len(detailed) == LOOKUP_PODS
        return out

    cases = [("auto", "memory"), ("auto", "redis"), ("auto", "redis, apply all then drain"),
             ("auto", "redis, a client looking up meanwhile"), ("auto", TTL_CASE), ("kvcm", "memory"),
             ("kvcm", "redis"), ("kvcm", TTL_CASE)]
    runs = {c: [] for c in cases}
    las = []
    for _ in range(repeats):
        las.append(loadavg())
        for mode, backend in cases:
            batches = workloads[mode]
            if backend == "memory":
                ns, cpu, counters, entries = apply_memory(batches, INGEST_PODS, mode)
                assert counters["blocks_stored"] == blocks == entries, counters
                runs[(mode, backend)].append({"ns": ns, "cpu_ns": cpu})
            else:
                busy = backend.endswith("meanwhile")
                ttl = INGEST_TTL if backend == TTL_CASE else 0
                r = await apply_shared(server, batches, INGEST_PODS, mode, interleave=not backend.endswith("drain"),
                                       prefill=prefill if busy else (), during=lookups if busy else None, ttl=ttl)
                prefilled = sum(lookup_depth(i) for i in range(LOOKUP_PODS)) if busy else 0
                assert r["sink"]["blocks_stored"] == blocks + prefilled, r["sink"]
                assert r["counters"]["entries_added"] == blocks and r["counters"]["records_written"] == nbatches, r
                assert r["evalsha"][0] == nbatches + len(r.get("during", ())), r["evalsha"]
                assert server.sync.dbsize() >= blocks
                sample = next(server.sync.scan_iter(match=NS + "@*", count=1000))  # a block key
                assert (server.sync.ttl(sample) > 0) == bool(ttl), (sample, server.sync.ttl(sample))
                runs[(mode, backend)].append(r)
    rows = []
    for mode, backend in cases:
        rs = runs[(mode, backend)]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        ns = med("ns")
        label = "%s mode (%s), %s" % (mode, "parity" if mode == "auto" else "decoupled: rehash, engine map", backend)
        note = "%.0f batches/s; %.0f ns/block wall; kvcm CPU %.0f ns/block" % (
            nbatches / ns * 1e9, ns / blocks, med("cpu_ns") / blocks)
        if backend != "memory":
            note += ("; redis-server CPU %.0f ns/block; EVALSHA %.0f ns/block server side; %.1f records per "
                     "round trip; %.2f SCRIPT EXISTS per round trip" % (
                         med("server_cpu_ns") / blocks, statistics.median(r["evalsha"][1] for r in rs) * 1e3 / blocks,
                         nbatches / statistics.median(len(r["packing"]) for r in rs),
                         statistics.median(r["script_exists"] / len(r["packing"]) for r in rs)))
        rows.append(row(label, blocks / ns * 1e9, "blocks/s", note=note))
        if backend != "memory":
            packs = [x for r in rs for x in r["packing"]]
            rows.append(row("  redis-py pack_commands per round trip (synchronous, on the loop)",
                            statistics.median(packs) / 1e6, "ms",
                            note="max %.1f ms; %.0f ns per block; %.0f%% of the run's wall time" % (
                                max(packs) / 1e6, sum(packs) / len(rs) / blocks,
                                statistics.median(sum(r["packing"]) / r["ns"] for r in rs) * 100)))
        if backend == "redis, apply all then drain":
            rows.append(row("  of which the writer's drain alone (after all batches applied)",
                            blocks / med("drain_ns") * 1e9, "blocks/s",
                            note="apply %.0f ms, drain %.0f ms; longest event-loop stall %.1f ms, p99 of loop turns "
                                 "%.2f ms" % (med("apply_ns") / 1e6, med("drain_ns") / 1e6,
                                              med("max_stall_ns") / 1e6, med("stall_p99_ns") / 1e6)))
        if backend == "redis":
            mem = statistics.median(r["ns"] for r in runs[(mode, "memory")])
            rows.append(row("  redis / memory wall time (%s)" % mode, ns / mem, "x"))
        if backend == TTL_CASE:
            plain = statistics.median(r["ns"] for r in runs[(mode, "redis")])
            rows.append(row("  with TTL / without (%s)" % mode, ns / plain, "x"))
        if backend.endswith("meanwhile"):
            p50, p99, mean = percentiles([x for r in rs for x in r["during"]])
            rows.append(row("  the lookups meanwhile: RedisStore.lookup, 256 keys", p50 / 1e3, "µs", p99=p99 / 1e3,
                            note="%d lookups over %d runs; max %.1f ms; idle: see lookup" % (
                                sum(len(r["during"]) for r in rs), len(rs),
                                max(x for r in rs for x in r["during"]) / 1e6)))
    report("ingest", rows, blocks=blocks, batches=nbatches, pods=INGEST_PODS, events_per_batch=EVENTS_PER_BATCH,
           chunk_records=CHUNK_RECORDS, chunk_keys=CHUNK_KEYS, loadavg=las)


# ---- 3. memory ------------------------------------------------------------------------------

MEM_BLOCKS = 200_000
MEM_EXTRA_PODS = 3


async def bench_memory(server, repeats):
    """One run: used_memory is deterministic for a seeded workload, unlike time."""
    events = MEM_BLOCKS // BLOCK
    per_batch = 10                    # 200,000 blocks = 1,250 batches of 10 events
    # one pod's batches; the other pods announce the very same blocks (same hashes)
    batches = chain_batches(31, 1, events // per_batch, False, per_batch, hashes_seed=77)
    assert len(batches) * per_batch * BLOCK == MEM_BLOCKS
    rows = []
    for mode in ("auto", "kvcm"):
        if mode == "kvcm":
            batches = chain_batches(31, 1, events // per_batch, True, per_batch, hashes_seed=77)
        server.flush()
        for script in (redis_store._APPLY, redis_store._LOOKUP):
            server.sync.script_load(script)
        before = server.used_memory()
        await apply_shared(server, batches, 1, mode, flush=False)  # closes its connections after
        one = server.used_memory()
        keys = server.sync.dbsize()
        sample = next(server.sync.scan_iter(match=NS + "@*", count=1000))  # a block key
        encoding, usage = server.sync.object("encoding", sample), server.sync.memory_usage(sample, samples=0)
        label = "parity (auto)" if mode == "auto" else "decoupled (kvcm): + an engine: key per block"
        rows.append(row("%s: 1 pod x %d blocks, per entry" % (label, MEM_BLOCKS), (one - before) / MEM_BLOCKS, "B",
                        note="used_memory %.1f -> %.1f MiB; %d keys; a block key: %s, MEMORY USAGE %d B" % (
                            before / 2**20, one / 2**20, keys, encoding, usage)))
        if mode != "auto":
            break
        for p in range(MEM_EXTRA_PODS):
            await apply_shared(server, batches, 1, mode, pod_offset=1 + p, flush=False)
        four = server.used_memory()
        entries = (1 + MEM_EXTRA_PODS) * MEM_BLOCKS
        usage4 = server.sync.memory_usage(sample, samples=0)
        rows.append(row("%s: %d pods x the same %d blocks, per entry" % (label, 1 + MEM_EXTRA_PODS, MEM_BLOCKS),
                        (four - before) / entries, "B",
                        note="used_memory -> %.1f MiB; a block key: %s, MEMORY USAGE %d B" % (
                            four / 2**20, server.sync.object("encoding", sample), usage4)))
        rows.append(row("  each further pod on a block already held", (four - one) / (MEM_EXTRA_PODS * MEM_BLOCKS),
                        "B"))
    report("memory", rows, blocks=MEM_BLOCKS, redis_hash_max_listpack_entries=
           server.sync.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"])


# ---- 4. serve: `kvcm serve` processes, ZMQ in and HTTP out ----------------------------------
# The servers, engines, HTTP load and publish -> visible probes are kvcm bench's
# (kvcm/bench/): what this part adds is the shared store, two replicas, and the store's
# progress read from /metrics.

SERVE_ENGINES = 16
SERVE_BATCHES = 400   # per engine: 16 engines x 400 batches x 128 blocks = 819,200 blocks
SERVE_PROBES = 200
SERVE_WINDOW_S = 2.0
SERVE_BACKLOG = 1_000_000   # --redis-backlog: a pass queues up to 51,200 events; no drop here
SERVE_PACED_RATE = 100_000  # blocks/s: an ingest well below what the store takes
SERVE_BATCH_BLOCKS = EVENTS_PER_BATCH * BLOCK


class Replica:
    """`kvcm serve` (in memory, or sharing redis_server) started by kvcm bench's targets, and a
    keep-alive connection to it."""

    def __init__(self, redis_server=None):
        args = [] if redis_server is None else ["--index", redis_server.url, "--redis-backlog", str(SERVE_BACKLOG)]
        spec = bench_targets.TargetSpec("kvcm", bench_targets.NativeApi(NS, BLOCK),
                                        start=lambda s: bench_targets.start_kvcm(s, args))
        self.target = spec.start()
        self.conn = load.Connection(self.target.address)

    def as_model(self, model):
        """The same server, its engines publishing `model` (streams of their own: no restart)."""
        t = self.target
        return bench_targets.Target(t.name, bench_targets.NativeApi(model, BLOCK), t.address, t.zmq, t.process)

    def metrics(self):
        """{name: value} of the unlabelled samples of /metrics."""
        status, body = self.conn.call(load.request_bytes("GET", "/metrics"))
        assert status == 200, status
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.target.process.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.conn.close()
        self.target.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(what, check, timeout=DEADLINE, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def store_progress(replica):
    """(records the store has answered, events still queued, events dropped) per /metrics."""
    m = replica.metrics()
    answered = sum(m["kvcm_redis_records_%s_total" % k] for k in ("written", "duplicate", "refused"))
    return answered, m["kvcm_redis_backlog_events"], m["kvcm_redis_backlog_dropped_events_total"]


def store_drained(replica):
    wait_until("the store to drain", lambda: store_progress(replica)[1] == 0)


def engine_workload():
    """kvcm bench's workload, for its engines' connect handshake and probes only."""
    return Workload(Spec(engines=SERVE_ENGINES, blocks=SERVE_ENGINES, system_tokens=0))


def random_streams(seed):
    """Per engine, SERVE_BATCHES batches of EVENTS_PER_BATCH BlockStored events of 16 fresh
    random hashes, parents set (parity mode stores them as they are)."""
    streams = [BenchStream(i) for i in range(SERVE_ENGINES)]
    for p, _, payload in chain_batches(seed, SERVE_ENGINES, SERVE_BATCHES, False):
        streams[p].payloads.append(payload)
        streams[p].blocks += SERVE_BATCH_BLOCKS
    return streams


def connected_engines(replica, model):
    engines = Engines(engine_workload(), replica.as_model(model))
    try:
        engines.connect(replica.conn)
    except BaseException:
        engines.close()
        raise
    return engines


def query_chain(replica, model, tokens, pods_blocks):
    """Engine i of `model` stores the first pods_blocks[i] blocks of tokens (vLLM's hashes)."""
    hasher = _core.BlockHasher("sha256", None, BLOCK)
    keys = list(hasher.keys(tokens))
    streams = []
    for i, n in enumerate(pods_blocks):
        s = BenchStream(i)
        events = [block_stored(keys[b:min(b + BLOCK, n)], keys[b - 1] if b else None,
                               tokens[b * BLOCK:min(b + BLOCK, n) * BLOCK], BLOCK) for b in range(0, n, BLOCK)]
        s.payloads = [encode_batch(events[j:j + EVENTS_PER_BATCH], ts=1.7e9) for j in range(0, len(events), EVENTS_PER_BATCH)]
        s.blocks = n
        streams.append(s)
    engines = connected_engines(replica, model)
    try:
        before = replica.metrics()["kvcm_ingest_batches_total"]
        engines.send(streams)
        # closing drops what the engines' ZMQ context has not sent yet: close once all arrived
        wait_until("the query chain's batches", lambda: replica.metrics()["kvcm_ingest_batches_total"]
                   >= before + sum(len(s.payloads) for s in streams))
    finally:
        engines.close()


def serve_ingest(replicas, seed, shared, model):
    """SERVE_ENGINES engines of their own per replica (publishing `model`, a stream no server
    has seen), started together, each sending its batches as fast as it can. Returns blocks/s
    over all replicas from the first send until every replica has applied every batch
    (/metrics) and, shared, the store has answered every record with nothing left queued;
    then checks that every block was counted, no gap was seen and nothing was dropped."""
    expected = SERVE_ENGINES * SERVE_BATCHES
    with contextlib.ExitStack() as stack:
        groups = []
        for r, replica in enumerate(replicas):
            engines = connected_engines(replica, "%s-%d" % (model, r))
            stack.callback(engines.close)
            groups.append((engines, random_streams(seed * 10 + r)))
        if shared:   # the connection pokes: written before the clock starts
            for replica in replicas:
                store_drained(replica)
        base = [replica.metrics() for replica in replicas]
        answered0 = [store_progress(replica)[0] if shared else 0 for replica in replicas]
        cpu0 = [replica.cpu_seconds() for replica in replicas]
        t0 = time.perf_counter()
        senders = [Background(engines.send, streams) for engines, streams in groups]

        def finished():
            for replica, m0, a0 in zip(replicas, base, answered0):
                m = replica.metrics()
                if m["kvcm_ingest_applied_batches_total"] - m0["kvcm_ingest_applied_batches_total"] < expected:
                    return False
                if shared:
                    answered, queued, _ = store_progress(replica)
                    if answered - a0 < expected or queued:
                        return False
            return True
        wait_until("every batch applied%s" % (" and written" if shared else ""), finished, 120)
        seconds = time.perf_counter() - t0
        for sender in senders:
            sender.result()
        cpu = sum(replica.cpu_seconds() - c for replica, c in zip(replicas, cpu0))
        for replica, m0 in zip(replicas, base):
            m = replica.metrics()
            assert m["kvcm_ingest_blocks_stored_total"] - m0["kvcm_ingest_blocks_stored_total"] == \
                expected * SERVE_BATCH_BLOCKS, m
            assert m["kvcm_ingest_gaps_total"] == m0["kvcm_ingest_gaps_total"], m
            if shared:
                assert store_progress(replica)[2] == 0, "the backlog dropped events"
                assert m["kvcm_redis_records_written_total"] - m0["kvcm_redis_records_written_total"] == expected, m
    blocks = expected * SERVE_BATCH_BLOCKS * len(replicas)
    return {"blocks_per_s": blocks / seconds, "seconds": seconds, "kvcm_cpu": cpu / seconds}


def probe_latency(publish_to, poll, model):
    """kvcm bench's publish -> visible probes: published to one replica, polled on another."""
    engines = connected_engines(publish_to, model)
    try:
        ctx = types.SimpleNamespace(workload=engines.workload, target=publish_to.as_model(model),
                                    conn=poll.conn, engines=engines)
        got = bench_phases.freshness(ctx, SERVE_PROBES)
    finally:
        engines.close()
    return {"p50": got["latency"].percentile_us(50) * 1e3, "p99": got["latency"].percentile_us(99) * 1e3,
            "rtt_p50": (got["poll_rtt"].percentile_us(50) or 0) * 1e3}


def closed_loop(replica, request, seconds=SERVE_WINDOW_S):
    return percentiles(load.closed_loop(replica.target.address, [request], 10 ** 9, 1, seconds))


def serve_run(redis_server, seed):
    """One round on fresh servers and an empty store: /v1/score on replica B idle and while
    replica A ingests at full speed; the ZMQ ingest of one in-memory server, of one shared
    replica and of two shared replicas at once; publish -> visible on the same replica and
    across replicas."""
    out = {}
    redis_server.flush()
    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(Replica())
        a = stack.enter_context(Replica(redis_server))
        b = stack.enter_context(Replica(redis_server))

        # /v1/score: one 4096-token query chain on both indexes, engine i (0..15) holding 16 (i + 1) blocks
        tokens = run.random_tokens(random.Random(11), 4096)
        layout = [BLOCK * (i + 1) for i in range(SERVE_ENGINES)]
        api = bench_targets.NativeApi(NS, BLOCK)
        request = api.query(Query(tokens, {}))
        want = {i: n * BLOCK for i, n in enumerate(layout)}
        for replica in (memory, a):
            query_chain(replica, NS, tokens, layout)
        store_drained(a)
        for replica in (memory, b):
            wait_until("the query chain", lambda r=replica: api.matched(r.conn.call(request)[1]) == want)
        closed_loop(b, request, 0.3)  # warm-up
        out["score_memory"] = closed_loop(memory, request)
        out["score_idle"] = closed_loop(b, request)
        engines = connected_engines(a, "loaded")
        try:
            store_drained(a)
            answered0 = store_progress(a)[0]
            sender = Background(engines.send, random_streams(seed + 200))
            time.sleep(0.2)   # the engines' first batches reach the store
            out["score_loaded"] = closed_loop(b, request)
            out["loaded_records"] = store_progress(a)[0] - answered0
            sender.result()
        finally:
            engines.close()
        store_drained(a)
        engines = connected_engines(a, "paced")
        try:
            store_drained(a)
            sender = Background(engines.send_paced, random_streams(seed + 300), SERVE_PACED_RATE)
            time.sleep(0.3)   # ramp up
            answered0, t0 = store_progress(a)[0], time.perf_counter()
            out["score_paced"] = closed_loop(b, request)
            out["paced_blocks_per_s"] = (store_progress(a)[0] - answered0) * SERVE_BATCH_BLOCKS / (time.perf_counter() - t0)
            sender.result()
        finally:
            engines.close()
        assert api.matched(b.conn.call(request)[1]) == want

        out["memory"] = serve_ingest([memory], seed, False, "ingest")
        rcpu0 = redis_server.cpu_ns()
        out["shared"] = serve_ingest([a], seed, True, "ingest")
        out["shared"]["redis_cpu"] = (redis_server.cpu_ns() - rcpu0) / 1e9 / out["shared"]["seconds"]
        rcpu0 = redis_server.cpu_ns()
        out["two"] = serve_ingest([a, b], seed + 100, True, "ingest-two")
        out["two"]["redis_cpu"] = (redis_server.cpu_ns() - rcpu0) / 1e9 / out["two"]["seconds"]
        out["probe_memory"] = probe_latency(memory, memory, "probe")
        out["probe_same"] = probe_latency(a, a, "probe")
        out["probe_across"] = probe_latency(a, b, "probe-across")
    return out


async def bench_serve(server, repeats):
    """`kvcm serve` subprocesses (kvcm bench's: `kvcm serve` on 127.0.0.1, free ports), the
    engines' events from kvcm bench's publishers over ZMQ, HTTP from its keep-alive client in
    this process: the whole path, not the pieces of the other benchmarks. Blocking calls on
    the loop: nothing else runs on it meanwhile."""
    runs = []
    for r in range(repeats):
        la = loadavg()
        res = serve_run(server, r + 1)
        res["loadavg"] = la
        runs.append(res)
        if not JSON:
            print("  run %d: memory %.2f M blocks/s, shared %.0f k/s, two replicas %.0f k/s; load %s" % (
                r + 1, res["memory"]["blocks_per_s"] / 1e6, res["shared"]["blocks_per_s"] / 1e3,
                res["two"]["blocks_per_s"] / 1e3, la), flush=True)
    med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
    per_replica = SERVE_ENGINES * SERVE_BATCHES * SERVE_BATCH_BLOCKS
    rows = []
    for key, label, n in (("memory", "memory index, one server", 1), ("shared", "shared index, one replica", 1),
                          ("two", "shared index, two replicas at once (their own engines each)", 2)):
        note = "%d blocks; runs %s k/s; kvcm CPU %.0f%% of a core" % (
            per_replica * n, ", ".join("%.0f" % (x[key]["blocks_per_s"] / 1e3) for x in runs),
            med(lambda x: x[key]["kvcm_cpu"]) * 100)
        if key != "memory":
            note += "; redis-server CPU %.0f%%" % (med(lambda x: x[key]["redis_cpu"]) * 100)
        rows.append(row("ZMQ -> applied%s, 16 engines per server, %s" % (
            "" if key == "memory" else " and written", label), med(lambda x: x[key]["blocks_per_s"]), "blocks/s",
            note=note))
    for key, label in (("probe_memory", "memory index"), ("probe_same", "shared index, the same replica"),
                       ("probe_across", "shared index, published to replica A, scored on replica B")):
        rows.append(row("publish -> visible, %s" % label, med(lambda x: x[key]["p50"]) / 1e3, "µs",
                        p99=med(lambda x: x[key]["p99"]) / 1e3,
                        note="%d probes/run; /v1/score poll %.0f µs" % (
                            SERVE_PROBES, med(lambda x: x[key]["rtt_p50"] or 0) / 1e3)))
    for key, label in (("score_memory", "memory index"), ("score_idle", "shared index, replica B, idle"),
                       ("score_paced", "shared index, replica B, while replica A ingests %d k blocks/s" % (
                           SERVE_PACED_RATE // 1000)),
                       ("score_loaded", "shared index, replica B, while replica A ingests at full speed")):
        note = "%.1f s closed loop" % SERVE_WINDOW_S
        if key == "score_loaded":
            note += "; A's store answered %.0f records in the window" % med(lambda x: x["loaded_records"])
        if key == "score_paced":
            note += "; A's store wrote %.0f k blocks/s meanwhile" % (med(lambda x: x["paced_blocks_per_s"]) / 1e3)
        rows.append(row("/v1/score, 4096 tokens (256 keys), 16 pods: %s" % label, med(lambda x: x[key][0]) / 1e3,
                        "µs", p99=med(lambda x: x[key][1]) / 1e3, note=note))
    report("serve", rows, batches_per_engine=SERVE_BATCHES, redis_backlog=SERVE_BACKLOG,
           loadavg=[x["loadavg"] for x in runs])


# ---- main -----------------------------------------------------------------------------------


def source_version():
    """HEAD, with "+dirty (files)" when anything under kvcm/ has local changes."""
    def git(*argv):
        return subprocess.run(("git",) + argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    try:
        head, dirty = git("rev-parse", "--short", "HEAD").strip(), git("status", "--porcelain", "--", "kvcm").rstrip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" +dirty (%s)" % ", ".join(line[3:] for line in dirty.splitlines()) if dirty else "")


BENCHMARKS = {"lookup": bench_lookup, "ingest": bench_ingest, "memory": bench_memory, "serve": bench_serve}


async def run_all(names, repeats):
    server = RedisServer()
    try:
        header = {"source": source_version(), "python": platform.python_version(), "redis_server": server.version,
                  "redis_py": redis.__version__, "uvloop": uvloop.__version__, "hiredis": _hiredis(),
                  "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": loadavg(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        if not JSON:
            print(json.dumps(header))
        t0 = time.monotonic()
        for name in names:
            await BENCHMARKS[name](server, repeats)
            gc.collect()
        header["seconds"] = round(time.monotonic() - t0, 1)
        return header
    finally:
        server.close()


def _hiredis():
    try:
        import hiredis
        return hiredis.__version__
    except ImportError:
        return None


def main():
    global JSON
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (%s); default: all" % ", ".join(BENCHMARKS))
    parser.add_argument("--repeats", type=int, default=5, help="runs (rounds) per measurement (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args()
    JSON = args.json
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error("unknown benchmark(s): %s (choose from %s)" % (", ".join(sorted(unknown)), ", ".join(BENCHMARKS)))
    gc.disable()  # as run.py: no collector pauses inside timed loops
    header = uvloop.run(run_all(args.names or list(BENCHMARKS), args.repeats))
    if JSON:
        print(json.dumps({**header, "benchmarks": RESULTS}))
    else:
        print("\n(%.1f s)" % header["seconds"])


if __name__ == "__main__":
    main()
