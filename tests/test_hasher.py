"""BlockHasher: vLLM's vectors, hand recomputation from hashlib + cbor2 + pickle, and core ==
reference on random inputs."""

import hashlib
import json
import pickle
import threading
from array import array

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gosim import fnv1a64, llmd_chain, llmd_root
from kvcm import _core, _reference

ALGOS = ["sha256", "sha256_cbor", "sha256_cbor_64bit", "kvcm", "llmd_fnv64a", "llmd_fnv64a_nomodel"]
UNSET = "vllm-none-hash"

_SETTINGS = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tuples(value):
    """JSON lists stand for Python tuples in extra keys."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _vectors(shared):
    return json.loads((shared / "vectors" / "vllm_hashes.json").read_text())


def _u64(digest):
    return int.from_bytes(digest[-8:], "big")


def _cbor(x):
    return cbor2.dumps(x, canonical=True)


def manual_llmd(algo, seed, block_size, tokens, extra_keys=None, namespace=None):
    """(root, digests, keys) of llm-d's FNV-1a-64 keys (specs/llmd-request-keys.md), from
    cbor2 and a plain FNV (tests/gosim.py)."""
    root = llmd_root(seed or "", namespace, with_model=algo == "llmd_fnv64a")
    keys = llmd_chain(root, tokens, block_size, extra_keys)
    return root.to_bytes(8, "big"), [k.to_bytes(8, "big") for k in keys], keys


def manual(algo, seed, block_size, tokens, extra_keys=None, namespace=None):
    """(root, digests, keys) recomputed from the spec with hashlib, cbor2 and pickle."""
    if algo.startswith("llmd_"):
        return manual_llmd(algo, seed, block_size, tokens, extra_keys, namespace)
    seed = UNSET if seed is None else seed
    h = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    if algo == "sha256":
        root = h(pickle.dumps(seed, protocol=5))
    elif algo == "sha256_cbor":
        root = h(_cbor(seed))
    elif algo == "sha256_cbor_64bit":
        root = h(_cbor(seed))[-8:]
    else:
        root = h(_cbor([seed, None, namespace]))[-8:]
    parent, digests = root, []
    for i in range(len(tokens) // block_size):
        block = tuple(tokens[i * block_size:(i + 1) * block_size])
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        if algo == "sha256":
            parent = h(pickle.dumps((parent, block, extra), protocol=5))
        elif algo == "sha256_cbor":
            parent = h(_cbor([parent, list(block), extra]))
        else:
            parent = h(_cbor([_u64(parent), list(block), extra]))[-8:]
        digests.append(parent)
    return root, digests, [_u64(d) for d in digests]


def _check(impl, algo, seed, block_size, tokens, extra=None, namespace=None):
    root, digests, keys = manual(algo, seed, block_size, tokens, extra, namespace)
    hasher = impl.BlockHasher(algo, seed, block_size, namespace=namespace)
    assert hasher.root == root
    assert list(hasher.keys(tokens, extra)) == keys
    assert hasher.digests(tokens, extra) == digests


# ---- vLLM vectors --------------------------------------------------------------------------

def test_vectors_cover_both_algos_and_extra_keys(shared):
    cases = _vectors(shared)
    assert {c["algo"] for c in cases} == {"sha256", "sha256_cbor"}
    assert any(c["extra_keys_per_block"] for c in cases)
    assert any(not c["event_ints"] for c in cases)


@pytest.mark.parametrize("index", range(23))
def test_vllm_vector(impl, shared, index):
    cases = _vectors(shared)
    case = cases[index]
    extra = case["extra_keys_per_block"]
    extra = None if extra is None else [_tuples(e) for e in extra]
    hasher = impl.BlockHasher(case["algo"], case["seed"], case["block_size"])
    assert hasher.root.hex() == case["none_hash_hex"], case["id"]
    assert list(hasher.keys(case["token_ids"], extra)) == case["event_ints"], case["id"]
    assert [d.hex() for d in hasher.digests(case["token_ids"], extra)] == case["digests_hex"], case["id"]


def test_vector_count_matches_the_parametrization(shared):
    assert len(_vectors(shared)) == 23


# ---- hand recomputation --------------------------------------------------------------------

TOKEN_SETS = {
    "range64": list(range(64)),
    "widths": [0, 23, 24, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 7] * 3,
    "partial": list(range(1000, 1039)),
}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("seed", [None, "", "0", "42", "sëed"])
@pytest.mark.parametrize("tokens", TOKEN_SETS.values(), ids=TOKEN_SETS.keys())
def test_hasher_matches_hand_recomputation(impl, algo, seed, tokens):
    _check(impl, algo, seed, 4, tokens)
    _check(impl, algo, seed, 16, tokens)


@pytest.mark.parametrize("namespace", [None, "Qwen/Qwen3-0.6B", "sql-lora", "日本"])
def test_kvcm_root_is_cbor_of_seed_none_namespace(impl, namespace):
    expected = hashlib.sha256(_cbor(["0", None, namespace])).digest()[-8:]
    assert impl.BlockHasher("kvcm", "0", 16, namespace=namespace).root == expected
    _check(impl, "kvcm", "0", 16, list(range(48)), namespace=namespace)


def test_kvcm_namespaces_give_different_chains(impl):
    keys = {ns: list(impl.BlockHasher("kvcm", None, 16, namespace=ns).keys(range(32)))
            for ns in (None, "a", "b")}
    assert len({tuple(v) for v in keys.values()}) == 3


# specs/llmd-request-keys.md: tokens 1..32, block size 16
LLMD_VECTORS = [
    ("llmd_fnv64a", "", "test-model", [9540012594951042066, 16921089685996993662]),
    ("llmd_fnv64a", "42", "test-model", [3239622172847516705, 18365376266021390534]),
    ("llmd_fnv64a_nomodel", "", None, [14388088054628765202, 16757933279298582072]),
    ("llmd_fnv64a_nomodel", "42", None, [1321676015697095315, 9386439422462522503]),
]


@pytest.mark.parametrize("algo, seed, model, keys", LLMD_VECTORS)
def test_llmd_vector(impl, algo, seed, model, keys):
    assert list(impl.BlockHasher(algo, seed, 16, namespace=model).keys(range(1, 33))) == keys


def test_llmd_unset_seed_is_the_empty_string_not_vllms_root(impl):
    for algo in ("llmd_fnv64a", "llmd_fnv64a_nomodel"):
        unset = impl.BlockHasher(algo, None, 16, namespace="m")
        assert unset.root == impl.BlockHasher(algo, "", 16, namespace="m").root
        assert unset.root != impl.BlockHasher(algo, "vllm-none-hash", 16, namespace="m").root


def test_llmd_root_payload_is_the_specs_example():
    payload = _cbor([fnv1a64(b""), None, "test-model"])
    assert payload.hex() == "831bcbf29ce484222325f66a746573742d6d6f64656c"
    assert _core.BlockHasher("llmd_fnv64a", "", 16, namespace="test-model").root == fnv1a64(payload).to_bytes(8, "big")


def test_64bit_legacy_root_is_last8_of_cbor_seed(impl):
    d = hashlib.sha256(_cbor("0")).digest()
    assert impl.BlockHasher("sha256_cbor_64bit", "0", 16).root == d[-8:]


@pytest.mark.parametrize("algo", ALGOS)
def test_hasher_with_tagged_extra_keys_matches_hand_recomputation(impl, algo):
    extra = [(("lora", "sql", "/p"), ("cache_salt", "tenant-a")), None, (("mm", "img0", 3),),
             (("lora", "sql", "/p"),)]
    _check(impl, algo, "0", 16, list(range(64)), extra)


# ---- core == reference on random inputs -----------------------------------------------------

_tokens = st.lists(st.integers(0, 2 ** 32) | st.integers(0, 2 ** 64 - 1), max_size=300)
_extra_item = st.recursive(st.text(max_size=8) | st.integers(-2 ** 63, 2 ** 64 - 1),
                           lambda c: st.lists(c, max_size=3).map(tuple), max_leaves=6)
_extra = st.none() | st.lists(st.none() | st.lists(_extra_item, max_size=3).map(tuple), max_size=8)
_seed = st.sampled_from([None, "", "0"]) | st.text(max_size=12)


def _as_container(tokens, kind):
    if kind == "tuple":
        return tuple(tokens)
    if kind == "array" and all(t < 2 ** 32 for t in tokens):
        return array("I", tokens)
    if kind == "array":
        return array("Q", tokens)
    return list(tokens)


@_SETTINGS
@given(algo=st.sampled_from(ALGOS), seed=_seed, block_size=st.integers(1, 70), tokens=_tokens,
       extra=_extra, namespace=st.none() | st.text(max_size=10),
       kind=st.sampled_from(["list", "tuple", "array"]))
def test_core_matches_reference_on_random_input(algo, seed, block_size, tokens, extra, namespace, kind):
    core = _core.BlockHasher(algo, seed, block_size, namespace=namespace)
    ref = _reference.BlockHasher(algo, seed, block_size, namespace=namespace)
    assert core.root == ref.root
    container = _as_container(tokens, kind)
    assert list(core.keys(container, extra)) == list(ref.keys(tokens, extra))
    assert core.digests(container, extra) == ref.digests(tokens, extra)


@settings(max_examples=100, deadline=None)
@given(algo=st.sampled_from(ALGOS), seed=_seed, block_size=st.integers(1, 70), tokens=_tokens,
       extra=_extra)
def test_core_matches_hand_recomputation_on_random_input(algo, seed, block_size, tokens, extra):
    _check(_core, algo, seed, block_size, tokens, extra)


# ---- both SHA-256 kernels, every id width ---------------------------------------------------
# Blocks without extra keys are encoded straight into the SHA-256 input (kvcm/block_chain.h),
# with SHA-NI the next block between the current block's rounds: every id encoding (CBOR's
# 1/2/3/5/9 bytes, pickle's BININT1/BININT2/BININT/LONG1), message lengths around the
# padding limits and both kernels, against hashlib + pickle + cbor2.

_WIDTHS = [(0, 23), (24, 255), (256, 65535), (65536, 2 ** 31 - 1), (2 ** 31, 2 ** 32 - 1),
           (2 ** 32, 2 ** 63 - 1), (2 ** 63, 2 ** 64 - 1)]
_mixed_tokens = st.lists(st.sampled_from(_WIDTHS).flatmap(lambda w: st.integers(*w)), max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(algo=st.sampled_from(ALGOS), block_size=st.integers(1, 80), tokens=_mixed_tokens,
       buffer=st.booleans())
def test_chain_matches_hand_recomputation_with_either_kernel(kernel, algo, block_size, tokens, buffer):
    root, digests, keys = manual(algo, "0", block_size, tokens)
    hasher = _core.BlockHasher(algo, "0", block_size)
    assert list(hasher.keys(array("Q", tokens) if buffer else tokens)) == keys
    assert hasher.digests(tokens) == digests


@pytest.mark.parametrize("block_size", [1, 3, 4, 16, 64, 65, 4096])
@pytest.mark.parametrize("algo", ALGOS)
def test_long_chain_matches_hand_recomputation_with_either_kernel(kernel, algo, block_size):
    """Many blocks in a row (the next one is written while this one is hashed), ids of every
    width, block sizes on both sides of the on-stack buffers."""
    n = max(40 * block_size, 4096) + 5
    tokens = [(i * 2654435761 * (1 + (i % 7) * 2 ** (4 * (i % 17)))) % 2 ** 64 for i in range(n)]
    _, digests, keys = manual(algo, "0", block_size, tokens)
    hasher = _core.BlockHasher(algo, "0", block_size)
    assert list(hasher.keys(tokens)) == keys
    assert hasher.digests(tokens) == digests


@pytest.mark.parametrize("parent", [0, 1, 23, 24, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32,
                                    2 ** 64 - 1])
@pytest.mark.parametrize("algo", ["sha256_cbor_64bit", "kvcm", "llmd_fnv64a"])
def test_short_parent_key_heads_match_the_reference_with_either_kernel(kernel, algo, parent):
    """A uint64 parent below 2**32 has a CBOR head shorter than the usual 9 bytes (one block
    in 2**32 meets one): the message moves down."""
    tokens = [(i * 40503) % 151000 for i in range(16 * 12)]
    expected = list(_reference.BlockHasher(algo, "0", 16).keys(tokens, parent=parent))
    assert list(_core.BlockHasher(algo, "0", 16).keys(tokens, parent=parent)) == expected


# ---- chaining and block boundaries ---------------------------------------------------------

@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("split", [0, 1, 3, 10])
def test_continuing_with_parent_equals_hashing_the_whole_list(impl, algo, split):
    bs = 8
    tokens = [t * 7919 % 151000 for t in range(10 * bs + 5)]
    extra = [None, (("cache_salt", "x"),)] + [None] * 7 + [(("mm", "a", 0),)]
    hasher = impl.BlockHasher(algo, "0", bs)
    whole = list(hasher.keys(tokens, extra))
    head = hasher.digests(tokens[:split * bs], extra[:split])
    parent = head[-1] if head else None
    tail = list(hasher.keys(tokens[split * bs:], extra[split:], parent=parent))
    assert whole == whole[:split] + tail
    assert hasher.digests(tokens, extra) == head + hasher.digests(tokens[split * bs:], extra[split:], parent=parent)


@pytest.mark.parametrize("algo", ["sha256_cbor_64bit", "kvcm", "llmd_fnv64a", "llmd_fnv64a_nomodel"])
def test_64bit_chains_accept_the_parent_key_as_int(impl, algo):
    hasher = impl.BlockHasher(algo, "0", 4)
    keys = list(hasher.keys(range(20)))
    assert list(hasher.keys(range(8, 20), parent=keys[1])) == keys[2:]
    assert list(hasher.keys(range(8, 20), parent=keys[1].to_bytes(8, "big"))) == keys[2:]


@pytest.mark.parametrize("algo", ALGOS)
def test_parent_none_starts_at_the_root(impl, algo):
    hasher = impl.BlockHasher(algo, "0", 4)
    assert list(hasher.keys(range(12), parent=None)) == list(hasher.keys(range(12)))


@pytest.mark.parametrize("parent", [b"\x00" * 31, b"\x00" * 33, "x" * 32, 5], ids=repr)
def test_core_rejects_malformed_32_byte_parent(parent):
    with pytest.raises(ValueError):
        _core.BlockHasher("sha256", "0", 4).keys(range(8), parent=parent)


@pytest.mark.parametrize("parent", [2 ** 64, -1, b"\x00" * 7, b"\x00" * 32], ids=repr)
def test_core_rejects_malformed_64bit_parent(parent):
    with pytest.raises(ValueError):
        _core.BlockHasher("kvcm", "0", 4).keys(range(8), parent=parent)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n, block_size, expected", [
    (15, 16, 0), (16, 16, 1), (31, 16, 1), (0, 16, 0), (5, 1, 5), (139, 70, 1), (140, 70, 2)])
def test_only_full_blocks_get_a_key(impl, algo, n, block_size, expected):
    hasher = impl.BlockHasher(algo, "0", block_size)
    keys = hasher.keys(list(range(n)))
    assert len(keys) == expected
    assert len(hasher.digests(list(range(n)))) == expected
    assert list(keys) == list(hasher.keys(list(range(expected * block_size))))


def test_keys_are_an_unsigned_64bit_array(impl):
    keys = impl.BlockHasher("sha256", None, 16).keys(range(64))
    assert isinstance(keys, array) and keys.typecode == "Q"


@pytest.mark.parametrize("algo", ALGOS)
def test_missing_trailing_extra_keys_are_none(impl, algo):
    hasher = impl.BlockHasher(algo, "0", 4)
    tokens = list(range(16))
    salt = [(("cache_salt", "t"),)]
    assert list(hasher.keys(tokens, salt)) == list(hasher.keys(tokens, salt + [None] * 3))
    assert list(hasher.keys(tokens, [])) == list(hasher.keys(tokens, None))
    assert list(hasher.keys(tokens, salt)) != list(hasher.keys(tokens))
    # entries beyond the number of blocks are ignored
    assert list(hasher.keys(tokens, [None] * 4 + salt)) == list(hasher.keys(tokens))


@pytest.mark.parametrize("algo", ALGOS)
def test_extra_keys_change_only_their_block_and_later(impl, algo):
    hasher = impl.BlockHasher(algo, "0", 4)
    plain = list(hasher.keys(range(16)))
    salted = list(hasher.keys(range(16), [None, None, (("cache_salt", "t"),)]))
    assert salted[:2] == plain[:2]
    assert all(a != b for a, b in zip(salted[2:], plain[2:]))


# ---- token containers ----------------------------------------------------------------------

TOKENS = [3, 255, 256, 65535, 0, 17, 40000, 9] * 4


@pytest.mark.parametrize("make", [
    list, tuple, lambda t: array("H", t), lambda t: array("I", t), lambda t: array("L", t),
    lambda t: array("Q", t), lambda t: array("i", t), lambda t: array("q", t),
    lambda t: memoryview(array("Q", t)), lambda t: iter(t), lambda t: (x for x in t),
], ids=["list", "tuple", "array-H", "array-I", "array-L", "array-Q", "array-i", "array-q",
        "memoryview-Q", "iterator", "generator"])
@pytest.mark.parametrize("algo", ALGOS)
def test_token_containers_give_the_same_keys(impl, make, algo):
    hasher = impl.BlockHasher(algo, "0", 8)
    assert list(hasher.keys(make(TOKENS))) == list(hasher.keys(list(TOKENS)))


def test_array_Q_tokens_above_2_63_are_unsigned(impl):
    tokens = [2 ** 64 - 1, 2 ** 63, 2 ** 63 - 1, 1]
    hasher = impl.BlockHasher("sha256_cbor", "0", 4)
    assert list(hasher.keys(array("Q", tokens))) == manual("sha256_cbor", "0", 4, tokens)[2]


@pytest.mark.parametrize("typecode", ["Q", "q", "L"])
def test_token_array_is_released_after_hashing(typecode):
    """64-bit arrays are read in place while exported (so they cannot be resized meanwhile,
    even with the GIL dropped); afterwards the array is the caller's again."""
    tokens = array(typecode, range(16 * 20))
    hasher = _core.BlockHasher("sha256", "0", 16)
    assert list(hasher.keys(tokens)) == list(_reference.BlockHasher("sha256", "0", 16).keys(list(tokens)))
    tokens.append(1)  # BufferError if the export were still held
    index = _core.Index()
    index.store("m", "pod", "gpu", array(typecode, [1, 2, 3]))
    keys = array(typecode, [1, 2, 3])
    assert index.lookup_prefix("m", keys)
    keys.append(4)


@pytest.mark.parametrize("make", [bytes, bytearray, lambda t: memoryview(bytes(t))],
                         ids=["bytes", "bytearray", "memoryview-B"])
def test_byte_strings_are_sequences_of_small_token_ids(impl, make):
    tokens = [1, 2, 3, 250, 0, 9, 8, 7]
    hasher = impl.BlockHasher("sha256", "0", 4)
    assert list(hasher.keys(make(tokens))) == list(hasher.keys(tokens))


def test_strided_buffer_of_tokens_is_accepted_like_the_reference():
    """A 1-D integer buffer that is not contiguous (a numpy slice like a[::2])."""
    view = memoryview(array("Q", range(32)))[::2]
    expected = list(_reference.BlockHasher("sha256", "0", 4).keys(view))
    assert expected == list(_reference.BlockHasher("sha256", "0", 4).keys(list(range(0, 32, 2))))
    assert list(_core.BlockHasher("sha256", "0", 4).keys(view)) == expected


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [
    [1, -1, 2, 3], [-2 ** 70] * 4, [2 ** 64, 0, 0, 0], array("q", [0, 1, -5, 2]),
    array("l", [0, 1, -5, 2]), array("i", [-1] * 4), array("h", [5, -2, 0, 1]), array("b", [0, 0, 0, -1]),
], ids=repr)
def test_token_out_of_range_raises_value_error(impl, tokens):
    with pytest.raises(ValueError):
        impl.BlockHasher("sha256", "0", 4).keys(tokens)


@pytest.mark.parametrize("tokens", [[1, 2.0, 3, 4], [1, None, 3, 4], ["1", "2", "3", "4"], "1234",
                                    [1, 2, 3, b"4"]], ids=repr)
def test_core_non_int_token_raises_type_error(tokens):
    with pytest.raises(TypeError):
        _core.BlockHasher("sha256", "0", 4).keys(tokens)


@pytest.mark.parametrize("block_size", [0, -1, -16])
def test_non_positive_block_size_raises_value_error(impl, block_size):
    with pytest.raises(ValueError):
        impl.BlockHasher("sha256", None, block_size)


@pytest.mark.parametrize("algo", ["xxhash", "SHA256", "", "sha256_cbor_32bit"])
def test_unknown_algo_raises_value_error(impl, algo):
    with pytest.raises(ValueError):
        impl.BlockHasher(algo, None, 16)


@pytest.mark.parametrize("seed", [0, b"0", 42])
def test_non_str_seed_raises_type_error(impl, seed):
    with pytest.raises(TypeError):
        impl.BlockHasher("sha256", seed, 16)


def test_unsupported_extra_key_type_raises_type_error(impl):
    with pytest.raises(TypeError):
        impl.BlockHasher("sha256", "0", 4).keys(range(8), [None, (1.5,)])


def test_hasher_is_usable_after_an_error(impl):
    hasher = impl.BlockHasher("sha256", "0", 4)
    expected = list(hasher.keys(range(8)))
    with pytest.raises(ValueError):
        hasher.keys([0, 1, 2, -3, 4, 5, 6, 7])
    assert list(hasher.keys(range(8))) == expected


# ---- large blocks and long inputs ----------------------------------------------------------

@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("block_size, big", [(4096, True), (5000, False), (7000, True), (20000, False)])
def test_large_blocks_match_reference(algo, block_size, big):
    """Blocks above 4096 tokens take the generic path; with big ids a pickle block crosses 64 KiB."""
    n = 2 * block_size + 3
    tokens = [(i * 2654435761 * (2 ** 31 + 1 if big else 1)) % (2 ** 64 if big else 2 ** 31) for i in range(n)]
    core = _core.BlockHasher(algo, "0", block_size)
    ref = _reference.BlockHasher(algo, "0", block_size)
    extra = [None, (("cache_salt", "s"),)]
    assert list(core.keys(tokens)) == list(ref.keys(tokens))
    assert core.digests(tokens, extra) == ref.digests(tokens, extra)


@pytest.mark.parametrize("algo", ALGOS)
def test_long_input_matches_reference(algo):
    tokens = [(i * 40503) % 151000 for i in range(64 * 1024 + 7)]
    core = _core.BlockHasher(algo, None, 16)
    ref = _reference.BlockHasher(algo, None, 16)
    assert core.digests(tokens) == ref.digests(tokens)
    assert list(core.keys(array("I", tokens))) == list(ref.keys(tokens))


def test_long_inputs_hashed_concurrently_from_threads_match_reference():
    hashers = {algo: _core.BlockHasher(algo, "0", 16) for algo in ALGOS}
    inputs = [[(i * 7 + k) % 100000 for i in range(16 * 500)] for k in range(8)]
    expected = {(algo, k): list(_reference.BlockHasher(algo, "0", 16).keys(inputs[k]))
                for algo in ALGOS for k in range(len(inputs))}
    results, errors = {}, []

    def work(algo, k):
        try:
            for _ in range(3):
                results[(algo, k)] = list(hashers[algo].keys(inputs[k]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=key) for key in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == expected


def test_the_twin_and_the_core_name_the_same_algorithms_in_the_same_order():
    """One list of algorithms: the core's (its hasher indexes it); the engines' algorithms are
    all of them but kvcm's own chain, and the twin restates the same."""
    from kvcm import _core, _reference
    assert _reference.ALGORITHMS == _core.ALGORITHMS
    assert _core.ENGINE_ALGORITHMS == tuple(a for a in _core.ALGORITHMS if a != "kvcm")
