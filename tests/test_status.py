"""The status page and its JSON (GET /, /status, /v1/status) against kvcm.serve.Service
running in-process: real HTTP over TCP, real ZMQ publishers, the in-memory index and a real
Redis/Valkey shared index. The page is read back with an HTML parser (tests/status_page.py;
tests/test_status_browser.py reads it in Chromium) and compared with the JSON it renders.
The figures kvcm adds for it (scoring outcomes, per-pod blocks, the start time) are checked
in /metrics too."""

import time

import pytest

import kvcm
from kvcm import status as status_module
from kvcm._core import BlockHasher
from kvcm.metrics import quantile
from serving import QWEN, Engine, InProcess, offloaded, stored, tokens, until
from status_page import Page

OTHER = "other/model"
SEED_42 = BlockHasher("sha256", "42", 16)      # an engine whose PYTHONHASHSEED kvcm was not told


def probe_free(streams):
    """The streams of the publishers' own, without their connection probes (ranks >= 1000)."""
    return {(s["pod"], s["model"], s["dp_rank"]): s for s in streams if s["dp_rank"] < 1000}


@pytest.fixture(scope="module")
def kvcm_with_traffic():
    """A kvcm holding pod-a (parity, GPU and CPU blocks) and pod-b (another model, whose
    engine hashes with another seed), after one warm and one cold scoring request."""
    service = InProcess("--log-level", "error")
    a = Engine(service.client, service.zmq_endpoint, "pod-a", QWEN).connect()
    b = Engine(service.client, service.zmq_endpoint, "pod-b", OTHER).connect()
    try:
        warm = tokens(1, 4)
        a.send(stored(warm))
        a.send(offloaded(warm, 2))
        b.send(stored(tokens(2, 3), hasher=SEED_42))
        service.client.score(QWEN, token_ids=warm)
        service.client.score(QWEN, token_ids=tokens(9, 2))
        yield service
    finally:
        a.close()
        b.close()
        service.close()


def test_the_json_has_every_figure_of_the_page(kvcm_with_traffic):
    status = kvcm_with_traffic.client.ok("GET", "/v1/status")
    assert status["version"] == kvcm.__version__
    assert status["ready"] is True and status["ready_reason"] == "ready"
    assert status["uptime_s"] >= 0
    assert status["config"]["hash_algo"] == "sha256" and status["config"]["hash_seed"] is None
    assert status["config"]["block_size"] == 16 and status["config"]["index"] == "memory"

    streams = probe_free(status["streams"])
    a, b = streams[("pod-a", QWEN, 0)], streams[("pod-b", OTHER, 0)]
    assert (a["state"], a["last_seq"], a["gaps"], a["replays"], a["restarts"]) == ("ok", 1, 0, 0, 0)
    assert a["blocks"] == {"gpu": 4, "cpu": 2}
    assert (a["hash_mode"], a["diagnosis"]) == ("parity", None)
    assert a["last_event_age_s"] >= 0
    # the sink's diagnosis, kept for display: the seed the engine uses
    assert b["hash_mode"] == "decoupled"
    assert "match --hash-algo sha256 --hash-seed '42', not kvcm's --hash-algo sha256 --hash-seed (unset)" \
        in b["diagnosis"]
    assert b["blocks"] == {"gpu": 3}
    namespaces = {ns["name"]: ns for ns in status["namespaces"]}
    assert namespaces[OTHER]["diagnosis"] == b["diagnosis"] and namespaces[QWEN]["diagnosis"] is None

    index = status["index"]
    assert (index["backend"], index["capacity"], index["pods"]) == ("memory", 10_000_000, 2)
    assert index["entries_by_tier"] == {"cpu": 2, "gpu": 7}
    assert index["blocks"] == 7

    # one request found pod-a warm, one found nothing
    assert status["scoring"] == {"requests": 2, "warm_requests": 1, "warm_fraction": 0.5}
    recent = status["recent"]
    assert recent["score_requests"] == 2 and recent["warm_fraction"] == 0.5
    latency = recent["score_latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert recent["ingest_batches_per_s"] > 0 and recent["ingest_blocks_stored_per_s"] > 0
    assert status["drops"] == {"events": {}, "messages": {}}


def test_the_new_figures_are_metrics_too(kvcm_with_traffic):
    metrics = kvcm_with_traffic.client.metrics()
    assert metrics[("kvcm_score_requests_total", ())] == 2
    assert metrics[("kvcm_score_warm_requests_total", ())] == 1
    # the two requests share no block: each of their six was hashed and entered in the memo
    assert metrics[("kvcm_key_memo_blocks_total", (("result", "miss"),))] == 6
    assert metrics[("kvcm_key_memo_blocks_total", (("result", "hit"),))] == 0
    assert metrics[("kvcm_key_memo_capacity_blocks", ())] == 65536
    assert metrics[("kvcm_pod_blocks", (("pod", "pod-a"), ("tier", "cpu")))] == 2
    assert metrics[("kvcm_pod_blocks", (("pod", "pod-a"), ("tier", "gpu")))] == 4
    assert metrics[("kvcm_pod_blocks", (("pod", "pod-b"), ("tier", "gpu")))] == 3
    assert 0 < time.time() - metrics[("kvcm_start_time_seconds", ())] < 3600


def test_the_page_renders_the_json(kvcm_with_traffic):
    client = kvcm_with_traffic.client
    status = client.ok("GET", "/v1/status")
    for path in ("/", "/status"):
        reply = client.get(path)
        assert reply.status == 200
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in reply.headers["content-security-policy"]
        page = Page(reply.body.decode())
        assert page.refresh == "5"
        for key, stream in probe_free(status["streams"]).items():
            cells = page.streams[key]
            assert cells["state"] == stream["state"]
            assert cells["last_seq"] == "%d" % stream["last_seq"]
            assert (cells["gaps"], cells["replays"], cells["restarts"]) == ("0", "0", "0")
            assert cells["hash_mode"] == stream["hash_mode"]
            for tier in ("gpu", "cpu"):
                assert cells["blocks_" + tier] == "%d" % stream["blocks"].get(tier, 0)
        # under every stream of the model (the connection probe's too)
        assert set(page.diagnoses) == {probe_free(status["streams"])[("pod-b", OTHER, 0)]["diagnosis"]}
        assert page.namespaces[OTHER]["mode"] == "decoupled"
        namespaces = {ns["name"]: ns for ns in status["namespaces"]}
        assert page.namespaces[OTHER]["diagnosis"] == namespaces[OTHER]["diagnosis"]
        assert page.namespaces[QWEN]["diagnosis"] == ""
        assert page.figures["entries_gpu"] == "7" and page.figures["entries_cpu"] == "2"
        assert page.figures["blocks"] == "7 of 10,000,000 (< 0.1 %)"
        assert page.figures["warm"] == "50.0 % of 2"
        assert page.figures["hash"] == "--hash-algo sha256 --hash-seed (unset) --block-size 16 --hash-mode auto"
        assert "version %s" % kvcm.__version__ in page.text and "ready" in page.text


@pytest.mark.parametrize("query, refresh", [("?refresh=0", None), ("?refresh=30", "30"), ("?refresh=x", "5"),
                                            ("?refresh=99999", "3600")])
def test_the_refresh_interval_can_be_chosen(kvcm_with_traffic, query, refresh):
    page = Page(kvcm_with_traffic.client.get("/" + query).body.decode())
    assert page.refresh == refresh
    assert ("does not refresh" in page.text) == (refresh is None)


def test_the_page_is_read_only_and_self_contained(kvcm_with_traffic):
    page = Page(kvcm_with_traffic.client.get("/").body.decode())
    for tag in ("script", "form", "button", "input", "img", "link", "iframe", "object"):
        assert page.tags[tag] == 0, tag
    # links only to the page's own JSON and metrics, on the same server
    assert sorted(set(page.references)) == ["/metrics", "/v1/status"]


def test_names_from_remote_parties_are_escaped():
    service = InProcess("--log-level", "error")
    pod, model = '<script>alert("pod")</script>', "m<b>&\"x'</td>"
    engine = Engine(service.client, service.zmq_endpoint, pod, model).connect()
    try:
        engine.send(stored(tokens(3, 2), hasher=SEED_42))     # a diagnosis quoting the model's name
        markup = service.client.get("/").body.decode()
    finally:
        engine.close()
        service.close()
    page = Page(markup)
    assert page.tags["script"] == 0 and page.tags["b"] == 0
    assert "<script>" not in markup and "m<b>" not in markup
    cells = page.streams[(pod, model, 0)]
    assert (cells["pod"], cells["model"]) == (pod, model)
    assert page.namespaces[model]["name"] == model
    assert page.diagnoses and repr(model) in page.diagnoses[0]


def test_status_and_page_with_a_shared_index(redis_server):
    url = redis_server.url.replace("127.0.0.1", ":secret@127.0.0.1")
    redis_server.client().config_set("requirepass", "secret")
    service = InProcess("--log-level", "error", "--index", url)
    engine = Engine(service.client, service.zmq_endpoint, "pod-s", QWEN).connect()
    try:
        engine.send(stored(tokens(5, 3)))

        def stored_in_the_store():
            status = service.client.ok("GET", "/v1/status")
            stream = probe_free(status["streams"]).get(("pod-s", QWEN, 0))
            return status if stream and stream["blocks"] == {"gpu": 3} else None
        status = until(stored_in_the_store, "the store to hold pod-s's blocks")
        index = status["index"]
        assert index["backend"] == redis_server.url.replace("127.0.0.1", ":***@127.0.0.1")
        assert (index["up"], index["capacity"], index["entries_by_tier"], index["pods"]) == (True, None, {"gpu": 3}, 1)
        assert status["ready"] is True
        page = Page(service.client.get("/").body.decode())
        assert page.streams[("pod-s", QWEN, 0)]["blocks_gpu"] == "3"
        assert page.figures["backend"] == index["backend"] and "secret" not in page.text

        # the store gone: the page still answers, and says why kvcm is not ready
        redis_server.kill()
        down = until(lambda: (lambda s: s if not s["ready"] else None)(service.client.ok("GET", "/v1/status")),
                     "kvcm to notice the store is gone")
        assert down["ready_reason"].startswith("the shared index is unavailable")
        assert probe_free(down["streams"])[("pod-s", QWEN, 0)]["blocks"] is None
        page = Page(service.client.get("/").body.decode())
        assert page.streams[("pod-s", QWEN, 0)]["blocks_gpu"] == "?"
        assert "not ready" in page.text and "the shared index is unavailable" in page.text
    finally:
        engine.close()
        service.close()
        redis_server.start()


# -- the figures' arithmetic ---------------------------------------------------------------------

INF = float("inf")


@pytest.mark.parametrize("q, expected", [(0.5, 0.1), (0.75, 0.15), (1.0, 0.2), (0.25, 0.05)])
def test_quantiles_interpolate_within_buckets_as_prometheus_does(q, expected):
    assert quantile(q, {0.1: 10, 0.2: 20, INF: 20}) == pytest.approx(expected)


def test_quantiles_of_an_empty_or_overflowing_histogram():
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {0.1: 0, INF: 0}) is None
    # everything beyond the last finite bound: that bound, as histogram_quantile answers
    assert quantile(0.99, {0.1: 0, 0.2: 0, INF: 5}) == 0.2


def test_rates_cover_the_last_minute(monkeypatch):
    from kvcm.config import load_config
    from kvcm.indexer import Indexer
    from kvcm.metrics import Metrics

    clock = [1000.0]
    monkeypatch.setattr(status_module.time, "monotonic", lambda: clock[0])
    indexer = Indexer(load_config(["--zmq-bind", "tcp://127.0.0.1:*"], environ={}))
    status = status_module.Status(indexer, Metrics(indexer), lambda: None)

    def after(seconds, requests):
        clock[0] += seconds
        indexer.score_counts["requests"] = requests
        recent = status._recent()
        return recent["window_s"], recent["score_requests_per_s"]

    assert after(10, 10) == (10.0, 1.0)          # since the start
    assert after(60, 130) == (60.0, 2.0)         # the sample 10 s in is a minute old now
    assert after(5, 130) == (65.0, 120 / 65)     # no sample exactly a minute old: the one before
    assert after(300, 130) == (300.0, 0.0)       # nobody looked for 5 minutes: over those
