"""The LongestPrefix scorer with tier weights (DESIGN §3), against both implementations."""

import math

import pytest

KEYS = [1001, 1002, 1003, 1004, 1005, 1006]
ISSUE_WEIGHTS = {"gpu": 1.0, "cpu": 0.5}


def build(impl, holders, max_blocks=1000, ns="m"):
    """holders: {key: [(pod, tier), ...]}, stored in key order."""
    ix = impl.Index(max_blocks=max_blocks)
    for key, entries in holders.items():
        for pod, tier in entries:
            ix.store(ns, pod, tier, [key])
    return ix


def issue_index(impl, block_1003):
    return build(impl, {
        1001: [("pod-a", "gpu")],
        1002: [("pod-a", "gpu")],
        1003: block_1003,
        1004: [("pod-b", "cpu")],
        1005: [("pod-b", "cpu")],
        1006: [("pod-a", "gpu")],
    })


@pytest.mark.parametrize("block_1003, score, tiers", [
    ([("pod-a", "gpu"), ("pod-a", "cpu")], 3.0, {"gpu": 3, "cpu": 1}),
    ([("pod-a", "cpu")], 2.5, {"gpu": 2, "cpu": 1}),
])
def test_issue_example(impl, block_1003, score, tiers):
    ix = issue_index(impl, block_1003)
    scorer = impl.Scorer(ISSUE_WEIGHTS)
    assert scorer.score(ix, "m", KEYS) == {"pod-a": score}
    assert scorer.score_detailed(ix, "m", KEYS) == {"pod-a": (score, 3, tiers)}
    assert ix.lookup_prefix("m", KEYS) == {"pod-a": (3, tiers)}


def test_default_weights_are_gpu_1_and_cpu_0_8(impl):
    scorer = impl.Scorer()
    assert scorer.weights == {"gpu": 1.0, "cpu": 0.8}
    assert scorer.default_weight == 1.0
    ix = build(impl, {1: [("pa", "cpu"), ("pb", "gpu")], 2: [("pa", "cpu"), ("pb", "gpu")]})
    got = scorer.score(ix, "m", [1, 2])
    assert got["pa"] == pytest.approx(1.6)
    assert got["pb"] == 2.0


@pytest.mark.parametrize("kwargs, per_block", [
    ({}, 1.0),
    ({"default_weight": 0.25}, 0.25),
    ({"default_weight": 0.0}, 0.0),
])
def test_unknown_tier_weighs_default_weight(impl, kwargs, per_block):
    ix = build(impl, {1: [("pa", "storage")], 2: [("pa", "storage")], 3: [("pa", "gpu")]})
    scorer = impl.Scorer(ISSUE_WEIGHTS, **kwargs)
    assert scorer.score_detailed(ix, "m", [1, 2, 3]) == {
        "pa": (2 * per_block + 1.0, 3, {"storage": 2, "gpu": 1})}


@pytest.mark.parametrize("weights, expected", [
    ({"gpu": 1.0, "cpu": 0.5}, 1.0),
    ({"gpu": 0.5, "cpu": 2.0}, 2.0),   # the best tier wins, whichever it is
    ({"gpu": 0.0, "cpu": 0.0}, 0.0),   # zero weights still return the pod
])
def test_a_block_held_in_two_tiers_scores_its_best_weight_and_counts_in_both(impl, weights, expected):
    ix = build(impl, {1: [("pa", "gpu"), ("pa", "cpu")]})
    assert impl.Scorer(weights).score_detailed(ix, "m", [1]) == {
        "pa": (expected, 1, {"gpu": 1, "cpu": 1})}


def test_each_pod_stops_at_its_first_missing_block_while_others_continue(impl):
    ix = build(impl, {
        1: [("pa", "gpu"), ("pb", "gpu"), ("pc", "cpu")],
        2: [("pa", "gpu"), ("pb", "cpu")],
        3: [("pa", "gpu"), ("pc", "cpu")],   # pc missed block 2: its run is over
        4: [("pa", "cpu"), ("pb", "gpu")],   # pb missed block 3
    })
    scorer = impl.Scorer(ISSUE_WEIGHTS)
    assert scorer.score_detailed(ix, "m", [1, 2, 3, 4]) == {
        "pa": (3.5, 4, {"gpu": 3, "cpu": 1}),
        "pb": (1.5, 2, {"gpu": 1, "cpu": 1}),
        "pc": (0.5, 1, {"cpu": 1}),
    }


def test_pods_absent_from_block_0_are_never_returned(impl):
    ix = build(impl, {
        1: [("pa", "gpu")],
        2: [("pa", "gpu"), ("late", "gpu")],
        3: [("pa", "gpu"), ("late", "gpu")],
    })
    scorer = impl.Scorer()
    assert scorer.score(ix, "m", [1, 2, 3]) == {"pa": 3.0}
    assert scorer.score(ix, "m", [1, 2, 3], pods=["late"]) == {}
    assert scorer.score(ix, "m", [2, 3]) == {"pa": 2.0, "late": 2.0}  # from its own block 0


def test_the_walk_stops_at_the_first_block_no_candidate_holds(impl):
    # Stored oldest first: 3 (pa), 2 (pb), 1 (pa). A lookup of [1, 2, 3] matches pa on 1 only;
    # the walk must stop at 2 (no candidate holds it) and leave 2 and 3 untouched.
    ix = build(impl, {3: [("pa", "gpu")], 2: [("pb", "gpu")], 1: [("pa", "gpu")]}, max_blocks=3)
    assert impl.Scorer().score_detailed(ix, "m", [1, 2, 3]) == {"pa": (1.0, 1, {"gpu": 1})}
    ix.store("m", "pc", "gpu", [4])
    assert ix.lookup_prefix("m", [3]) == {}
    assert ix.lookup_prefix("m", [2]) == {"pb": (1, {"gpu": 1})}
    assert ix.lookup_prefix("m", [1]) == {"pa": (1, {"gpu": 1})}


@pytest.mark.parametrize("pods, expected", [
    (None, {"pa": 3.0, "pb": 2.0}),
    (["pb"], {"pb": 2.0}),
    (("pa", "ghost"), {"pa": 3.0}),       # unknown names are ignored
    ({"ghost", "other"}, {}),
    ([], {}),
])
def test_pods_filter(impl, pods, expected):
    ix = build(impl, {1: [("pa", "gpu"), ("pb", "gpu")], 2: [("pa", "gpu"), ("pb", "gpu")],
                      3: [("pa", "gpu")]})
    assert impl.Scorer().score(ix, "m", [1, 2, 3], pods=pods) == expected
    assert set(ix.lookup_prefix("m", [1, 2, 3], pods=pods)) == set(expected)


def test_a_filtered_pod_runs_as_long_as_it_holds_blocks(impl):
    ix = build(impl, {1: [("pa", "gpu"), ("pb", "gpu")], 2: [("pb", "gpu")], 3: [("pb", "gpu")]})
    assert impl.Scorer().score(ix, "m", [1, 2, 3], pods=["pb"]) == {"pb": 3.0}
    assert impl.Scorer().score(ix, "m", [1, 2, 3], pods=["pa"]) == {"pa": 1.0}


def test_unknown_namespace_and_empty_keys_score_nothing(impl):
    ix = build(impl, {1: [("pa", "gpu")]})
    scorer = impl.Scorer()
    assert scorer.score(ix, "other", [1]) == {}
    assert scorer.score_detailed(ix, "other", [1]) == {}
    assert scorer.score(ix, "m", []) == {}
    assert scorer.score(ix, "m", [2, 1]) == {}


@pytest.mark.parametrize("weights", [
    {"gpu": -1.0},
    {"gpu": 1.0, "cpu": -0.001},
    {"gpu": math.nan},
    {1: 1.0},
])
def test_bad_tier_weights_are_rejected(impl, weights):
    with pytest.raises(ValueError):
        impl.Scorer(weights)


def test_scoring_is_a_lookup_hit_that_refreshes_recency(impl):
    ix = build(impl, {1: [("pa", "gpu")], 2: [("pa", "gpu")], 3: [("pa", "gpu")]}, max_blocks=3)
    scorer = impl.Scorer()
    assert scorer.score(ix, "m", [1]) == {"pa": 1.0}           # 1 becomes the newest
    assert scorer.score_detailed(ix, "m", [2, 9]) == {"pa": (1.0, 1, {"gpu": 1})}  # then 2
    ix.store("m", "pa", "gpu", [4])                             # evicts 3, the oldest
    assert ix.stats()["evictions"] == 1
    assert ix.lookup_prefix("m", [3]) == {}
    assert ix.lookup_prefix("m", [1, 2]) == {"pa": (2, {"gpu": 2})}


def test_one_scorer_serves_indexes_with_different_tier_orders(impl):
    # Tier ids are per index; a scorer must not carry one index's tier numbering to another.
    first = build(impl, {1: [("pa", "gpu"), ("pb", "cpu")]})
    second = build(impl, {1: [("pb", "cpu"), ("pa", "gpu")]})
    scorer = impl.Scorer(ISSUE_WEIGHTS)
    for ix in (first, second, first, second):
        assert scorer.score(ix, "m", [1]) == {"pa": 1.0, "pb": 0.5}


def test_a_tier_first_seen_after_scoring_gets_its_weight(impl):
    ix = build(impl, {1: [("pa", "gpu")]})
    scorer = impl.Scorer({"gpu": 1.0, "ssd": 0.25}, default_weight=0.5)
    assert scorer.score(ix, "m", [1]) == {"pa": 1.0}
    ix.store("m", "pb", "ssd", [1])
    ix.store("m", "pc", "tape", [1])
    assert scorer.score(ix, "m", [1]) == {"pa": 1.0, "pb": 0.25, "pc": 0.5}
