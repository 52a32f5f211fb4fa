"""llm-d-inference-sim's events through `kvcm serve`: tests/gosim.py writes exactly what the
Go simulator publishes (array and map layouts, parent 0, `kv@<ip>:<port>@<model>` topics,
uint32 tokens, fixed-width hashes, batches flushed by a 1 s timer) into a kvcm running for
real (ZMQ and HTTP over loopback), scored by token ids in parity (--hash-algo llmd_fnv64a) and
in decoupled mode (vLLM's default settings, which kvcm finds do not match); and the shared
index's Redis layout read back by an llm-d-style reader written from docs/redis.md."""

import logging

import pytest

from aio import poll_until
from gosim import GoSim, llmd_keys
from serving import InProcess

MODEL = "Qwen/Qwen3-0.6B"
BS = 16
SYSTEM = [(7919 * i) % 150_000 + 70_000 for i in range(96)]      # 6 blocks, ids above 2**16
ASK_A = SYSTEM + list(range(200, 232))
ASK_B = SYSTEM + list(range(300, 332))


def scores(server, model, ids):
    return server.client.score(model, token_ids=ids)["scores"]


def wait_scores(server, model, ids, expected):
    poll_until(lambda: scores(server, model, ids) == expected,
               "scores %s for %s (got %s)" % (expected, model, scores(server, model, ids)))


@pytest.fixture
def sims():
    opened = []

    def open_sim(server, **kw):
        sim = GoSim(server.zmq_endpoint, model=MODEL, **kw)
        opened.append(sim)
        server.client.connected(sim)
        return sim
    yield open_sim
    for sim in opened:
        sim.close()


@pytest.mark.parametrize("form", ["array", "map"])
@pytest.mark.parametrize("flags, mode", [
    (("--hash-algo", "llmd_fnv64a"), "parity"),
    ((), "decoupled"),                                   # sha256, seed unset: kvcm finds llm-d keys
    (("--hash-mode", "kvcm"), "decoupled")])
def test_the_go_simulators_events_score(sims, caplog, form, flags, mode):
    server = InProcess(*flags)
    try:
        with caplog.at_level(logging.WARNING, logger="kvcm.events"):
            a = sims(server, form=form, port=8001)
            b = sims(server, form=form, ip="10.1.2.3", legacy_topic=True)     # kv@<ip>@<model>
            a.request(ASK_A)
            b.request(SYSTEM)
            b.request(ASK_B)                             # parent: the last cached block
            wait_scores(server, MODEL, ASK_A, {"127.0.0.1:8001": 8.0, "10.1.2.3": 6.0})
            wait_scores(server, MODEL, ASK_B, {"127.0.0.1:8001": 6.0, "10.1.2.3": 8.0})
            a.evict(a.keys(ASK_A)[6:])                   # one BlockRemoved per block
            wait_scores(server, MODEL, ASK_A, {"127.0.0.1:8001": 6.0, "10.1.2.3": 6.0})
        hashed = server.client.ok("POST", "/v1/hash", {"model": MODEL, "token_ids": ASK_A})
        assert hashed["mode"] == mode
        assert (hashed["keys"] == llmd_keys(ASK_A, MODEL)) == (mode == "parity")
        metrics = server.client.metrics()
        drops = {labels: n for (name, labels), n in metrics.items() if name == "kvcm_ingest_event_drops_total" and n}
        assert drops == {}
        mismatches = metrics[("kvcm_hash_parity_mismatch_total", ())]
        warned = [r.getMessage() for r in caplog.records if "llm-d keys" in r.getMessage()]
        if flags == ():
            assert mismatches == 1 and len(warned) == 1
            assert "the engines use llm-d keys: --hash-algo llmd_fnv64a --hash-seed (unset)" in warned[0]
        else:
            assert mismatches == 0 and warned == []
        pods = {(s["pod"], s["model"]) for s in server.client.streams()}
        assert pods == {("127.0.0.1:8001", MODEL), ("10.1.2.3", MODEL)}
    finally:
        server.close()


def test_lora_requests_of_the_go_simulator_score_under_the_adapters_name(sims):
    server = InProcess("--hash-algo", "llmd_fnv64a")
    try:
        sim = sims(server, port=8002)
        sim.request(ASK_A, lora="sql-adapter", lora_id=1)
        sim.request(ASK_B)
        wait_scores(server, "sql-adapter", ASK_A, {"127.0.0.1:8002": 8.0})
        assert scores(server, MODEL, ASK_A) == {"127.0.0.1:8002": 6.0}, "the base model's own blocks"
        hashed = server.client.ok("POST", "/v1/hash", {"model": "sql-adapter", "token_ids": ASK_A})
        assert hashed == {"model": "sql-adapter", "mode": "parity", "keys": llmd_keys(ASK_A, "sql-adapter")}
    finally:
        server.close()


# ---- the shared index, read as llm-d reads it ------------------------------------------------

def llmd_reader_scores(client, model, keys):
    """docs/redis.md's layout, read without kvcm: one hash per `<model>@<key>`, a field
    `<pod>@<tier>` per holder; a pod's score is its run of consecutive blocks from block 0."""
    run, alive = {}, None
    for key in keys:
        holders = {field.rpartition("@")[0] for field in client.hkeys("%s@%d" % (model, key))}
        alive = holders if alive is None else alive & holders
        if not alive:
            break
        for pod in alive:
            run[pod] = run.get(pod, 0) + 1
    return run


def test_llmd_keys_land_in_llm_ds_redis_layout(redis_server, sims):
    server = InProcess("--index", redis_server.url, "--hash-algo", "llmd_fnv64a")
    try:
        sim = sims(server, port=8003)
        sim.request(ASK_A)
        sim.request(ASK_B, lora="sql-adapter", lora_id=1)
        wait_scores(server, "sql-adapter", ASK_B, {"127.0.0.1:8003": 8.0})
        wait_scores(server, MODEL, ASK_A, {"127.0.0.1:8003": 8.0})
        raw = redis_server.client()
        assert llmd_reader_scores(raw, MODEL, llmd_keys(ASK_A, MODEL)) == {"127.0.0.1:8003": 8}
        assert llmd_reader_scores(raw, "sql-adapter", llmd_keys(ASK_B, "sql-adapter")) == {"127.0.0.1:8003": 8}
        assert llmd_reader_scores(raw, MODEL, llmd_keys(ASK_B, MODEL)) == {"127.0.0.1:8003": 6}
        assert set(raw.hkeys("%s@%d" % (MODEL, llmd_keys(ASK_A, MODEL)[0]))) == {"127.0.0.1:8003@gpu"}
        assert not raw.keys("engine:*"), "parity keys need no engine-hash map"
    finally:
        server.close()
