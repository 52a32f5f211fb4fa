"""kvcm's Dynamo-compatible API (kvcm/dynamo.py) against NVIDIA Dynamo's own standalone
indexer (`python -m dynamo.indexer` from the venv `make prereq-dynamo` caches): both are
started, get their engines through `POST /register`, ingest the same small workload from real
ZMQ publishers, and must then give the same JSON to the same requests. Without Dynamo's venv
these tests skip, naming `make prereq-dynamo`; under CI=true they fail instead."""

import os

import orjson
import pytest

from conftest import ROOT
from kvcm.bench import phases, targets
from kvcm.bench.engines import Engines
from kvcm.bench.index import Context
from kvcm.bench.load import request_bytes
from kvcm.bench.progress import Progress
from kvcm.bench.workload import Spec, Workload

DYNAMO_PYTHON = ROOT / ".cache" / "dynamo-venv" / "bin" / "python"
MODEL, BLOCK = "bench", 16


@pytest.fixture(scope="module")
def dynamo_python():
    if not DYNAMO_PYTHON.exists():
        message = "Dynamo's indexer venv is missing: run `make prereq-dynamo` (%s)" % DYNAMO_PYTHON
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return str(DYNAMO_PYTHON)


@pytest.fixture(scope="module")
def workload():
    w = Workload(Spec(engines=3, blocks=300, prompt_tokens=((64, 1.0), (256, 1.0)), system_tokens=32,
                      event_format="map"))
    w.build()
    return w


class Loaded:
    """A target started, its engines registered through /register and the workload ingested."""

    def __init__(self, spec, workload):
        self.target = spec.start()
        self.ctx = Context(self.target, workload, Progress(0, quiet=True), type("S", (), {"open_seconds": 1})())
        try:
            self.ctx.engines = Engines(workload, self.target)
            self.ctx.engines.connect(self.ctx.conn)
            assert phases.ingest(self.ctx)["blocks"] == sum(s.blocks for s in workload.streams)
        except BaseException:
            self.close()
            raise

    def call(self, method, path, body=None):
        raw = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
        status, reply = self.ctx.conn.call(request_bytes(method, path, raw) if method == "POST"
                                           else request_bytes(method, path))
        return status, orjson.loads(reply) if reply else None

    def close(self):
        self.ctx.close()
        self.target.close()


@pytest.fixture(scope="module")
def both(dynamo_python, workload):
    api = targets.DynamoApi(MODEL, BLOCK)
    kvcm = Loaded(targets.TargetSpec("kvcm", api, start=targets.start_kvcm), workload)
    try:
        dynamo = Loaded(targets.TargetSpec("dynamo", api, start=lambda s: targets.start_dynamo(s, dynamo_python)),
                        workload)
    except BaseException:
        kvcm.close()
        raise
    yield kvcm, dynamo
    kvcm.close()
    dynamo.close()


def test_query_answers_are_the_same_json(both, workload):
    kvcm, dynamo = both
    queries = workload.queries(64, 20) + workload.queries(256, 20)
    shared_prefix = 0
    for q in queries:
        for ids in (q.tokens, q.tokens[:40], q.tokens[:BLOCK - 1], []):
            body = {"token_ids": ids, "model_name": MODEL}
            got, want = kvcm.call("POST", "/query", body), dynamo.call("POST", "/query", body)
            assert got == want, ids[:8]
            shared_prefix += len(got[1]["scores"]) > 1
    assert shared_prefix                           # the system prompts: several workers match
    # the score is the workload's own: matched tokens of the owner engine
    for q in queries:
        status, answer = kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})
        assert status == 200 and targets.DynamoApi(MODEL, BLOCK).matched(orjson.dumps(answer)) == q.expected


def test_workers_lists_the_same_instances(both):
    kvcm, dynamo = both
    (s1, got), (s2, want) = kvcm.call("GET", "/workers"), dynamo.call("GET", "/workers")
    assert s1 == s2 == 200

    def shape(workers):   # each side's engines bound their own ports
        return sorted(({**w, "endpoints": sorted(w["endpoints"]),
                        "listeners": {dp: sorted(v) for dp, v in w["listeners"].items()}} for w in workers),
                      key=lambda w: w["instance_id"])
    assert shape(got) == shape(want) and len(got) == 3
    assert kvcm.call("GET", "/workers?model_name=nobody") == dynamo.call("GET", "/workers?model_name=nobody") \
        == (200, [])


@pytest.mark.parametrize("path, body", [
    ("/query", {"token_ids": [1] * 32, "model_name": "nobody"}),                    # no such model: 404
    ("/query", {"token_ids": [1] * 32, "model_name": MODEL, "routing_group": "x"}),  # no such group: 404
    ("/query_by_hash", {"block_hashes": [1, 2, 3], "model_name": MODEL}),            # nothing held
    ("/query_by_hash", {"block_hashes": [], "model_name": MODEL}),
    ("/query_by_hash", {"block_hashes": [1], "model_name": "nobody"}),
    ("/unregister", {"instance_id": 99, "model_name": MODEL}),                       # 404
    ("/register", {"instance_id": 1, "endpoint": "tcp://127.0.0.1:9", "model_name": MODEL,
                   "block_size": BLOCK}),                                            # taken: 409
    ("/register", {"instance_id": 50, "endpoint": "tcp://127.0.0.1:9", "model_name": MODEL,
                   "block_size": 2 * BLOCK}),                                        # block size: 409
], ids=["unknown-model", "unknown-group", "unknown-hashes", "no-hashes", "hash-unknown-model",
        "unregister-unknown", "register-twice", "register-block-size"])
def test_same_status_and_shape(both, path, body):
    kvcm, dynamo = both
    (s1, got), (s2, want) = kvcm.call("POST", path, body), dynamo.call("POST", path, body)
    assert s1 == s2, (got, want)
    if s1 == 200:
        assert got == want
    else:
        assert set(got) == set(want) == {"error"}   # kvcm's error objects carry a message too


def test_query_by_hash_with_kvcm_keys_answers_as_query(both, workload):
    kvcm, _ = both
    for q in workload.queries(256, 5):
        _, keys = kvcm.call("POST", "/v1/hash", {"model": MODEL, "token_ids": q.tokens})
        by_hash = kvcm.call("POST", "/query_by_hash", {"block_hashes": keys["keys"], "model_name": MODEL})
        assert by_hash == kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})
        assert by_hash[1]["scores"]


def test_register_and_unregister_change_what_queries_see(both, workload):
    kvcm, _ = both
    q = workload.queries(256, 1)[0]
    owner = next(iter(q.expected))
    instance = owner + 1                          # bench registers engine i as instance i + 1
    status, workers = kvcm.call("GET", "/workers")
    endpoint = next(w["endpoints"]["0"] for w in workers if w["instance_id"] == instance)
    assert kvcm.call("POST", "/unregister", {"instance_id": instance, "model_name": MODEL}) == (200, {"status": "ok"})
    assert str(instance) not in kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})[1]["scores"]
    again = {"instance_id": instance, "endpoint": endpoint, "model_name": MODEL, "block_size": BLOCK}
    assert kvcm.call("POST", "/register", again) == (201, {"status": "ok"})
    # its index entries stayed (an engine removed keeps them, DESIGN.md): it matches at once
    answer = kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})[1]
    assert answer["scores"][str(instance)] == {"0": q.expected[owner]}


def test_an_engine_removed_through_v1_engines_leaves_the_queries(both, workload):
    """/query answers from the members of a routing group built once per change of the
    registrations: removing a worker's engine with DELETE /v1/engines is such a change."""
    kvcm, _ = both
    q = workload.queries(256, 1)[0]
    owner = next(iter(q.expected))
    instance = owner + 1                          # bench registers engine i as instance i + 1
    assert str(instance) in kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})[1]["scores"]
    endpoint = next(w["endpoints"]["0"] for w in kvcm.call("GET", "/workers")[1] if w["instance_id"] == instance)
    assert kvcm.call("DELETE", "/v1/engines/%d:0" % instance)[0] == 200
    assert str(instance) not in kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})[1]["scores"]
    assert instance not in [w["instance_id"] for w in kvcm.call("GET", "/workers")[1]]
    again = {"instance_id": instance, "endpoint": endpoint, "model_name": MODEL, "block_size": BLOCK}
    assert kvcm.call("POST", "/register", again) == (201, {"status": "ok"})
    assert kvcm.call("POST", "/query", {"token_ids": q.tokens, "model_name": MODEL})[1]["scores"][str(instance)] \
        == {"0": q.expected[owner]}
