"""Snapshots of the in-memory index: write time and size, restore time, and what a snapshot
being written does to scoring (DESIGN.md "Durable state"; results in benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/snapshot.py --entries 1000000 10000000

For each size: an Indexer filled with `entries` (block, pod) entries (sequences of 32 blocks
on one or two of 8 pods), then
- write: StateKeeper.write() to a temporary --state-dir (dump in slices, fsync, rename);
- restore: a fresh Indexer's StateKeeper.restore() of that file (read, verify, load);
- scoring: an open-loop stream of score_tokens() calls on the same event loop (one every
  `--period` seconds, 1,000 prompts of 32 blocks that the index holds), latency measured from
  each call's due time, so that a stalled loop counts: p50/p99 while idle and while
  snapshots are written back to back, in 5 alternating windows of 2 s each (the write time
  is the median of those writes).
"""

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvcm import snapshot  # noqa: E402
from kvcm.config import load_config  # noqa: E402
from kvcm.state import SLICE_ITEMS  # noqa: E402
from kvcm.indexer import Indexer  # noqa: E402

MODEL = "bench-model"
BLOCKS = 32
PODS = ["pod-%d" % i for i in range(8)]
ROUNDS, WINDOW = 5, 2.0   # alternating idle / writing windows of at least WINDOW seconds


def filled(state_dir, entries, rng):
    indexer = Indexer(load_config(["--state-dir", state_dir, "--zmq-bind", "tcp://127.0.0.1:0",
                                   "--max-blocks", str(max(entries, 1000))]))
    prompts = []
    for i in range(1000):   # prompts the scorer asks about: their real keys
        tokens = [(i * 7919 + t * 104729) % 150_000 for t in range(BLOCKS * 16)]
        keys = indexer.keys(MODEL, tokens)
        indexer.index.store(MODEL, rng.choice(PODS), "gpu", keys)
        prompts.append(tokens)
    stored = indexer.index.stats()["entries"]
    while stored < entries:
        keys = [rng.getrandbits(64) for _ in range(BLOCKS)]
        for pod in rng.sample(PODS, rng.choice((1, 1, 2))):
            stored += indexer.index.store(MODEL, pod, rng.choice(("gpu", "gpu", "cpu")), keys)
    return indexer, prompts


async def scoring(indexer, prompts, period, stop):
    latencies, due, i = [], time.perf_counter(), 0
    while not stop.is_set():
        now = time.perf_counter()
        if now < due:
            await asyncio.sleep(due - now)
        indexer.score_tokens(MODEL, prompts[i % len(prompts)])
        latencies.append(time.perf_counter() - due)
        due += period
        i += 1
    return latencies


def slice_times(indexer):
    """How long the event loop is held per slice of a dump (the dump and its frame, as
    StateKeeper.stream does them): the longest a scoring request can wait behind a snapshot,
    scheduler preemption aside."""
    dump, writer, times = indexer.index.dump(), snapshot.Writer(), []
    while True:
        started = time.perf_counter()
        chunk = dump.next(SLICE_ITEMS)
        if chunk is None:
            return times
        writer.frame(*chunk)
        times.append(time.perf_counter() - started)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(entries, period, rng):
    with tempfile.TemporaryDirectory(prefix="kvcm-snapbench-") as state_dir:
        indexer, prompts = filled(state_dir, entries, rng)
        stats = indexer.index.stats()
        slices = slice_times(indexer)
        # scoring alone, then scoring while snapshots are written back to back, in
        # alternating windows so that the machine's other load falls on both alike
        idle, during, writes = [], [], []
        for _ in range(ROUNDS):
            stop = asyncio.Event()
            task = asyncio.ensure_future(scoring(indexer, prompts, period, stop))
            await asyncio.sleep(WINDOW)
            stop.set()
            idle += await task
            stop = asyncio.Event()
            task = asyncio.ensure_future(scoring(indexer, prompts, period, stop))
            spent = 0.0
            while spent < WINDOW:
                started = time.perf_counter()
                assert await indexer.state.write()
                writes.append(time.perf_counter() - started)
                spent += writes[-1]
            stop.set()
            during += await task
        write_s = statistics.median(writes)
        size = os.path.getsize(os.path.join(state_dir, "index.snapshot"))
        del indexer
        fresh = Indexer(load_config(["--state-dir", state_dir, "--zmq-bind", "tcp://127.0.0.1:0",
                                     "--max-blocks", str(max(entries, 1000))]))
        started = time.perf_counter()
        assert await fresh.state.restore()
        restore_s = time.perf_counter() - started
        assert fresh.index.stats()["entries"] == stats["entries"]
        return {"entries": stats["entries"], "blocks": stats["blocks"], "write_s": write_s, "size": size,
                "restore_s": restore_s, "idle_p50": pct(idle, 0.5), "idle_p99": pct(idle, 0.99),
                "during_p50": pct(during, 0.5), "during_p99": pct(during, 0.99), "calls": len(during),
                "slice_p99": pct(slices, 0.99), "slice_max": max(slices), "slices": len(slices)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--period", type=float, default=0.001, help="seconds between scoring calls")
    args = parser.parse_args()
    rng = random.Random(14)
    print("| entries | blocks | write | size | B/entry | restore | slice p99 / max (slices) | "
          "scoring p50 / p99 idle | p50 / p99 while writing (calls) | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entries in args.entries:
        r = asyncio.run(measure(entries, args.period, rng))
        print("| %s | %s | %.2f s | %.1f MB | %.1f | %.2f s | %.0f / %.0f µs (%d) | %.0f / %.0f µs | "
              "%.0f / %.0f µs (%d) | %.2f × |" % (
            format(r["entries"], ","), format(r["blocks"], ","), r["write_s"], r["size"] / 1e6,
            r["size"] / r["entries"], r["restore_s"], r["slice_p99"] * 1e6, r["slice_max"] * 1e6, r["slices"],
            r["idle_p50"] * 1e6, r["idle_p99"] * 1e6,
            r["during_p50"] * 1e6, r["during_p99"] * 1e6, r["calls"],
            r["during_p99"] / r["idle_p99"]))
    print("\n%d CPUs, load average %.2f %.2f %.2f at the end" % ((os.cpu_count(),) + os.getloadavg()))


if __name__ == "__main__":
    main()
