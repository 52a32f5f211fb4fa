"""The ingest on a thread of its own (kvcm.ingest_thread.IngestThread): lookups on the main
thread while it applies, what an exception inside it does, and `kvcm serve` stopping with a
batch in flight. Its semantics are Ingest's: test_ingest.py runs every case on it too.

Real parts: ZMQ publishers on 127.0.0.1, the core's index and sink, `python -m kvcm serve`
as a subprocess. Nothing is timed."""

import asyncio
import logging
import signal
import threading

import pytest

from aio import on_uvloop, poll_until, until
from kvcm._core import BlockHasher, EventSink, Index, StreamContext
from kvcm.ingest_thread import IngestThread, IngestUnavailable
from kvcm.publisher import Publisher, block_stored, encode_batch
from serving import Serve

MODEL = "Qwen/Qwen3-0.6B"
POD = "pod-a"
BLOCK = 16
LOCAL = "tcp://127.0.0.1:*"
HASHER = BlockHasher("sha256", None, BLOCK)
SINK = {"block_size": BLOCK, "hash_algo": "sha256", "hash_seed": None, "hash_mode": "auto"}


def chain(seed, events, blocks):
    """A chain of `events` BlockStored events of `blocks` blocks each, from block 0: its
    events and its keys."""
    ids = [(seed * 7919 + i * 104729) % 150_000 for i in range(events * blocks * BLOCK)]
    keys = list(HASHER.keys(ids))
    out = []
    for e in range(events):
        first, last = e * blocks, (e + 1) * blocks
        out.append(block_stored(keys[first:last], keys[first - 1] if first else None,
                                ids[first * BLOCK:last * BLOCK], BLOCK))
    return out, keys


async def started(sink, **options):
    ingest = IngestThread(sink, binds=(LOCAL,), **options)
    await ingest.start()
    return ingest


async def connected(pub, ingest):
    """Publishes probe batches (a stream of their own) until the ingest has one."""
    probe = encode_batch([], dp_rank=999)

    def probed():
        pub.publish_raw(probe)
        return any(s["dp_rank"] == 999 for s in ingest.streams())
    await until(probed, "a probe")


@on_uvloop
async def test_lookups_during_applies_see_whole_events_in_order():
    """The visibility guarantee: a lookup sees each event of a batch whole or not at all, and
    a stream's events in order, so a chain stored over several events shows as a prefix of
    itself ending on an event boundary, and never shrinks while it is being stored."""
    events, blocks, chains = 64, 64, 16
    index = Index(max_blocks=1_000_000)
    ingest = await started(EventSink(index, **SINK))
    pub = Publisher(ingest.bound[0], topic="kv@%s@%s" % (POD, MODEL))
    try:
        await connected(pub, ingest)
        batches = [chain(seed, events, blocks) for seed in range(chains)]
        payloads = [encode_batch(evs) for evs, _ in batches]
        # published from another thread while this one looks up, chain after chain (one
        # stream: they apply in order)
        publishing = threading.Thread(target=lambda: [pub.publish_raw(p) for p in payloads])
        publishing.start()
        seen = []
        for seed, (_, keys) in enumerate(batches):
            last = 0
            while last < events * blocks:
                found = index.lookup_prefix(MODEL, keys).get(POD, (0, {}))[0]
                assert found % blocks == 0, (seed, found)       # never part of an event
                assert found >= last, (seed, last, found)       # never going back
                seen.append(found)
                last = found
        publishing.join()
        assert ingest.alive and index.stats()["entries"] == chains * events * blocks
    finally:
        pub.close()
        await ingest.stop()


class FailingSink(EventSink):
    """An EventSink whose decode fails, as a bug would, for batches with a chosen timestamp."""

    fail_at, failure = None, RuntimeError

    def decode(self, payload):
        batch = super().decode(payload)
        if batch.ts == self.fail_at:
            raise self.failure("a bug in decoding")
        return batch


@on_uvloop
async def test_an_exception_in_the_thread_is_counted_and_logged_and_ingest_goes_on(caplog):
    sink = FailingSink(Index(max_blocks=1024), **SINK)
    sink.fail_at = 13.0
    ingest = await started(sink)
    pub = Publisher(ingest.bound[0], topic="kv@%s@%s" % (POD, MODEL))
    try:
        await connected(pub, ingest)
        evs, keys = chain(1, 2, 4)
        with caplog.at_level(logging.ERROR, logger="kvcm.ingest"):
            pub.publish(evs[:1], ts=13.0)
            await until(lambda: ingest.counters["drops_by_reason"].get("error") == 1, "the error counted")
        assert any("unexpected error on a message" in r.getMessage() and r.exc_info for r in caplog.records)
        pub.publish(evs[:1], ts=14.0)
        await until(lambda: sink.index.lookup_prefix(MODEL, keys).get(POD, (0,))[0] == 4, "the next batch applied")
        assert ingest.alive
    finally:
        pub.close()
        await ingest.stop()


@on_uvloop
async def test_a_thread_that_ends_is_reported_not_silent(caplog):
    """An exception no callback can catch ends the thread: it is logged, on_fatal is called on
    the main loop (kvcm serve then exits 1), and calls into the ingest fail instead of
    hanging."""
    sink = FailingSink(Index(max_blocks=1024), **SINK)
    sink.fail_at, sink.failure = 13.0, SystemExit
    ingest = await started(sink)
    fatal = asyncio.get_running_loop().create_future()
    ingest.on_fatal = fatal.set_result
    pub = Publisher(ingest.bound[0], topic="kv@%s@%s" % (POD, MODEL))
    try:
        await connected(pub, ingest)
        with caplog.at_level(logging.CRITICAL, logger="kvcm.ingest"):
            pub.publish([], ts=13.0)
            exc = await fatal
        assert isinstance(exc, SystemExit) and ingest.failure is exc
        assert any("the ingest thread stopped" in r.getMessage() for r in caplog.records)
        await until(lambda: not ingest.alive, "the thread to end")
        with pytest.raises(IngestUnavailable):
            ingest.streams()
    finally:
        pub.close()
        await ingest.stop()


def test_sigterm_with_a_batch_in_flight_stops_cleanly():
    """kvcm serve is told to stop while its ingest thread is applying a large batch a slice at
    a time: it stops the thread after the slice in progress and exits 0."""
    server = Serve.standard()
    try:
        server.wait_ready()
        client = server.client
        pub = Publisher(server.zmq_endpoint, topic="kv@%s@%s" % (POD, MODEL))
        try:
            client.connected(pub)
            # 320 events, 1.5 MB: a few dozen slices, applied within milliseconds. A look that
            # comes too late finds the batch applied, and the batch is sent again.
            big = encode_batch([ev for seed in range(40) for ev in chain(seed, 8, 64)[0]])
            sent = [pub.publish_raw(big)]

            def applying():
                s = client.stream(POD, MODEL)
                if s is not None and s["state"] == "applying":
                    return True
                if s is not None and s["state"] == "ok" and s["last_seq"] == sent[-1] and not s["held"]:
                    sent.append(pub.publish_raw(big))
                return False
            poll_until(applying, "the batch to be in flight", interval=0)
            assert server.stop(signal.SIGTERM) == 0, server.stderr()
        finally:
            pub.close()
        err = server.stderr()
        assert "stopping" in err and "Traceback" not in err, err
    finally:
        server.close()
