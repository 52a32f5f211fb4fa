"""kvcm sim's KV events on real ZMQ sockets, read with an independent msgpack reader: frames,
topics and seq, both event formats against the spec, batching per step, bind and connect
endpoints, the replay protocol in both layouts, data-parallel ports."""

import pytest

from kvcm._core import BlockHasher
from sim_harness import InProcessSim, Subscriber, dealer_replay, free_port, plain, unpack, until

MODEL = "Qwen/Qwen3-0.6B"
WORDS = " ".join("w%d" % i for i in range(40))       # 2 full blocks of 16 + 8 tokens
HASHER = BlockHasher("sha256", None, 16)


def attach(sim, sub, rank=0):
    """Resets the (empty) cache until the subscriber receives: a PUB drops what it sends
    before the connection and the subscription exist. Returns the number of messages so far."""
    client = sim.client_of(rank)

    def received():
        assert client.post("/reset_prefix_cache").status == 200
        return sub.messages()
    until(received, "the simulator's first batch")
    # resets sent while waiting may still be on their way: wait for the last one (ZMQ keeps
    # the order), so that what comes next is the test's
    last = sim.on_loop(lambda: sim.ranks[rank].events.publisher.next_seq) - 1
    until(lambda: any(int.from_bytes(m[1], "big") == last for m in sub.messages()), "the last reset's batch")
    return len(sub.received)


def batches(messages):
    """(topic, seq, [ts, events, rank]) of each message, decoded independently."""
    out = []
    for frames in messages:
        assert len(frames) == 3, frames
        topic, seq, payload = frames
        assert len(seq) == 8
        out.append((topic.decode(), int.from_bytes(seq, "big"), unpack(payload)))
    return out


@pytest.mark.parametrize("form", ["map", "array"])
def test_events_of_a_request_match_the_spec(form):
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--event-format", form, "--mode", "echo",
                      "--kv-cache-size", "3") as sim:
        start = attach(sim, sub)
        c = sim.client
        ids = c.tokens(WORDS)
        c.complete(prompt=WORDS, max_tokens=1)
        c.complete(prompt="x " * 40, max_tokens=1)       # 3 blocks: evicts the first prompt's blocks
        received = batches(sub.wait(start + 2))
        port = sim.ranks[0].port
        assert {t for t, _, _ in received} == {"kv@127.0.0.1:%d@%s" % (port, MODEL)}
        seqs = [s for _, s, _ in received]
        # 0, 1, 2, … per batch (the first ones may have gone before the subscription existed)
        assert seqs == list(range(seqs[0], seqs[0] + len(received)))
        (_, _, first), (_, _, second) = received[start:start + 2]
        assert first.header == 0x93 and isinstance(first.value[0], float) and first.value[2] == 0
        [store] = first.value[1].value
        keys = list(HASHER.keys(ids))
        other = list(HASHER.keys(c.tokens("x " * 40)))
        if form == "map":
            assert store.header == 0xDE
            assert plain(store) == {"type": "BlockStored", "block_hashes": keys, "parent_block_hash": None,
                                    "token_ids": ids[:32], "block_size": 16, "lora_id": None, "medium": "GPU",
                                    "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
                                    "kv_cache_spec_kind": "full_attention"}
            assert [plain(e) for e in second.value[1].value[:2]] == [
                {"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU", "group_idx": 0}
                for h in reversed(keys)]
            assert plain(second.value[1].value[2])["block_hashes"] == other
        else:
            assert (store.header, len(store.value)) == (0x9A, 10)
            assert plain(store) == ["BlockStored", keys, None, ids[:32], 16, None, "GPU", None, [None, None], 0]
            assert [plain(e) for e in second.value[1].value[:2]] == [["BlockRemoved", [h], "GPU", 0]
                                                                     for h in reversed(keys)]
            assert plain(second.value[1].value[2])[1] == other
        # AllBlocksCleared: 1 element (array) or only its type (map)
        cleared = received[0][2].value[1].value[0]
        assert plain(cleared) == (["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"})
    sub.close()


def test_events_of_one_step_share_a_batch():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--mode", "echo") as sim:
        start = attach(sim, sub)
        prompts = ["a%d " % i * 20 for i in range(3)]
        sim.client.complete(prompt=prompts, max_tokens=1)     # admitted together: one step
        received = batches(sub.wait(start + 1))
        [(_, _, batch)] = received[start:]
        stores = [plain(e) for e in batch.value[1].value]
        assert [s["token_ids"] for s in stores] == [sim.client.tokens(p)[:16] for p in prompts]
    sub.close()


def test_topic_pod_and_bind_mode():
    with InProcessSim("--zmq-endpoint", "tcp://127.0.0.1:*", "--pod-id", "10.0.0.7", "--topic",
                      "{model}/{pod}/x", "--model", "m") as sim:
        endpoint = sim.ranks[0].events.endpoint
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")   # bound: the port chosen
        sub = Subscriber(connect=endpoint)
        attach(sim, sub)
        assert {bytes(f[0]) for f in sub.received} == {b"m/10.0.0.7/x"}
        sub.close()
    with InProcessSim("--zmq-endpoint", "tcp://127.0.0.1:*", "--topic", "") as sim:   # vLLM's default topic
        sub = Subscriber(connect=sim.ranks[0].events.endpoint)
        attach(sim, sub)
        assert {bytes(f[0]) for f in sub.received} == {b""}
        sub.close()


@pytest.mark.parametrize("form, layout", [("map", "v26"), ("array", "v25")])
def test_replay_protocol(form, layout):
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--replay-endpoint", "tcp://127.0.0.1:*",
                      "--event-format", form) as sim:
        start = attach(sim, sub)
        for i in range(3):
            sim.client.complete(prompt="r%d " % i * 20, max_tokens=1)
        live = sub.wait(start + 3)[start - 1:]       # the last reset's batch, then the 3 requests'
        first = int.from_bytes(live[0][1], "big")
        *replayed, end = dealer_replay(sim.ranks[0].events.replay_endpoint, first)
        if layout == "v26":
            assert end == [b"", b"\xff" * 8, b""]
            assert replayed == [list(m) for m in live]              # [topic, seq, payload], as live
        else:
            assert end == [b"\xff" * 8, b""]
            assert replayed == [list(m[1:]) for m in live]          # [seq, payload]
        assert dealer_replay(sim.ranks[0].events.replay_endpoint, 10 ** 6)[0][-2:] == [b"\xff" * 8, b""]
    sub.close()


def test_data_parallel_ranks_offset_every_port():
    zmq_port, replay_port, http_port = free_port(2), free_port(2), free_port(2)
    subs = [Subscriber("tcp://127.0.0.1:%d" % (zmq_port + r)) for r in range(2)]
    with InProcessSim("--port", str(http_port), "--data-parallel-size", "2", "--zmq-endpoint",
                      "tcp://127.0.0.1:%d" % zmq_port, "--replay-endpoint", "tcp://127.0.0.1:%d" % replay_port) as sim:
        assert [r.port for r in sim.ranks] == [http_port, http_port + 1]
        for rank, sub in enumerate(subs):
            start = attach(sim, sub, rank)
            sim.client_of(rank).complete(prompt="rank%d " % rank * 20, max_tokens=1)
            topic, seq, batch = batches(sub.wait(start + 1))[-1]
            assert topic == "kv@127.0.0.1:%d@%s" % (http_port + rank, MODEL)
            assert batch.value[2] == rank                       # the rank in every batch
            assert sim.ranks[rank].events.replay_endpoint == "tcp://127.0.0.1:%d" % (replay_port + rank)
            replay = dealer_replay(sim.ranks[rank].events.replay_endpoint, seq)
            assert unpack(replay[0][2]).value[2] == rank
        # each rank has a cache of its own
        assert sim.client_of(1).complete(prompt="rank0 " * 20, max_tokens=1)["usage"]["prompt_tokens_details"][
            "cached_tokens"] == 0
    for sub in subs:
        sub.close()
