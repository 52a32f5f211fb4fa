"""The engine-hash -> kvcm-key map of decoupled namespaces (Index.map_engine / resolve): one or
k keys per engine hash, replacement, namespaces, argument checks, the two-generation bound,
and a differential run of kvcm._core against kvcm._reference."""

import random
from array import array

import pytest

from kvcm import _core, _reference


def entries(ix):
    return ix.stats()["engine_map_entries"]


def test_one_engine_hash_maps_to_one_key(impl):
    ix = impl.Index()
    ix.map_engine("m", [7, 8], [70, 80])
    assert ix.resolve("m", [7, 8, 7]) == [(70,), (80,), (70,)]
    assert entries(ix) == 2


@pytest.mark.parametrize("k", [2, 3, 64])
def test_one_engine_hash_maps_to_k_keys_in_order(impl, k):
    hashes = [11, 12, 13]
    keys = [1000 * (i + 1) + j for i in range(len(hashes)) for j in range(k)]
    ix = impl.Index()
    ix.map_engine("m", array("Q", hashes), tuple(keys))
    assert ix.resolve("m", hashes) == [tuple(keys[i * k:(i + 1) * k]) for i in range(3)]
    assert entries(ix) == 3 * k


def test_unknown_engine_hashes_and_namespaces_resolve_to_empty(impl):
    ix = impl.Index()
    ix.map_engine("m", [1], [10])
    assert ix.resolve("m", [2, 1, 3]) == [(), (10,), ()]
    assert ix.resolve("other", [1, 2]) == [(), ()]
    assert ix.resolve("m", []) == []
    assert entries(ix) == 1


def test_remapping_an_engine_hash_replaces_its_keys(impl):
    ix = impl.Index()
    ix.map_engine("m", [1, 2], [10, 11, 20, 21])
    ix.map_engine("m", [1], [12])
    assert ix.resolve("m", [1, 2]) == [(12,), (20, 21)]
    assert entries(ix) == 3
    ix.map_engine("m", [2], [22, 23, 24])
    assert ix.resolve("m", [2]) == [(22, 23, 24)]
    assert entries(ix) == 4


def test_a_hash_repeated_in_one_call_keeps_its_last_keys(impl):
    ix = impl.Index()
    ix.map_engine("m", [5, 6, 5], [50, 60, 55])
    assert ix.resolve("m", [5, 6]) == [(55,), (60,)]
    assert entries(ix) == 2


def test_namespaces_are_separate(impl):
    ix = impl.Index()
    ix.map_engine("m1", [1], [10])
    ix.map_engine("m2", [1], [20, 21])
    assert ix.resolve("m1", [1]) == [(10,)]
    assert ix.resolve("m2", [1]) == [(20, 21)]
    ix.map_engine("m1", [1], [11])
    assert ix.resolve("m2", [1]) == [(20, 21)]
    assert entries(ix) == 3


def test_engine_map_is_independent_of_the_block_index(impl):
    ix = impl.Index(max_blocks=2)
    ix.map_engine("m", [1, 2, 3], [10, 20, 30])
    ix.store("m", "pa", "gpu", [10, 20, 30, 40])  # evicts index blocks, not map entries
    ix.clear_pod("pa")
    assert ix.resolve("m", [1, 2, 3]) == [(10,), (20,), (30,)]
    assert len(ix) == 0


@pytest.mark.parametrize("hashes, keys", [
    ([1], []),
    ([1, 2], [10, 20, 30]),
    ([1, 2, 3], [10, 20]),
    ([], [10]),
    ([1], list(range(65))),  # more than 64 kvcm blocks per engine block
])
def test_bad_lengths_raise_value_error_and_map_nothing(impl, hashes, keys):
    ix = impl.Index()
    ix.map_engine("m", [9], [90])
    with pytest.raises(ValueError):
        ix.map_engine("m", hashes, keys)
    assert entries(ix) == 1
    assert ix.resolve("m", hashes + [9]) == [()] * len(hashes) + [(90,)]


def test_no_hashes_and_no_keys_is_a_no_op(impl):
    ix = impl.Index()
    assert ix.map_engine("m", [], []) is None
    assert entries(ix) == 0


@pytest.mark.parametrize("hashes, keys", [([-1], [1]), ([2 ** 64], [1]), ([1], [-1]), ([1], [2 ** 64])])
def test_values_outside_u64_raise_value_error(impl, hashes, keys):
    ix = impl.Index()
    with pytest.raises(ValueError):
        ix.map_engine("m", hashes, keys)
    assert entries(ix) == 0


def test_clear_namespace_drops_its_engine_map_entries_only(impl):
    ix = impl.Index()
    ix.map_engine("m1", [1, 2], [10, 11, 20, 21])
    ix.map_engine("m2", [1], [30])
    ix.store("m1", "pa", "gpu", [10])
    assert ix.clear_namespace("m1") == 1
    # cleared entries stop resolving at once but stay counted until their generation goes
    assert entries(ix) == 5
    assert ix.resolve("m1", [1, 2]) == [(), ()]
    assert ix.resolve("m2", [1]) == [(30,)]
    ix.map_engine("m1", [1], [12])
    assert ix.resolve("m1", [1]) == [(12,)]


def _mapping(n, k, ns_seed=0):
    rnd = random.Random(ns_seed)
    mapping = {}
    while len(mapping) < n:
        mapping[rnd.getrandbits(64)] = tuple(rnd.getrandbits(64) for _ in range(k))
    return mapping


def test_keys_stay_in_order_while_the_table_grows(impl):
    """Several hundred k-key entries make the young table rehash; every engine hash must
    still resolve to its keys in the order given."""
    ix = impl.Index()
    mapping = {h: (h * 10, h * 10 + 1) for h in range(385)}
    for h, keys in mapping.items():
        ix.map_engine("m", [h], keys)
    assert entries(ix) == 770
    wrong = {h: got for h, got in zip(mapping, ix.resolve("m", list(mapping))) if got != mapping[h]}
    assert wrong == {}


@pytest.mark.parametrize("k, n", [(2, 340), (3, 230)])
def test_keys_stay_in_order_after_clearing_another_namespace(impl, k, n):
    """The other namespace's k-key entries (filling the table to about 2/3, so some clusters
    wrap around its end, and growing it) keep their order through a clear."""
    for seed in range(5):
        ix = impl.Index()
        mapping = _mapping(n, k, seed)
        for h, keys in mapping.items():
            ix.map_engine("keep", [h], keys)
        for h in list(mapping)[:50]:
            ix.map_engine("drop", [h], [1])
        ix.clear_namespace("drop")
        assert entries(ix) == n * k + 50
        assert ix.resolve("drop", list(mapping)[:50]) == [()] * 50
        got = ix.resolve("keep", list(mapping))
        wrong = {h: g for h, g in zip(mapping, got) if g != mapping[h]}
        assert wrong == {}, seed


@pytest.mark.parametrize("max_blocks, gen_cap", [(10, 512), (1000, 512), (3000, 1500)])
def test_capacity_is_two_generations_of_half_max_blocks(impl, max_blocks, gen_cap):
    ix = impl.Index(max_blocks=max_blocks)
    peak = 0
    for h in range(8 * gen_cap):
        ix.map_engine("m", [h], [h + 1])
        peak = max(peak, entries(ix))
    assert peak == 2 * gen_cap
    assert gen_cap <= entries(ix) <= 2 * gen_cap
    # the newest gen_cap entries are all there, the oldest are forgotten
    newest = list(range(7 * gen_cap, 8 * gen_cap))
    assert ix.resolve("m", newest) == [(h + 1,) for h in newest]
    assert ix.resolve("m", [0, gen_cap, 2 * gen_cap]) == [(), (), ()]


def test_capacity_counts_keys_not_engine_hashes(impl):
    ix = impl.Index(max_blocks=10)  # gen_cap 512
    for h in range(2000):
        ix.map_engine("m", [h], [h, h + 1, h + 2, h + 3])
    assert entries(ix) <= 1024 + 3
    assert ix.resolve("m", [1999]) == [(1999, 2000, 2001, 2002)]
    assert ix.resolve("m", [1700]) == [()]


def test_resolved_entries_survive_while_untouched_ones_are_forgotten(impl):
    ix = impl.Index(max_blocks=10)  # gen_cap 512
    hot, cold = 2 ** 63 + 1, 2 ** 63 + 2
    ix.map_engine("m", [hot, cold], [1, 2])
    for h in range(10 * 512):
        ix.map_engine("m", [h], [h])
        if h % 200 == 0:  # fewer than gen_cap inserts between two resolves
            assert ix.resolve("m", [hot]) == [(1,)], h
    assert ix.resolve("m", [hot, cold]) == [(1,), ()]


def test_a_resolve_promotes_an_old_entry_to_the_young_generation(impl):
    ix = impl.Index(max_blocks=10)  # gen_cap 512
    ix.map_engine("m", [10 ** 6], [5])
    for h in range(600):              # one rotation: 10**6 is now in the old generation
        ix.map_engine("m", [h], [h])
    assert ix.resolve("m", [10 ** 6]) == [(5,)]
    for h in range(600, 1100):        # a second rotation drops the old generation
        ix.map_engine("m", [h], [h])
    assert ix.resolve("m", [10 ** 6, 0]) == [(5,), ()]


# ---- differential: core vs reference -----------------------------------------------------

def random_map_ops(seed, n, hash_space):
    rnd = random.Random(seed)
    ops = []
    for _ in range(n):
        r = rnd.random()
        ns = rnd.choice(("m1", "m2", "m3"))
        if r < 0.55:
            hashes = [rnd.randrange(hash_space) for _ in range(rnd.randint(1, 6))]
            k = rnd.choice((1, 1, 2, 3, 4))
            keys = [rnd.getrandbits(64) for _ in range(k * len(hashes))]
            ops.append(("map_engine", ns, rnd.choice((list, tuple))(hashes),
                        keys if rnd.random() < 0.5 else array("Q", keys)))
        elif r < 0.995:
            ops.append(("resolve", ns, [rnd.randrange(hash_space) for _ in range(rnd.randint(0, 8))]))
        else:
            ops.append(("clear_namespace", ns))
    return ops


@pytest.mark.parametrize("seed, max_blocks, hash_space", [(1, 10, 700), (2, 1500, 2000), (3, 1100, 400)])
def test_core_matches_reference_on_random_map_and_resolve(seed, max_blocks, hash_space):
    core, ref = _core.Index(max_blocks=max_blocks), _reference.Index(max_blocks=max_blocks)
    hits = 0
    for i, (name, *args) in enumerate(random_map_ops(seed, 4000, hash_space)):
        got, want = getattr(core, name)(*args), getattr(ref, name)(*args)
        assert got == want, (i, name, args)
        assert entries(core) == entries(ref), (i, name)
        hits += name == "resolve" and any(got)
    assert hits > 200
    every = list(range(hash_space))
    for ns in ("m1", "m2", "m3"):
        assert core.resolve(ns, every) == ref.resolve(ns, every)
