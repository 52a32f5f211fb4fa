"""kvcm.ingest over real ZMQ sockets on 127.0.0.1 (random ports), on uvloop, into the real
core sink and index (DESIGN.md §4, §11). Nothing is mocked and nothing is timed: tests wait
for conditions with a deadline."""

import asyncio
import contextlib
import itertools
import json
import os
import random
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from aio import TEST_DEADLINE, free_port, on_uvloop, until
from captures import IndexModel, load_captures
from kvcm._core import BlockHasher, EventSink, Index
from kvcm.endpoints import check_endpoint
from kvcm.ingest import EngineSpec, Ingest, parse_engine, read_engines_file
from kvcm.ingest_thread import IngestThread
from kvcm.publisher import (Publisher, all_blocks_cleared, block_removed, block_stored,
                            encode_batch)

MODEL = "Qwen/Qwen3-0.6B"
BLOCK = 16
LOCAL = "tcp://127.0.0.1:*"
SINK = {"block_size": BLOCK, "hash_algo": "sha256", "hash_seed": None, "hash_mode": "vllm"}
HASHER = BlockHasher("sha256", None, BLOCK)
INGEST = Ingest   # or IngestThread: see ingest_class
_probe_ranks = itertools.count(1000)


def topic(pod, model=MODEL):
    return "kv@%s@%s" % (pod, model)


def for_rank(endpoint, rank):
    """The endpoint a rank-`rank` publisher must be given to end up at `endpoint`."""
    base, port = endpoint.rsplit(":", 1)
    return "%s:%d" % (base, int(port) - rank)


@pytest.fixture(autouse=True, params=[Ingest, IngestThread], ids=["loop", "thread"])
def ingest_class(request):
    """Every test runs with the ingest on the test's loop and on a thread of its own: the
    same semantics either way."""
    global INGEST
    INGEST = request.param
    yield request.param


@contextlib.asynccontextmanager
async def running(sink_config=None, *, binds=(LOCAL,), ingest_class=None, **options):
    index = Index(max_blocks=1_000_000)
    ingest = (ingest_class or INGEST)(EventSink(index, **dict(SINK, **(sink_config or {}))), binds=binds, **options)
    await ingest.start()
    try:
        yield ingest, index
    finally:
        await ingest.stop()


@contextlib.contextmanager
def publishers(*pubs):
    try:
        yield pubs
    finally:
        for pub in pubs:
            pub.close()


def tasks_of(ingest):
    """The tasks of the loop the ingest runs on (its thread's, while that runs)."""
    if isinstance(ingest, IngestThread) and ingest.alive:
        return ingest._call(asyncio.all_tasks)
    return asyncio.all_tasks()


def stream(ingest, pod, model=MODEL, dp_rank=0):
    for s in ingest.streams():
        if (s["pod"], s["model"], s["dp_rank"]) == (pod, model, dp_rank):
            return s
    return None


def stream_field(ingest, pod, name):
    s = stream(ingest, pod)
    return s and s[name]


async def connected(pub, ingest):
    """Publishes empty probe batches until ingest has one: a PUB drops messages until its
    connection and the subscription exist. Each publisher's probes carry a DP rank of their
    own, so they form a stream of their own."""
    rank = next(_probe_ranks)
    probe = encode_batch([], dp_rank=rank)

    def probed():
        pub.publish_raw(probe)
        return any(s["dp_rank"] == rank for s in ingest.streams())
    await until(probed, "a probe from %s" % pub.endpoint)


async def caught_up(ingest, pod, seq, model=MODEL, dp_rank=0):
    def done():
        s = stream(ingest, pod, model, dp_rank)
        return s is not None and s["last_seq"] == seq and s["state"] not in ("replaying", "applying")
    await until(done, "%s/%s/dp%d to apply seq %d" % (pod, model, dp_rank, seq))
    return stream(ingest, pod, model, dp_rank)


def workload(seed, n, form="map", resets=True, prompts=6, blocks=8):
    """n batches of vLLM-like traffic: runs of chained blocks stored with their token ids and
    real sha256 hashes (parent = the block before the run), single-block evictions, now and
    then a cache reset. Applied in another order they leave another index."""
    rng = random.Random(seed)
    chains = []
    for _ in range(prompts):
        tokens = [rng.randrange(150_000) for _ in range(blocks * BLOCK)]
        chains.append((tokens, list(HASHER.keys(tokens))))
    batches = []
    for _ in range(n):
        tokens, keys = rng.choice(chains)
        start = rng.randrange(blocks)
        end = min(blocks, start + rng.randint(1, 3))
        events = [block_stored(keys[start:end], keys[start - 1] if start else None,
                               tokens[start * BLOCK:end * BLOCK], BLOCK, form=form)]
        if rng.random() < 0.5:
            events.append(block_removed([rng.choice(rng.choice(chains)[1])], form=form))
        if resets and rng.random() < 0.03:
            events.append(all_blocks_cleared(form=form))
        batches.append(events)
    return batches


def saw(monitor, event):
    """Whether the monitor socket reported `event` (reads what it has, without waiting)."""
    while True:
        try:
            if recv_monitor_message(monitor, zmq.NOBLOCK)["event"] == event:
                return True
        except zmq.Again:
            return False


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# -- engine specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("e1=tcp://10.0.0.1:5557", EngineSpec("e1", "tcp://10.0.0.1:5557")),
    (" 10.0.0.1:8000 = tcp://10.0.0.1:5557 , replay=tcp://10.0.0.1:5558,model=Qwen/Qwen3-0.6B ",
     EngineSpec("10.0.0.1:8000", "tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558", "Qwen/Qwen3-0.6B")),
    ("e=ipc:///run/vllm.sock,model=m=x", EngineSpec("e", "ipc:///run/vllm.sock", None, "m=x")),
])
def test_parse_engine(text, spec):
    assert parse_engine(text) == spec


@pytest.mark.parametrize("text, message", [
    ("tcp://10.0.0.1:5557", "expected NAME=ENDPOINT"),
    ("=tcp://10.0.0.1:5557", "expected NAME=ENDPOINT"),
    ("e=", "expected NAME=ENDPOINT"),
    ("e=10.0.0.1:5557", "endpoint '10.0.0.1:5557'"),
    ("e=tcp://10.0.0.1", "expected tcp://HOST:PORT"),
    ("e=tcp://10.0.0.1:70000", "expected tcp://HOST:PORT"),
    ("e=tcp://h:1,replay=h:2", "replay endpoint 'h:2'"),
    ("e=tcp://h:1,hwm=5", "unknown option 'hwm'"),
    ("e=tcp://h:1,model=a,model=b", "model= given twice"),
    ("e=tcp://h:1,model=", "model= needs a value"),
])
def test_parse_engine_rejects(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_engine(text)


def test_engines_file(tmp_path):
    path = tmp_path / "engines"
    path.write_text("# the fleet\n\na=tcp://10.0.0.1:5557\n   # rank 1\nb=tcp://10.0.0.1:5558,model=m\n")
    assert read_engines_file(path) == [EngineSpec("a", "tcp://10.0.0.1:5557"),
                                       EngineSpec("b", "tcp://10.0.0.1:5558", model="m")]
    path.write_text("a=tcp://10.0.0.1:5557\nb=tcp://10.0.0.1\n")
    with pytest.raises(ValueError, match="%s:2: engine 'b'" % path):
        read_engines_file(path)


def test_bad_configuration_fails_loud():
    sink = EventSink(Index(max_blocks=16), **SINK)
    for bad in ("tcp://*", "udp://*:5557", "5557", "tcp://:5557"):
        with pytest.raises(ValueError, match="--zmq-bind"):
            Ingest(sink, binds=[bad])
    with pytest.raises(ValueError, match="replay endpoint of pod 'p'"):
        Ingest(sink, replay_endpoints={"p": "localhost:1"})
    with pytest.raises(ValueError, match="already registered"):
        Ingest(sink, engines=[EngineSpec("a", "tcp://h:1"), EngineSpec("a", "tcp://h:2")])
    assert check_endpoint("tcp://[::1]:*") == "tcp://[::1]:*"


@on_uvloop
async def test_a_port_in_use_fails_at_start():
    async with running() as (first, _):
        second = Ingest(EventSink(Index(max_blocks=16), **SINK), binds=[LOCAL, first.bound[0]])
        with pytest.raises(OSError, match="--zmq-bind %s" % first.bound[0]):
            await second.start()
        assert second.bound == []


# -- delivery ---------------------------------------------------------------------------------

@on_uvloop
async def test_bind_mode_streams_per_dp_rank_over_two_endpoints():
    # vLLM offsets rank r's port by r, so kvcm binds one endpoint per rank (--zmq-bind twice).
    async with running(binds=(LOCAL, LOCAL)) as (ingest, index):
        ep0, ep1 = ingest.bound
        with publishers(Publisher(ep0, topic=topic("10.0.0.1"), dp_rank=0),
                        Publisher(for_rank(ep1, 1), topic=topic("10.0.0.1"), dp_rank=1)) as pubs:
            assert pubs[1].endpoint == ep1
            model = IndexModel()
            last = {}
            for rank, (pub, form) in enumerate(zip(pubs, ("map", "array"))):
                await connected(pub, ingest)
                # No cache resets: a reset clears the whole pod, so it would order the ranks.
                for events in workload(seed=rank, n=40, form=form, resets=False):
                    last[rank] = pub.publish(events)
                    model.apply("10.0.0.1", MODEL, events)
            for rank in (0, 1):
                s = await caught_up(ingest, "10.0.0.1", last[rank], dp_rank=rank)
                assert (s["batches"], s["gaps"], s["replays"], s["state"]) == (40, 0, 0, "ok")
                assert s["last_event_age_s"] >= 0
            model.assert_matches(index)
            assert ingest.counters["drops_by_reason"] == {}


@on_uvloop
async def test_connect_mode_takes_the_model_from_the_entry_or_the_topic():
    with publishers(Publisher(LOCAL, topic=topic("ignored", "topic-model")),
                    Publisher(LOCAL, topic=""),                       # vLLM's default topic
                    Publisher(LOCAL, topic="")) as (a, b, bare):
        async with running(binds=(), engines=[EngineSpec("engine-a", a.endpoint)]) as (ingest, index):
            ingest.add_engine("engine-b", b.endpoint, model=MODEL)
            ingest.add_engine("bare", bare.endpoint)              # no model anywhere: dropped
            model = IndexModel()
            for pod, ns, pub, seed in (("engine-a", "topic-model", a, 1), ("engine-b", MODEL, b, 2)):
                await connected(pub, ingest)
                for events in workload(seed=seed, n=30):
                    seq = pub.publish(events)
                    model.apply(pod, ns, events)
                await caught_up(ingest, pod, seq, ns)
            model.assert_matches(index)

            def dropped():
                bare.publish(workload(seed=3, n=1)[0])
                return ingest.counters["drops_by_reason"].get("model", 0) > 0
            await until(dropped, "a message without a model to be dropped")
            assert {s["pod"] for s in ingest.streams()} == {"engine-a", "engine-b"}
            model.assert_matches(index)


@on_uvloop
async def test_bind_and_connect_modes_at_once():
    with publishers(Publisher(LOCAL, topic=topic("ignored"))) as (engine,):
        async with running(engines=[EngineSpec("engine", engine.endpoint, model=MODEL)]) as (ingest, index):
            with publishers(Publisher(ingest.bound[0], topic=topic("binder"))) as (binder,):
                model = IndexModel()
                for pod, pub, seed in (("engine", engine, 1), ("binder", binder, 2)):
                    await connected(pub, ingest)
                    for events in workload(seed=seed, n=20):
                        seq = pub.publish(events)
                        model.apply(pod, MODEL, events)
                    await caught_up(ingest, pod, seq)
                model.assert_matches(index)


@on_uvloop
async def test_malformed_messages_are_dropped_and_counted():
    async with running() as (ingest, index):
        name = topic("pod-m").encode()
        with publishers(Publisher(ingest.bound[0], topic=topic("pod-m"))) as (pub,):
            await connected(pub, ingest)
            payload = encode_batch(workload(seed=1, n=1)[0])
            seq8 = (5).to_bytes(8, "big")
            pub.send_frames([name])
            pub.send_frames([name, seq8])
            pub.send_frames([name, seq8, payload, b"extra"])
            pub.send_frames([name, b"\x00\x00\x05", payload])
            for bad in (b"kv@pod-m", b"kv@a@b@c", b"kv@@" + MODEL.encode(), b"kv@pod-m@", b"kv@\xff@m"):
                pub.publish_raw(payload, topic=bad)
            pub.send_frames([name, seq8, b"\xc1"])              # msgpack's never-used byte
            good = workload(seed=2, n=1)[0]
            seq = pub.publish(good)
            s = await caught_up(ingest, "pod-m", seq)
            drops = ingest.counters["drops_by_reason"]
            assert (drops.pop("frames"), drops.pop("seq"), drops.pop("topic")) == (3, 1, 5)
            assert sum(drops.values()) == 1                       # the sink's reason for \xc1
            assert (s["batches"], s["gaps"], s["restarts"]) == (1, 0, 0)   # the good one was the baseline
            model = IndexModel()
            model.apply("pod-m", MODEL, good)
            model.assert_matches(index)


# -- sequence rules ---------------------------------------------------------------------------

@on_uvloop
@pytest.mark.parametrize("layout", ["v26", "v25"])
async def test_gap_replay_ends_equal_to_a_no_loss_run(layout):
    batches = workload(seed=7, n=120)
    lost = {20, 21, 22, 50, *range(80, 90), 118}
    with publishers(Publisher(LOCAL, topic=topic("ref")),
                    Publisher(LOCAL, topic=topic("lossy"), replay_endpoint=LOCAL, replay_layout=layout)) as (ref, lossy):
        async with running(binds=(), replay_interval=0) as (ingest, index):
            ingest.add_engine("ref", ref.endpoint)
            ingest.add_engine("lossy", lossy.endpoint, replay=lossy.replay_endpoint)
            await connected(ref, ingest)
            await connected(lossy, ingest)
            model = IndexModel()
            for i, events in enumerate(batches):
                last_ref = ref.publish(events)
                last = lossy.publish(events, deliver=i not in lost)
                model.apply("ref", MODEL, events)
                model.apply("lossy", MODEL, events)
            await caught_up(ingest, "ref", last_ref)
            s = await caught_up(ingest, "lossy", last)
            assert (s["gaps"], s["state"]) == (0, "ok") and s["replays"] >= 1
            assert ingest.counters["replay_failures"] == 0
            model.assert_matches(index)      # both pods hold what the events say
            assert model.holders()


@on_uvloop
@pytest.mark.parametrize("layout", ["v26", "v25"])
async def test_live_batches_are_held_while_a_replay_is_in_flight(layout):
    batches = workload(seed=3, n=30)
    with publishers(Publisher(LOCAL, topic=topic("held"), replay_endpoint=LOCAL, replay_layout=layout,
                              replay_thread=False)) as (pub,):
        async with running(binds=(), replay_timeout=TEST_DEADLINE,
                           engines=[EngineSpec("held", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            seqs = [pub.publish(events, deliver=not 10 <= i < 13) for i, events in enumerate(batches[:14])]
            await until(lambda: stream_field(ingest, "held", "state") == "replaying", "the gap to start a replay")
            seqs += [pub.publish(events) for events in batches[14:]]
            await until(lambda: stream_field(ingest, "held", "held") == 17, "seqs 13..29 to be held")
            # Only now does the engine answer: 10..29, then the held 13..29 are duplicates.
            assert await asyncio.to_thread(pub.serve_replays, 10.0) == 1
            s = await caught_up(ingest, "held", seqs[-1])
            assert (s["replays"], s["gaps"], s["batches"], s["duplicates"], s["held"], s["state"]) == (1, 0, 30, 17, 0, "ok")
            model = IndexModel()
            for events in batches:
                model.apply("held", MODEL, events)
            model.assert_matches(index)


@on_uvloop
async def test_live_feed_lagging_behind_a_replay_is_not_a_restart():
    batches = workload(seed=12, n=31)
    with publishers(Publisher(LOCAL, topic=topic("lag"), replay_endpoint=LOCAL, replay_thread=False)) as (pub,):
        async with running(binds=(), replay_timeout=TEST_DEADLINE,
                           engines=[EngineSpec("lag", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            seqs = [pub.publish(events, deliver=not 10 <= i < 13) for i, events in enumerate(batches[:14])]
            await until(lambda: stream_field(ingest, "lag", "state") == "replaying", "the gap to start a replay")
            # 14..29 reach the replay buffer first and the live feed only after the replay.
            payloads = [encode_batch(events) for events in batches[14:30]]
            seqs += [pub.publish_raw(p, deliver=False) for p in payloads]
            assert await asyncio.to_thread(pub.serve_replays, 10.0) == 1
            await caught_up(ingest, "lag", seqs[-1])
            for seq, p in zip(seqs[14:], payloads):
                pub.publish_raw(p, seq=seq)
            s = await caught_up(ingest, "lag", pub.publish(batches[30]))
            # duplicates: the held 13, then the lagging 14..29
            assert (s["restarts"], s["duplicates"], s["gaps"], s["batches"]) == (0, 17, 0, 31)
            model = IndexModel()
            for events in batches:
                model.apply("lag", MODEL, events)
            model.assert_matches(index)


@on_uvloop
async def test_held_batches_are_bounded():
    batches = workload(seed=13, n=20)
    with publishers(Publisher(LOCAL, topic=topic("full"), replay_endpoint=LOCAL, replay_thread=False)) as (pub,):
        async with running(binds=(), max_held=5, replay_timeout=TEST_DEADLINE,
                           engines=[EngineSpec("full", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            seqs = [pub.publish(events, deliver=i != 5) for i, events in enumerate(batches)]
            await until(lambda: ingest.counters["held_dropped"] == 9, "the held batches beyond 5 to be dropped")
            assert stream_field(ingest, "full", "held") == 5
            assert await asyncio.to_thread(pub.serve_replays, 10.0) == 1
            s = await caught_up(ingest, "full", seqs[-1])    # the replay brought them all
            assert (s["gaps"], s["replays"], s["state"]) == (0, 1, "ok")
            model = IndexModel()
            for events in batches:
                model.apply("full", MODEL, events)
            model.assert_matches(index)


@on_uvloop
async def test_a_full_stream_table_forgets_the_least_recently_active_stream():
    async with running(max_streams=4) as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("steady")),
                        Publisher(ingest.bound[0], topic=topic("quiet"))) as (steady, quiet):
            for pub in (steady, quiet):
                await connected(pub, ingest)           # each probe stream is one more
            await caught_up(ingest, "quiet", quiet.publish(workload(seed=1, n=1)[0]))
            # junk topics by the hundred while one real engine keeps publishing
            for i in range(300):
                steady.send_frames([topic("junk-%d" % i).encode(), bytes(8), encode_batch([])])
                if i % 2:
                    steady.publish([])
            s = await caught_up(ingest, "steady", steady.publish(workload(seed=2, n=1)[0]))
            assert (s["gaps"], s["restarts"], s["batches"]) == (0, 0, 151)
            assert stream(ingest, "quiet") is None and len(ingest.streams()) == 4
            assert ingest.counters["streams_evicted"] >= 300
            assert ingest.counters["drops_by_reason"] == {}
            # its last stream forgotten, the quiet pod's entries are too: nothing proves them current
            assert set(index.stats()["pods"]) == {"steady"}
            # a new engine is never refused, and the quiet one, back, starts a new baseline
            for pod, pub in (("newcomer", steady), ("quiet", quiet)):
                await caught_up(ingest, pod, pub.publish_raw(encode_batch([]), topic=topic(pod).encode(), seq=9))


@on_uvloop
async def test_forgetting_a_pod_frees_its_streams_and_cancels_their_replays():
    with publishers(Publisher(LOCAL, topic=topic("gone"), replay_endpoint=LOCAL, replay_thread=False)) as (pub,):
        async with running(binds=(), replay_timeout=TEST_DEADLINE,
                           engines=[EngineSpec("gone", pub.endpoint, pub.replay_endpoint)]) as (ingest, _):
            await connected(pub, ingest)
            tasks = tasks_of(ingest)
            pub.publish([])
            pub.publish([], deliver=False)
            pub.publish([])
            await until(lambda: stream_field(ingest, "gone", "state") == "replaying", "a replay in flight")
            assert tasks_of(ingest) > tasks
            assert ingest.forget_pod("gone") == 2             # the stream and the probe's
            assert ingest.streams() == [] and ingest.tables()["streams"] == (0, 4096)
            await until(lambda: tasks_of(ingest) == tasks, "the replay to be cancelled")
            s = await caught_up(ingest, "gone", pub.publish([]))
            assert (s["batches"], s["gaps"], s["restarts"], s["state"]) == (1, 0, 0, "ok")


@on_uvloop
async def test_unknown_parent_in_decoupled_mode_resyncs_from_the_engines_buffer():
    tokens = list(range(2 * BLOCK))
    first, second = HASHER.keys(tokens)
    kvcm_keys = BlockHasher("kvcm", None, BLOCK, namespace=MODEL).keys(tokens)
    with publishers(Publisher(LOCAL, topic=topic("late"), replay_endpoint=LOCAL)) as (pub,):
        async with running({"hash_mode": "kvcm"}, binds=(),
                           engines=[EngineSpec("late", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            pub.publish([block_stored([first], None, tokens[:BLOCK])], deliver=False)   # before kvcm looked
            seq = pub.publish([block_stored([second], first, tokens[BLOCK:])])           # the baseline
            s = await caught_up(ingest, "late", seq)
            await until(lambda: stream_field(ingest, "late", "replays") == 1, "the resync")
            assert index.lookup_prefix(MODEL, kvcm_keys) == {"late": (2, {"gpu": 2})}
            assert (s["gaps"], s["restarts"]) == (0, 0)


@on_uvloop
async def test_a_namespace_switching_to_decoupled_resyncs_every_stream_that_fed_it():
    tokens = list(range(3 * BLOCK))
    parity = list(HASHER.keys(tokens))
    other_seed = list(BlockHasher("sha256", "42", BLOCK).keys(tokens))
    kvcm_keys = BlockHasher("kvcm", None, BLOCK, namespace=MODEL).keys(tokens)
    with publishers(Publisher(LOCAL, topic=topic("good"), replay_endpoint=LOCAL),
                    Publisher(LOCAL, topic=topic("odd"), replay_endpoint=LOCAL)) as (good, odd):
        engines = [EngineSpec(p.topic.split("@")[1], p.endpoint, p.replay_endpoint) for p in (good, odd)]
        async with running({"hash_mode": "auto"}, binds=(), engines=engines) as (ingest, index):
            for pub in (good, odd):
                await connected(pub, ingest)
            await caught_up(ingest, "good", good.publish([block_stored(parity, None, tokens)]))
            assert set(index.lookup_prefix(MODEL, parity)) == {"good"}
            # An engine with another PYTHONHASHSEED: the namespace goes decoupled and is
            # cleared on every pod; both streams replay their history under kvcm's keys.
            await caught_up(ingest, "odd", odd.publish([block_stored(other_seed, None, tokens)]))
            await until(lambda: all(stream_field(ingest, pod, "replays") == 1 for pod in ("good", "odd")),
                        "both streams to resync")
            assert index.lookup_prefix(MODEL, kvcm_keys) == {pod: (3, {"gpu": 3}) for pod in ("good", "odd")}
            assert index.lookup_prefix(MODEL, parity) == {}


@on_uvloop
async def test_bind_mode_replay_endpoint_is_offset_by_rank():
    port = free_port()
    replay = "tcp://127.0.0.1:%d" % (port - 1)                       # rank 0's, as configured
    batches = workload(seed=4, n=12)
    async with running(replay_endpoints={"10.0.0.2": replay}) as (ingest, index):
        with publishers(Publisher(for_rank(ingest.bound[0], 1), topic=topic("10.0.0.2"), dp_rank=1,
                                  replay_endpoint=replay)) as (pub,):
            assert pub.replay_endpoint == "tcp://127.0.0.1:%d" % port
            await connected(pub, ingest)
            seqs = [pub.publish(events, deliver=i != 5) for i, events in enumerate(batches)]
            s = await caught_up(ingest, "10.0.0.2", seqs[-1], dp_rank=1)
            assert (s["replays"], s["gaps"], s["batches"]) == (1, 0, 12)
            model = IndexModel()
            for events in batches:
                model.apply("10.0.0.2", MODEL, events)
            model.assert_matches(index)


@on_uvloop
async def test_gap_without_replay_endpoint_is_counted_and_degrades():
    batches = workload(seed=5, n=10)
    async with running() as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("lossy"))) as (pub,):
            await connected(pub, ingest)
            model = IndexModel()
            for i, events in enumerate(batches):
                seq = pub.publish(events, deliver=i not in (5, 6))
                if i not in (5, 6):
                    model.apply("lossy", MODEL, events)
            s = await caught_up(ingest, "lossy", seq)
            assert (s["gaps"], s["missed_batches"], s["replays"], s["batches"], s["state"]) == (1, 2, 0, 8, "degraded")
            assert ingest.counters["gaps"] == 1 and ingest.counters["missed_batches"] == 2
            model.assert_matches(index)


@on_uvloop
async def test_a_replay_that_never_answers_times_out_into_a_gap():
    batches = workload(seed=6, n=10)
    with publishers(Publisher(LOCAL, topic=topic("mute"), replay_endpoint=LOCAL, replay_thread=False)) as (pub,):
        async with running(binds=(), replay_timeout=0.2,
                           engines=[EngineSpec("mute", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            model = IndexModel()
            for i, events in enumerate(batches):
                seq = pub.publish(events, deliver=i not in (5, 6))
                if i not in (5, 6):
                    model.apply("mute", MODEL, events)
            s = await caught_up(ingest, "mute", seq)
            assert (s["gaps"], s["replays"], s["batches"], s["state"]) == (1, 0, 8, "degraded")
            assert ingest.counters["replay_failures"] == 1
            model.assert_matches(index)


@on_uvloop
async def test_duplicates_are_dropped():
    tokens = list(range(2 * BLOCK))
    x, y = HASHER.keys(tokens)
    async with running() as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("dup"))) as (pub,):
            await connected(pub, ingest)
            pub.publish([block_stored([x], None, tokens[:BLOCK])])
            again = pub.publish([block_removed([x])])
            pub.publish([block_stored([x], None, tokens[:BLOCK])], seq=again)   # same seq: dropped
            seq = pub.publish([block_stored([y], x, tokens[BLOCK:])])
            s = await caught_up(ingest, "dup", seq)
            assert (s["duplicates"], s["batches"], s["restarts"], s["gaps"]) == (1, 3, 0, 0)
            assert index.lookup_prefix(MODEL, [x]) == {}
            assert set(index.lookup_prefix(MODEL, [y])) == {"dup"}


@on_uvloop
async def test_seq_going_back_is_a_restart_that_clears_the_pod():
    before, after = workload(seed=8, n=20), workload(seed=9, n=10)
    async with running() as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("restarting")),
                        Publisher(ingest.bound[0], topic=topic("bystander"))) as (pub, other):
            model = IndexModel()
            for p in (pub, other):
                await connected(p, ingest)
            for events in before:
                other_seq = other.publish(events)
                model.apply("bystander", MODEL, events)
            for i, events in enumerate(before):
                seq = pub.publish(events, deliver=i != 10)             # one lost: degraded
                if i != 10:
                    model.apply("restarting", MODEL, events)
            assert (await caught_up(ingest, "restarting", seq))["state"] == "degraded"
            await caught_up(ingest, "bystander", other_seq)
            model.assert_matches(index)
            pub.restart()
            model.clear_pod("restarting")
            for events in after:
                seq = pub.publish(events)
                model.apply("restarting", MODEL, events)
            s = await caught_up(ingest, "restarting", seq)
            assert seq == len(after) - 1
            assert (s["restarts"], s["state"], s["batches"]) == (1, "ok", 19 + 10)
            model.assert_matches(index)


@on_uvloop
async def test_a_restart_whose_first_batch_was_lost_replays_from_zero():
    before, after = workload(seed=10, n=5), workload(seed=11, n=5)
    with publishers(Publisher(LOCAL, topic=topic("phoenix"), replay_endpoint=LOCAL)) as (pub,):
        async with running(binds=(), engines=[EngineSpec("phoenix", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            for events in before:
                seq = pub.publish(events)
            await caught_up(ingest, "phoenix", seq)
            pub.restart()
            for i, events in enumerate(after):
                seq = pub.publish(events, deliver=i != 0)
            s = await caught_up(ingest, "phoenix", seq)
            assert (s["restarts"], s["replays"], s["gaps"], s["state"]) == (1, 1, 0, "ok")
            model = IndexModel()
            for events in after:
                model.apply("phoenix", MODEL, events)
            model.assert_matches(index)


# -- many publishers, engines coming and going, shutdown -------------------------------------

@on_uvloop
async def test_many_publishers_at_once_keep_per_stream_order():
    n = 150

    def publish_all(pub, batches):
        return [pub.publish(events) for events in batches][-1]

    with publishers(*[Publisher(LOCAL, topic="") for _ in range(4)]) as engines:
        async with running(engines=[EngineSpec("engine-%d" % i, p.endpoint, model=MODEL)
                                    for i, p in enumerate(engines)]) as (ingest, index):
            with publishers(*[Publisher(ingest.bound[0], topic=topic("bound-%d" % i)) for i in range(8)]) as bound:
                pods = ["engine-%d" % i for i in range(4)] + ["bound-%d" % i for i in range(8)]
                pubs = engines + bound
                for pub in pubs:
                    await connected(pub, ingest)
                work = [workload(seed=100 + i, n=n, form=("map", "array")[i % 2]) for i in range(len(pubs))]
                lasts = await asyncio.gather(*(asyncio.to_thread(publish_all, pub, batches)
                                               for pub, batches in zip(pubs, work)))
                model = IndexModel()
                for pod, batches, last in zip(pods, work, lasts):
                    s = await caught_up(ingest, pod, last)
                    assert (s["batches"], s["gaps"], s["duplicates"], s["restarts"]) == (n, 0, 0, 0)
                    for events in batches:
                        model.apply(pod, MODEL, events)
                model.assert_matches(index)


@on_uvloop
async def test_engines_added_and_removed_at_run_time():
    with publishers(Publisher(LOCAL, topic=topic("x")), Publisher(LOCAL, topic=topic("x"))) as (a, b):
        async with running(binds=()) as (ingest, index):
            ingest.add_engine("a", a.endpoint)
            await connected(a, ingest)
            with pytest.raises(ValueError, match="already registered"):
                ingest.add_engine("a", b.endpoint)
            with pytest.raises(ValueError, match="endpoint"):
                ingest.add_engine("c", "tcp://nohost")
            ingest.add_engine("b", b.endpoint)
            await connected(b, ingest)
            seq_a = a.publish(workload(seed=1, n=1)[0])
            await caught_up(ingest, "a", seq_a)

            monitor = a.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            ingest.remove_engine("a")
            await until(lambda: saw(monitor, zmq.EVENT_DISCONNECTED), "engine a's socket to close")
            assert [e.name for e in ingest.engines] == ["b"]
            with pytest.raises(KeyError):
                ingest.remove_engine("a")
            a.publish(workload(seed=2, n=1)[0])                   # nobody listens
            await caught_up(ingest, "b", b.publish(workload(seed=3, n=1)[0]))
            assert stream(ingest, "a")["last_seq"] == seq_a

            ingest.add_engine("a", a.endpoint)                      # back: its seq shows the miss
            await connected(a, ingest)
            s = await caught_up(ingest, "a", a.publish(workload(seed=4, n=1)[0]))
            assert (s["gaps"], s["restarts"], s["state"]) == (1, 0, "degraded")


@on_uvloop
async def test_stop_closes_every_socket_and_task():
    fds, loop_tasks = open_fds(), asyncio.all_tasks()
    mute = Publisher(LOCAL, topic=topic("e"), replay_endpoint=LOCAL, replay_thread=False)
    ingest = INGEST(EventSink(Index(max_blocks=1024), **SINK), binds=[LOCAL], replay_timeout=60,
                    engines=[EngineSpec("e", mute.endpoint, mute.replay_endpoint)])
    await ingest.start()
    tasks = tasks_of(ingest)
    bound = ingest.bound[0]
    binder = Publisher(bound, topic=topic("b"))
    await connected(binder, ingest)
    await connected(mute, ingest)
    mute.publish([])
    mute.publish([], deliver=False)
    mute.publish([])
    await until(lambda: stream_field(ingest, "e", "state") == "replaying", "a replay in flight")
    assert tasks_of(ingest) > tasks                        # the replay
    await ingest.stop()
    await ingest.stop()
    assert asyncio.all_tasks() == loop_tasks
    assert not isinstance(ingest, IngestThread) or not ingest.alive
    assert ingest.bound == []
    assert (stream_field(ingest, "e", "state"), stream_field(ingest, "e", "held")) == ("ok", 0)
    with zmq.Context() as ctx, ctx.socket(zmq.SUB) as again:   # the port is free again
        again.bind(bound)
    binder.close()
    mute.close()
    assert open_fds() == fds


@on_uvloop
async def test_ingest_yields_to_the_loop_between_budgets():
    budget, n = 8, 400
    # the loop the ingest shares with HTTP: on a thread of its own it shares none
    async with running(batch_budget=budget, ingest_class=Ingest) as (ingest, _):
        with publishers(Publisher(ingest.bound[0], topic=topic("burst"))) as (pub,):
            await connected(pub, ingest)
            start = ingest.counters["messages"]
            for _ in range(n):
                pub.publish([])
            time.sleep(0.2)    # let ZMQ queue the burst while the loop is blocked
            seen = [start]
            while seen[-1] < start + n:
                await asyncio.sleep(0)
                seen.append(ingest.counters["messages"])
            steps = [b - a for a, b in zip(seen, seen[1:])]
            assert max(steps) <= 2 * budget        # other callbacks ran between budgets


# -- the vLLM captures ------------------------------------------------------------------------

@on_uvloop
@pytest.mark.parametrize("mode", ["bind", "connect"])
@pytest.mark.parametrize("version", ["0.33.0", "0.20.0"])
async def test_vllm_captures_reach_the_index(shared, version, mode):
    captures = [c for c in load_captures(shared) if c.version == version]
    config = captures[0].hash_config
    sink_config = {"hash_algo": config["algo"], "hash_seed": config["seed"],
                   "block_size": config["block_size"], "hash_mode": "auto"}

    def lora_keys(lora, tokens):
        return BlockHasher("kvcm", config["seed"], config["block_size"], namespace=lora).keys(tokens)

    async with running(sink_config, binds=(LOCAL,) if mode == "bind" else ()) as (ingest, index):
        model = IndexModel(lora_keys)
        for capture in captures:
            if mode == "bind":
                pub = Publisher(for_rank(ingest.bound[0], capture.dp_rank), topic=capture.topic,
                                dp_rank=capture.dp_rank)
            else:
                pub = Publisher(LOCAL, topic=capture.topic, dp_rank=capture.dp_rank)
                ingest.add_engine(capture.pod, pub.endpoint)
            with publishers(pub):
                await connected(pub, ingest)
                for message in capture.messages:
                    seq = pub.publish_raw(message.payload, seq=int.from_bytes(message.seq, "big"),
                                          topic=message.topic)
                    _, events, rank = message.decoded
                    model.apply(capture.pod, capture.model, events)
                    await caught_up(ingest, capture.pod, seq, capture.model, rank)
                    model.assert_matches(index)
            s = stream(ingest, capture.pod, capture.model, capture.dp_rank)
            assert (s["batches"], s["gaps"], s["restarts"], s["duplicates"]) == (len(capture.messages), 0, 0, 0)
        assert ingest.counters["drops_by_reason"] == {}


# -- hostile and careless publishers ------------------------------------------------------------

@on_uvloop
async def test_a_large_batch_is_applied_in_slices_between_other_streams_batches():
    big = [events for events in workload(seed=20, n=300, resets=False)]
    small = workload(seed=21, n=1)[0]
    applied = []
    # blocking the test's loop queues the batches only when the ingest runs on that loop
    async with running(slice_bytes=2048, on_applied=lambda s, seq, resync: applied.append((s.pod, seq)),
                       ingest_class=Ingest) as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("big")),
                        Publisher(ingest.bound[0], topic=topic("small"))) as (a, b):
            for pub in (a, b):
                await connected(pub, ingest)
            applied.clear()
            first = a.publish([event for events in big for event in events])   # one batch, ~100 KB
            after = a.publish(small)                                           # the same stream, next
            other = b.publish(small)
            time.sleep(0.2)    # let ZMQ queue all three while the loop is blocked
            await caught_up(ingest, "big", after)
            await caught_up(ingest, "small", other)
            # the other stream's batch went in between the slices; the big stream kept its order
            assert applied.index(("small", other)) < applied.index(("big", first)) < applied.index(("big", after))
            model = IndexModel()
            model.apply("big", MODEL, [event for events in big for event in events])
            model.apply("big", MODEL, small)
            model.apply("small", MODEL, small)
            model.assert_matches(index)
            assert stream_field(ingest, "big", "batches") == 2


@on_uvloop
async def test_a_message_over_the_size_cap_is_never_applied():
    cap = 64 << 10
    big_tokens = list(range(12_000 * BLOCK))                   # > 64 KiB of msgpack
    big = [block_stored(HASHER.keys(big_tokens), None, big_tokens)]
    async with running(max_message=cap) as (ingest, index):
        with publishers(Publisher(ingest.bound[0], topic=topic("big"))) as (pub,):
            await connected(pub, ingest)
            assert len(encode_batch(big)) > cap
            pub.publish(big)                 # libzmq drops the connection that carried it
            small = workload(seed=1, n=1)[0]

            def applied():                   # the publisher reconnects; later batches flow
                pub.publish(small)
                return stream(ingest, "big") is not None
            await until(applied, "a batch after the oversized one")
            assert len(index) == len({k for e in small for k in e.get("block_hashes", ())})
            assert index.lookup_prefix(MODEL, HASHER.keys(big_tokens)[:1]) == {}


@on_uvloop
async def test_any_u64_sequence_numbers_keep_counters_within_u64():
    async with running() as (ingest, _):
        with publishers(Publisher(ingest.bound[0], topic=topic("wild"))) as (pub,):
            await connected(pub, ingest)
            for seq in (0, (1 << 64) - 1, (1 << 64) - 2):
                pub.publish([], seq=seq)
            s = await caught_up(ingest, "wild", (1 << 64) - 2)
            assert (s["gaps"], s["restarts"]) == (2, 1)
            assert s["missed_batches"] == ingest.counters["missed_batches"] == (1 << 64) - 1
            assert json.loads(json.dumps(ingest.streams()))


@on_uvloop
async def test_the_engine_cap_is_reached_before_any_socket_limit():
    async with running(binds=()) as (ingest, _):
        for i in range(1024):
            ingest.add_engine("e%d" % i, "inproc://kvcm-engine-%d" % i)
        with pytest.raises(ValueError, match="too many engines"):
            ingest.add_engine("one-more", "inproc://kvcm-engine-x")
        assert ingest.counters["engines_refused"] == 1
        assert ingest.tables()["engines"] == (1024, 1024)
        ingest.remove_engine("e0")
        ingest.add_engine("one-more", "inproc://kvcm-engine-x")


@pytest.mark.parametrize("endpoint", ["tcp://*:5557", "tcp://10.0.0.1:*", "tcp://10.0.0.1:0", "tcp://:5557"])
def test_an_engine_endpoint_must_name_a_host_and_a_port(endpoint):
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        EngineSpec("e", endpoint)
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        EngineSpec("e", "tcp://10.0.0.1:5557", replay=endpoint)


@on_uvloop
@pytest.mark.parametrize("mode", ["bind", "connect"])
async def test_zmq_allow_admits_publishers_by_address(mode):
    # 127.0.0.1 is allowed, 127.0.0.2 (loopback too, another address) is not
    binds = (LOCAL,) if mode == "bind" else ()
    async with running(binds=binds, allow=["127.0.0.1/32"]) as (ingest, index):
        if mode == "bind":
            port = ingest.bound[0].rsplit(":", 1)[1]
            stranger = Publisher("tcp://127.0.0.2:0;127.0.0.1:%s" % port, topic=topic("stranger"))
            friend = Publisher("tcp://127.0.0.1:%s" % port, topic=topic("friend"))
        else:
            stranger = Publisher("tcp://127.0.0.2:*", topic="")
            friend = Publisher("tcp://127.0.0.1:*", topic="")
            ingest.add_engine("stranger", stranger.endpoint, model=MODEL)
            ingest.add_engine("friend", friend.endpoint, model=MODEL)
        with publishers(stranger, friend):
            await connected(friend, ingest)
            batch = workload(seed=3, n=1)[0]

            def refused():                  # the handshake fails before a message passes
                stranger.publish(batch)
                return ingest.counters["publishers_refused"] >= 1
            await until(refused, "the stranger to be refused")
            stranger.publish(batch)
            await caught_up(ingest, "friend", friend.publish(batch))
            assert stream(ingest, "stranger") is None
            assert set(index.stats()["pods"]) == {"friend"}


# -- replay rules -------------------------------------------------------------------------------

def answer_replay_partially(router, payloads):
    """A replay endpoint that answers the first request with payloads [(seq, payload)] and
    then falls silent: no end marker."""
    identity, _, start = router.recv_multipart()
    for seq, payload in payloads:
        if seq >= int.from_bytes(start, "big"):
            router.send_multipart([identity, b"", topic("cut").encode(), seq.to_bytes(8, "big"), payload])


@on_uvloop
@pytest.mark.parametrize("cut", ["batch_cap", "timeout"])
async def test_an_incomplete_resync_is_not_applied_over_newer_state(cut):
    # seq 0 stores C, seq 1 removes it, seq 2 chains from a block kvcm never saw: the resync
    # from 0 that follows brings back only seq 0 (the batch cap, or an engine that stops
    # answering). Applying that prefix would bring C back after its removal.
    c_tokens, orphan_tokens = list(range(BLOCK)), list(range(100, 100 + 2 * BLOCK))
    c_hash, (parent, orphan) = 7001, (7002, 7003)
    history = [[block_stored([c_hash], None, c_tokens)], [block_removed([c_hash])],
               [block_stored([orphan], parent, orphan_tokens[BLOCK:])]]
    payloads = [(seq, encode_batch(events)) for seq, events in enumerate(history)]
    c_key = BlockHasher("kvcm", None, BLOCK, namespace=MODEL).keys(c_tokens)
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router, \
            publishers(Publisher(LOCAL, topic=topic("cut"), replay_endpoint=LOCAL)) as (pub,):
        replay = pub.replay_endpoint
        if cut == "timeout":
            router.bind(LOCAL)
            replay = router.getsockopt_string(zmq.LAST_ENDPOINT)
        async with running({"hash_mode": "kvcm"}, binds=(), replay_timeout=0.3,
                           max_replay_batches=1 if cut == "batch_cap" else 100,
                           engines=[EngineSpec("cut", pub.endpoint, replay)]) as (ingest, index):
            await connected(pub, ingest)
            pub.restart()                      # the replay buffer holds the history below only
            await caught_up(ingest, "cut", pub.publish_raw(payloads[0][1]))
            assert index.lookup_prefix(MODEL, c_key) == {"cut": (1, {"gpu": 1})}
            await caught_up(ingest, "cut", pub.publish_raw(payloads[1][1]))
            assert index.lookup_prefix(MODEL, c_key) == {}
            pub.publish_raw(payloads[2][1])
            if cut == "timeout":
                await asyncio.to_thread(answer_replay_partially, router, payloads[:1])
            await until(lambda: ingest.counters["replay_failures"] == 1, "the resync to fail")
            await caught_up(ingest, "cut", 2)
            assert index.lookup_prefix(MODEL, c_key) == {}       # seq 1 stays the truth
            assert stream_field(ingest, "cut", "replays") == 0


@on_uvloop
async def test_a_second_gap_within_the_replay_interval_is_counted_not_replayed():
    batches = workload(seed=30, n=12)
    with publishers(Publisher(LOCAL, topic=topic("storm"), replay_endpoint=LOCAL)) as (pub,):
        async with running(binds=(), replay_interval=TEST_DEADLINE,
                           engines=[EngineSpec("storm", pub.endpoint, pub.replay_endpoint)]) as (ingest, index):
            await connected(pub, ingest)
            model = IndexModel()
            for i, events in enumerate(batches[:6]):
                seq = pub.publish(events, deliver=i != 3)       # a gap: replayed
                model.apply("storm", MODEL, events)
            s = await caught_up(ingest, "storm", seq)
            assert (s["replays"], s["gaps"], s["state"]) == (1, 0, "ok")
            for i, events in enumerate(batches[6:], 6):
                seq = pub.publish(events, deliver=i != 8)       # another, too soon: counted
                if i != 8:
                    model.apply("storm", MODEL, events)
            s = await caught_up(ingest, "storm", seq)
            assert (s["replays"], s["gaps"], s["missed_batches"], s["state"]) == (1, 1, 1, "degraded")
            assert ingest.counters["replays"] == 1
            model.assert_matches(index)
