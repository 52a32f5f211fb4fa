"""kvcm sim's block pool: hits, reference counts, eviction order, capacity, decode blocks,
LoRA and salt keys, reset; and its event batches against vLLM's own wire captures, byte for
byte."""

import json

import pytest

from kvcm._core import BlockHasher
from kvcm.sim.events import as_array, encode, encode_batch
from kvcm.sim.kvcache import KVCache, Keying, Lora
from sim_harness import plain, unpack

BS = 4


def pool(capacity=16, algo="sha256", seed=None, block_size=BS, loaded_loras=None):
    return KVCache(capacity, Keying(algo, seed, block_size, "m"), loaded_loras=loaded_loras)


def keys(tokens, extra=None, block_size=BS):
    return list(BlockHasher("sha256", None, block_size).keys(tokens, extra))


def stored(events):
    return [e for e in events if e["type"] == "BlockStored"]


def removed(events):
    return [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]


def test_a_prompt_stores_its_full_blocks_once_and_hits_them_later():
    cache = pool()
    prompt = list(range(100, 114))          # 3 full blocks + 2 tokens
    alloc = cache.allocate(prompt, len(prompt))
    assert alloc.hit_tokens == 0 and cache.used == 4
    [event] = cache.take_events()
    assert event == {"type": "BlockStored", "block_hashes": keys(prompt), "parent_block_hash": None,
                     "token_ids": prompt[:12], "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None,
                     "extra_keys": [None, None, None], "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    cache.free(alloc)
    assert cache.used == 0

    again = cache.allocate(prompt, len(prompt))
    assert again.hit_tokens == 12 and cache.take_events() == []      # hits publish nothing
    cache.free(again)

    longer = prompt + list(range(500, 510))  # 6 full blocks: 3 hit, 3 new chained to block 2
    alloc = cache.allocate(longer, len(longer))
    assert alloc.hit_tokens == 12
    [event] = cache.take_events()
    assert event["block_hashes"] == keys(longer)[3:]
    assert event["parent_block_hash"] == keys(longer)[2]
    assert event["token_ids"] == longer[12:24]
    assert (cache.queries, cache.hits) == (14 + 14 + 24, 12 + 12)


def test_the_last_prompt_token_is_always_computed():
    # as vLLM: a fully cached prompt hits all but its last block, which is announced again
    cache = pool()
    prompt = list(range(8))
    cache.free(cache.allocate(prompt, 8))
    cache.take_events()
    alloc = cache.allocate(prompt, 8)
    assert alloc.hit_tokens == 4
    [event] = cache.take_events()
    assert event["block_hashes"] == keys(prompt)[1:] and event["parent_block_hash"] == keys(prompt)[0]
    cache.free(alloc)
    assert sorted(b["hash"] for b in cache.contents()) == sorted(keys(prompt))   # one entry per hash
    # evicting both copies' hash announces it once, when the last block holding it goes
    cache.take_events()
    filler = cache.allocate(list(range(1000, 1000 + 16 * BS)), 16 * BS)
    assert sorted(removed(cache.take_events())) == sorted(keys(prompt))
    cache.free(filler)


def test_shared_blocks_are_reference_counted():
    cache = pool()
    prompt = list(range(20, 33))             # 3 full blocks + 1
    a = cache.allocate(prompt, 13)
    b = cache.allocate(prompt, 13)
    assert b.hit_tokens == 12 and cache.used == 4 + 1     # b shares a's full blocks, owns its partial one
    assert {blk["hash"]: blk["ref_cnt"] for blk in cache.contents()} == {k: 2 for k in keys(prompt)}
    cache.free(a)
    assert cache.used == 4 and cache.eviction_order() == []   # still referenced by b
    cache.free(b)
    assert cache.used == 0
    assert cache.eviction_order() == list(reversed(keys(prompt)))


def test_eviction_is_lru_by_release_time_last_block_first():
    cache = pool(capacity=6)
    a, b = list(range(0, 8)), list(range(50, 58))
    alloc_a = cache.allocate(a, 8)
    alloc_b = cache.allocate(b, 8)
    cache.free(alloc_b)                      # b released first ...
    cache.free(alloc_a)                      # ... then a
    cache.take_events()
    # the two never-used blocks go first, then b's blocks (released earlier), last block first
    assert cache.eviction_order() == [keys(b)[1], keys(b)[0], keys(a)[1], keys(a)[0]]
    c = cache.allocate(list(range(900, 912)), 12)   # 3 blocks: the 2 unused + b's last
    assert removed(cache.take_events()) == [keys(b)[1]]
    cache.free(c)
    # b's first block is still cached and hit (its prefix is contiguous)
    alloc = cache.allocate(b, 8)
    assert alloc.hit_tokens == 4
    cache.free(alloc)
    # a hit moves a block out of the free queue and back to its tail when released
    assert cache.eviction_order()[-2:] == [keys(b)[1], keys(b)[0]]


def test_capacity_reservations_and_requests_that_never_fit():
    cache = pool(capacity=4)
    with pytest.raises(ValueError, match="needs 5 KV cache blocks of 4 tokens but the cache has 4"):
        cache.allocate(list(range(17)), 17)
    with pytest.raises(ValueError, match="needs 5"):
        cache.allocate(list(range(8)), 8 + 9)     # the output's blocks count too
    a = cache.allocate(list(range(6)), 6 + 5)     # 2 prompt blocks now, 1 more reserved
    assert (cache.used, cache.available) == (2, 1)
    assert cache.allocate(list(range(100, 108)), 8) is None     # 2 needed, 1 available: it waits
    b = cache.allocate(list(range(100, 104)), 4)
    assert b is not None and cache.available == 0
    cache.free(a)
    assert cache.available == 3               # the reservation is given back with the blocks
    cache.free(b)
    assert cache.available == 4


def test_output_tokens_fill_blocks_that_are_stored_as_they_fill():
    cache = pool(capacity=8)
    prompt, output = list(range(1, 7)), list(range(60, 67))     # 6 + 7 tokens: KV of 6 + 6
    alloc = cache.allocate(prompt, len(prompt) + len(output) - 1)
    [event] = cache.take_events()
    assert event["block_hashes"] == keys(prompt)               # 1 full prompt block
    assert (cache.used, alloc.reserved) == (2, 1)
    every = prompt + output[:-1]
    announced = []
    for token in output[:-1]:
        cache.append(alloc, token)
        for e in stored(cache.take_events()):
            announced.append((e["block_hashes"], e["parent_block_hash"], e["token_ids"]))
    want = keys(every)
    assert announced == [([want[1]], want[0], every[4:8]), ([want[2]], want[1], every[8:12])]
    assert (cache.used, alloc.reserved) == (3, 0)
    with pytest.raises(RuntimeError, match="outgrew"):
        for token in range(5):
            cache.append(alloc, token)
    cache.free(alloc)


def test_lora_and_cache_salt_are_hashed_tagged_and_published_untagged():
    cache = pool()
    lora = Lora(3, "sql", "/adapters/sql")
    prompt = list(range(40, 52))
    alloc = cache.allocate(prompt, 12, lora=lora, cache_salt="tenant-a")
    [event] = cache.take_events()
    tagged = [(("lora", "sql", "/adapters/sql"), ("cache_salt", "tenant-a"))] + [(("lora", "sql", "/adapters/sql"),)] * 2
    assert event["block_hashes"] == keys(prompt, tagged)
    assert (event["lora_id"], event["lora_name"]) == (3, "sql")
    assert event["extra_keys"] == [["sql", "tenant-a"], ["sql"], ["sql"]]
    cache.free(alloc)
    # the same tokens without the LoRA, or with another salt, are other blocks
    for kwargs in ({}, {"lora": lora, "cache_salt": "tenant-b"}, {"cache_salt": "tenant-a"}):
        alloc = cache.allocate(prompt, 12, **kwargs)
        assert alloc.hit_tokens == 0, kwargs
        cache.free(alloc)


def test_vllm_salt_vector(shared):
    case = next(c for c in json.loads((shared / "vectors" / "vllm_hashes.json").read_text())
                if c.get("cache_salt") and c["algo"] == "sha256")
    cache = KVCache(8, Keying("sha256", case["seed"], case["block_size"], "m"))
    cache.allocate(case["token_ids"], len(case["token_ids"]), cache_salt=case["cache_salt"])
    [event] = cache.take_events()
    assert event["block_hashes"] == case["event_ints"]
    for field, value in case["event"].items():
        assert event[field] == value, field


def test_reset_is_refused_while_blocks_are_in_use():
    cache = pool()
    alloc = cache.allocate(list(range(8)), 8)
    cache.take_events()
    assert not cache.reset() and cache.take_events() == [] and len(cache.contents()) == 2
    cache.free(alloc)
    assert cache.reset()
    assert cache.take_events() == [{"type": "AllBlocksCleared"}]
    assert cache.contents() == [] and cache.eviction_order() == []
    assert cache.allocate(list(range(8)), 8).hit_tokens == 0


def test_array_form_is_vllm_020s_layout():
    cache = pool(capacity=2)
    cache.free(cache.allocate(list(range(8)), 8))
    cache.allocate(list(range(70, 74)), 4)
    alloc = cache.allocate(list(range(80, 84)), 4)
    cache.free(alloc)
    assert cache.reset() is False
    events = cache.take_events()
    batch = unpack(encode(events, "array", ts=1.5, dp_rank=3))
    assert batch.header == 0x93 and plain(batch)[0] == 1.5 and plain(batch)[2] == 3
    shapes = [(e.header, len(e.value)) for e in batch.value[1].value]
    # store, then two requests that each evict one block and store one: BlockStored has 10
    # elements, BlockRemoved 4
    assert shapes == [(0x9A, 10), (0x94, 4), (0x9A, 10), (0x94, 4), (0x9A, 10)]
    first = plain(batch)[1][0]
    assert first == ["BlockStored", keys(range(8)), None, list(range(8)), BS, None, "GPU", None, [None, None], 0]
    assert plain(batch)[1][1] == ["BlockRemoved", [keys(range(8))[1]], "GPU", 0]     # last block first
    assert plain(batch)[1][3] == ["BlockRemoved", [keys(range(8))[0]], "GPU", 0]
    cleared = unpack(encode_batch([["AllBlocksCleared"]], ts=0.0))
    assert cleared.value[1].value[0].header == 0x91


def test_map_form_headers_are_msgspecs():
    cache = pool(capacity=2)
    cache.free(cache.allocate(list(range(8)), 8))
    cache.allocate(list(range(70, 74)), 4)
    events = cache.take_events()
    batch = unpack(encode_batch(events + [{"type": "AllBlocksCleared"}], ts=2.0))
    headers = [e.header for e in batch.value[1].value]
    assert headers == [0xDE, 0x84, 0xDE, 0x81]   # BlockStored map16 (16 declared fields), the others fixmaps
    assert [k for k, _ in batch.value[1].value[0].value] == [
        "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
        "extra_keys", "group_idx", "kv_cache_spec_kind"]


# -- vLLM's wire captures -------------------------------------------------------------------------

def _stream(shared, name):
    manifest = json.loads((shared / "vectors" / "vllm_events" / "MANIFEST.json").read_text())
    stream = next(s for s in manifest["streams"] if s["dir"] == name)
    payloads = [(shared / "vectors" / "vllm_events" / m["files"].replace("{topic,seq,payload}", "payload")).read_bytes()
                for m in stream["messages"]]
    return stream, payloads


def _replay_scenario(stream):
    """The capture's scenario through the simulator's pool: one batch of events per step."""
    config = stream["hash_config"]
    cache = KVCache(11, Keying(config["algo"], config["seed"], config["block_size"], "m"))
    batches = []
    for step in stream["input"]:
        if step["op"] == "reset":
            assert cache.reset()
        else:
            tokens = list(range(*step["range"]))
            lora = Lora(step["lora"][1], step["lora"][0], step["lora"][2]) if "lora" in step else None
            cache.free(cache.allocate(tokens, len(tokens), lora=lora, cache_salt=step.get("cache_salt")))
        batches.append(cache.take_events())
    return batches


def test_map_batches_equal_vllm_033s_bytes(shared):
    stream, payloads = _stream(shared, "v0.33.0/scenario")
    batches = _replay_scenario(stream)
    ts = [m["ts"] for m in stream["messages"]]
    # steps 0, 1, 3 (LoRA), 5 (reset) and 6: the same pool operations give the same bytes
    for step in (0, 1, 3, 5, 6):
        assert encode_batch(batches[step], ts=ts[step]) == payloads[step], step
    # step 2 asked vLLM for kv_cache_report_mode=full (a re-announce the simulator does not do)
    assert batches[2] == []
    # step 4: the capture script allocated one block fewer than a 100-token prompt takes, so it
    # evicted one block fewer; the salted store and the evictions it shares are identical
    capture = plain(unpack(payloads[4]))[1]
    assert stored(batches[4]) == stored(capture)
    assert removed(batches[4])[:3] == removed(capture)
    assert encode_batch(capture, ts=ts[4]) == payloads[4]


def test_array_batches_equal_vllm_020s_bytes(shared):
    stream, payloads = _stream(shared, "v0.20.0/scenario")
    batches = [[as_array(e) for e in b] for b in _replay_scenario(stream) if b]   # 0.20 sent nothing for step 2
    ts = [m["ts"] for m in stream["messages"]]
    for seq in (0, 1, 4, 5):
        assert encode_batch(batches[seq], ts=ts[seq]) == payloads[seq], seq
    # seq 3: the same four LRU evictions, in vLLM's order, then the store
    capture = plain(unpack(payloads[3]))[1]
    assert [e[:2] for e in batches[3] if e[0] == "BlockRemoved"] == [e[:2] for e in capture if e[0] == "BlockRemoved"]
    # LoRA and salt were hashed untagged by 0.20; the layout is the same, byte for byte
    for seq in (2, 3):
        assert encode_batch(plain(unpack(payloads[seq]))[1], ts=ts[seq]) == payloads[seq]
    for ours, theirs in zip(batches[2] + batches[3], plain(unpack(payloads[2]))[1] + capture):
        assert len(ours) == len(theirs) and ours[0] == theirs[0]
        if ours[0] == "BlockStored":
            assert ours[2:] == theirs[2:]      # all but the (differently hashed) block hashes


def test_discard_forgets_everything_and_disables_until_activated():
    cache = pool(capacity=8)
    held = cache.allocate(list(range(6)), 6 + 4)           # 2 prompt blocks, 1 reserved
    cache.take_events()
    cache.discard()
    assert cache.take_events() == [{"type": "AllBlocksCleared"}] and cache.contents() == []
    assert not cache.enabled and cache.used == 2            # the running request keeps its blocks ...
    for token in (6, 7, 8):
        cache.append(held, token)                           # ... but names none of them any more
    assert cache.take_events() == [] and cache.contents() == [] and cache.used == 3
    detached = cache.allocate(list(range(6)), 6)            # asleep: nothing cached, held or announced
    assert detached.hit_tokens == 0 and cache.used == 3 and cache.take_events() == []
    cache.append(detached, 1)
    cache.free(detached)
    cache.free(held)
    assert cache.used == 0 and cache.queries == 6
    cache.activate()
    cache.free(cache.allocate(list(range(8)), 8))
    assert cache.allocate(list(range(8)), 8).hit_tokens == 4


def test_unloaded_adapters_are_evicted_first():
    loaded = {"b"}
    cache = pool(capacity=4, loaded_loras=loaded)
    a, b = Lora(1, "a", "/a"), Lora(2, "b", "/b")
    cache.free(cache.allocate(list(range(4)), 4, lora=b))    # b's block, released first
    cache.free(cache.allocate(list(range(4)), 4, lora=a))    # a's block (another hash: another LoRA)
    cache.free(cache.allocate(list(range(10, 14)), 4))       # a base block, released last
    cache.take_events()
    order = cache.eviction_order()
    by_lora = {blk["hash"]: blk["lora_name"] for blk in cache.contents()}
    assert [by_lora[h] for h in order] == ["a", "b", None]   # a is not loaded: first, whatever its age
    cache.allocate(list(range(20, 28)), 8)                   # the free empty block, then one eviction
    assert [by_lora[h] for h in removed(cache.take_events())] == ["a"]
    loaded.add("a")                                          # loaded again: plain LRU
    assert [by_lora[h] for h in cache.eviction_order()] == ["b", None]


def test_llmd_keying_uses_the_served_name_or_the_lora():
    spec = [9540012594951042066, 16921089685996993662]      # specs/llmd-request-keys.md, seed ""
    cache = KVCache(8, Keying("llmd_fnv64a", None, 16, "base/model", "test-model"))
    cache.free(cache.allocate(list(range(1, 33)), 32))
    [event] = cache.take_events()
    assert event["block_hashes"] == spec and event["extra_keys"] == [None, None]
    cache.allocate(list(range(1, 33)), 32, lora=Lora(1, "test-model-lora", "/p"), cache_salt="ignored")
    [event] = cache.take_events()
    assert event["block_hashes"] == list(BlockHasher("llmd_fnv64a", "", 16, namespace="test-model-lora").keys(
        list(range(1, 33))))
