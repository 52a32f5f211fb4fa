"""Careless and hostile publishers and admin clients against kvcm serve (in-process, real
HTTP over TCP, real ZMQ on 127.0.0.1): whatever they send, no table is wedged, no endpoint
breaks, and no request reaches where an admin client must not point kvcm. Nothing is timed:
each test shows the outcome by values and ordering."""

import logging
import socket
import uuid

import pytest

from kvcm.publisher import Publisher, block_stored, encode_batch
from serving import BLOCK, HASHER, Engine, InProcess, offloaded, stored, tokens, until

MODEL = "hostile/model"


def unique(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def kvcm():
    service = InProcess("--log-level", "error")
    yield service
    service.close()


@pytest.fixture
def engine(kvcm):
    made = []

    def make(pod, model=MODEL, **kw):
        made.append(Engine(kvcm.client, kvcm.zmq_endpoint, pod, model, **kw).connect())
        return made[-1]
    yield make
    for e in made:
        e.close()


def metric(client, name, **labels):
    return client.metrics().get((name, tuple(sorted(labels.items()))), 0)


def errors_logged(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("kvcm")]


def test_junk_topics_never_lock_a_new_pod_out_and_a_cleared_pod_frees_its_slot(kvcm, engine):
    client = kvcm.client
    junk = engine(unique("junk"))
    block = tokens(9, 1)
    store = encode_batch([block_stored(list(HASHER.keys(block)), None, block)])
    for i in range(5000):                      # more pods than the stream table holds, a block each
        junk.pub.send_frames([("kv@junk-%d@m" % i).encode(), bytes(8), store])
    until(lambda: metric(client, "kvcm_ingest_streams_evicted_total") >= 5000 - 4096,
          "the junk to fill the stream table")
    assert metric(client, "kvcm_name_table_entries", table="streams") == 4096
    # pods whose last stream went were cleared: neither the pod table nor the per-pod
    # metrics grow with the junk
    assert metric(client, "kvcm_name_table_entries", table="pods") <= 2 * 4096 + 64
    assert metric(client, "kvcm_index_pods") <= 4096
    ids = tokens(1, 3)
    real = engine(unique("real"))
    real.send(stored(ids))                     # a real engine arriving after the junk
    assert client.score(MODEL, token_ids=ids)["scores"] == {real.pod: 3.0}
    junk_pods = {s["pod"] for s in client.ok("GET", "/v1/pods")["pods"] if s["pod"].startswith("junk-")}
    assert client.ok("DELETE", "/v1/pods/" + min(junk_pods)) == {"pod": min(junk_pods), "removed": 1}
    assert metric(client, "kvcm_name_table_entries", table="streams") == 4095
    assert min(junk_pods) not in {s["pod"] for s in client.ok("GET", "/v1/pods")["pods"]}


def test_a_flood_of_adapter_names_never_stops_a_new_model(kvcm, engine, caplog):
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.WARNING, logger="kvcm.events")   # whatever another test set it to
    client = kvcm.client
    flooder = engine(unique("flooder"))
    ids = tokens(2, 1)
    names = 0
    while names < 70_000:                      # more than the 65,535 namespaces kvcm holds
        flooder.send(*[block_stored([10 + i], None, ids, BLOCK, lora_id=1, lora_name="adapter-%d" % (names + i))
                       for i in range(2000)])
        names += 2000
    assert metric(client, "kvcm_ingest_namespaces_evicted_total") > 0
    entries, capacity = (metric(client, "kvcm_name_table_" + kind, table="namespaces")
                         for kind in ("entries", "capacity"))
    assert capacity == 65535 and entries <= capacity
    newcomer = engine(unique("newcomer"), unique("new-base-model"))
    more = tokens(3, 4)
    newcomer.send(stored(more))
    assert client.score(newcomer.model, token_ids=more)["scores"] == {newcomer.pod: 4.0}
    assert errors_logged(caplog) == []
    full = [r for r in caplog.records if "namespace table is full" in r.getMessage()]
    assert len(full) == 1                      # once per interval, however many evictions


def test_junk_media_never_displace_a_known_tier(kvcm, engine):
    client = kvcm.client
    e = engine(unique("media"))
    ids = tokens(4, 2)
    before = metric(client, "kvcm_ingest_event_drops_total", reason="unknown_tier")
    e.send(*[block_stored(list(HASHER.keys(ids)), None, ids, BLOCK, medium="junk-%d" % i) for i in range(15)])
    e.send(stored(ids), offloaded(ids, 2, medium="CPU"), offloaded(ids, 1, medium="Disk"))
    result = client.score(MODEL, token_ids=ids)
    assert result["matched"][e.pod]["tiers"] == {"gpu": 2, "cpu": 2, "disk": 1}
    assert metric(client, "kvcm_ingest_event_drops_total", reason="unknown_tier") == before + 15
    assert metric(client, "kvcm_name_table_entries", table="tiers") <= 6


def test_any_u64_sequence_numbers_leave_every_endpoint_answering(kvcm, engine):
    client = kvcm.client
    e = engine(unique("seq"))
    for seq in (0, 2**64 - 1, 2**64 - 2):
        e.pub.publish_raw(encode_batch([]), seq=seq)
    s = client.caught_up(e.pod, MODEL, 2**64 - 2)
    assert (s["missed_batches"], s["restarts"]) == (2**64 - 1, 1)
    assert client.get("/v1/pods").status == 200
    assert metric(client, "kvcm_ingest_missed_batches_total") >= 2**64 - 2


@pytest.mark.parametrize("endpoint, why", [
    ("tcp://*:5557", "host name or an IPv4 address"),
    ("tcp://127.0.0.1:*", "port from 1 to 65535"),
    ("tcp://127.0.0.1:0", "port from 1 to 65535"),
    ("ipc:///run/vllm.sock", "must be tcp://"),
    ("inproc://kvcm", "must be tcp://"),
    ("tcp://169.254.169.254:80", "link-local"),
    ("tcp://[fe80::1]:5557", "link-local"),
    ("tcp://0.0.0.0:5557", "unspecified"),
    ("tcp://224.0.0.1:5557", "multicast"),
    ("tcp://kvcm-nowhere.invalid:5557", "cannot resolve"),
    ("tcp://eth0;10.0.0.1:5557", "host name"),
])
def test_engines_registered_over_http_must_be_reachable_tcp_engines(kvcm, endpoint, why):
    client = kvcm.client
    for body in ({"name": unique("bad"), "endpoint": endpoint},
                 {"name": unique("bad"), "endpoint": "tcp://127.0.0.1:9", "replay": endpoint}):
        reply = client.post("/v1/engines", body)
        assert reply.status == 400, reply
        assert why in reply.json["error"]["message"]
        assert body["name"] not in [e["name"] for e in client.ok("GET", "/v1/engines")["engines"]]


def test_a_full_engine_table_answers_400_and_nothing_else():
    # a listener that never accepts: the kernel completes the connections, nothing reconnects
    with socket.create_server(("127.0.0.1", 0), backlog=2048) as silent:
        endpoint = "tcp://localhost:%d" % silent.getsockname()[1]
        service = InProcess("--log-level", "error")
        try:
            client = service.client
            statuses = [client.post("/v1/engines", {"name": "e%d" % i, "endpoint": endpoint}).status
                        for i in range(1025)]
            assert statuses == [201] * 1024 + [400]
            assert metric(client, "kvcm_ingest_engines_refused_total") == 1
            assert client.ok("DELETE", "/v1/engines/e7")["removed"]
            assert client.post("/v1/engines", {"name": "e7", "endpoint": endpoint}).status == 201
        finally:
            service.close()


def test_zmq_allow_keeps_strangers_off_the_ingest_port():
    service = InProcess("--log-level", "error", "--zmq-allow", "10.0.0.0/8", "--zmq-max-message", "64KiB")
    try:
        client = service.client
        stranger = Publisher(service.zmq_endpoint, topic="kv@stranger@%s" % MODEL)
        try:
            def refused():
                stranger.publish([block_stored(list(HASHER.keys(tokens(5, 1))), None, tokens(5, 1))])
                return metric(client, "kvcm_ingest_publishers_refused_total") >= 1
            until(refused, "kvcm to refuse a publisher outside 10.0.0.0/8")
            assert client.ok("GET", "/v1/pods")["pods"] == []
        finally:
            stranger.close()
    finally:
        service.close()


def test_a_message_over_zmq_max_message_is_never_applied():
    service = InProcess("--log-level", "error", "--zmq-max-message", "64KiB")
    try:
        client = service.client
        with Engine(client, service.zmq_endpoint, "big", MODEL) as e:
            e.connect()
            huge = tokens(6, 5000)
            e.pub.publish([block_stored(list(HASHER.keys(huge)), None, huge)])   # ~250 KB
            small = tokens(7, 2)

            def applied():
                e.pub.publish([block_stored(list(HASHER.keys(small)), None, small)])
                return client.score(MODEL, token_ids=small)["scores"] == {"big": 2.0}
            until(applied, "a batch within the cap after the oversized one")
            assert client.score(MODEL, token_ids=huge[:BLOCK])["scores"] == {}
    finally:
        service.close()
