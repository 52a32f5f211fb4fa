"""llm-d interop in the event sink: llm-d's request keys as the engines' hash
(llmd_fnv64a, llmd_fnv64a_nomodel; specs/llmd-request-keys.md), the Go simulator's parent 0,
LoRA namespaces under llm-d keys, what a mismatch says, and unresolvable parents. Keys come
from tests/gosim.py (cbor2 and a plain FNV), never from kvcm's hasher."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gosim import llmd_chain, llmd_keys, llmd_root
from test_events import Rig as events_rig
from kvcm import _core, _reference
from kvcm._core import ENGINE_ALGORITHMS, BlockHasher, EventSink, Index, StreamContext
from kvcm.publisher import block_stored, encode_batch

MODEL = "Qwen/Qwen3-0.6B"
POD = "10.0.0.7:8000"
BS = 16
PROMPT = list(range(1000, 1064))       # 4 blocks
LONGER = PROMPT + list(range(5000, 5032))


class Rig(events_rig):
    """One stream (POD, MODEL) into a fresh Index through an EventSink; other streams too."""

    def __init__(self, algo="sha256", seed=None, hash_mode="auto"):
        super().__init__(hash_mode, seed, algo, MODEL, POD)

    def apply(self, *events, ctx=None):
        return self.sink.apply(ctx or self.ctx, encode_batch(events, ts=1.0))

    def drops(self):
        return {name: n for name, n in self.sink.counters.items() if name.startswith("drop_") and n}


def go_stored(keys, parent, tokens, **fields):
    """The Go simulator's array BlockStored: 0 as the parent of a chain's first block."""
    return block_stored(keys, 0 if parent is None else parent, tokens, BS, form="array", **fields)


# ---- the hash algorithms -------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(algo=st.sampled_from(["llmd_fnv64a", "llmd_fnv64a_nomodel"]),
       seed=st.sampled_from([None, "", "42"]) | st.text(max_size=8),
       model=st.text(max_size=24), block_size=st.integers(1, 40),
       tokens=st.lists(st.integers(0, 2 ** 32 - 1), max_size=200))
def test_llmd_keys_match_cbor2_and_a_plain_fnv_on_random_input(algo, seed, model, block_size, tokens):
    root = llmd_root(seed or "", model, with_model=algo == "llmd_fnv64a")
    expected = llmd_chain(root, tokens, block_size)
    for impl in (_core, _reference):
        hasher = impl.BlockHasher(algo, seed, block_size, namespace=model)
        assert list(hasher.keys(tokens)) == expected


def test_the_sink_takes_every_engine_algorithm_and_no_other():
    assert set(ENGINE_ALGORITHMS) == {"sha256", "sha256_cbor", "sha256_cbor_64bit", "llmd_fnv64a",
                                      "llmd_fnv64a_nomodel"}
    for algo in ENGINE_ALGORITHMS:
        EventSink(Index(), BS, algo)
    with pytest.raises(ValueError, match="cannot be an engine's"):
        EventSink(Index(), BS, "kvcm")


# ---- parent 0 ------------------------------------------------------------------------------

def test_parent_zero_starts_a_decoupled_chain_at_the_root():
    rig = Rig(hash_mode="kvcm")
    rig.apply(go_stored([11, 12, 13, 14], None, PROMPT))
    rig.apply(go_stored([15, 16], 14, LONGER[64:]))
    assert rig.drops() == {}
    assert rig.run(LONGER) == (6, {"gpu": 6})


def test_parent_zero_of_a_first_block_is_verified_in_parity():
    rig = Rig("llmd_fnv64a")
    rig.apply(go_stored(llmd_keys(PROMPT, MODEL), None, PROMPT))
    assert rig.sink.counters["parity_verified"] == 1
    assert rig.run(PROMPT) == (4, {"gpu": 4})


def test_a_known_block_zero_stays_a_parent():
    rig = Rig(hash_mode="kvcm")
    rig.apply(block_stored([0], None, PROMPT[:16]))          # an engine whose hash happens to be 0
    rig.apply(go_stored([21, 22, 23], 0, PROMPT[16:]))
    assert rig.run(PROMPT) == (4, {"gpu": 4})


# ---- the stock simulator against vLLM's default settings ----------------------------------

@pytest.mark.parametrize("algo, seed, flag", [
    ("llmd_fnv64a", "", "--hash-algo llmd_fnv64a --hash-seed (unset)"),
    ("llmd_fnv64a", "42", "--hash-algo llmd_fnv64a --hash-seed '42'"),
    ("llmd_fnv64a_nomodel", "", "--hash-algo llmd_fnv64a_nomodel --hash-seed (unset)")])
def test_llmd_keys_are_named_in_the_mismatch_warning_and_still_score(algo, seed, flag):
    rig = Rig()                                              # vLLM's defaults: sha256, seed unset
    keys = llmd_chain(llmd_root(seed, MODEL, with_model=algo == "llmd_fnv64a"), LONGER, BS)
    rig.apply(go_stored(keys[:4], None, PROMPT))
    rig.apply(go_stored(keys[4:], keys[3], LONGER[64:]))
    assert len(rig.warnings) == 1
    assert "the engines use llm-d keys: %s" % flag in rig.warnings[0]
    assert rig.sink.mode_of(MODEL) == "decoupled"
    assert rig.sink.counters["parity_mismatch"] == 1
    assert rig.drops() == {}
    assert rig.run(LONGER) == (6, {"gpu": 6})


def test_vllm_keys_under_llmd_settings_are_named_too():
    rig = Rig("llmd_fnv64a")
    rig.apply(go_stored(list(BlockHasher("sha256", None, BS).keys(PROMPT)), None, PROMPT))
    assert "match --hash-algo sha256 --hash-seed (unset), not kvcm's --hash-algo llmd_fnv64a" in rig.warnings[0]


def test_keys_salted_with_a_served_alias_mismatch_with_a_hint():
    """The topic names the base --model; an alias salts the keys (the spec's last section)."""
    rig = Rig("llmd_fnv64a")
    rig.apply(go_stored(llmd_keys(PROMPT, "my-alias"), None, PROMPT))
    assert "--served-model-name" in rig.warnings[0]
    assert rig.sink.mode_of(MODEL) == "decoupled"
    assert rig.run(PROMPT) == (4, {"gpu": 4})


# ---- parity under llm-d keys ---------------------------------------------------------------

@pytest.mark.parametrize("algo", ["llmd_fnv64a", "llmd_fnv64a_nomodel"])
@pytest.mark.parametrize("seed", [None, "42"])
def test_llmd_parity_keys_requests_as_the_engines_do(algo, seed):
    rig = Rig(algo, seed)
    root = llmd_root(seed or "", MODEL, with_model=algo == "llmd_fnv64a")
    keys = llmd_chain(root, LONGER, BS)
    rig.apply(go_stored(keys[:4], None, PROMPT))
    rig.apply(go_stored(keys[4:], keys[3], LONGER[64:]))
    assert rig.warnings == [] and rig.sink.mode_of(MODEL) == "parity"
    assert list(rig.sink.keys_for(MODEL, LONGER)) == keys
    assert rig.run(LONGER) == (6, {"gpu": 6})
    other = list(rig.sink.keys_for("another-model", LONGER))
    assert (other == keys) == (algo == "llmd_fnv64a_nomodel"), "only llmd_fnv64a salts with the model"


def test_llm_d_keys_carry_no_cache_salt():
    rig = Rig("llmd_fnv64a")
    assert list(rig.sink.keys_for(MODEL, PROMPT, cache_salt="tenant-a")) == llmd_keys(PROMPT, MODEL)


def test_llmd_lora_blocks_are_verified_in_parity_under_the_lora_name():
    rig = Rig("llmd_fnv64a")
    keys = llmd_keys(PROMPT, "sql-adapter")
    rig.apply(go_stored(keys, None, PROMPT, lora_id=1, lora_name="sql-adapter"))
    namespace = rig.sink.namespaces()["sql-adapter"]
    assert (namespace["mode"], namespace["lora"], namespace["diagnosis"]) == ("parity", True, None)
    assert rig.sink.counters["parity_verified"] == 1 and rig.warnings == []
    assert list(rig.sink.keys_for("sql-adapter", PROMPT)) == keys
    assert rig.run(PROMPT, ns="sql-adapter") == (4, {"gpu": 4})
    assert rig.run(PROMPT) == (0, {}), "the base model's namespace holds none of it"


def test_a_lora_known_by_its_id_alone_is_decoupled_under_llmd_keys():
    rig = Rig("llmd_fnv64a")
    rig.apply(go_stored(llmd_keys(PROMPT, "whatever"), None, PROMPT, lora_id=3))
    assert rig.sink.namespaces()["lora-id-3"]["mode"] == "decoupled"
    assert rig.warnings == [] and rig.run(PROMPT, ns="lora-id-3") == (4, {"gpu": 4})


def test_vllm_lora_blocks_stay_decoupled():
    rig = Rig()
    rig.apply(go_stored([31, 32, 33, 34], None, PROMPT, lora_id=1, lora_name="sql-adapter"))
    assert rig.sink.namespaces()["sql-adapter"]["mode"] == "decoupled"


def test_a_lora_learns_its_base_model_from_the_streams_that_fed_it():
    rig = Rig()
    rig.apply(go_stored([31, 32, 33, 34], None, PROMPT, lora_id=1, lora_name="sql-adapter"))
    other = StreamContext("10.0.0.8:8000", "another-model")
    rig.apply(go_stored([41, 42, 43, 44], None, PROMPT, lora_id=1, lora_name="sql-adapter"), ctx=other)
    assert rig.sink.base_model("sql-adapter") == MODEL
    assert rig.sink.base_model(MODEL) is None and rig.sink.base_model("never-seen") is None


# ---- unresolvable parents ------------------------------------------------------------------

def test_unknown_parents_are_counted_as_drops_and_logged_once_per_stream(caplog):
    rig = Rig(hash_mode="kvcm")
    other = StreamContext("10.0.0.8:8000", MODEL)
    with caplog.at_level(logging.WARNING, logger="kvcm.events"):
        rig.apply(go_stored([11, 12], 4242, PROMPT[:32]))
        rig.apply(go_stored([13, 14], 4343, PROMPT[32:]))
        rig.apply(go_stored([15], 4444, PROMPT[:16]), ctx=other)
    assert rig.drops() == {"drop_unknown_parent": 3}
    lines = [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("stream %s/%s: dropped a BlockStored whose parent block 4242" % (POD, MODEL))
    assert "--replay-endpoint" in lines[0] and 'reason="unknown_parent"' in lines[0]
    assert lines[1].startswith("stream 10.0.0.8:8000/%s:" % MODEL)
