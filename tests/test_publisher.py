"""kvcm.publisher against vLLM's own wire captures: live frames, replay replies in both
layouts, event encodings; plus the endpoint conventions (bind vs connect, DP offset)."""

import msgpack
import pytest
import zmq

from captures import event_fields, load_captures
from kvcm.publisher import Publisher, all_blocks_cleared, block_removed, block_stored, encode_batch
from kvcm.wire import END_SEQ, binds, dp_endpoint

LOCAL = "tcp://127.0.0.1:*"
POLL_MS = 5000


@pytest.fixture(scope="module")
def captures(shared):
    return load_captures(shared)


@pytest.fixture
def ctx():
    context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    yield context
    context.destroy(linger=0)


def _layout(capture):
    return "v26" if capture.version >= "0.26" else "v25"


def _recv(sock):
    assert sock.poll(POLL_MS), "no message within %d ms" % POLL_MS
    return sock.recv_multipart()


@pytest.mark.parametrize("endpoint, rank, expected", [
    ("tcp://*:5557", 0, "tcp://*:5557"),
    ("tcp://*:47575", 2, "tcp://*:47577"),           # the offload capture's publisher
    ("tcp://10.0.0.1:5557", 3, "tcp://10.0.0.1:5560"),
    ("tcp://[::1]:5557", 1, "tcp://[::1]:5558"),
    ("tcp://127.0.0.1:*", 1, "tcp://127.0.0.1:*"),     # nothing to offset
    ("inproc://kv", 1, "inproc://kv_dp1"),
    ("ipc:///tmp/kv", 2, "ipc:///tmp/kv_dp2"),
])
def test_dp_endpoint_offsets_like_vllm(endpoint, rank, expected):
    assert dp_endpoint(endpoint, rank) == expected


@pytest.mark.parametrize("endpoint, bind", [
    ("tcp://*:5557", True), ("tcp://[::]:5557", True), ("ipc:///tmp/kv", True), ("inproc://kv", True),
    ("tcp://127.0.0.1:5557", False), ("tcp://kvcm.svc:5557", False),
])
def test_binds_only_wildcard_and_local_endpoints(endpoint, bind):
    assert binds(endpoint) is bind


def test_connecting_publisher_applies_the_rank_offset(ctx):
    with ctx.socket(zmq.SUB) as sub:
        # The subscriber takes a port first, so no other process can take it in between.
        sub.subscribe(b"")
        sub.bind("tcp://127.0.0.1:*")
        port = int(sub.last_endpoint.rsplit(b":", 1)[1])
        with Publisher("tcp://127.0.0.1:%d" % (port - 1), topic="kv@p@m", dp_rank=1) as pub:
            assert pub.endpoint == "tcp://127.0.0.1:%d" % port
            while not sub.poll(10):        # PUB drops until the connection and subscription exist
                pub.publish([])
            topic, _, payload = sub.recv_multipart()
            assert topic == b"kv@p@m" and msgpack.unpackb(payload)[2] == 1


def test_live_frames_are_the_captured_bytes(ctx, captures):
    for capture in captures:
        with Publisher(LOCAL, topic=capture.topic) as pub, ctx.socket(zmq.SUB) as sub:
            sub.subscribe(b"")
            sub.connect(pub.endpoint)
            while not sub.poll(10):
                pub.send_frames([b"probe"])
            for message in capture.messages:
                seq = pub.publish_raw(message.payload, seq=int.from_bytes(message.seq, "big"))
                assert seq.to_bytes(8, "big") == message.seq
                frames = _recv(sub)
                while frames == [b"probe"]:
                    frames = _recv(sub)
                assert frames == [message.topic, message.seq, message.payload]


def test_seq_counts_per_batch_and_obeys_explicit_seqs():
    with Publisher(LOCAL) as pub:
        assert [pub.publish([]) for _ in range(3)] == [0, 1, 2]
        assert pub.publish([], seq=7) == 7
        assert pub.publish([]) == 8
        assert pub.publish([], seq=8) == 8          # a duplicate
        pub.restart()
        assert pub.publish([]) == 0


@pytest.mark.parametrize("threaded", [True, False])
def test_replay_reply_is_byte_identical_to_vllm(ctx, captures, threaded):
    replayed = [c for c in captures if c.replay_replies]
    assert {_layout(c) for c in replayed} == {"v25", "v26"}
    for capture in replayed:
        with Publisher(LOCAL, topic=capture.topic, replay_endpoint=LOCAL, replay_layout=_layout(capture),
                       replay_thread=threaded) as pub, ctx.socket(zmq.DEALER) as dealer:
            for message in capture.messages:
                pub.publish_raw(message.payload, seq=int.from_bytes(message.seq, "big"), deliver=False)
            dealer.connect(pub.replay_endpoint)
            dealer.send_multipart(capture.replay_request)
            if not threaded:
                assert pub.serve_replays(timeout=POLL_MS / 1000) == 1
            replies = []
            while not replies or END_SEQ not in replies[-1]:
                replies.append(_recv(dealer))
            assert replies == capture.replay_replies


@pytest.mark.parametrize("layout", ["v26", "v25"])
def test_replay_keeps_the_last_buffer_steps_and_ignores_bad_requests(ctx, layout):
    with Publisher(LOCAL, topic="kv@p@m", replay_endpoint=LOCAL, replay_layout=layout,
                   buffer_steps=3) as pub, ctx.socket(zmq.DEALER) as dealer:
        for _ in range(5):
            pub.publish([], deliver=False)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", b"\x00" * 4])               # not an 8-byte seq: ignored
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while True:
            frames = _recv(dealer)
            seq8 = frames[-2]
            if seq8 == END_SEQ:
                break
            assert len(frames) == (4 if layout == "v26" else 3)
            seqs.append(int.from_bytes(seq8, "big"))
        assert frames == ([b"", b"", END_SEQ, b""] if layout == "v26" else [b"", END_SEQ, b""])
        assert seqs == [2, 3, 4]


def _rebuild(event, form):
    """The event through kvcm.publisher's helpers, from its decoded fields."""
    tag, f = event_fields(event)
    if tag == "BlockStored":
        return block_stored(f["block_hashes"], f["parent_block_hash"], f["token_ids"], f["block_size"],
                            lora_id=f["lora_id"], medium=f["medium"], lora_name=f["lora_name"],
                            extra_keys=f.get("extra_keys"), group_idx=f.get("group_idx"),
                            kv_cache_spec_kind=f.get("kv_cache_spec_kind"), form=form)
    if tag == "BlockRemoved":
        return block_removed(f["block_hashes"], medium=f["medium"], group_idx=f.get("group_idx"), form=form)
    return all_blocks_cleared(form=form)


def test_event_helpers_write_vllms_layouts(captures):
    forms = set()
    for capture in captures:
        for message in capture.messages:
            ts, events, rank = msgpack.unpackb(message.payload)
            form = "map" if isinstance(events[0], dict) else "array"
            forms.add(form)
            ours = encode_batch([_rebuild(e, form) for e in events], ts=ts, dp_rank=rank)
            if form == "array":
                assert ours == message.payload     # msgpack's smallest encodings, as msgspec's
            else:
                # msgspec writes map16 headers for small maps: compare the content and key order.
                decoded = msgpack.unpackb(ours)
                assert decoded == [ts, events, rank]
                assert [list(e) for e in decoded[1]] == [list(e) for e in events]
    assert forms == {"map", "array"}


def test_array_layout_has_vllm_020_lengths():
    assert len(block_stored([1], form="array")) == 10
    assert len(block_removed([1], form="array")) == 4
    assert all_blocks_cleared(form="array") == ["AllBlocksCleared"]
    with pytest.raises(ValueError):
        block_stored([1], kv_cache_spec_kind="full_attention", form="array")
    with pytest.raises(ValueError):
        block_removed([1], form="json")


def test_publishers_on_a_shared_context_close_alone_and_leave_it_open(ctx):
    with ctx.socket(zmq.SUB) as sub:
        sub.subscribe(b"")
        sub.bind("tcp://127.0.0.1:*")
        endpoint = sub.last_endpoint.decode()
        first = Publisher(endpoint, topic="a", context=ctx, replay_endpoint="tcp://127.0.0.1:*")
        second = Publisher(endpoint, topic="b", context=ctx)
        while not sub.poll(10):
            second.publish([])
        first.close()
        assert not ctx.closed
        while sub.poll(0):
            sub.recv_multipart()
        second.publish([])
        assert _recv(sub)[0] == b"b"     # the other publisher goes on
        second.close()
        assert not ctx.closed
