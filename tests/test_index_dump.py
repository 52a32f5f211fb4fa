"""Dump and load of the index (the body of a snapshot): a round trip keeps entries, tiers,
namespaces, LRU order and the engine map; a dump taken in slices while the index changes,
plus a replay of the changes made since it began, gives the index that never stopped; a
malformed dump loads nothing. Against kvcm._core and kvcm._reference, and across them."""

import random

import pytest

from kvcm import _core, _reference

PODS = ["pa", "pb", "pc", "p-wide"]
TIERS = ["gpu", "cpu", "disk"]
NAMESPACES = ["m1", "m2", "lora-x"]


def random_ops(rng, n, keyspace=400):
    ops = []
    for _ in range(n):
        r = rng.random()
        ns, pod, tier = rng.choice(NAMESPACES), rng.choice(PODS), rng.choice(TIERS)
        keys = [rng.randrange(keyspace) for _ in range(rng.randrange(1, 12))]
        if r < 0.65:
            ops.append(("store", ns, pod, tier, keys))
        elif r < 0.95:
            ops.append(("remove", ns, pod, tier, keys))
        else:
            ops.append(("clear_pod", pod))
    return ops


def apply(ix, ops):
    for op, *args in ops:
        getattr(ix, op)(*args)


def dump_all(ix, max_items=7):
    dump, chunks = ix.dump(), []
    while (chunk := dump.next(max_items)) is not None:
        chunks.append(chunk)
    return dump.tables(), chunks


def picture(ix, keyspace=400):
    """Everything observable: per-pod counts and, per namespace and key, who holds it in
    which tier (the lookups touch recency, the same way on both sides of a comparison)."""
    stats = ix.stats()
    held = {}
    for ns in NAMESPACES:
        for key in range(keyspace):
            found = ix.lookup_prefix(ns, [key])
            if found:
                held[ns, key] = found
    return stats["blocks"], stats["entries"], stats["pods"], held


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_keeps_every_entry(impl, seed):
    ix = impl.Index(100_000)
    apply(ix, random_ops(random.Random(seed), 600))
    tables, chunks = dump_all(ix)
    loaded = impl.Index(100_000)
    loaded.load(tables, chunks)
    assert picture(loaded) == picture(ix)


def test_round_trip_keeps_lru_order(impl):
    """At capacity, the loaded index evicts the same blocks in the same order as the one it
    was dumped from."""
    rng = random.Random(7)
    ix = impl.Index(50)
    for _ in range(300):
        ix.store(rng.choice(NAMESPACES), rng.choice(PODS), "gpu", [rng.randrange(120)])
    for _ in range(40):   # lookup hits refresh recency too
        ix.lookup_prefix(rng.choice(NAMESPACES), [rng.randrange(120)])
    tables, chunks = dump_all(ix, max_items=3)
    loaded = impl.Index(50)
    loaded.load(tables, chunks)
    for step in range(60):
        for index in (ix, loaded):
            index.store("fresh", "pz", "gpu", [1000 + step])
        survivors = [{(ns, k) for ns in NAMESPACES for k in range(120) if index.lookup_prefix(ns, [k])}
                     for index in (ix, loaded)]
        assert survivors[0] == survivors[1], step


@pytest.mark.parametrize("source,target", [(_core, _reference), (_reference, _core)])
def test_a_dump_loads_into_the_other_implementation(source, target):
    ix = source.Index(100_000)
    apply(ix, random_ops(random.Random(11), 500))
    tables, chunks = dump_all(ix, max_items=5)
    loaded = target.Index(100_000)
    loaded.load(tables, chunks)
    assert picture(loaded) == picture(ix)


@pytest.mark.parametrize("seed", range(6))
def test_a_dump_while_the_index_changes_plus_replay_is_the_truth(seed):
    """The snapshot's promise: the index keeps changing between slices; loading the dump and
    re-applying every change made since the dump began gives what the live index holds."""
    rng = random.Random(seed)
    ix = _core.Index(100_000)
    apply(ix, random_ops(rng, 800))
    dump, chunks, since = ix.dump(), [], []
    while True:
        chunk = dump.next(rng.randrange(1, 20))
        if chunk is None:
            break
        chunks.append(chunk)
        ops = random_ops(rng, rng.randrange(0, 6))
        for op in ops:   # lookups move blocks in the LRU list under the cursor as well
            ix.lookup_prefix(rng.choice(NAMESPACES), [rng.randrange(400)])
        apply(ix, ops)
        since.extend(ops)
    tables = dump.tables()
    loaded = _core.Index(100_000)
    loaded.load(tables, chunks)
    apply(loaded, since)
    assert picture(loaded) == picture(ix)


def test_the_engine_map_survives_and_a_reshaped_map_restarts_its_pass(impl):
    ix = impl.Index(2000)
    for i in range(370):   # 740 entries: the young table doubles at 768
        ix.map_engine("m1", [10_000 + i], [i, i + 1])
    ix.map_engine("m2", [5], [50])
    ix.clear_namespace("m2")   # a new salt: its old entry must stay unreachable
    ix.map_engine("m2", [6], [60])
    dump, chunks, since = ix.dump(), [], 0
    while (chunk := dump.next(16)) is not None:
        chunks.append(chunk)
        if since < 700:   # enough new entries to grow and rotate the young table mid-dump
            ix.map_engine("m1", [20_000 + since], [since])
            since += 1
    loaded = impl.Index(2000)
    loaded.load(dump.tables(), chunks)
    for i in range(since):
        loaded.map_engine("m1", [20_000 + i], [i])
    probes = [10_000 + i for i in range(370)] + [20_000 + i for i in range(since)]
    assert loaded.resolve("m1", probes) == ix.resolve("m1", probes)
    assert loaded.resolve("m2", [5, 6]) == ix.resolve("m2", [5, 6]) == [(), (60,)]
    if impl is _core:
        assert any(kind == _core.DUMP_EMAP_RESET for kind, _ in chunks)


def good_dump(impl):
    ix = impl.Index(1000)
    ix.store("m1", "pa", "gpu", [1, 2, 3])
    ix.store("m1", "pb", "cpu", [1])
    return dump_all(ix)


@pytest.mark.parametrize("damage", ["truncated", "pod_id", "tier_id", "kind", "names"])
def test_a_malformed_dump_loads_nothing(impl, damage):
    tables, chunks = good_dump(impl)
    kind, data = chunks[-1]
    if damage == "truncated":
        chunks[-1] = (kind, data[:-3])
    elif damage == "pod_id":
        chunks[-1] = (kind, data[:-4] + (77 << 4).to_bytes(4, "little"))
    elif damage == "tier_id":
        chunks[-1] = (kind, data[:-4] + (9).to_bytes(4, "little"))
    elif damage == "kind":
        chunks.append((99, b"x"))
    elif damage == "names":
        tables = dict(tables, pods="pa")
    loaded = impl.Index(1000)
    with pytest.raises(ValueError):
        loaded.load(tables, chunks)
    assert loaded.stats()["entries"] == 0 and len(loaded) == 0
    loaded.load(*good_dump(impl))   # and it is usable: empty, not half-loaded
    assert loaded.lookup_prefix("m1", [1, 2, 3]) == {"pa": (3, {"gpu": 3}), "pb": (1, {"cpu": 1})}


def test_load_refuses_a_non_empty_index(impl):
    ix = impl.Index(1000)
    ix.store("m9", "p", "gpu", [5])
    with pytest.raises(ValueError):
        ix.load(*good_dump(impl))


def test_released_names_abort_a_dump_and_one_dump_runs_at_a_time():
    ix = _core.Index(1000)
    ix.store("m1", "pa", "gpu", list(range(50)))
    ix.store("m2", "pa", "gpu", [1])
    dump = ix.dump()
    with pytest.raises(_core.DumpAborted):
        ix.dump()
    assert dump.next(5)[0] == _core.DUMP_BLOCKS
    ix.forget_namespaces(["m2"])   # its id could go to another name mid-dump
    with pytest.raises(_core.DumpAborted):
        dump.next(5)
    again = ix.dump()   # the aborted one let the index go
    assert again.next(100) is not None
