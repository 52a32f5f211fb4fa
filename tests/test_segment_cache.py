"""kvcm.segment_cache: encoding with remembered pieces gives exactly the ids of plain
encoding (`tokenizers`' own, uncached) on every fixture tokenizer, for random texts around
their added tokens and for chat conversations growing turn by turn; tokenizers whose pieces
are not encoded independently get no cache."""

import os
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcm.segment_cache import MIN_PIECE_CHARS, SegmentCache
from kvcm.tokenize import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(os.environ.get("KVCM_SHARED", ROOT.parent / "shared")) / "fixtures" / "tokenizers"
MODELS = ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-nemo-instruct-2407", "gpt2", "all-minilm-l6-v2"]
CHAT_MODELS = ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-nemo-instruct-2407"]

pytestmark = pytest.mark.skipif(not (FIXTURES / "gpt2" / "tokenizer.json").is_file(),
                                reason="../shared/fixtures/tokenizers is not beside the project")

_TOKENIZERS = {}


def tokenizer(model):
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = Tokenizer(FIXTURES / model)
    return _TOKENIZERS[model]


def plain(tok, text):
    """The ids `tokenizers` gives, without kvcm's cache."""
    return tok.backend.encode(text, add_special_tokens=False).ids


WORDS = ("KV-cache aware routing sends each request to the engine holding its prefix. Ünïcödé "
         "façade, 日本語の文章、😀👍🏽; numbers 1234567 and code `x += 1`\n\n  ").split(" ")


def _part(added):
    long_text = st.lists(st.sampled_from(WORDS), min_size=12, max_size=40).map(" ".join)
    return (st.sampled_from(added) | st.text(max_size=12) | long_text
            | st.sampled_from([" ", "\n", "\n\n", "  ", "\t", "user\n", " assistant"]))


@pytest.mark.parametrize("model", MODELS)
def test_every_fixture_tokenizer_gets_a_cache(model):
    assert tokenizer(model).segment_cache is not None


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_cached_encoding_equals_plain_encoding(model, data):
    """Texts made of the tokenizer's added tokens, long runs of text (cached) and short bits
    between them; each text's growing prefixes (a conversation) encoded in turn, twice."""
    tok = tokenizer(model)
    added = sorted(tok.backend.get_added_tokens_decoder()[i].content
                   for i in list(tok.backend.get_added_tokens_decoder())[:40])
    parts = data.draw(st.lists(_part(added), min_size=1, max_size=14))
    for end in range(1, len(parts) + 1):
        text = "".join(parts[:end])
        expected = plain(tok, text)
        assert tok.encode(text, add_special_tokens=False) == expected
        assert tok.encode(text, add_special_tokens=False) == expected   # from the cache now


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_a_growing_chat_encodes_only_its_new_pieces(model):
    tok = tokenizer(model)
    cache = tok.segment_cache
    messages = [{"role": "system", "content": "You are a careful assistant. " * 20}]
    for turn in range(6):
        messages.append({"role": "user", "content": "Question %d about KV caches, Ünïcödé 日本語: %s" % (
            turn, "why does the prefix matter? " * (5 + turn))})
        text = tok.render_chat(messages)
        hits = cache.hits
        assert tok.encode(text, add_special_tokens=False) == plain(tok, text)
        if turn >= 2:   # earlier messages came from the cache (Mistral moves the system prompt
            assert cache.hits - hits >= turn - 1    # to the last user message: one turn later)
        messages.append({"role": "assistant", "content": "Answer %d: " % turn + "it is reused. " * 9})


def test_pieces_are_remembered_within_the_token_bound():
    tok = tokenizer("qwen2.5-instruct")
    cache = SegmentCache.for_backend(tok.backend, tok._encode_pieces, max_tokens=200)
    pieces = ["piece %d: %s" % (i, "some words to encode here " * 4) for i in range(30)]
    text = "<|im_end|>".join(pieces)
    assert all(len(p) >= MIN_PIECE_CHARS for p in pieces)
    assert cache.encode(text) == plain(tok, text)
    assert 0 < len(cache) < 30 and cache._tokens <= 200


def _toy(pre_tokenizer, special):
    """A word-level tokenizer with one special token, built in memory."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "▁a": 1, "a": 2, "▁b": 3, "b": 4, "▁": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens([special])
    return tok


def _encode_batch(backend):
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def test_a_first_piece_rule_gets_no_cache_and_would_need_none():
    """Metaspace with prepend_scheme "first" encodes the text's first piece differently: a
    piece cached from the start of one text would be wrong inside another."""
    tokenizers = pytest.importorskip("tokenizers")
    special = tokenizers.AddedToken("<sep>", special=True, normalized=False)
    backend = _toy(tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first"), special)
    assert SegmentCache.for_backend(backend, _encode_batch(backend)) is None
    forced = SegmentCache({"<sep>": backend.token_to_id("<sep>")}, _encode_batch(backend))
    text = "a b<sep>a b"
    assert forced.encode(text) != backend.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("option", ["lstrip", "rstrip", "single_word", "normalized"])
def test_special_tokens_that_strip_or_look_around_are_not_cut_at(option):
    tokenizers = pytest.importorskip("tokenizers")
    flags = {"special": True, "normalized": False, option: True}
    backend = _toy(tokenizers.pre_tokenizers.Whitespace(), tokenizers.AddedToken("<sep>", **flags))
    assert SegmentCache.for_backend(backend, _encode_batch(backend)) is None


def test_added_tokens_overlapping_a_special_one_keep_it_uncut():
    tokenizers = pytest.importorskip("tokenizers")
    backend = _toy(tokenizers.pre_tokenizers.Whitespace(),
                   tokenizers.AddedToken("<sep>", special=True, normalized=False))
    backend.add_special_tokens([tokenizers.AddedToken("<sep>>", special=True, normalized=False),
                                tokenizers.AddedToken("<end>", special=True, normalized=False)])
    cache = SegmentCache.for_backend(backend, _encode_batch(backend))
    assert cache is not None and set(cache._ids) == {"<end>"}
