"""The ingest's native lane (kvcm/_ingest_lane.pxi): the common batches received, checked and
applied in C, everything else handed back to Ingest's Python logic. The lane and the Python
path must leave the same index, stream table and counters on the same messages, gaps,
duplicates, restarts and malformed ones mixed in; and `kvcm serve` must stop cleanly while
the lane is busy.

Real parts: ZMQ publishers on 127.0.0.1, the core's index and sink, `python -m kvcm serve`
as a subprocess. Nothing is timed."""

import asyncio
import os
import random
import signal
import threading

import pytest

from aio import on_uvloop, poll_until, until
from kvcm._core import BlockHasher, EventSink, Index
from kvcm.ingest import Ingest
from kvcm.ingest_thread import IngestThread
from kvcm.publisher import Publisher, all_blocks_cleared, block_removed, block_stored, encode_batch
from serving import Serve

MODEL = "Qwen/Qwen3-0.6B"
BLOCK = 16
LOCAL = "tcp://127.0.0.1:*"
HASHER = BlockHasher("sha256", None, BLOCK)
SINK = {"block_size": BLOCK, "hash_algo": "sha256", "hash_seed": None, "hash_mode": "auto"}
PROBE = b"kv@probe@" + MODEL.encode()


def topic(pod, model=MODEL):
    return ("kv@%s@%s" % (pod, model)).encode()


def chains(rng, n=6, blocks=8):
    out = []
    for _ in range(n):
        tokens = [rng.randrange(150_000) for _ in range(blocks * BLOCK)]
        out.append((tokens, list(HASHER.keys(tokens))))
    return out


def events_of(rng, prompts, form):
    """A batch's events: mostly common ones (chained stores, removals, cache resets), now and
    then one the general path takes (a medium that is no tier, a LoRA store)."""
    tokens, keys = rng.choice(prompts)
    start = rng.randrange(len(keys))
    end = min(len(keys), start + rng.randint(1, 3))
    events = [block_stored(keys[start:end], keys[start - 1] if start else None,
                           tokens[start * BLOCK:end * BLOCK], BLOCK, form=form)]
    if rng.random() < 0.4:
        events.append(block_removed([rng.choice(rng.choice(prompts)[1])], form=form))
    roll = rng.random()
    if roll < 0.03:
        events.append(all_blocks_cleared(form=form))
    elif roll < 0.06:
        events.append(block_removed(keys[:1], medium="NVME", form=form))   # not a tier: dropped
    elif roll < 0.08:
        events.insert(0, block_stored(keys[:1], None, tokens[:BLOCK], BLOCK, lora_id=1, lora_name="sql", form=form))
    return events


def messages(seed, n=600):
    """[(topic, seq, payload)] for a few streams (pods, dp ranks), interleaved: in
    order mostly, with lost batches (gaps), duplicates, restarts (seq back to 0), messages
    that are not batches, and batches larger than the lane takes (64 KiB)."""
    rng = random.Random(seed)
    prompts = chains(rng)
    streams = [(topic("pod-%d" % p), rank) for p in range(3) for rank in (0, 1)]
    seqs = {s: rng.choice([0, 5, 1 << 40]) for s in streams}
    out = []
    for _ in range(n):
        s = rng.choice(streams)
        tp, rank = s
        form = rng.choice(["map", "array"])
        roll = rng.random()
        if roll < 0.03:
            seqs[s] += rng.randint(1, 4)                       # lost on the way
        elif roll < 0.06 and seqs[s] > 0:
            out.append((tp, seqs[s] - rng.randint(1, min(3, seqs[s])), encode_batch(
                events_of(rng, prompts, form), dp_rank=rank)))   # a duplicate
            continue
        elif roll < 0.07:
            seqs[s] = 0                                        # the engine restarted
        elif roll < 0.09:
            out.append((tp, seqs[s], b"\x93\xc1"))      # not a batch: dropped, seq not taken
            continue
        if rng.random() < 0.01:
            events = [ev for _ in range(700) for ev in events_of(rng, prompts, form)]   # > 64 KiB
        else:
            events = events_of(rng, prompts, form)
        out.append((tp, seqs[s], encode_batch(events, dp_rank=rank)))
        seqs[s] += 1
    return out


def stream_of(ingest):
    (s,) = ingest.streams()
    return s


def _delta(after, before):
    return {k: _delta(v, before.get(k, {})) if isinstance(v, dict) else v - before.get(k, 0)
            for k, v in after.items()}


def dump(index):
    d = index.dump()
    chunks = []
    while (chunk := d.next()) is not None:
        chunks.append(chunk)
    return chunks, d.tables()


async def run(ingest_class, native, plan):
    """Publishes the plan into a fresh ingest; what it leaves, as comparable values."""
    index = Index(max_blocks=200_000)
    sink = EventSink(index, **SINK)
    # batches larger than 64 KiB go to the Python path, and are applied whole there: sliced,
    # they would interleave with other streams' batches as the loop's turns fall
    ingest = ingest_class(sink, binds=(LOCAL,), native=native, slice_bytes=1 << 20)
    await ingest.start()
    pub = Publisher(ingest.bound[0])
    try:
        def probed():
            pub.publish_raw(encode_batch([], dp_rank=999), topic=PROBE, seq=0)
            return any(s["dp_rank"] == 999 for s in ingest.streams())
        await until(probed, "a probe")
        # one connection keeps order: once this one is in, no earlier probe is on its way
        pub.publish_raw(encode_batch([], dp_rank=998), topic=PROBE, seq=0)
        await until(lambda: any(s["dp_rank"] == 998 for s in ingest.streams()), "the probes' end")
        before, sink_before = ingest.counters, sink.counters
        for tp, seq, payload in plan:
            pub.publish_raw(payload, topic=tp, seq=seq)
        pub.publish_raw(encode_batch([], dp_rank=997), topic=PROBE, seq=0)
        await until(lambda: any(s["dp_rank"] == 997 for s in ingest.streams()), "every message", deadline=30)
        counters = _delta(ingest.counters, before)
        sink_counters = _delta(sink.counters, sink_before)
        streams = sorted(({k: v for k, v in s.items() if k != "last_event_age_s"}
                          for s in ingest.streams() if s["dp_rank"] < 997), key=lambda s: (s["pod"], s["dp_rank"]))
        positions = [p for p in ingest.positions() if p["dp_rank"] < 997]
        lane = ingest._ingest._lane if isinstance(ingest, IngestThread) else ingest._lane
        taken = lane.batches if lane is not None else 0
        return (dump(index), index.stats(), counters, sink_counters, streams, positions), taken
    finally:
        pub.close()
        await ingest.stop()


@on_uvloop
@pytest.mark.parametrize("ingest_class", [Ingest, IngestThread], ids=["loop", "thread"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_the_lane_leaves_what_the_python_path_leaves(ingest_class, seed):
    plan = messages(seed)
    lane, taken = await run(ingest_class, True, plan)
    python, none = await run(ingest_class, False, plan)
    assert none == 0 and taken > len(plan) // 2     # the lane took most batches, the Python path none
    assert lane[4] == python[4]                     # streams: seqs, gaps, duplicates, restarts, batches
    assert lane[2] == python[2]                     # the ingest's counters
    assert lane[3] == python[3]                     # the sink's
    assert lane[1] == python[1] and lane[0] == python[0]   # the index, entry by entry
    assert lane[5] == python[5]                     # positions and digests for a snapshot


@on_uvloop
async def test_the_lane_applies_only_the_next_seq():
    """A batch that skips seqs is a gap and one whose seq was seen is a duplicate, also when
    the stream is the lane's: neither is applied as the next batch."""
    rng = random.Random(3)
    (tokens, keys), (other_tokens, other_keys) = chains(rng, 2)
    index = Index(max_blocks=10_000)
    ingest = Ingest(EventSink(index, **SINK), binds=(LOCAL,))
    await ingest.start()
    pub = Publisher(ingest.bound[0], topic=topic("pod-a").decode())
    try:
        def probed():
            pub.publish_raw(encode_batch([]), seq=0)
            return ingest.counters["batches"] > 0
        await until(probed, "the first batch")
        for i in range(1, 4):   # in order: the lane's
            pub.publish([block_stored(keys[i - 1:i], keys[i - 2] if i > 1 else None,
                                      tokens[(i - 1) * BLOCK:i * BLOCK], BLOCK)], seq=i)
        await until(lambda: stream_of(ingest)["last_seq"] == 3, "seqs 1-3")
        assert ingest._lane.batches >= 2     # seq 1 made the model known: the lane took 2 and 3
        before = ingest.counters
        # seq 3 again: a duplicate, not applied
        pub.publish([block_stored(other_keys[:1], None, other_tokens[:BLOCK], BLOCK)], seq=3)
        # seq 6: seqs 4 and 5 lost
        pub.publish([block_stored(keys[3:4], keys[2], tokens[3 * BLOCK:4 * BLOCK], BLOCK)], seq=6)
        await until(lambda: ingest.counters["messages"] == before["messages"] + 2, "both")
        counters = _delta(ingest.counters, before)
        assert (counters["duplicates"], counters["gaps"], counters["missed_batches"], counters["batches"]) == (1, 1, 2, 1)
        assert index.lookup_prefix(MODEL, other_keys[:1]) == {}
        assert index.lookup_prefix(MODEL, keys[:4])["pod-a"][0] == 4
        s = stream_of(ingest)
        assert (s["last_seq"], s["state"]) == (6, "degraded")
    finally:
        pub.close()
        await ingest.stop()


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


@on_uvloop
async def test_the_lane_frees_each_message_it_applies():
    """60,000 batches of 4 KiB through the lane (240 MiB received) leave RSS where it was:
    each message's libzmq parts are closed once it is applied (they were not, once)."""
    rng = random.Random(5)
    ((tokens, keys),) = chains(rng, 1, 4)
    ingest = Ingest(EventSink(Index(max_blocks=1000), **SINK), binds=(LOCAL,))
    await ingest.start()
    pub = Publisher(ingest.bound[0], topic=topic("pod-a").decode())
    try:
        first = encode_batch([block_stored(keys, None, tokens, BLOCK)])

        def seen():
            pub.publish_raw(first)
            return ingest.streams() != []
        await until(seen, "the stream")
        payload = encode_batch([block_removed(keys + list(range(1 << 40, (1 << 40) + 450)))])
        assert len(payload) > 4000
        before, start = _rss_mib(), ingest.counters["messages"]
        for i in range(60_000):
            pub.publish_raw(payload)
            if i % 200 == 0:
                await asyncio.sleep(0.001)   # the PUB's queue stays short
        await until(lambda: ingest.counters["messages"] - start >= 60_000, "every batch", deadline=60)
        assert ingest._lane.batches >= 59_000
        assert _rss_mib() - before < 64
    finally:
        pub.close()
        await ingest.stop()


def test_sigterm_while_the_lane_applies_stops_cleanly():
    """kvcm serve is told to stop while publishers flood its lane with small batches: it
    exits 0 after the lane's turn in progress."""
    server = Serve.standard()
    stop = threading.Event()
    try:
        server.wait_ready()
        client = server.client
        pub = Publisher(server.zmq_endpoint, topic="kv@pod-a@%s" % MODEL)
        rng = random.Random(4)
        prompts = chains(rng, 4)

        def flood():
            while not stop.is_set():
                pub.publish(events_of(rng, prompts, "map")[:1])
        try:
            client.connected(pub)
            feeder = threading.Thread(target=flood, daemon=True)
            feeder.start()

            def busy():
                s = client.stream("pod-a", MODEL)
                return s is not None and s["batches"] > 2000
            poll_until(busy, "the lane to apply batches")
            assert server.stop(signal.SIGTERM) == 0, server.stderr()
        finally:
            stop.set()
            feeder.join()
            pub.close()
        err = server.stderr()
        assert "stopping" in err and "Traceback" not in err, err
    finally:
        server.close()
