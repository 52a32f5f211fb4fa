#!/usr/bin/env python3
"""Lookups on the main thread while the ingest thread applies a flood of batches, in process.

    python benchmarks/ingest_lookups.py [--python-path] [--publisher-nice 19] [--switch-interval S]

An IngestThread (the in-memory index, auto hash mode) is fed by a publisher process that
sends pre-encoded batches of 4 BlockStored events of 16 blocks (16 pods' worth of chains) as
fast as it can, at the given nice value. The main thread times `Index.lookup_prefix` of a
64-key prompt plus a little Python work (what a request adds), every 0.5 ms: 2,000 idle,
then 4,000 while the publisher runs. Prints p50/p99 of both, what was sent and how many
batches the native lane applied (0 with --python-path: the Python path alone). Telling the
GIL, the index lock and CPU scheduling apart: see benchmarks/RESULTS.md ("native ingest
lane").
"""
import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvcm._core import BlockHasher, EventSink, Index  # noqa: E402
from kvcm.ingest_thread import IngestThread  # noqa: E402
from kvcm.publisher import Publisher, block_stored, encode_batch  # noqa: E402

BLOCK = 16
HASHER = BlockHasher("sha256", None, BLOCK)


def publish(endpoint, stop, nice, done):
    os.nice(nice)
    rng = random.Random(0)
    payloads = []
    for c in range(64):
        tokens = [rng.randrange(150_000) for _ in range(64 * BLOCK)]
        keys = list(HASHER.keys(tokens))
        payloads.append(encode_batch([block_stored(keys[e * 16:(e + 1) * 16], keys[e * 16 - 1] if e else None,
                                                   tokens[e * 256:(e + 1) * 256], BLOCK) for e in range(4)]))
    pubs = [Publisher(endpoint, topic="kv@pod-%d@m" % i) for i in range(4)]
    time.sleep(0.5)   # the connections
    sent, start = 0, time.perf_counter()
    while not stop.is_set():
        pubs[sent % 4].publish_raw(payloads[sent % 64])
        sent += 1
    done.put((sent, time.perf_counter() - start))
    for pub in pubs:
        pub.close()


def percentiles(samples):
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def lookups(index, keys, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        index.lookup_prefix("m", keys)
        sum(range(2000))
        out.append(time.perf_counter() - t)
        time.sleep(0.0005)
    return percentiles(out)


async def main(args):
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    index = Index(max_blocks=2_000_000)
    sink = EventSink(index, block_size=BLOCK, hash_algo="sha256", hash_seed=None, hash_mode="auto")
    ingest = IngestThread(sink, binds=("tcp://127.0.0.1:*",), native=not args.python_path)
    await ingest.start()
    keys = list(HASHER.keys([1] * 1024))
    print("idle     lookup p50 / p99: %.0f / %.0f µs" % lookups(index, keys, 2000))
    stop, done = multiprocessing.Event(), multiprocessing.Queue()
    publisher = multiprocessing.Process(target=publish, args=(ingest.bound[0], stop, args.publisher_nice, done))
    publisher.start()
    await asyncio.sleep(1.5)
    print("flooded  lookup p50 / p99: %.0f / %.0f µs" % lookups(index, keys, 4000))
    stop.set()
    sent, seconds = done.get()
    publisher.join()
    lane = ingest._ingest._lane
    print("sent %d batches, %.2f M blocks/s; applied %d, by the native lane %d"
          % (sent, sent * 64 / seconds / 1e6, ingest.counters["batches"], lane.batches if lane else 0))
    await ingest.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python-path", action="store_true", help="without the native lane")
    parser.add_argument("--publisher-nice", type=int, default=0, help="the publisher's nice value")
    parser.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval, if given")
    asyncio.run(main(parser.parse_args()))
