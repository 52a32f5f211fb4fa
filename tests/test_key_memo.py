"""KeyMemo: the keys of recently hashed blocks (kvcm/key_memo.h). A memo never changes a key:
every case compares keys and digests hashed through it with the same hasher's without it,
which test_hasher.py checks against hashlib, pickle and cbor2, on both implementations and
both SHA-256 kernels. Its hits are what make it pay: counted where they are certain."""

import threading
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcm import _core
from kvcm._core import EventSink, Index

ALGOS = ["sha256", "sha256_cbor", "sha256_cbor_64bit", "kvcm", "llmd_fnv64a", "llmd_fnv64a_nomodel"]
SHA_ALGOS = ALGOS[:4]


def ids(seed, n, top=151_000):
    return [(seed * 7919 + i * 104729) % top for i in range(n)]


def plain_and_memo(hasher, memo, tokens, parent=None):
    """(keys, digests) without the memo, then through it; both as lists."""
    plain = (list(hasher.keys(tokens, parent=parent)), hasher.digests(tokens, parent=parent))
    through = (list(hasher.keys(tokens, parent=parent, memo=memo)), hasher.digests(tokens, parent=parent, memo=memo))
    return plain, through


# requests as routers send them: shared prefixes (a system prompt, earlier turns), then their
# own ids; of every id width, 2**32 and above included (never memoized)
_PREFIXES = [ids(s, 400) for s in range(3)] + [[2 ** 32 + i for i in range(40)] + ids(9, 100)]
_request = st.tuples(st.integers(0, len(_PREFIXES) - 1), st.integers(0, 400),
                     st.lists(st.integers(0, 2 ** 64 - 1) | st.integers(0, 200), max_size=60))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(algo=st.sampled_from(ALGOS), block_size=st.sampled_from([1, 3, 4, 16, 64, 65]),
       capacity=st.sampled_from([1, 2, 5, 64, 4096]), requests=st.lists(_request, min_size=1, max_size=12),
       continued=st.booleans())
def test_keys_through_a_memo_are_the_keys(impl, kernel, algo, block_size, capacity, requests, continued):
    """Overlapping requests through one memo, small enough to evict on every request or
    large enough to keep everything: each answer equals hashing without it, also when a
    chain continues from a parent."""
    hasher = impl.BlockHasher(algo, "0", block_size)
    memo = impl.KeyMemo(capacity, block_size)
    for prefix, cut, own in requests:
        tokens = _PREFIXES[prefix][:cut] + own
        parent = hasher.digests(tokens[:block_size])[0] if continued and len(tokens) >= block_size else None
        plain, through = plain_and_memo(hasher, memo, tokens[block_size:] if parent else tokens, parent)
        assert through == plain


@pytest.mark.parametrize("algo", SHA_ALGOS)
def test_a_repeated_prefix_is_looked_up(impl, kernel, algo):
    """The second request sharing 40 blocks with the first finds those 40, hashes the rest,
    and answers as without the memo."""
    hasher = impl.BlockHasher(algo, "0", 16)
    memo = impl.KeyMemo(1 << 16, 16)     # a set of eight entries all but never meets a ninth block
    first = ids(1, 16 * 100)
    second = first[:16 * 40] + ids(2, 16 * 30)
    assert list(hasher.keys(first, memo=memo)) == list(hasher.keys(first))
    assert (memo.hits, memo.misses) == (0, 100)
    assert list(hasher.keys(second, memo=memo)) == list(hasher.keys(second))
    assert (memo.hits, memo.misses) == (40, 130)
    assert list(hasher.keys(first, memo=memo)) == list(hasher.keys(first))
    assert memo.hits == 140


def test_a_working_set_of_a_quarter_of_the_memo_is_held_whole(kernel):
    """Routers ask the same prompts in turn: blocks filling a quarter of the memo, asked
    again, are all looked up (with two entries a set, a tenth of them met two others in
    their set and were hashed again on every turn)."""
    hasher = _core.BlockHasher("sha256", "0", 16)
    memo = _core.KeyMemo(4096, 16)
    prompts = [[(p * 1_000_003 + i * 7_919) % 151_000 for i in range(16 * 256)] for p in range(4)]
    for turn in range(3):
        for p in prompts:
            hasher.keys(p, memo=memo)
        if turn == 0:
            assert (memo.hits, memo.misses) == (0, 1024)
    assert (memo.hits, memo.misses) == (2048, 1024)


def test_new_blocks_are_staged_until_entered_or_until_the_next_call(impl, kernel):
    """A caller enters a call's new blocks once its answer is out (enter_staged); if it
    does not, the next call does before looking anything up."""
    hasher = impl.BlockHasher("sha256", "0", 16)
    memo = impl.KeyMemo(4096, 16)
    tokens, other = ids(12, 16 * 20), ids(13, 16 * 300)
    expected = list(hasher.keys(tokens))
    assert list(hasher.keys(tokens, memo=memo)) == expected and memo.staged == 20
    memo.enter_staged()
    assert memo.staged == 0
    assert list(hasher.keys(tokens, memo=memo)) == expected and memo.hits == 20
    hasher.keys(other, memo=memo)
    assert memo.staged == 256                         # a call stages 256 at most
    assert list(hasher.keys(other, memo=memo)) == list(hasher.keys(other))
    assert memo.hits == 20 + 256 and memo.staged == 44


def test_a_call_enters_256_new_blocks_at_most(impl, kernel):
    """A long new prompt is entered over its next requests, its first blocks first."""
    hasher = impl.BlockHasher("sha256", "0", 16)
    memo = impl.KeyMemo(1 << 16, 16)
    tokens = ids(10, 16 * 600)
    expected = list(hasher.keys(tokens))
    for hits in (0, 256, 512, 600):
        before = memo.hits
        assert list(hasher.keys(tokens, memo=memo)) == expected
        assert memo.hits - before == hits


@pytest.mark.parametrize("algo", SHA_ALGOS)
def test_one_memo_serves_every_seed_namespace_and_algorithm(impl, algo):
    """The same ids under other seeds, namespaces and algorithms are other blocks (their
    chains start from other roots): none takes another's keys."""
    memo = impl.KeyMemo(4096, 16)
    tokens = ids(3, 16 * 20)
    hashers = [impl.BlockHasher(a, seed, 16, namespace=ns) for a in SHA_ALGOS for seed in ("0", "1", None)
               for ns in ("m1", "m2")]
    expected = [list(h.keys(tokens)) for h in hashers]
    for _ in range(2):
        assert [list(h.keys(tokens, memo=memo)) for h in hashers] == expected


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_a_parent_differing_past_its_first_bytes_is_another_chain(impl, algo):
    """Entries are found by a fingerprint of the parent's first 8 bytes and the ids; an entry
    is used only for its whole parent."""
    hasher = impl.BlockHasher(algo, "0", 16)
    memo = impl.KeyMemo(4096, 16)
    tokens = ids(7, 16 * 8)
    one = hasher.digests(ids(8, 16))[0]
    other = one[:20] + bytes([one[20] ^ 1]) + one[21:]
    assert list(hasher.keys(tokens, parent=one, memo=memo)) == list(hasher.keys(tokens, parent=one))
    assert list(hasher.keys(tokens, parent=other, memo=memo)) == list(hasher.keys(tokens, parent=other))
    assert memo.hits == 0


def test_a_memo_of_another_block_size_or_of_long_blocks_is_left_aside(impl):
    tokens = ids(4, 16 * 20)
    other = impl.KeyMemo(4096, 8)
    hasher = impl.BlockHasher("sha256", "0", 16)
    for _ in range(2):
        assert list(hasher.keys(tokens, memo=other)) == list(hasher.keys(tokens))
    assert (other.hits, other.misses) == (0, 0)
    long_blocks = impl.KeyMemo(4096, 65)
    assert long_blocks.capacity == 0
    assert list(impl.BlockHasher("sha256", "0", 65).keys(tokens, memo=long_blocks)) == \
        list(impl.BlockHasher("sha256", "0", 65).keys(tokens))
    assert impl.KeyMemo(0, 16).capacity == 0
    assert impl.KeyMemo(3, 16).capacity == 8      # a set of eight ways at least
    assert impl.KeyMemo(100, 16).capacity == 128
    with pytest.raises(ValueError):
        impl.KeyMemo(16, 0)


def test_a_core_memo_is_initialised_once():
    """Its table may be in use by a thread hashing without the GIL."""
    memo = _core.KeyMemo(64, 16)
    _core.BlockHasher("sha256", "0", 16).keys(ids(11, 16 * 4), memo=memo)
    with pytest.raises(RuntimeError):
        memo.__init__(128, 16)
    assert memo.capacity == 64 and memo.misses == 4


def test_llm_d_chains_and_extra_keys_are_not_memoized(impl):
    """FNV chains cost less than a lookup; blocks with extra keys are hashed the general way."""
    memo = impl.KeyMemo(4096, 16)
    tokens = ids(5, 16 * 10)
    fnv = impl.BlockHasher("llmd_fnv64a", "0", 16)
    assert list(fnv.keys(tokens, memo=memo)) == list(fnv.keys(tokens))
    salted = impl.BlockHasher("sha256", "0", 16)
    extra = [(("cache_salt", "s"),)]
    for _ in range(2):
        assert list(salted.keys(tokens, extra, memo=memo)) == list(salted.keys(tokens, extra))
    assert (memo.hits, memo.misses) == (0, 0)


def test_threads_sharing_a_memo_get_their_own_keys():
    """Chains of 1,024 blocks and more are hashed without the GIL: a second thread finding the
    memo in use hashes without it. Every answer stays right."""
    memo = _core.KeyMemo(8192, 16)
    hasher = _core.BlockHasher("sha256", "0", 16)
    prompts = [ids(s, 16 * 1200) for s in range(4)]
    expected = [list(hasher.keys(p)) for p in prompts]
    wrong = []

    def run(k):
        for r in range(6):
            i = (k + r) % len(prompts)
            if list(hasher.keys(array("Q", prompts[i]), memo=memo)) != expected[i]:
                wrong.append(i)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert memo.hits > 0


def test_scoring_keys_go_through_the_sinks_memo():
    """EventSink.keys_for - what every scoring request hashes with - uses the sink's memo;
    key_memo_blocks=0 turns it off."""
    tokens = ids(6, 16 * 32)
    sink = EventSink(Index(1024), 16, "sha256", "0", key_memo_blocks=1024)
    first = list(sink.keys_for("m", tokens))
    assert list(sink.keys_for("m", tokens)) == first == list(_core.BlockHasher("sha256", "0", 16).keys(tokens))
    assert (sink.key_memo.hits, sink.key_memo.misses) == (32, 32)
    assert list(sink.keys_for("m", tokens, cache_salt="s")) != first      # salted: hashed, not looked up
    off = EventSink(Index(1024), 16, "sha256", "0", key_memo_blocks=0)
    assert list(off.keys_for("m", tokens)) == list(off.keys_for("m", tokens)) == first
    assert off.key_memo.capacity == 0 and off.key_memo.hits == 0
