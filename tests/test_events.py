"""Event decoding and apply (kvcm._core.EventSink) against the real Index, in-process:
every vLLM capture, hash modes, set semantics, block sizes, decoupled chains, both event
encodings, and malformed input (DESIGN.md §2 and §4, specs/vllm-kv-events.md)."""

import collections
import struct
import subprocess
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captures import event_fields, hash_value, load_captures
from eventgen import Raw, batch, mutate, pack, raw_str, sint, uint
from kvcm._core import COUNTER_NAMES, HASH_MODES, BlockHasher, DecodeError, EventSink, Index, StreamContext
from kvcm.publisher import all_blocks_cleared, block_removed, block_stored, encode_batch

MODEL = "Qwen/Qwen3-0.6B"
POD = "pod-a"
BS = 16
PROMPT = list(range(64))     # 4 blocks
OTHER = list(range(100, 132))  # 2 blocks
STREAMS = ("v0.33.0/scenario", "v0.33.0/offload_events", "v0.33.0/bytes_hashes",
           "v0.20.0/scenario", "v0.20.0/offload_events")
SCENARIOS = ("v0.33.0/scenario", "v0.20.0/scenario")
PROBLEM_COUNTERS = tuple(n for n in COUNTER_NAMES if n.startswith("drop_")) + (
    "offload_unresolved", "remove_unresolved", "events_unknown_tag")


def vllm_keys(tokens, algo="sha256", seed=None, salt=None):
    """The event hashes vLLM >= 0.31 publishes for a prompt (seed None = unset)."""
    extra = None if salt is None else [(("cache_salt", salt),)]
    return list(BlockHasher(algo, seed, BS).keys(tokens, extra))


def seed_flag(seed):
    return "(unset)" if seed is None else repr(seed)


class Rig:
    """One engine stream (pod, model) into a fresh Index through an EventSink."""

    def __init__(self, hash_mode="auto", seed=None, algo="sha256", model=MODEL, pod=POD):
        self.ix = Index()
        self.warnings = []
        self.sink = EventSink(self.ix, BS, algo, seed, hash_mode, warn=self.warnings.append)
        self.ctx = StreamContext(pod, model)
        self.model, self.pod = model, pod

    def apply(self, *events):
        return self.sink.apply(self.ctx, encode_batch(events, ts=1.0))

    def raw(self, payload):
        return self.sink.apply(self.ctx, payload)

    def count(self, name):
        return self.sink.counters[name]

    def problems(self):
        return {n: v for n, v in self.sink.counters.items() if n in PROBLEM_COUNTERS and v}

    def keys(self, tokens, ns=None, salt=None):
        return list(self.sink.keys_for(ns or self.model, tokens, cache_salt=salt))

    def run(self, tokens, ns=None, salt=None):
        """(blocks, {tier: blocks}) of this pod's run from block 0 for a prompt, scored by
        tokens through the read path."""
        ns = ns or self.model
        return self.ix.lookup_prefix(ns, self.keys(tokens, ns, salt)).get(self.pod, (0, {}))

    def tiers(self, key, ns=None):
        return self.ix.lookup_prefix(ns or self.model, [key]).get(self.pod, (0, {}))[1]

    def entries(self):
        return self.ix.stats()["entries"]


def assert_consistent(ix, probes=()):
    """Index invariants: per-pod accounting sums to the entries, listed pods hold entries,
    and lookups answer within them."""
    stats = ix.stats()
    assert stats["entries"] == sum(sum(t.values()) for t in stats["pods"].values())
    assert stats["blocks"] <= stats["entries"]
    for pod, tiers in stats["pods"].items():
        assert tiers and all(n > 0 for n in tiers.values())
        assert ix.pod_blocks(pod) == tiers
    for ns, key in probes:
        for pod, (blocks, tiers) in ix.lookup_prefix(ns, [key]).items():
            assert blocks == 1 and pod in stats["pods"]
            assert set(tiers) <= set(stats["pods"][pod])


# ---- the captures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captures(shared):
    return {c.dir: c for c in load_captures(shared)}


def test_the_manifest_holds_exactly_the_streams_parametrized_here(captures):
    assert sorted(captures) == sorted(STREAMS)


class ExpectedState:
    """What a stream's decoded events say its pod holds, computed without kvcm: a set of
    (namespace, engine hash, tier), and for each (namespace, engine hash) the chain it ends
    (the prompt from block 0, its cache salt, the engine hashes of its blocks) so that the
    kvcm keys can be found through the read path (keys_for), whatever the hash mode."""

    def __init__(self, model):
        self.model = model
        self.entries = set()
        self.chains = {}
        self.home = {}  # engine hash -> namespace of its token-carrying store
        self.verifiable = 0  # base-model stores from block 0, which auto mode verifies
        self.salted = False

    def apply(self, events):
        for event in events:
            tag, f = event_fields(event)
            if tag == "AllBlocksCleared":
                self.entries = {e for e in self.entries if e[2] != "gpu"}
                continue
            tier = (f.get("medium") or "GPU").lower()
            hashes = [hash_value(h) for h in f["block_hashes"]]
            if tag == "BlockRemoved":
                self.entries -= {e for e in self.entries if e[1] in hashes and e[2] == tier}
            elif f["token_ids"]:
                self._stored(f, hashes, tier)
            else:  # offload placeholder: a tier for blocks described earlier
                self.entries |= {(self.home.get(h, self.model), h, tier) for h in hashes}

    def _stored(self, f, hashes, tier):
        ns = f.get("lora_name") or self.model
        tokens, size = f["token_ids"], len(f["token_ids"]) // len(hashes)
        if f["parent_block_hash"] is None:
            first = (f.get("extra_keys") or [None])[0] or []
            salts = [k for k in first if k != f.get("lora_name")]
            prompt, salt, blocks = (), (salts[0] if salts else None), ()
            self.salted |= salt is not None
            self.verifiable += ns == self.model
        else:
            prompt, salt, blocks = self.chains[(ns, hash_value(f["parent_block_hash"]))]
        for i, h in enumerate(hashes):
            prompt += tuple(tokens[i * size:(i + 1) * size])
            blocks += (h,)
            self.chains[(ns, h)] = (prompt, salt, blocks)
            self.home[h] = ns
            self.entries.add((ns, h, tier))

    def assert_matches(self, rig):
        stats = rig.ix.stats()
        assert stats["entries"] == len(self.entries)
        assert stats["pods"].get(rig.pod, {}) == dict(collections.Counter(t for _, _, t in self.entries))
        parity = rig.sink.mode_of(self.model) == "parity"
        for (ns, h), (prompt, salt, blocks) in self.chains.items():
            keys = rig.keys(list(prompt), ns, salt)
            assert len(keys) == len(blocks)
            if ns == self.model and parity:
                assert keys == list(blocks), "parity: kvcm keys are vLLM's event hashes"
            held = {(n, b) for n, b, _ in self.entries}
            assert set(rig.tiers(keys[-1], ns)) == {t for n, b, t in self.entries if (n, b) == (ns, h)}, (ns, h)
            run = next((i for i, b in enumerate(blocks) if (ns, b) not in held), len(blocks))
            assert rig.run(list(prompt), ns, salt)[0] == run, "scoring by tokens for %r" % ((ns, h),)


def capture_config(capture, config):
    hc = capture.hash_config
    assert hc["block_size"] == BS
    return {"engine-config": dict(hash_mode="auto", seed=hc["seed"], algo=hc["algo"]),
            "wrong-seed": dict(hash_mode="auto", seed="42", algo=hc["algo"]),
            "kvcm-mode": dict(hash_mode="kvcm", seed=hc["seed"], algo=hc["algo"])}[config]


@pytest.mark.parametrize("config", ["engine-config", "wrong-seed", "kvcm-mode"])
@pytest.mark.parametrize("stream", STREAMS)
def test_capture_leaves_the_index_holding_exactly_what_its_events_say(captures, stream, config):
    capture = captures[stream]
    rig = Rig(model=capture.model, pod=capture.pod, **capture_config(capture, config))
    expected = ExpectedState(capture.model)
    for message in capture.messages:
        assert message.topic.decode() == capture.topic
        rig.raw(message.payload)
        expected.apply(message.decoded[1])
        expected.assert_matches(rig)
    assert rig.problems() == {}
    namespaces = rig.sink.namespaces()
    assert all(ns["mode"] == "decoupled" for ns in namespaces.values() if ns["lora"])
    c = rig.sink.counters
    if config == "engine-config":
        assert rig.sink.mode_of(capture.model) == "parity"
        assert (c["parity_verified"], c["parity_mismatch"]) == (expected.verifiable, 0)
        assert c["parity_verified"] > 0
        assert rig.warnings == [] and rig.sink.take_switched() == []
        if expected.salted:
            style = "tagged" if capture.hash_config["tagged_extra_keys"] else "untagged"
            assert namespaces[capture.model]["extra_style"] == style
    elif config == "wrong-seed":
        assert rig.sink.mode_of(capture.model) == "decoupled"
        assert (c["parity_verified"], c["parity_mismatch"]) == (0, 1)
        assert len(rig.warnings) == 1
        assert rig.sink.take_switched() == [capture.model]
        assert rig.sink.take_switched() == []
        assert rig.ctx.needs_replay
    else:
        assert rig.sink.mode_of(capture.model) == "decoupled"
        assert (c["parity_verified"], c["parity_mismatch"]) == (0, 0)
        assert rig.warnings == []


@pytest.mark.parametrize("stream", SCENARIOS)
def test_wrong_seed_warns_once_naming_the_engines_setting(captures, stream):
    capture = captures[stream]
    hc = capture.hash_config
    rig = Rig(model=capture.model, pod=capture.pod, seed="42", algo=hc["algo"])
    for message in capture.messages + capture.messages[:3]:  # more verifiable events after the switch
        rig.raw(message.payload)
    assert len(rig.warnings) == 1
    assert "--hash-algo %s --hash-seed %s" % (hc["algo"], seed_flag(hc["seed"])) in rig.warnings[0]
    assert rig.count("parity_mismatch") == 1


def test_scenario_prompts_score_by_tokens_with_cache_salt_and_lora(captures):
    """vLLM 0.33.0's scenario, up to the reset: the salted prompt and the LoRA prompt are
    found by tokens (the salt only through cache_salt)."""
    capture = captures["v0.33.0/scenario"]
    for hash_mode, seed in (("auto", None), ("auto", "42"), ("kvcm", None)):
        rig = Rig(hash_mode, seed, model=capture.model, pod=capture.pod)
        for message in capture.messages[:5]:
            rig.raw(message.payload)
        salted = list(range(2000, 2096))
        assert rig.run(salted, salt="tenant-a") == (6, {"gpu": 6})
        assert rig.run(salted) == (0, {})
        assert rig.run(list(range(1000, 1032)), ns="sql") == (2, {"gpu": 2})
        assert rig.run(list(range(1000, 1032))) == (0, {})
        assert rig.run(list(range(80))) == (2, {"gpu": 2})  # blocks 2..4 were evicted


def test_hash_mode_vllm_keeps_parity_but_warns_once_about_a_mismatch(captures):
    capture = captures["v0.33.0/scenario"]
    rig = Rig("vllm", "42", model=capture.model, pod=capture.pod)
    for message in capture.messages[:4]:
        rig.raw(message.payload)
    assert rig.sink.namespaces()["sql"]["mode"] == "decoupled"  # LoRA blocks, whatever the mode
    assert rig.run(list(range(1000, 1032)), ns="sql") == (2, {"gpu": 2})
    for message in capture.messages[4:]:
        rig.raw(message.payload)
    assert rig.sink.mode_of(capture.model) == "parity"
    assert rig.sink.take_switched() == []
    # forced parity is never silent: one warning naming the engines' setting, every mismatch counted
    assert len(rig.warnings) == 1
    assert "--hash-seed (unset)" in rig.warnings[0] and "--hash-mode vllm keeps parity" in rig.warnings[0]
    assert rig.count("parity_verified") == 0 and rig.count("parity_mismatch") >= 2
    engine = vllm_keys(list(range(32)))
    assert rig.ix.lookup_prefix(capture.model, engine) == {capture.pod: (2, {"gpu": 2})}
    assert rig.keys(list(range(32))) != engine  # the read path uses the (wrong) configured seed


def test_hash_mode_kvcm_starts_decoupled_and_scores_by_tokens():
    rig = Rig("kvcm")
    assert rig.sink.mode_of(MODEL) == "decoupled"
    rig.apply(block_stored([11, 12, 13, 14], None, PROMPT))
    assert rig.run(PROMPT) == (4, {"gpu": 4})
    assert rig.ix.lookup_prefix(MODEL, [11]) == {}
    assert rig.ix.resolve(MODEL, [11, 14]) == [(k,) for k in rig.keys(PROMPT)[::3]]


@pytest.mark.parametrize("algo,seed", [("sha256_cbor", None), ("sha256_cbor", "0"), ("sha256", "")])
def test_parity_verifies_engines_hashing_as_configured(algo, seed):
    rig = Rig(algo=algo, seed=seed)
    rig.apply(block_stored(vllm_keys(PROMPT, algo, seed), None, PROMPT))
    assert (rig.count("parity_verified"), rig.count("parity_mismatch")) == (1, 0)
    assert rig.sink.mode_of(MODEL) == "parity" and rig.warnings == []
    assert rig.keys(PROMPT) == vllm_keys(PROMPT, algo, seed)
    assert rig.run(PROMPT) == (4, {"gpu": 4})


def test_sha256_cbor_64bit_engines_verify_in_parity():
    hashes = list(BlockHasher("sha256_cbor_64bit", "0", BS).keys(PROMPT))
    rig = Rig(algo="sha256_cbor_64bit", seed="0")
    rig.apply(block_stored(hashes, None, PROMPT))
    assert (rig.count("parity_verified"), rig.count("parity_mismatch")) == (1, 0)
    assert rig.run(PROMPT) == (4, {"gpu": 4})


@pytest.mark.parametrize("seed", [None, "0"])
def test_sha256_cbor_engine_under_a_sha256_sink_switches_and_names_sha256_cbor(seed):
    rig = Rig(algo="sha256", seed=seed)
    rig.apply(block_stored(vllm_keys(PROMPT, "sha256_cbor", seed), None, PROMPT))
    assert (rig.count("parity_verified"), rig.count("parity_mismatch")) == (0, 1)
    assert rig.sink.mode_of(MODEL) == "decoupled"
    assert len(rig.warnings) == 1
    assert "--hash-algo sha256_cbor --hash-seed %s" % seed_flag(seed) in rig.warnings[0]
    assert rig.run(PROMPT) == (4, {"gpu": 4})


def test_unrecognised_engine_hashes_warn_that_no_likely_setting_matches():
    rig = Rig()
    rig.apply(block_stored([1, 2, 3, 4], None, PROMPT))
    assert len(rig.warnings) == 1 and "match neither" in rig.warnings[0]
    assert rig.run(PROMPT) == (4, {"gpu": 4})


def test_switch_clears_the_namespace_stored_under_parity_keys_on_every_pod():
    """Entries stored under parity keys before the mismatch cannot be re-keyed."""
    rig = Rig()
    other = StreamContext("pod-b", MODEL)
    rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT))
    rig.sink.apply(other, encode_batch([block_stored(vllm_keys(OTHER), None, OTHER)]))
    assert rig.entries() == 6
    rig.apply(block_stored([7, 8], None, list(range(500, 532))))  # reveals a mismatch
    assert rig.sink.mode_of(MODEL) == "decoupled"
    assert rig.entries() == 2 and rig.run(list(range(500, 532))) == (2, {"gpu": 2})
    assert rig.ix.lookup_prefix(MODEL, vllm_keys(PROMPT)) == {}


# ---- set semantics and tiers -------------------------------------------------------------

@pytest.mark.parametrize("form", ["map", "array"])
def test_a_block_stored_twice_and_removed_once_is_gone(form):
    rig = Rig()
    hashes = vllm_keys(PROMPT)
    rig.apply(block_stored(hashes[:2], None, PROMPT[:32], form=form))
    rig.apply(block_stored(hashes[:2], None, PROMPT[:32], form=form))  # re-announced prefix
    assert rig.entries() == 2
    rig.apply(block_removed([hashes[0]], form=form))
    assert rig.tiers(hashes[0]) == {} and rig.tiers(hashes[1]) == {"gpu": 1}
    assert rig.run(PROMPT) == (0, {})
    assert rig.entries() == 1 and rig.count("blocks_removed") == 1


@pytest.mark.parametrize("setup,unresolved", [
    ("parity namespace known", 0),      # in parity an engine hash is its own key: nothing to find
    ("namespace never stored", 1),
    ("decoupled namespace", 1),         # not in the engine map
    ("stream without a model", 1),
])
def test_removing_an_unknown_hash_changes_nothing(setup, unresolved):
    rig = Rig("kvcm" if setup == "decoupled namespace" else "auto",
              model=None if setup == "stream without a model" else MODEL)
    if setup in ("parity namespace known", "decoupled namespace"):
        rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT))
    before = rig.ix.stats()
    assert rig.apply(block_removed([424242])) == 0
    assert rig.ix.stats() == before
    assert rig.count("remove_unresolved") == unresolved
    assert rig.count("events_removed") == 1


@pytest.mark.parametrize("hash_mode", ["auto", "kvcm"])
def test_all_blocks_cleared_clears_only_the_gpu_tier_in_every_namespace(hash_mode):
    rig = Rig(hash_mode)
    hashes = vllm_keys(PROMPT)
    rig.apply(block_stored(hashes, None, PROMPT),
              block_stored([91, 92], None, OTHER, lora_id=1, lora_name="sql", extra_keys=[["sql"], ["sql"]]),
              block_stored(hashes[:2], None, (), 0, medium="CPU"))
    assert rig.ix.stats()["pods"] == {POD: {"gpu": 6, "cpu": 2}}
    rig.apply(all_blocks_cleared())
    assert rig.ix.stats()["pods"] == {POD: {"cpu": 2}}
    assert rig.run(PROMPT) == (2, {"cpu": 2})
    assert rig.run(OTHER, ns="sql") == (0, {})


def test_all_blocks_cleared_leaves_other_pods_alone():
    rig = Rig()
    other = StreamContext("pod-b", MODEL)
    rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT))
    rig.sink.apply(other, encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT)]))
    rig.sink.apply(other, encode_batch([all_blocks_cleared()]))
    assert rig.ix.stats()["pods"] == {POD: {"gpu": 4}}


def test_tokenless_store_in_parity_adds_the_tier_to_known_blocks():
    rig = Rig()
    hashes = vllm_keys(PROMPT)
    rig.apply(block_stored(hashes, None, PROMPT))
    rig.apply(block_stored(hashes[:2], None, (), 0, medium="CPU"), block_stored(hashes[:1], None, (), 0, medium="STORAGE"))
    assert rig.run(PROMPT) == (4, {"gpu": 4, "cpu": 2, "storage": 1})
    assert rig.ix.pod_blocks(POD) == {"gpu": 4, "cpu": 2, "storage": 1}
    assert rig.count("offload_unresolved") == 0


def test_tokenless_store_in_decoupled_mode_resolves_through_the_engine_map():
    rig = Rig("kvcm")
    rig.apply(block_stored([11, 12, 13, 14], None, PROMPT))
    rig.apply(block_removed([11, 12]))  # the engine map outlives a GPU eviction (DESIGN §3)
    rig.apply(block_stored([11, 12, 999], None, (), 0, medium="CPU"))
    assert rig.run(PROMPT) == (4, {"gpu": 2, "cpu": 2})
    assert rig.count("offload_unresolved") == 1
    assert rig.ix.pod_blocks(POD) == {"gpu": 2, "cpu": 2}


def test_tokenless_store_resolves_lora_blocks_in_their_namespace():
    rig = Rig()
    rig.apply(block_stored([91, 92], None, OTHER, lora_id=1, lora_name="sql", extra_keys=[["sql"], ["sql"]]))
    rig.apply(block_stored([92], None, (), 0, medium="CPU"))
    assert rig.run(OTHER, ns="sql") == (2, {"gpu": 2, "cpu": 1})


def test_lora_blocks_with_a_cache_salt_score_with_that_salt():
    rig = Rig()
    rig.apply(block_stored([91, 92], None, OTHER, lora_id=1, lora_name="sql",
                           extra_keys=[["sql", "tenant-a"], ["sql"]]))
    assert rig.run(OTHER, ns="sql", salt="tenant-a") == (2, {"gpu": 2})
    assert rig.run(OTHER, ns="sql") == (0, {})


def test_block_removed_in_decoupled_mode_removes_the_mapped_kvcm_keys():
    rig = Rig("kvcm")
    rig.apply(block_stored([11, 12, 13, 14], None, PROMPT))
    rig.apply(block_removed([13], medium="CPU"))  # another tier: nothing to remove
    assert rig.run(PROMPT) == (4, {"gpu": 4})
    rig.apply(block_removed([13]))
    keys = rig.keys(PROMPT)
    assert rig.run(PROMPT) == (2, {"gpu": 2})
    assert rig.tiers(keys[2]) == {} and rig.tiers(keys[3]) == {"gpu": 1}
    assert (rig.count("blocks_removed"), rig.count("remove_unresolved")) == (1, 0)


def test_block_removed_by_one_pod_leaves_the_other_pods_entry():
    rig = Rig("kvcm")
    other = StreamContext("pod-b", MODEL)
    for ctx in (rig.ctx, other):
        rig.sink.apply(ctx, encode_batch([block_stored([11, 12], None, OTHER)]))
    rig.sink.apply(other, encode_batch([block_removed([11, 12])]))
    assert rig.ix.lookup_prefix(MODEL, rig.keys(OTHER)) == {POD: (2, {"gpu": 2})}


# ---- block sizes ---------------------------------------------------------------------------

def test_engine_blocks_twice_kvcm_size_map_to_two_keys_each():
    rig = Rig()
    rig.apply(block_stored([501, 502], None, PROMPT, 32))
    rig.apply(block_stored([503], 502, list(range(64, 96)), 32))
    assert rig.sink.mode_of(MODEL) == "decoupled"
    assert rig.count("block_size_decoupled") == 1 and len(rig.warnings) == 1
    prompt = list(range(96))
    keys = rig.keys(prompt)
    assert rig.ix.resolve(MODEL, [501, 502, 503]) == [tuple(keys[0:2]), tuple(keys[2:4]), tuple(keys[4:6])]
    assert rig.run(prompt) == (6, {"gpu": 6})
    rig.apply(block_removed([502]))
    assert rig.run(prompt) == (2, {"gpu": 2})
    assert [rig.tiers(k) for k in keys] == [{"gpu": 1}] * 2 + [{}] * 2 + [{"gpu": 1}] * 2
    assert rig.count("blocks_removed") == 2


@pytest.mark.parametrize("split", [(4,), (2, 2), (1, 3), (1, 2, 1), (1, 1, 1, 1), (3, 1)],
                         ids=lambda s: "+".join(map(str, s)))
def test_engine_blocks_half_kvcm_size_chain_across_events(split):
    """Engine block 8 tokens, kvcm 16: four engine blocks e1..e4 make kvcm blocks k0, k1,
    whatever events they arrive in."""
    rig = Rig()
    tokens, engine = list(range(32)), [601, 602, 603, 604]
    done, parent = 0, None
    for n in split:
        rig.apply(block_stored(engine[done:done + n], parent, tokens[8 * done:8 * (done + n)], 8))
        done += n
        parent = engine[done - 1]
        assert rig.entries() == done // 2, "a kvcm block appears only once complete"
    assert rig.problems() == {}
    keys = rig.keys(tokens)
    assert rig.ix.resolve(MODEL, engine) == [(keys[0],), (keys[0],), (keys[1],), (keys[1],)]
    assert rig.run(tokens) == (2, {"gpu": 2})


@pytest.mark.parametrize("engine_block_size,split", [(8, (2,)), (8, (1, 1)), (32, (1,))])
def test_a_cache_salt_reaches_the_first_kvcm_block_whatever_the_engine_block_size(engine_block_size, split):
    rig = Rig()
    tokens, done, parent = list(range(32)), 0, None
    per = engine_block_size
    for n in split:
        extra = [["tenant-a"] if done + i == 0 else None for i in range(n)]
        rig.apply(block_stored(list(range(700 + done, 700 + done + n)), parent,
                               tokens[per * done:per * (done + n)], engine_block_size, extra_keys=extra))
        done += n
        parent = 700 + done - 1
    blocks = per * done // BS
    assert rig.run(tokens[:BS * blocks], salt="tenant-a") == (blocks, {"gpu": blocks})
    assert rig.run(tokens[:BS * blocks]) == (0, {})


@pytest.mark.parametrize("engine_block_size", [1040, 2048])
def test_engine_blocks_of_more_than_64_kvcm_blocks_are_mapped_whole_or_refused(engine_block_size):
    """DESIGN §2: an engine block of k kvcm blocks maps to its k keys and BlockRemoved removes
    all k; the engine map holds at most 64 keys per hash, so larger ratios must be refused
    (counted) rather than half-mapped."""
    rig = Rig("kvcm")
    k = engine_block_size // BS
    first, second = list(range(engine_block_size)), list(range(10**6, 10**6 + engine_block_size))
    rig.apply(block_stored([1], None, first, engine_block_size))
    if rig.entries() == 0:
        assert rig.problems() == {"drop_block_size_unsupported": 1}
        return
    rig.apply(block_stored([2], 1, second, engine_block_size))
    assert [len(r) for r in rig.ix.resolve(MODEL, [1, 2])] == [k, k]
    assert rig.run(first + second) == (2 * k, {"gpu": 2 * k}), "the child chains from the parent's last key"
    rig.apply(block_removed([1]))
    assert rig.entries() == k


# An overflowing n_hashes * block_size passes the token-count check and the sink then hashes
# far past the token buffer: run in a child so that a crash fails one test, not the session.
_HUGE_BLOCK_SIZE = """
import sys
from kvcm._core import EventSink, Index, StreamContext
from kvcm.publisher import block_stored, encode_batch
n, block_size, ntokens, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sink = EventSink(Index(), hash_mode=mode)
ctx = StreamContext("p", "m")
sink.apply(ctx, encode_batch([block_stored(list(range(1, n + 1)), None, list(range(ntokens)), block_size)]))
print(sink.index.stats()["entries"], sorted(k for k, v in sink.counters.items() if v and k.startswith("drop_")))
"""


@pytest.mark.parametrize("n,block_size,ntokens,hash_mode", [
    (4, 2 ** 62 + 16, 64, "auto"), (8, 2 ** 61 + 16, 128, "kvcm"), (8, 2 ** 61 + 8, 64, "kvcm")])
def test_block_sizes_whose_product_with_the_hash_count_overflows_are_dropped(n, block_size, ntokens, hash_mode):
    assert (n * block_size) % 2 ** 64 == ntokens  # wraps to the real token count
    proc = subprocess.run([sys.executable, "-c", _HUGE_BLOCK_SIZE, str(n), str(block_size), str(ntokens), hash_mode],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, "the process died (%d): %s" % (proc.returncode, proc.stderr[-500:])
    entries, drops = proc.stdout.split(" ", 1)
    assert entries == "0" and drops.strip() in ("['drop_token_count']", "['drop_bad_block_size']",
                                                "['drop_block_size_unsupported']")


@pytest.mark.parametrize("removed,left", [(601, 1), (602, 1), (603, 0), (604, 0)])
def test_removing_any_small_engine_block_removes_the_kvcm_block_holding_it(removed, left):
    rig = Rig()
    tokens = list(range(32))
    rig.apply(block_stored([601, 602, 603, 604], None, tokens, 8))
    keys = rig.keys(tokens)
    rig.apply(block_removed([removed]))
    assert rig.entries() == 1
    assert rig.tiers(keys[left]) == {"gpu": 1} and rig.tiers(keys[1 - left]) == {}


@pytest.mark.parametrize("block_size", [12, 24, 40, 7])
def test_block_sizes_neither_dividing_the_other_are_dropped(block_size):
    rig = Rig()
    rig.apply(block_stored([1, 2], None, list(range(2 * block_size)), block_size),
              block_stored(vllm_keys(OTHER), None, OTHER))
    assert rig.problems() == {"drop_block_size_unsupported": 1}
    assert rig.ix.stats()["pods"] == {POD: {"gpu": 2}}
    assert rig.sink.mode_of(MODEL) == "parity" and rig.sink.take_switched() == []


@pytest.mark.parametrize("block_size,ntokens,counter", [
    (0, 32, "drop_bad_block_size"),       # block_size 0 is the offload placeholder's, never with tokens
    (-16, 32, "drop_bad_block_size"),
    (-(2 ** 63), 32, "drop_bad_block_size"),
    (None, 31, "drop_bad_block_size"),    # absent and not inferable from the token count
    (16, 31, "drop_token_count"),
    (16, 48, "drop_token_count"),
    (2 ** 62, 32, "drop_token_count"),
])
def test_bad_block_sizes_and_token_counts_are_dropped_and_counted(block_size, ntokens, counter):
    rig = Rig("kvcm")
    rig.apply(block_stored([1, 2], None, list(range(ntokens)), block_size),
              block_stored([3, 4], None, OTHER))
    assert rig.problems() == {counter: 1}
    assert rig.entries() == 2 and rig.run(OTHER) == (2, {"gpu": 2})


def test_missing_block_size_is_inferred_from_the_token_count():
    rig = Rig()
    rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT, None))
    assert rig.problems() == {} and rig.run(PROMPT) == (4, {"gpu": 4})
    assert rig.count("parity_verified") == 1


# ---- decoupled chains ----------------------------------------------------------------------

@pytest.mark.parametrize("hash_mode,block_size", [("kvcm", 16), ("kvcm", 32), ("auto", 32), ("kvcm", 8)])
def test_unknown_parent_is_dropped_and_never_chained_from_the_root(hash_mode, block_size):
    rig = Rig(hash_mode)
    tokens = list(range(2 * block_size))
    rig.apply(block_stored([11, 12], 4242, tokens, block_size))
    rig.apply(block_stored([13], 12, list(range(500, 500 + block_size)), block_size))
    assert rig.problems() == {"drop_unknown_parent": 2}
    assert rig.ctx.needs_replay
    assert rig.entries() == 0
    assert rig.ix.lookup_prefix(MODEL, rig.keys(tokens)) == {}
    assert rig.ix.resolve(MODEL, [11, 12, 13]) == [(), (), ()]


def test_a_stream_context_is_bound_to_the_index_it_first_fed():
    rig = Rig()
    rig.apply(all_blocks_cleared())
    with pytest.raises(ValueError):
        EventSink(Index()).apply(rig.ctx, encode_batch([all_blocks_cleared()]))


def test_known_parent_continues_the_decoupled_chain():
    rig = Rig("kvcm")
    rig.apply(block_stored([11, 12], None, PROMPT[:32]))
    rig.apply(block_stored([13, 14], 12, PROMPT[32:]))
    assert rig.run(PROMPT) == (4, {"gpu": 4}) and not rig.ctx.needs_replay


# ---- encodings -------------------------------------------------------------------------------

def shortest(event):
    """An array-form event without the trailing fields a reader must default (nil, medium
    GPU, a block size the token count implies): what older publishers send."""
    tag, fields = event[0], list(event[1:])
    while True:
        if fields and fields[-1] is None:
            fields.pop()
        elif tag == "BlockStored" and len(fields) == 6 and fields[5] == "GPU" \
                or tag == "BlockRemoved" and len(fields) == 2 and fields[1] == "GPU":
            fields.pop()
        elif tag == "BlockStored" and len(fields) == 4 and fields[0] and fields[3] * len(fields[0]) == len(fields[2]):
            fields.pop()
        else:
            return [tag] + fields


FUTURE = ["full_attention", 4096, "local", "owner", "session-1", [[1, 2], [3]], {"x": [None, 1.5]}, "more"]


def longest(event):
    """An array-form event with fields of later versions and some nobody knows."""
    return event + [None] * (10 - len(event) if event[0] == "BlockStored" else 0) + FUTURE


def reordered(event):
    """A map-form event with "type" last and unknown keys around the known ones."""
    out = {"zz_unknown": {"nested": [1, [2, {"k": None}]]}, "locality": "remote"}
    out.update((k, v) for k, v in event.items() if k != "type")
    out["lookahead_token_ids"] = [[1, 2, 3]]
    out["type"] = event["type"]
    return out


VARIANTS = {
    "map": ("map", lambda e: e),
    "map-reordered-unknown-keys": ("map", reordered),
    "array-0.20": ("array", lambda e: e),
    "array-shortest": ("array", shortest),
    "array-longest": ("array", longest),
}


def mixed_batches(form):
    """A little of everything: chains with parents, a LoRA, a cache salt, removes in GPU and
    CPU, offload placeholders, a clear."""
    h = vllm_keys(PROMPT)
    salted = list(range(2000, 2032))
    hs = vllm_keys(salted, salt="tenant-a")
    lora = dict(lora_id=1, lora_name="sql", extra_keys=[["sql"], ["sql"]])
    return [
        [block_stored(h[:2], None, PROMPT[:32], form=form)],
        [block_stored(h[2:], h[1], PROMPT[32:], form=form),
         block_stored([91, 92], None, OTHER, form=form, **lora)],
        [block_stored(hs, None, salted, extra_keys=[["tenant-a"], None], form=form)],
        [block_stored(h[:3], None, (), 0, medium="CPU", form=form), block_stored([92], None, (), 0, medium="CPU", form=form)],
        [block_removed([h[3]], form=form), block_removed([92], medium="CPU", form=form), block_removed([h[0]], medium="CPU", form=form)],
        [block_stored([93], 92, list(range(132, 148)), form=form, lora_id=1, lora_name="sql", extra_keys=[["sql"]])],
        [all_blocks_cleared(form=form)],
        [block_stored(h[:1], None, PROMPT[:16], form=form)],
    ]


def snapshot(rig):
    stats = rig.ix.stats()
    prompts = [(MODEL, PROMPT, None), (MODEL, list(range(2000, 2032)), "tenant-a"), ("sql", list(range(100, 148)), None)]
    runs = {}
    for ns, prompt, salt in prompts:
        keys = rig.keys(prompt, ns, salt)
        runs[ns, salt] = (rig.run(prompt, ns, salt), [rig.tiers(k, ns) for k in keys])
    return stats, rig.sink.namespaces(), rig.sink.counters, runs


@pytest.mark.parametrize("hash_mode", ["auto", "kvcm"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "map"])
def test_every_encoding_of_the_same_events_gives_the_same_index(variant, hash_mode):
    form, transform = VARIANTS[variant]
    reference, rig = Rig(hash_mode), Rig(hash_mode)
    for plain, events in zip(mixed_batches("map"), mixed_batches(form)):
        reference.apply(*plain)
        rig.apply(*map(transform, events))
        assert snapshot(rig) == snapshot(reference)
    assert rig.problems() == {}
    stats, _, counters, runs = snapshot(rig)
    assert stats["pods"] == {POD: {"gpu": 1, "cpu": 2}}  # not vacuous
    assert counters["parity_verified"] == (3 if hash_mode == "auto" else 0)


def test_shortest_and_longest_array_events_really_differ_in_length():
    events = [e for b in mixed_batches("array") for e in b]
    assert {len(shortest(e)) for e in events if e[0] == "BlockStored"} >= {4, 7}
    assert {len(shortest(e)) for e in events if e[0] == "BlockRemoved"} == {2, 3}
    assert all(len(longest(e)) > 10 for e in events if e[0] == "BlockStored")


def stored_map(hash_encodings, tokens, parent=None):
    return {"type": "BlockStored", "block_hashes": list(hash_encodings), "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None}


HASH_ENCODINGS = [
    ("fixint", uint(5, 0), 5),
    ("uint8", uint(200, 1), 200),
    ("uint8-non-minimal", uint(5, 1), 5),
    ("uint16", uint(0xBEEF, 2), 0xBEEF),
    ("uint32", uint(0xDEADBEEF, 4), 0xDEADBEEF),
    ("uint64", uint(2 ** 64 - 2, 8), 2 ** 64 - 2),
    ("uint64-non-minimal", uint(7, 8), 7),
    ("negative-fixint", sint(-1, 0), 2 ** 64 - 1),
    ("int8", sint(-128, 1), 2 ** 64 - 128),
    ("int16", sint(-30000, 2), 2 ** 64 - 30000),
    ("int32", sint(-2 ** 31, 4), 2 ** 64 - 2 ** 31),
    ("int64", sint(-2 ** 63, 8), 2 ** 63),
    ("int64-positive", sint(12345, 8), 12345),
    ("bin32-sha256-digest", Raw(msgpack.packb(bytes(range(32)))), int.from_bytes(bytes(range(24, 32)), "big")),
    ("bin16-xxhash-digest", Raw(msgpack.packb(bytes(range(16)))), int.from_bytes(bytes(range(8, 16)), "big")),
    ("bin8", Raw(msgpack.packb(b"\x80" + bytes(7))), 2 ** 63),
    ("bin4-left-padded", Raw(msgpack.packb(b"\x01\x02\x03\x04")), 0x01020304),
    ("bin1", Raw(msgpack.packb(b"\xff")), 0xFF),
]


@pytest.mark.parametrize("encoded,value", [c[1:] for c in HASH_ENCODINGS], ids=[c[0] for c in HASH_ENCODINGS])
def test_block_hash_encodings_name_the_same_uint64(encoded, value):
    rig = Rig("vllm")
    rig.raw(batch([stored_map([encoded], list(range(16)))]))
    assert rig.ix.lookup_prefix(MODEL, [value]) == {POD: (1, {"gpu": 1})}
    rig.apply(block_removed([value]))
    assert rig.entries() == 0 and rig.count("blocks_removed") == 1


@pytest.mark.parametrize("encoded,value", [c[1:] for c in HASH_ENCODINGS], ids=[c[0] for c in HASH_ENCODINGS])
def test_parent_hash_encodings_resolve_in_decoupled_mode(encoded, value):
    rig = Rig("kvcm")
    rig.apply(block_stored([value], None, PROMPT[:16]))
    rig.raw(batch([stored_map([777], PROMPT[16:32], parent=encoded)]))
    assert rig.problems() == {} and rig.run(PROMPT) == (2, {"gpu": 2})
    rig.raw(batch([{"type": "BlockRemoved", "block_hashes": [encoded], "medium": "GPU"}]))
    assert rig.run(PROMPT) == (0, {})


def test_a_batch_without_dp_rank_is_applied():
    rig = Rig()
    payload = batch([block_stored(vllm_keys(PROMPT), None, PROMPT)], ts=5.0, dp_rank=None)
    assert rig.sink.batch_header(payload) == (5.0, 0, 1)
    assert rig.raw(payload) == 4 and rig.run(PROMPT) == (4, {"gpu": 4})


@pytest.mark.parametrize("ts,dp_rank,n,expected", [
    (1700000000.25, 0, 0, (1700000000.25, 0, 0)),
    (1700000000.5, 2, 3, (1700000000.5, 2, 3)),
    (1700000000, 7, 1, (1700000000.0, 7, 1)),                        # integer timestamps
    (Raw(b"\xca" + struct.pack(">f", 1.5)), 65535, 2, (1.5, 65535, 2)),  # float32
    (2.0, None, 1, (2.0, 0, 1)),                                     # nil rank
])
def test_batch_header_returns_ts_dp_rank_and_event_count(ts, dp_rank, n, expected):
    sink = EventSink(Index())
    events = [all_blocks_cleared()] * n
    payload = pack([ts, events, dp_rank])
    assert sink.batch_header(payload) == expected
    assert sink.batch_header(bytearray(payload)) == expected
    assert sink.batch_header(memoryview(payload)) == expected


@pytest.mark.parametrize("dp_rank", [-1, 65536, "0", 1.0, [0]])
def test_batch_header_rejects_a_rank_that_is_not_a_small_non_negative_int(dp_rank):
    with pytest.raises(DecodeError) as err:
        EventSink(Index()).batch_header(batch([], dp_rank=dp_rank))
    assert err.value.reason == "wrong_type"


def test_batch_header_checks_every_event_but_apply_keeps_the_good_ones():
    rig = Rig()
    payload = pack([1.0, [block_stored(vllm_keys(PROMPT), None, PROMPT), Raw(b"\x92\xc1\xc0")], 0])
    with pytest.raises(DecodeError) as err:
        rig.sink.batch_header(payload)
    assert err.value.reason == "invalid"
    rig.raw(payload)
    assert rig.problems() == {"drop_invalid": 1} and rig.run(PROMPT) == (4, {"gpu": 4})


# ---- malformed input --------------------------------------------------------------------------

def event_spans(payload):
    """(end of the events array header, declared event count, [(start, end)] per event)."""
    u = msgpack.Unpacker()
    u.feed(payload)
    u.read_array_header()
    u.skip()
    n = u.read_array_header()
    header_end = start = u.tell()
    spans = []
    for _ in range(n):
        u.skip()
        spans.append((start, u.tell()))
        start = u.tell()
    return header_end, n, spans


def index_state(rig, probes):
    stats = rig.ix.stats()
    del stats["capacity"]
    return stats, rig.sink.namespaces(), {(ns, k): rig.ix.lookup_prefix(ns, [k]) for ns, k in probes}


@pytest.mark.parametrize("stream", STREAMS)
def test_a_capture_truncated_at_every_byte_applies_exactly_its_complete_events(captures, stream):
    """DecodeError ("truncated") only while the batch header cannot be read; otherwise the
    events that are complete are applied, the cut one is dropped and counted."""
    capture = captures[stream]
    config = capture_config(capture, "engine-config")
    probes = {(capture.model, hash_value(h)) for m in capture.messages for e in m.decoded[1]
              for h in event_fields(e)[1].get("block_hashes", ())}

    def rig_after(k):
        rig = Rig(model=capture.model, pod=capture.pod, **config)
        for message in capture.messages[:k]:
            rig.raw(message.payload)
        return rig

    for k, message in enumerate(capture.messages):
        payload = message.payload
        header_end, n, spans = event_spans(payload)
        references = {}
        for cut in range(len(payload)):
            rig = rig_after(k)
            if cut < header_end or n > cut - header_end:
                with pytest.raises(DecodeError) as err:
                    rig.raw(payload[:cut])
                assert err.value.reason == "truncated"
                assert rig.count("drop_batch") == 1
                assert index_state(rig, probes) == index_state(rig_after(k), probes)
                continue
            rig.raw(payload[:cut])
            complete = sum(end <= cut for _, end in spans)
            assert rig.count("drop_truncated") == (complete < n)
            if complete not in references:
                reference = rig_after(k)
                reference.raw(pack([message.decoded[0], [Raw(payload[s:e]) for s, e in spans[:complete]], 0]))
                references[complete] = index_state(reference, probes)
            assert index_state(rig, probes) == references[complete], (k, cut)
            assert_consistent(rig.ix, probes)


HUGE_ARRAY = Raw(b"\xdd\xff\xff\xff\xff")
HUGE_STR = Raw(b"\xdb\xff\xff\xff\xff")


def deep(levels, leaf=None):
    return Raw(b"\x91" * levels + msgpack.packb(leaf))


BATCH_ERRORS = [
    ("empty payload", b"", "truncated"),
    ("nil", msgpack.packb(None), "wrong_type"),
    ("batch is a map", msgpack.packb({"ts": 1.0, "events": []}), "wrong_type"),
    ("batch is a string", msgpack.packb("[1.0, [], 0]"), "wrong_type"),
    ("batch of one element", pack([1.0]), "wrong_type"),
    ("ts is a string", pack(["now", [], 0]), "wrong_type"),
    ("ts is nil", pack([None, [], 0]), "wrong_type"),
    ("events not an array", pack([1.0, "events", 0]), "wrong_type"),
    ("events are a map", pack([1.0, {"type": "AllBlocksCleared"}, 0]), "wrong_type"),
    ("events are nil", pack([1.0, None, 0]), "wrong_type"),
    ("batch array32 claiming 2**32-1", Raw(HUGE_ARRAY + msgpack.packb(1.0) + b"\x90"), "truncated"),
    ("events array32 claiming 2**32-1", pack([1.0, HUGE_ARRAY, 0]), "truncated"),
    ("events claiming more than the bytes left", b"\x93\xcb" + bytes(8) + b"\x9f\xc0", "truncated"),
    ("reserved byte", b"\xc1", "wrong_type"),
    ("batch nested 100 deep", deep(100), "wrong_type"),
]


@pytest.mark.parametrize("payload,reason", [c[1:] for c in BATCH_ERRORS], ids=[c[0] for c in BATCH_ERRORS])
def test_a_malformed_batch_raises_decode_error_with_its_reason(payload, reason):
    rig = Rig()
    rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT))
    for call in (rig.sink.batch_header, rig.raw):
        with pytest.raises(DecodeError) as err:
            call(payload)
        assert err.value.reason == reason
    assert rig.count("drop_batch") == 1 and rig.count("batches") == 1
    assert rig.ix.stats()["pods"] == {POD: {"gpu": 4}}


def bad_stored(**fields):
    event = stored_map([1, 2], OTHER)
    event.update(fields)
    return event


EVENT_ERRORS = [  # (id, event, counter, whether the events after it can still be delimited)
    ("hashes as a string", bad_stored(block_hashes="3262291359910021016"), "drop_wrong_type", True),
    ("hashes as a map", bad_stored(block_hashes={"a": 1}), "drop_wrong_type", True),
    ("hash as a float", bad_stored(block_hashes=[1.5]), "drop_wrong_type", True),
    ("hash nil", bad_stored(block_hashes=[None]), "drop_wrong_type", True),
    ("hash as an empty bin", bad_stored(block_hashes=[b""]), "drop_invalid", True),
    ("parent as a string", bad_stored(parent_block_hash="1"), "drop_wrong_type", True),
    ("tokens with a negative int", bad_stored(token_ids=[-1] + OTHER[1:]), "drop_wrong_type", True),
    ("tokens as a string", bad_stored(token_ids="0123"), "drop_wrong_type", True),
    ("token as a float", bad_stored(token_ids=[0.5] * 32), "drop_wrong_type", True),
    ("block size as a string", bad_stored(block_size="16"), "drop_wrong_type", True),
    ("block size above int64", bad_stored(block_size=2 ** 64 - 1), "drop_wrong_type", True),
    ("medium as an int", bad_stored(medium=1), "drop_wrong_type", True),
    ("medium invalid UTF-8", bad_stored(medium=raw_str(b"\xff\xfeCPU")), "drop_bad_utf8", True),
    ("lora_name as an int", bad_stored(lora_name=7), "drop_wrong_type", True),
    ("lora_name invalid UTF-8", bad_stored(lora_name=raw_str(b"sq\xc3")), "drop_bad_utf8", True),
    ("extra_keys not a list", bad_stored(extra_keys="tenant-a"), "drop_wrong_type", True),
    ("extra_keys entry not a list", bad_stored(extra_keys=[5, None]), "drop_wrong_type", True),
    ("extra_keys invalid UTF-8", bad_stored(extra_keys=[[raw_str(b"\xed\xa0\x80")], None]), "drop_bad_utf8", True),
    ("BlockStored without hashes", {"type": "BlockStored", "token_ids": OTHER}, "drop_missing_hashes", True),
    ("BlockRemoved hashes as a string", {"type": "BlockRemoved", "block_hashes": "x"}, "drop_wrong_type", True),
    ("BlockRemoved medium invalid UTF-8", {"type": "BlockRemoved", "block_hashes": [1], "medium": raw_str(b"\x80")}, "drop_bad_utf8", True),
    ("event is an int", 5, "drop_wrong_type", True),
    ("event is a string", "BlockStored", "drop_wrong_type", True),
    ("event is an empty array", [], "drop_wrong_type", True),
    ("tag is an int", [5, [1], None, OTHER], "drop_wrong_type", True),
    ("type is an int", {"type": 5}, "drop_wrong_type", True),
    ("map key is an int", {1: 2, "type": "AllBlocksCleared"}, "drop_wrong_type", True),
    ("unknown array tag", ["BlockMoved", [1, 2], "GPU"], "events_unknown_tag", True),
    ("unknown map tag", {"type": "CacheFlushed", "block_hashes": [1]}, "events_unknown_tag", True),
    ("map without type", {"block_hashes": [1, 2], "token_ids": OTHER}, "events_unknown_tag", True),
    ("hashes array32 claiming 2**32-1", bad_stored(block_hashes=HUGE_ARRAY), "drop_truncated", False),
    ("tokens array32 claiming 2**32-1", bad_stored(token_ids=HUGE_ARRAY), "drop_truncated", False),
    ("medium str32 claiming 2**32-1", bad_stored(medium=HUGE_STR), "drop_truncated", False),
    ("lora_name str32 claiming 2**32-1", bad_stored(lora_name=HUGE_STR), "drop_truncated", False),
    ("hash bin32 claiming 2**32-1", bad_stored(block_hashes=[Raw(b"\xc6\xff\xff\xff\xff")]), "drop_truncated", False),
    ("event map32 claiming 2**32-1 pairs", Raw(b"\xdf\xff\xff\xff\xff"), "drop_truncated", False),
    ("extra_keys nested 40 deep", bad_stored(extra_keys=[deep(40, "x"), None]), "drop_too_deep", False),
    ("event nested 1000 deep", deep(1000), "drop_too_deep", False),
    ("reserved byte in an event", bad_stored(lora_id=Raw(b"\xc1")), "drop_invalid", False),
]


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize("event,counter,delimited", [c[1:] for c in EVENT_ERRORS], ids=[c[0] for c in EVENT_ERRORS])
def test_a_bad_event_is_dropped_and_counted_and_the_rest_of_its_batch_applied(event, counter, delimited, form):
    rig = Rig()
    before = block_stored(vllm_keys(PROMPT), None, PROMPT, form=form)
    after = block_stored(vllm_keys(OTHER[:16]), None, OTHER[:16], form=form)
    rig.raw(pack([1.0, [before, event, after], 0]))
    assert rig.problems() == {counter: 1}
    assert rig.run(PROMPT) == (4, {"gpu": 4})
    assert rig.run(OTHER[:16]) == ((1, {"gpu": 1}) if delimited else (0, {}))
    assert rig.entries() == (5 if delimited else 4)
    assert rig.count("batches") == 1 and rig.count("drop_batch") == 0


def test_unknown_keys_with_any_msgpack_type_are_skipped():
    rig = Rig()
    event = block_stored(vllm_keys(PROMPT), None, PROMPT)
    event["future_ext"] = msgpack.ExtType(5, b"abc")
    event["future_fixext"] = msgpack.ExtType(1, b"\x00" * 16)
    event["future_bool"] = True
    event["future_float"] = 0.5
    event["future_bin"] = b"\x00" * 300
    rig.raw(msgpack.packb([1.0, [event], 0]))
    assert rig.problems() == {} and rig.run(PROMPT) == (4, {"gpu": 4})


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                               st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def capture_list(captures):
    return [captures[s] for s in STREAMS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10_000), mutations=MUTATIONS, hash_mode=st.sampled_from(HASH_MODES),
       wrong_seed=st.booleans())
def test_fuzzed_captures_never_crash_and_keep_the_index_consistent(capture_list, which, mutations, hash_mode, wrong_seed):
    capture = capture_list[which % len(capture_list)]
    config = capture_config(capture, "engine-config")
    rig = Rig(hash_mode, "42" if wrong_seed else config["seed"], config["algo"], capture.model, capture.pod)
    target = (which // len(capture_list)) % len(capture.messages)
    for k, message in enumerate(capture.messages):
        payload = mutate(message.payload, mutations) if k == target else message.payload
        try:
            rig.raw(payload)
        except DecodeError as err:
            assert k == target and err.reason in ("truncated", "wrong_type", "too_deep", "bad_utf8", "invalid")
    probes = [(ns, hash_value(h)) for ns in (capture.model, "sql") for m in capture.messages
              for e in m.decoded[1] for h in event_fields(e)[1].get("block_hashes", ())]
    assert_consistent(rig.ix, probes)
    rig.run(PROMPT)
    rig.sink.clear_pod(capture.pod)
    assert rig.ix.stats()["entries"] == 0 and rig.ix.stats()["pods"] == {}


# ---- bounded name tables, large events, slices -----------------------------------------------

def lora_store(name, tokens=OTHER, first_hash=500):
    n = len(tokens) // BS
    return block_stored(list(range(first_hash, first_hash + n)), None, tokens, BS, lora_id=1, lora_name=name)


def test_a_full_namespace_table_forgets_the_least_recently_used_namespaces():
    ix = Index(max_namespaces=32)
    sink = EventSink(ix, BS, "sha256", None, "auto")
    ctx = StreamContext(POD, MODEL)
    sink.apply(ctx, encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT)]))
    # A flood of adapter names, one per batch: the model keeps publishing, so it stays.
    for i in range(100):
        sink.apply(ctx, encode_batch([lora_store("lora-%d" % i, first_hash=1000 * i)]))
        assert ix.namespaces[0] <= 32
    assert sink.counters["namespaces_evicted"] == 101 - ix.namespaces[0]
    kept = [i for i in range(100) if "lora-%d" % i in sink.namespaces()]
    gone = [i for i in range(100) if i not in kept]
    assert MODEL in sink.namespaces() and kept and gone
    assert kept == list(range(100 - len(kept), 100))     # the most recent ones stayed
    # The model's entries and the kept adapters' are all the index holds.
    assert ix.lookup_prefix(MODEL, vllm_keys(PROMPT)) == {POD: (4, {"gpu": 4})}
    assert ix.stats()["pods"] == {POD: {"gpu": 4 + 2 * len(kept)}}
    for i in kept[-3:]:
        name = "lora-%d" % i
        assert ix.lookup_prefix(name, sink.keys_for(name, OTHER)) == {POD: (2, {"gpu": 2})}
        assert ix.resolve(name, [1000 * i]) != [()]
    # An evicted adapter: no entry, no engine-map entry, removals of its blocks unresolved.
    name = "lora-%d" % gone[0]
    assert ix.resolve(name, [1000 * gone[0]]) == [()]
    assert name not in ctx.fed
    before = ix.stats()
    sink.apply(ctx, encode_batch([block_removed([1000 * gone[0]])]))
    assert ix.stats() == before
    # Named again, it starts empty, and fills as any new namespace.
    assert ix.lookup_prefix(name, BlockHasher("kvcm", None, BS, namespace=name).keys(OTHER)) == {}
    sink.apply(ctx, encode_batch([lora_store(name, first_hash=77)]))
    assert ix.lookup_prefix(name, sink.keys_for(name, OTHER)) == {POD: (2, {"gpu": 2})}
    assert_consistent(ix)


def test_a_new_base_model_ingests_after_a_flood_of_adapter_names_in_one_batch():
    ix = Index(max_namespaces=40)
    sink = EventSink(ix, BS, "sha256", None, "auto")
    flood = StreamContext("flooder", "base")
    sink.apply(flood, encode_batch([lora_store("adapter-%d" % i, first_hash=10 * i) for i in range(200)]))
    assert len(flood.fed) <= 64
    newcomer = StreamContext(POD, "new-model")
    sink.apply(newcomer, encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT)]))
    assert ix.lookup_prefix("new-model", vllm_keys(PROMPT)) == {POD: (4, {"gpu": 4})}
    assert ix.namespaces[0] <= 40
    assert_consistent(ix)


def test_a_stream_resolves_through_at_most_64_namespaces():
    rig = Rig()
    rig.apply(*[lora_store("a-%d" % i, first_hash=10 * i) for i in range(100)])
    assert rig.ctx.fed == tuple("a-%d" % i for i in range(36, 100))
    rig.apply(lora_store("a-40", first_hash=5000))         # fed again: the most recent
    assert rig.ctx.fed[-1] == "a-40" and len(rig.ctx.fed) == 64


@pytest.mark.parametrize("medium, tier", [("GPU", "gpu"), ("CPU", "cpu"), ("cpu", "cpu"), ("Disk", "disk"),
                                          ("DISK", "disk"), ("STORAGE", "storage"), ("FS", "fs"), ("OBJ", "obj")])
def test_the_media_of_vllm_and_lmcache_are_tiers(medium, tier):
    rig = Rig()
    rig.apply(block_stored(vllm_keys(PROMPT), None, PROMPT, medium=medium))
    assert rig.run(PROMPT) == (4, {tier: 4}) and rig.problems() == {}


def test_unknown_media_are_dropped_and_never_take_a_tier_a_known_medium_needs():
    rig = Rig()
    keys = vllm_keys(PROMPT)
    for i in range(20):
        rig.apply(block_stored(keys, None, PROMPT, medium="junk-%d" % i))
    assert rig.count("drop_unknown_tier") == 20 and rig.entries() == 0
    rig.apply(block_stored(keys, None, PROMPT, medium="CPU"), block_stored(keys[:1], None, PROMPT[:BS], medium="Disk"))
    assert rig.run(PROMPT) == (4, {"cpu": 4, "disk": 1})
    assert set(rig.ix.tiers) == {"gpu", "cpu", "disk"}
    rig.apply(block_removed(keys[:1], medium="junk-3"))
    assert rig.count("drop_unknown_tier") == 21 and rig.run(PROMPT) == (4, {"cpu": 4, "disk": 1})


def test_media_named_in_the_tier_weights_are_tiers_too():
    ix = Index()
    sink = EventSink(ix, BS, "sha256", None, "vllm", tiers={"nvme": 0.5, "gpu": 1.0})
    sink.apply(StreamContext(POD, MODEL), encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT, medium="NVMe")]))
    assert ix.lookup_prefix(MODEL, vllm_keys(PROMPT)) == {POD: (4, {"nvme": 4})}
    with pytest.raises(ValueError, match="at most 16 tiers"):
        EventSink(ix, BS, tiers=["t%d" % i for i in range(11)])


@pytest.mark.parametrize("form", ["map", "array"])
@pytest.mark.parametrize("what", ["hashes", "tokens"])
def test_an_event_too_large_is_dropped_and_counted_and_the_rest_applied(what, form):
    rig = Rig("vllm")
    if what == "hashes":
        huge = block_stored(list(range(1, (1 << 16) + 2)), None, (), 0, medium="CPU", form=form)
    else:
        huge = block_stored([1], None, [7] * ((1 << 20) + 1), (1 << 20) + 1, form=form)
    rig.apply(huge, block_stored(vllm_keys(PROMPT), None, PROMPT, form=form))
    assert rig.count("drop_event_too_large") == 1
    assert rig.run(PROMPT) == (4, {"gpu": 4}) and rig.entries() == 4
    rig.apply(block_stored(list(range(1, (1 << 16) + 1)), None, (), 0, medium="CPU", form=form))
    assert rig.count("drop_event_too_large") == 1           # the largest allowed one applies


def test_a_batch_applied_in_slices_leaves_what_a_whole_apply_leaves():
    events = [block_stored(vllm_keys(PROMPT)[i:i + 1], vllm_keys(PROMPT)[i - 1] if i else None,
                           PROMPT[i * BS:(i + 1) * BS]) for i in range(4)]
    events += [block_removed(vllm_keys(PROMPT)[3:]), all_blocks_cleared(),
               block_stored(vllm_keys(OTHER), None, OTHER, medium="CPU")] * 5
    payload = encode_batch(events)
    whole, sliced = Rig(), Rig()
    assert whole.raw(payload) > 0
    cursor = sliced.sink.cursor(sliced.ctx, payload)
    slices = 1
    while not cursor.apply(40):
        slices += 1
    assert cursor.done and slices > 10
    assert sliced.ix.stats() == whole.ix.stats()
    assert sliced.sink.counters == whole.sink.counters
    assert sliced.run(OTHER) == whole.run(OTHER) == (2, {"cpu": 2})


def test_slices_of_a_shared_index_batch_keep_their_effects_together():
    from kvcm.shared_index import Journal

    def ops_alone(ctx_pod, payload):
        journal = Journal()
        sink = EventSink(Index(), BS, "sha256", None, "vllm", journal=journal)
        sink.apply(StreamContext(ctx_pod, MODEL), payload)
        return journal.take()

    big = encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT), block_removed(vllm_keys(PROMPT)[2:]),
                        block_stored(vllm_keys(OTHER), None, OTHER, medium="CPU")] * 3)
    small = encode_batch([block_stored(vllm_keys(OTHER), None, OTHER)])
    journal = Journal()
    sink = EventSink(Index(), BS, "sha256", None, "vllm", journal=journal)
    cursor = sink.cursor(StreamContext("big", MODEL), big)
    assert not cursor.apply(100)
    sink.apply(StreamContext("small", MODEL), small)     # another stream's batch between slices
    assert journal.take() == ops_alone("small", small)
    while not cursor.apply(100):
        sink.apply(StreamContext("none", MODEL), encode_batch([]))
        assert journal.take() == ([], 0, 0)
    assert journal.take() == ops_alone("big", big)


def test_pods_that_hold_nothing_and_feed_no_stream_are_forgotten():
    ix = Index()
    sink = EventSink(ix, BS, "sha256", None, "vllm")
    keeper = StreamContext("keeper", MODEL)                 # a live stream holding nothing
    sink.apply(keeper, encode_batch([]))
    holder = StreamContext("holder", MODEL)
    sink.apply(holder, encode_batch([block_stored(vllm_keys(PROMPT), None, PROMPT)]))
    del holder                                              # its stream went; its entries stay
    for i in range(5000):                                   # junk pods, each seen once
        sink.apply(StreamContext("junk-%d" % i, MODEL), encode_batch([]))
    assert ix.pods <= 2048
    assert ix.lookup_prefix(MODEL, vllm_keys(PROMPT)) == {"holder": (4, {"gpu": 4})}
    sink.apply(keeper, encode_batch([block_stored(vllm_keys(OTHER), None, OTHER)]))
    assert ix.stats()["pods"] == {"holder": {"gpu": 4}, "keeper": {"gpu": 2}}
    assert ix.lookup_prefix(MODEL, vllm_keys(OTHER)) == {"keeper": (2, {"gpu": 2})}


def test_a_run_from_block_0_is_verified_on_its_first_2_blocks():
    # the algorithm, the seed and a salt show in block 0's hash, the chaining in block 1's:
    # a run of 65,536 blocks costs no more to check than one of 2
    tokens = list(range(100 * BS))
    keys = vllm_keys(tokens)
    rig = Rig()
    rig.apply(block_stored(keys[:2] + [k ^ 1 for k in keys[2:]], None, tokens))
    assert (rig.count("parity_verified"), rig.count("parity_mismatch")) == (1, 0)
    rig.apply(block_stored(keys[:1] + [keys[1] ^ 1] + keys[2:], None, tokens))
    assert rig.count("parity_mismatch") == 1 and rig.warnings
    rig = Rig()
    rig.apply(block_stored([keys[0] ^ 1] + keys[1:], None, tokens))
    assert rig.count("parity_mismatch") == 1 and rig.warnings
