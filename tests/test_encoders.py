"""cbor_encode vs cbor2 (canonical) and pickle5_encode vs pickle.dumps(protocol=5), byte for
byte, for both implementations."""

import pickle
import pickletools

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcm import _core

_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


def _opcodes(data):
    return [op.name for op, _, _ in pickletools.genops(data)]


def _assert_cbor(impl, obj):
    assert impl.cbor_encode(obj) == cbor2.dumps(obj, canonical=True)


def _assert_pickle(impl, obj):
    assert impl.pickle5_encode(obj) == pickle.dumps(obj, protocol=5)


def _nested(depth):
    x = None
    for _ in range(depth):
        x = (x,)
    return x


# ---- strategies ----------------------------------------------------------------------------

_text = st.text(max_size=20) | st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), max_size=8)
# pickle writes lone surrogates (surrogatepass); CBOR cannot
_text_surrogates = _text | st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8)

_cbor_atoms = (st.none() | st.booleans() | st.integers(-2 ** 64, 2 ** 64 - 1)
               | st.integers(-300, 300) | st.binary(max_size=40) | _text)
cbor_values = st.recursive(
    _cbor_atoms,
    lambda children: st.lists(children, max_size=6) | st.lists(children, max_size=6).map(tuple),
    max_leaves=40)

_pickle_atoms = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70)
                 | st.integers(-2 ** 2100, 2 ** 2100) | st.integers(-300, 70000)
                 | st.binary(max_size=300) | _text_surrogates)
pickle_values = st.recursive(
    _pickle_atoms, lambda children: st.lists(children, max_size=6).map(tuple), max_leaves=40)


@st.composite
def pickle_values_with_sharing(draw):
    """Tuples that hold the same objects (by identity) more than once: memo references."""
    pool = draw(st.lists(pickle_values, min_size=1, max_size=6))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=12))
    inner = tuple(pool[i] for i in picks)
    return (inner, pool[picks[0]], inner) if draw(st.booleans()) else inner


# ---- CBOR ----------------------------------------------------------------------------------

CBOR_INT_BOUNDARIES = [0, 23, 24, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 64 - 1,
                       -1, -24, -25, -256, -257, -65536, -65537, -2 ** 32, -2 ** 32 - 1, -2 ** 64]


@pytest.mark.parametrize("value", CBOR_INT_BOUNDARIES)
def test_cbor_int_width_boundary_matches_cbor2(impl, value):
    _assert_cbor(impl, value)
    _assert_cbor(impl, [value, (value,)])


@pytest.mark.parametrize("obj", [
    None, True, False, b"", b"\x00" * 23, b"x" * 24, b"y" * 300, "", "a" * 23, "b" * 24,
    "héllo wörld", "日本語", "\U0001f600", "z" * 70000, b"w" * 70000, [], (), [[], ()],
    ("lora", "sql", "/p"), [b"\x00" * 32, list(range(16)), None], tuple(range(30)),
    [None] * 23, [None] * 24, [0] * 256, [1] * 65536,
], ids=repr)
def test_cbor_explicit_case_matches_cbor2(impl, obj):
    _assert_cbor(impl, obj)


@_SETTINGS
@given(obj=cbor_values)
def test_cbor_random_value_matches_cbor2(impl, obj):
    _assert_cbor(impl, obj)


@pytest.mark.parametrize("value", [2 ** 64, -2 ** 64 - 1, 2 ** 100, -2 ** 100])
def test_cbor_int_out_of_range_is_refused(impl, value):
    for obj in (value, (1, [value])):
        with pytest.raises((OverflowError, ValueError)):
            impl.cbor_encode(obj)


@pytest.mark.parametrize("obj", [1.5, {"a": 1}, {1, 2}, frozenset(), object(), bytearray(b"x"),
                                 (1, 2.0), [None, {}]], ids=repr)
def test_cbor_unsupported_type_raises_type_error(impl, obj):
    with pytest.raises(TypeError):
        impl.cbor_encode(obj)


@pytest.mark.parametrize("obj", ["\udc80", ("ok", "a\ud800b")], ids=repr)
def test_cbor_lone_surrogate_raises_value_error_like_cbor2(impl, obj):
    with pytest.raises(ValueError):
        cbor2.dumps(obj, canonical=True)
    with pytest.raises(ValueError):  # UnicodeEncodeError
        impl.cbor_encode(obj)


# ---- pickle protocol 5 ---------------------------------------------------------------------

PICKLE_INT_BOUNDARIES = [0, 1, 255, 256, 65535, 65536, 2 ** 31 - 1, 2 ** 31, -1, -2 ** 31,
                         -2 ** 31 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64,
                         -2 ** 63, -2 ** 63 - 1, -2 ** 64, -128, -129, 127, 128, 2 ** 2040,
                         2 ** 2047 - 1, 2 ** 2047, -2 ** 2047, -2 ** 2047 - 1, 2 ** 5000, -3 ** 4000]


@pytest.mark.parametrize("value", PICKLE_INT_BOUNDARIES)
def test_pickle_int_width_boundary_matches_pickle(impl, value):
    _assert_pickle(impl, value)
    _assert_pickle(impl, (value, (value, value)))


s10 = "x" * 10
t3 = (1, "a", b"b")
many_strs = tuple("s%d" % i for i in range(300))
many_tuples = tuple((i,) for i in range(300))


@pytest.mark.parametrize("obj, opcode", [
    ((s10, s10), "BINGET"),
    ((t3, t3), "BINGET"),
    ((b"q" * 5, (b"q" * 5,)), None),  # equal but distinct objects: no memo reference
    (((t3, s10), s10, t3, (t3, s10)), "BINGET"),
    (many_strs + many_strs, "LONG_BINGET"),
    (many_tuples + (many_tuples[0], many_tuples[299]), "LONG_BINGET"),
    (("\udc80", "\udc80x", "é\udfff"), None),
    ((("\udc80",) * 3), "BINGET"),
], ids=["str-twice", "tuple-twice", "equal-not-identical", "nested-sharing", "300-strs-twice",
        "300-tuples-referenced", "lone-surrogates", "surrogate-twice"])
def test_pickle_memo_matches_pickle(impl, obj, opcode):
    _assert_pickle(impl, obj)
    if opcode is not None:
        assert opcode in _opcodes(impl.pickle5_encode(obj))


@pytest.mark.parametrize("obj", [
    b"b" * 65535, b"b" * 65536, "s" * 65536, "é" * 40000, (b"b" * 70000, 1, b"c" * 70000),
    ("a", "s" * 100000, "z"), (b"x" * 65536,) * 2, tuple(range(40000)),
    tuple("%03d" % (i % 1000) for i in range(20000)), tuple(range(2 ** 31 - 20000, 2 ** 31 + 20000)),
    tuple(bytes([i % 256]) * 200 for i in range(700)), (tuple(range(30000)), tuple(range(30000, 60000))),
    tuple((i, "k%d" % i) for i in range(15000)),
], ids=["bytes-65535", "bytes-65536", "str-65536", "nonascii-str-80000-bytes", "two-big-bytes",
        "big-str-between-small", "big-bytes-memo", "range-40000", "20000-3char-strs",
        "ints-around-2**31", "700-bytes-200", "two-big-tuples", "15000-pairs"])
def test_pickle_framing_beyond_64k_matches_pickle(impl, obj):
    _assert_pickle(impl, obj)
    assert len(impl.pickle5_encode(obj)) >= 65535  # the case really reaches the frame size


@pytest.mark.parametrize("obj, framed", [
    (None, False), ((), False), (1, False), (True, False), (255, False),
    (65535, True), ("", True), (b"", True), (-1, True),  # a 4-byte payload is framed
], ids=repr)
def test_pickle_frame_only_around_payloads_of_4_bytes_or_more(impl, obj, framed):
    out = impl.pickle5_encode(obj)
    assert out == pickle.dumps(obj, protocol=5)
    assert ("FRAME" in _opcodes(out)) == framed


def test_pickle_large_bytes_are_written_outside_frames(impl):
    out = impl.pickle5_encode(b"x" * 70000)
    assert out == pickle.dumps(b"x" * 70000, protocol=5)
    assert _opcodes(out)[:2] == ["PROTO", "BINBYTES"]


@_SETTINGS
@given(obj=pickle_values)
def test_pickle_random_value_matches_pickle(impl, obj):
    _assert_pickle(impl, obj)


@_SETTINGS
@given(obj=pickle_values_with_sharing())
def test_pickle_random_shared_objects_match_pickle(impl, obj):
    _assert_pickle(impl, obj)


@pytest.mark.parametrize("obj", [1.5, {"a": 1}, [1, 2], {1}, frozenset(), object(), bytearray(b"x"),
                                 (1, 2.0), ("a", [1]), ((None, {}),)], ids=repr)
def test_pickle_unsupported_type_raises_type_error(impl, obj):
    with pytest.raises(TypeError):
        impl.pickle5_encode(obj)


@pytest.mark.parametrize("encode", ["cbor_encode", "pickle5_encode"])
def test_core_refuses_deep_nesting_without_crashing(encode):
    with pytest.raises((RecursionError, ValueError)):
        getattr(_core, encode)(_nested(600))
    # the refusal leaves the encoder usable
    assert getattr(_core, encode)(_nested(3)) in (cbor2.dumps(_nested(3), canonical=True),
                                                  pickle.dumps(_nested(3), protocol=5))


@pytest.mark.parametrize("depth", [1, 50, 400])
def test_core_encodes_moderate_nesting(depth):
    obj = _nested(depth)
    _assert_cbor(_core, obj)
    _assert_pickle(_core, obj)
