"""The fast path of scoring by token ids (kvcm/bodies.py, kvcm/json_ids.h) against the
general path: the same real Api handlers over one real Indexer, once with the core reading
token ids from the body's bytes and once with every body parsed by orjson, must give the same
answers and the same errors on many generated bodies (valid, invalid, unusual). The core's
reader is also checked against orjson itself, the independent reference."""

import asyncio
import json
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvcm._core import json_token_ids
from kvcm.api import Api
from kvcm.config import load_config
from kvcm.http import HttpError, Request
from kvcm.indexer import Indexer
from kvcm.metrics import Metrics

from id_bodies import MODEL, body, id_literal

BLOCK = 16
HELD = [list(range(i, i + 3 * BLOCK)) for i in (0, 1000)]   # two pods' prompts


@pytest.fixture(scope="module")
def apis():
    indexer = Indexer(load_config(["--block-size", str(BLOCK), "--zmq-bind", ""], environ={}))
    for n, ids in enumerate(HELD):
        indexer.index.store(MODEL, "pod-%d" % n, "gpu", indexer.keys(MODEL, ids))
    metrics = Metrics(indexer)
    fast, general = Api(indexer, metrics, fast_ids=True), Api(indexer, metrics, fast_ids=False)
    for api in (fast, general):      # one Dynamo worker serving MODEL (its engine is never connected)
        handler, _ = api.router.match("POST", "/register")
        register = {"instance_id": 1, "endpoint": "tcp://127.0.0.1:9", "model_name": MODEL, "block_size": BLOCK}
        if api is fast:
            asyncio.run(handler(Request("POST", "/register", body=orjson.dumps(register), peer=("127.0.0.1", 1))))
        else:                        # the same indexer: the engine is there already
            api.router.match("POST", "/query")[0].__self__.workers.update(
                fast.router.match("POST", "/query")[0].__self__.workers)
    return fast, general


PATHS = ("/v1/score", "/v1/hash", "/query")


def outcome(api, path, body, content_type=None):
    handler, _ = api.router.match("POST", path)
    headers = {} if content_type is None else {"content-type": content_type}
    try:
        response = handler(Request("POST", path, headers=headers, body=body))
        if asyncio.iscoroutine(response):      # a prompt to tokenize (there is no tokenizer: 404)
            response = asyncio.run(response)
    except HttpError as e:
        return ("error", e.status, e.message)
    return ("ok", response.status, orjson.loads(response.body))


def same(apis, body, content_type=None):
    """The /v1/score outcome, once every path answered alike both ways."""
    fast, general = apis
    for path in PATHS:
        got, want = outcome(fast, path, body, content_type), outcome(general, path, body, content_type)
        assert got == want, (path, body[:200])
    return outcome(fast, "/v1/score", body, content_type)


# ---- the properties ---------------------------------------------------------------------------

EDGES = [b'{"model": "%s", "token_ids": [%s]}' % (MODEL.encode(), x) for x in (
    b"18446744073709551615", b"18446744073709551616", b"184467440737095516150", b"99999999999999999999", b"01",
    b"-0", b"1.0", b"1e2", b"0",
    b",".join(b"1234567890123456789"[:k] for k in range(1, 20)) + b",12345678901234567890",   # every length
    b"12345678,0,9,012345678", b"123456789a")] + [
    b'{"model": "%s", "token_ids": [1, 2], "token\\u005fids": [3]}' % MODEL.encode(),   # an escaped twin, last
    b'{"model": "%s", "token\\u005fids": [3], "token_ids": [1, 2]}' % MODEL.encode(),
    b'{"model": "%s", "token_ids": [1, 2], "token_ids": [4]}' % MODEL.encode(),         # a plain twin: last wins
    b'{"model": "%s", "token_ids": [1, 2], "token_ids": "4"}' % MODEL.encode(),
    b'{"model": "%s", "x": {"token_ids": [5]}, "token_ids": [1]}' % MODEL.encode(),
]


@pytest.mark.parametrize("raw", EDGES)
def test_edge_bodies_answer_alike(apis, ids_kernel, raw):
    same(apis, raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body())
def test_fast_and_general_paths_answer_alike(apis, raw):
    same(apis, raw)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body())
def test_the_core_reads_what_orjson_reads(ids_kernel, raw):
    reads_what_orjson_reads(raw)


def reads_what_orjson_reads(raw):
    split = json_token_ids(raw)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if split is None:
        return
    ids, rest = split
    # what the fast path takes is a plain array of uint64 in a body that parses iff the rest does
    try:
        rest_parsed = orjson.loads(rest)
    except orjson.JSONDecodeError:
        assert parsed is None
        return
    assert isinstance(parsed, dict) and isinstance(parsed["token_ids"], list)
    assert list(ids) == parsed["token_ids"] and ids.typecode == "Q"
    assert rest_parsed == dict(parsed, token_ids=[])


@st.composite
def compact_body(draw):
    """Long arrays without spaces, as JSON encoders write them: the core reads these 64 bytes
    at a time (the commas of a window at once); now and then an item that is not a plain id,
    a space or the array's end falls inside a window."""
    plain = st.integers(0, 200_000).map(str) | st.integers(0, 2 ** 64 - 1).map(str)
    items = draw(st.lists(st.one_of(*[plain] * 12, id_literal()), min_size=1, max_size=300))
    tail = draw(st.sampled_from(["", ', "cache_salt": "s"', ' , "x": [1,2]']))
    return ('{"model":"%s","model_name":"%s","token_ids":[%s]%s}' % (MODEL, MODEL, ",".join(items), tail)).encode()


@settings(max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(compact_body())
def test_compact_arrays_read_as_orjson_reads_them_and_answer_alike(apis, ids_kernel, raw):
    reads_what_orjson_reads(raw)
    same(apis, raw)


@pytest.mark.parametrize("item", ["01", "00", "0", "12345678", "123456789", "18446744073709551615",
                                  "18446744073709551616", "99999999999999999999", "", "-1", " 5", "1.5", "5]"])
def test_every_item_at_every_place_of_a_compact_window(apis, ids_kernel, item):
    """One item among 100 plain ids, at each place across the first windows of 64 bytes."""
    for k in range(0, 40):
        items = ["123"] * 100
        items[k] = item
        raw = ('{"model":"%s","token_ids":[%s]}' % (MODEL, ",".join(items))).encode()
        reads_what_orjson_reads(raw)
        if k % 8 == 0:
            same(apis, raw)


def test_valid_bodies_of_every_length_take_the_fast_path(apis, ids_kernel):
    rng = random.Random(7)
    taken = 0
    # 8000 ids of up to 20 digits: past the body length the core scans without the GIL
    for n in (0, 1, 15, 16, 17, 48, 1000, 5000, 8000):
        for ids in ([rng.randrange(2 ** 64) for _ in range(n)], HELD[0][:n], HELD[1][:n] + [0] * n):
            for indent, separators in ((None, None), (2, None), (None, (",", ":"))):
                raw = json.dumps({"model": MODEL, "model_name": MODEL, "token_ids": ids}, indent=indent,
                                 separators=separators).encode()
                assert json_token_ids(raw) is not None
                taken += 1
                result = same(apis, raw)
                assert result[:2] == ("ok", 200)
    assert taken == 81
    # the held prefixes score as the general path scores them, over HTTP bodies as sent
    scored = outcome(apis[0], "/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[1]}))
    assert scored[2]["scores"] == {"pod-1": 3.0}


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "%s", "token_ids": [1, -2]}' % MODEL.encode(), "below 2**64"),
    (b'{"model": "%s", "token_ids": [18446744073709551616]}' % MODEL.encode(), "below 2**64"),
    (b'{"model": "%s", "token_ids": [1.0]}' % MODEL.encode(), "below 2**64"),
    (b'{"model": "%s", "token_ids": [1], }' % MODEL.encode(), "not valid JSON"),
    (b'{"model": "%s", "token_ids": "1"}' % MODEL.encode(), "must be a list"),
    (b'[1, 2]', "must be a JSON object"),
])
def test_errors_are_worded_as_the_general_path_words_them(apis, raw, message):
    kind, status, text = same(apis, raw)
    assert (kind, status) == ("error", 400) and message in text, text


def test_a_wrong_content_type_is_415_either_way(apis):
    raw = orjson.dumps({"model": MODEL, "token_ids": [1, 2]})
    assert same(apis, raw, "application/xml")[:2] == ("error", 415)
    assert same(apis, raw, "application/json")[:2] == ("ok", 200)
