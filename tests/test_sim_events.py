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


# -- llm-d's formats, keys and batching --------------------------------------------------------------

def _raw_events(payload):
    """The events of a batch as (header byte, decoded value) with every integer's msgpack type
    byte, read from the bytes (so fixed-width encodings are checked)."""
    batch = unpack(payload)
    return batch, [plain(e) for e in batch.value[1].value]


def test_go_array_format_is_llmds_simulators():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--event-format", "go-array", "--mode", "echo",
                      "--kv-cache-size", "3", "--replay-endpoint", "tcp://127.0.0.1:*") as sim:
        start = attach(sim, sub)
        ids = sim.client.tokens(WORDS)
        sim.client.complete(prompt=WORDS, max_tokens=1)
        sim.client.complete(prompt="x " * 40, max_tokens=1)       # evicts the first prompt's blocks
        received = sub.wait(start + 2)
        keys = list(HASHER.keys(ids))
        store_batch, evict_batch = received[start][2], received[start + 1][2]
        batch, [store] = _raw_events(store_batch)
        assert batch.header == 0x93 and plain(batch)[2] == 0
        # 9 fields; no parent is 0; no LoRA id/name, medium GPU, extra keys nil
        assert store == ["BlockStored", keys, 0, ids[:32], 16, None, "GPU", None, None]
        # hashes and the parent as 9-byte uint64, tokens as 5-byte uint32 (Go's msgpack encoder)
        expected = (b"\x99\xabBlockStored\x92" + b"".join(b"\xcf" + k.to_bytes(8, "big") for k in keys) +
                    b"\xcf" + bytes(8) + b"\xdc\x00\x20" + b"".join(b"\xce" + t.to_bytes(4, "big") for t in ids[:32]) +
                    b"\x10\xc0\xa3GPU\xc0\xc0")
        assert expected in store_batch
        _, evicted = _raw_events(evict_batch)
        assert evicted[:2] == [["BlockRemoved", [h], "GPU"] for h in reversed(keys)]
        assert b"\x93\xacBlockRemoved\x91\xcf" + keys[1].to_bytes(8, "big") + b"\xa3GPU" in evict_batch
        *replayed, end = dealer_replay(sim.ranks[0].events.replay_endpoint, int.from_bytes(received[start][1], "big"))
        assert end == [b"", b"\xff" * 8, b""] and replayed[0] == list(received[start])   # llm-d's [topic, seq, payload]
        cleared = plain(unpack(received[0][2]))[1]
        assert cleared == [["AllBlocksCleared"]]
    sub.close()


def test_llmd_keys_match_the_spec_vectors():
    # specs/llmd-request-keys.md: tokens 1..32, block size 16, model "test-model"
    vectors = {"": [9540012594951042066, 16921089685996993662], "42": [3239622172847516705, 18365376266021390534]}
    for seed, keys in vectors.items():
        sub = Subscriber()
        with InProcessSim("--zmq-endpoint", sub.endpoint, "--hash-algo", "llmd_fnv64a", "--model", "base/model",
                          "--served-model-name", "test-model", "--mode", "echo",
                          *(["--hash-seed", seed] if seed else [])) as sim:
            start = attach(sim, sub)
            sim.client.complete(prompt=list(range(1, 33)), max_tokens=1)
            [store] = plain(unpack(sub.wait(start + 1)[start][2]))[1]
            assert store["block_hashes"] == keys and store["parent_block_hash"] is None, seed
            assert store["extra_keys"] == [None, None]
            # the topic carries --model, the keys the served name (llm-d's quirk)
            assert sub.received[start][0].decode().endswith("@base/model")
        sub.close()


def test_llmd_keys_of_a_lora_are_salted_with_its_name():
    from kvcm._core import BlockHasher as Hasher

    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--hash-algo", "llmd_fnv64a", "--mode", "echo",
                      "--lora-modules", "sql=/sql", "--served-model-name", "served") as sim:
        start = attach(sim, sub)
        tokens = list(range(100, 132))
        sim.client.complete(model="sql", prompt=tokens, max_tokens=1)
        sim.client.complete(prompt=tokens, max_tokens=1)
        lora_store, base_store = (plain(unpack(m[2]))[1][0] for m in sub.wait(start + 2)[start:start + 2])
        assert lora_store["block_hashes"] == list(Hasher("llmd_fnv64a", None, 16, namespace="sql").keys(tokens))
        assert (lora_store["lora_name"], lora_store["extra_keys"]) == ("sql", [None, None])
        assert base_store["block_hashes"] == list(Hasher("llmd_fnv64a", None, 16, namespace="served").keys(tokens))
    sub.close()


def test_event_batch_size_and_the_flush_timer():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--event-batch-size", "3", "--mode", "echo",
                      "--block-size", "4") as sim:
        attach(sim, sub)
        # the resets' AllBlocksCleared events are sent 3 at a time: wait until the timer sent the
        # rest and the subscriber has it
        until(lambda: not sim.on_loop(lambda: sim.ranks[0].batcher._waiting), "the resets' events to be sent")
        last = sim.on_loop(lambda: sim.ranks[0].events.publisher.next_seq) - 1
        until(lambda: any(int.from_bytes(m[1], "big") == last for m in sub.messages()), "the resets' last batch")
        start = len(sub.received)
        # 5 prompts admitted together: 5 BlockStored in one step, sent as 3, then 2 after the timer
        sim.client.complete(prompt=["p%d q r s t" % i for i in range(5)], max_tokens=1)
        first, second = (plain(unpack(m[2]))[1] for m in sub.wait(start + 2)[start:start + 2])
        assert (len(first), len(second)) == (3, 2)
        assert [e["token_ids"] for e in first + second] == [sim.client.tokens("p%d q r s t" % i)[:4]
                                                            for i in range(5)]
    sub.close()


def test_replay_queue_size():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--kv-events-replay-endpoint", "tcp://127.0.0.1:*",
                      "--kv-events-replay-queue-size", "2") as sim:
        start = attach(sim, sub)
        for i in range(4):
            sim.client.complete(prompt="r%d " % i * 20, max_tokens=1)
        live = sub.wait(start + 4)
        *replayed, _ = dealer_replay(sim.ranks[0].events.replay_endpoint, 0)
        assert replayed == [list(m) for m in live[-2:]]            # only the last 2 batches are kept
    sub.close()


def test_data_parallel_rank_runs_one_rank():
    zmq_port, http_port = free_port(3), free_port()
    sub = Subscriber("tcp://127.0.0.1:%d" % (zmq_port + 2))
    with InProcessSim("--port", str(http_port), "--data-parallel-rank", "2", "--data-parallel-size", "4",
                      "--zmq-endpoint", "tcp://127.0.0.1:%d" % zmq_port, environ={"POD_IP": "10.9.8.7"}) as sim:
        assert [r.port for r in sim.ranks] == [http_port] and sim.ranks[0].index == 2   # the HTTP port is not offset
        start = attach(sim, sub)
        sim.client.complete(prompt="rank " * 20, max_tokens=1)
        topic, _, batch = batches(sub.wait(start + 1))[-1]
        assert batch.value[2] == 2 and topic == "kv@10.9.8.7:%d@%s" % (http_port, MODEL)
        assert sim.client.ok("GET", "/query") == {"2": {"engine_id": sim.ranks[0].engine_id}}
    sub.close()


def test_no_events_without_the_kv_cache():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--enable-kvcache=false") as sim:
        assert sim.ranks[0].events is None
        sim.client.post("/reset_prefix_cache")
        sim.client.complete(prompt=WORDS, max_tokens=1)
        assert sim.on_loop(lambda: sim.ranks[0].cache.take_events()) == []
    sub.close()
