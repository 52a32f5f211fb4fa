"""Property-based tests of the event sink (kvcm._core.EventSink) on generated traffic:

- any valid sequence of batches (stores with and without token ids, removals, cache resets,
  LoRA adapters, every known medium, both event encodings, two pods), applied whole or in
  slices of any size, leaves the index holding exactly what a plain Python model of the
  events says (captures.IndexModel), after every batch;
- valid batches mutated (bytes flipped, inserted, deleted, truncated; fields given values of
  other types) never raise anything but DecodeError and leave the index consistent.

Example counts are bounded so that the suite stays fast; the seeds vary between runs."""

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from captures import IndexModel
from eventgen import mutate
from kvcm._core import BlockHasher, DecodeError, EventSink, Index, StreamContext
from kvcm.publisher import all_blocks_cleared, block_removed, block_stored, encode_batch

BS = 16
MODEL = "fuzz/model"
PODS = ("pod-a", "pod-b")
HASHER = BlockHasher("sha256", None, BS)
PROMPTS = [[(p * 7919 + i * 104729) % 150_000 for i in range(4 * BS)] for p in range(3)]
KEYS = [list(HASHER.keys(p)) for p in PROMPTS]
MEDIA = (None, "GPU", "CPU", "cpu", "Disk", "STORAGE")
LORAS = ("sql", "chat")
DECODE_REASONS = ("truncated", "wrong_type", "too_deep", "bad_utf8", "invalid")


def lora_keys(lora, tokens):
    return BlockHasher("kvcm", None, BS, namespace=lora).keys(tokens)


def lora_hash(lora, prompt, block):
    """Engine hashes of adapter blocks: small, and distinct from every parity key."""
    return 1000 * (LORAS.index(lora) + 1) + 10 * prompt + block


@st.composite
def events(draw):
    kind = draw(st.sampled_from(["store", "store", "offload", "remove", "lora", "clear"]))
    form = draw(st.sampled_from(["map", "array"]))
    p = draw(st.integers(0, len(PROMPTS) - 1))
    medium = draw(st.sampled_from(MEDIA))
    if kind == "store":
        start = draw(st.integers(0, 3))
        end = draw(st.integers(start + 1, 4))
        return block_stored(KEYS[p][start:end], KEYS[p][start - 1] if start else None,
                            PROMPTS[p][start * BS:end * BS], BS, medium=medium, form=form)
    if kind == "offload":
        blocks = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
        return block_stored([KEYS[p][i] for i in blocks], None, [], 0,
                            medium=draw(st.sampled_from(["CPU", "STORAGE", "Disk"])), form=form)
    if kind == "remove":
        lora = draw(st.sampled_from((None,) + LORAS))
        block = draw(st.integers(0, 3))
        h = KEYS[p][block] if lora is None else lora_hash(lora, p, block)
        return block_removed([h], medium=medium, form=form)
    if kind == "lora":
        lora = draw(st.sampled_from(LORAS))
        end = draw(st.integers(1, 4))
        return block_stored([lora_hash(lora, p, i) for i in range(end)], None, PROMPTS[p][:end * BS], BS,
                            lora_id=1, medium=medium, lora_name=lora, form=form)
    return all_blocks_cleared(form=form)


batches = st.lists(st.tuples(st.sampled_from(PODS), st.lists(events(), max_size=6),
                             st.integers(0, 600)), min_size=1, max_size=12)


def apply_in_slices(sink, ctx, payload, slice_bytes):
    """The batch whole (slice_bytes 0) or a slice of at least slice_bytes at a time."""
    cursor = sink.cursor(ctx, payload)
    while not cursor.apply(slice_bytes):
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches)
def test_any_valid_sequence_leaves_what_the_model_says(batches):
    index = Index(max_blocks=100_000)
    sink = EventSink(index, BS, "sha256", None, "auto")
    contexts = {pod: StreamContext(pod, MODEL) for pod in PODS}
    model = IndexModel(lora_keys)
    for pod, evs, slice_bytes in batches:
        apply_in_slices(sink, contexts[pod], encode_batch(evs), slice_bytes)
        model.apply(pod, MODEL, evs)
        model.assert_matches(index)
    problems = {n: v for n, v in sink.counters.items() if n.startswith("drop_") and v}
    assert problems == {} and sink.counters["parity_mismatch"] == 0


# -- mutated batches ----------------------------------------------------------------------------

MSGPACK_INTS = st.integers(-2**63, 2**64 - 1)
OTHER_VALUES = st.one_of(
    st.none(), st.booleans(), MSGPACK_INTS, st.floats(allow_nan=True), st.text(max_size=8),
    st.binary(max_size=40), st.lists(MSGPACK_INTS, max_size=5),
    st.lists(st.lists(st.text(max_size=3), max_size=2), max_size=3),
    st.dictionaries(st.text(max_size=3), MSGPACK_INTS, max_size=2))


def retype(decoded, choice, value):
    """decoded ([ts, events, rank]) with one event field, the timestamp or the rank replaced."""
    ts, evs, rank = decoded
    if not evs or choice % 5 == 0:
        return [value, evs, rank] if choice % 2 else [ts, evs, value]
    event = evs[choice % len(evs)]
    if isinstance(event, dict):
        event[sorted(event)[choice % len(event)]] = value
    elif len(event) > 1:
        event[1 + choice % (len(event) - 1)] = value
    return [ts, evs, rank]


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                           st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid=st.lists(events(), min_size=1, max_size=6), choice=st.integers(0, 1000), value=OTHER_VALUES,
       edits=EDITS | st.none(), slice_bytes=st.integers(0, 300))
def test_mutated_batches_raise_only_decode_error_and_keep_the_index_consistent(valid, choice, value, edits,
                                                                              slice_bytes):
    payload = encode_batch(valid)
    if edits is None:
        payload = msgpack.packb(retype(msgpack.unpackb(payload), choice, value))
    else:
        payload = mutate(payload, edits)
    index = Index(max_blocks=1000)
    sink = EventSink(index, BS, "sha256", None, "auto")
    ctx = StreamContext(PODS[0], MODEL)
    sink.apply(ctx, encode_batch([block_stored(KEYS[0], None, PROMPTS[0])]))
    for check in (sink.batch_header, lambda p: apply_in_slices(sink, ctx, p, slice_bytes)):
        try:
            check(payload)
        except DecodeError as err:
            assert err.reason in DECODE_REASONS
    stats = index.stats()
    assert stats["entries"] == sum(sum(t.values()) for t in stats["pods"].values())
    assert set(stats["pods"]) <= {PODS[0]}
    # the stream goes on: a valid batch after the bad one applies as usual
    sink.apply(ctx, encode_batch([block_stored(KEYS[1], None, PROMPTS[1])]))
    blocks, tiers = index.lookup_prefix(MODEL, sink.keys_for(MODEL, PROMPTS[1]))[PODS[0]]
    assert blocks == 4 and tiers["gpu"] == 4
    sink.clear_pod(PODS[0])
    assert index.stats()["entries"] == 0


# -- the C fast path against the general path ------------------------------------------------

@st.composite
def any_events(draw):
    """Valid events (as events()), events from block 0 whose hashes are not vLLM's (a parity
    mismatch: the namespace switches to decoupled mode mid-batch, or is kept in parity under
    --hash-mode vllm), removals of anything and events of another block size."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["wrong_hashes", "remove_any", "other_size"]))
    form = draw(st.sampled_from(["map", "array"]))
    p = draw(st.integers(0, len(PROMPTS) - 1))
    if kind == "valid":
        return draw(events())
    if kind == "wrong_hashes":
        return block_stored([k + 1 for k in KEYS[p][:2]], None, PROMPTS[p][:2 * BS], BS, form=form)
    if kind == "remove_any":
        return block_removed([draw(st.sampled_from(KEYS[p] + [12345]))], medium=draw(st.sampled_from(MEDIA)),
                             form=form)
    return block_stored(KEYS[p][:1], None, PROMPTS[p][:BS], 2 * BS, form=form)


def index_state(index, sink):
    """Everything a fast path could get wrong, as comparable values."""
    lookups = {}
    for ns in (MODEL,) + LORAS:
        for tokens in PROMPTS:
            for keys in (list(HASHER.keys(tokens)), list(sink.keys_for(ns, tokens)), lora_keys(ns, tokens)):
                lookups[(ns, tuple(keys))] = index.lookup_prefix(ns, keys)
    return index.stats(), lookups, sink.counters, sink.namespaces(), sorted(sink.take_switched())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(st.sampled_from(PODS), st.lists(any_events(), max_size=8), st.integers(0, 400)),
                        min_size=1, max_size=10),
       mode=st.sampled_from(["auto", "vllm", "kvcm"]), capacity=st.sampled_from([6, 100_000]),
       mutation=st.none() | EDITS)
# a model's store after a LoRA's: the model is the stream's most recently fed namespace again
@example(batches=[(PODS[0], [block_stored(KEYS[0][:1], None, PROMPTS[0][:BS], BS),
                             block_stored([lora_hash("sql", 0, 0)], None, PROMPTS[0][:BS], BS, lora_id=1,
                                          lora_name="sql"),
                             block_stored(KEYS[0][1:2], KEYS[0][0], PROMPTS[0][BS:2 * BS], BS)], 0)],
         mode="auto", capacity=100_000, mutation=None)
def test_the_fast_path_leaves_what_the_general_path_leaves(batches, mode, capacity, mutation):
    """The same batches, whole or in slices, a small index (so that recency decides what is
    evicted) or a large one, optionally one of them mutated: the C fast path and the general
    path leave the same index, counters and namespace contracts."""
    states = []
    for fast in (True, False):
        index = Index(max_blocks=capacity)
        sink = EventSink(index, BS, "sha256", None, mode, fast_path=fast)
        contexts = {pod: StreamContext(pod, MODEL) for pod in PODS}
        for i, (pod, evs, slice_bytes) in enumerate(batches):
            payload = encode_batch(evs)
            if mutation is not None and i == len(batches) // 2:
                payload = mutate(payload, mutation)
            try:
                apply_in_slices(sink, contexts[pod], payload, slice_bytes)
            except DecodeError:
                pass
        states.append((index_state(index, sink), [contexts[pod].fed for pod in PODS]))
    assert states[0] == states[1]
