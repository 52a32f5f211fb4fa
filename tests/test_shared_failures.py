"""The shared index (--index redis://…) when its store fails: a real redis-server killed
(SIGKILL) and started again on the same port, a real `kvcm serve` subprocess or an in-process
Service, real ZMQ publishers and real HTTP. Nothing is timed: every wait polls a condition.

Writes to the store are asynchronous (Engine.send only waits until the local replica applied
a batch), so expected scores and metrics are polled for. Where the store must keep what it
held across the outage (stale entries would otherwise vanish with the data), the server runs
with an append-only file fsynced on every write, so a SIGKILL loses nothing."""

import signal

import pytest

from aio import poll_until
from kvcm.publisher import encode_batch
from redis_server import start_server
from serving import QWEN, Engine, InProcess, Serve, removed, stored, tokens

MODEL = QWEN          # scoring by token ids needs no tokenizer; the Serve ones load Qwen's anyway


# -- helpers ----------------------------------------------------------------------------------

def eventually(fetch, check, what, deadline=10.0):
    """Polls fetch() until check(value); returns the value (the last one seen on failure)."""
    seen = []

    def condition():
        seen[:] = [fetch()]
        return check(seen[0])
    try:
        poll_until(condition, what, deadline)
    except AssertionError as exc:
        raise AssertionError("%s; last seen: %r" % (exc, seen[0] if seen else None)) from None
    return seen[0]


def score_reply(client, ids):
    return client.post("/v1/score", {"model": MODEL, "token_ids": ids})


def scores(client, ids):
    reply = score_reply(client, ids)
    assert reply.status == 200, reply
    return reply.json["scores"]


def scored(client, ids, expected, what):
    return eventually(lambda: scores(client, ids), lambda s: s == expected, what)


def metrics(client, name):
    """{labels: value} of one sample name."""
    return {labels: value for (sample, labels), value in client.metrics().items() if sample == name}


def metric(client, name, **labels):
    return metrics(client, name).get(tuple(sorted(labels.items())))


def ready_status(client):
    return client.get("/ready").status


def wait_down(client):
    """Waits until kvcm says the store is down; returns the /ready reply."""
    return eventually(lambda: client.get("/ready"), lambda r: r.status == 503, "/ready to turn 503")


def wait_recovered(client):
    """Waits until kvcm is ready again and has written everything it held."""
    eventually(lambda: ready_status(client), lambda s: s == 200, "/ready to turn 200 again")
    eventually(lambda: metric(client, "kvcm_redis_backlog_events"), lambda n: n == 0, "the backlog to drain")
    assert metric(client, "kvcm_redis_up") == 1


def connection_errors(client):
    return metric(client, "kvcm_redis_errors_total", kind="connection") or 0


def wait_reconnect_attempts(client, attempts=3):
    """Waits until the watcher failed `attempts` more pings: the outage outlasts a few backoff
    steps, so recovery needs a retry that comes after them."""
    start = connection_errors(client)
    eventually(lambda: connection_errors(client), lambda n: n >= start + attempts,
               "%d more failed reconnection attempts" % attempts)


def burst(engine, batches):
    """Publishes every batch at once (one seq each, in order) and waits until kvcm applied the
    last: for more batches than a round trip each would allow."""
    seq = None
    for events in batches:
        seq = engine.seqs[0]
        engine.seqs[0] = seq + 1
        engine.pub.publish_raw(encode_batch(events), seq=seq)
    engine.client.caught_up(engine.pod, engine.model, seq)


def check_unavailable_reply(reply):
    assert reply.status == 503, reply
    assert reply.headers.get("retry-after") == "1", reply.headers
    assert reply.error_type == "index_unavailable", reply
    assert "unavailable" in reply.error or "did not answer" in reply.error, reply


@pytest.fixture
def durable_redis():
    """A real server of its own that keeps its data across a SIGKILL (AOF, fsync always)."""
    server = start_server("--appendonly", "yes", "--appendfsync", "always")
    yield server
    server.close()


@pytest.fixture
def services():
    """serve(*args) -> a started `kvcm serve` (READY received); inproc(*args) -> an in-process
    Service; all stopped after the test."""
    made = []

    class Make:
        @staticmethod
        def serve(*args):
            server = Serve.standard("--log-level", "warning", *args)
            made.append(server)
            server.wait_ready()
            return server

        @staticmethod
        def inproc(*args):
            service = InProcess("--log-level", "error", *args)
            made.append(service)
            return service

        @staticmethod
        def engine(service, pod):
            engine = Engine(service.client, service.zmq_endpoint, pod, MODEL)
            made.append(engine)
            return engine.connect()
    yield Make
    for thing in reversed(made):
        thing.close()


# -- 1. kill and restart under `kvcm serve` ---------------------------------------------------

def test_serve_survives_a_redis_kill_and_restart(shared, redis_server, services):
    server = services.serve("--index", redis_server.url)
    client = server.client
    pod = services.engine(server, "pod-a")

    before = tokens(1, 2)
    pod.send(stored(before))
    scored(client, before, {"pod-a": 2.0}, "a block stored before the outage")
    assert ready_status(client) == 200
    assert metric(client, "kvcm_redis_up") == 1
    apply_calls = metric(client, "kvcm_redis_call_duration_seconds_count", call="apply")
    assert apply_calls and apply_calls > 0

    redis_server.kill()

    ready = wait_down(client)
    assert "shared index" in ready.error, ready
    assert server.alive(), server.stderr()
    assert client.get("/health").status == 200

    reply = score_reply(client, before)
    check_unavailable_reply(reply)
    assert "unavailable" in reply.error, reply

    assert metric(client, "kvcm_redis_up") == 0
    errors = metrics(client, "kvcm_redis_errors_total")
    assert errors.get((("kind", "connection"),), 0) > 0, errors
    (entry,) = client.streams("pod-a")             # /v1/pods still answers, without counts
    assert entry["blocks"] is None, entry

    during = tokens(2, 3)
    pod.send(stored(during))                       # the local replica applied it
    held = metric(client, "kvcm_redis_backlog_events")
    assert held > 0, held
    check_unavailable_reply(score_reply(client, during))
    wait_reconnect_attempts(client)

    redis_server.start()                           # empty: the killed server lost its data
    wait_recovered(client)
    assert scores(client, during) == {"pod-a": 3.0}
    assert scores(client, during[:32]) == {"pod-a": 2.0}

    after = tokens(3, 1)                           # and it keeps working
    pod.send(stored(after))
    scored(client, after, {"pod-a": 1.0}, "a block stored after the recovery")

    assert server.alive(), server.stderr()
    assert "Traceback" not in server.stderr(), server.stderr()
    assert server.stop(signal.SIGTERM) == 0, server.stderr()


# -- 2. --redis-fail-open ---------------------------------------------------------------------

def test_fail_open_answers_empty_scores_while_redis_is_down(redis_server, services):
    service = services.inproc("--index", redis_server.url, "--redis-fail-open")
    client = service.client
    pod = services.engine(service, "pod-open")

    first = tokens(11, 2)
    pod.send(stored(first))
    scored(client, first, {"pod-open": 2.0}, "scores before the outage")
    assert "unavailable" not in score_reply(client, first).json

    redis_server.kill()

    body = eventually(lambda: score_reply(client, first),
                      lambda r: r.status == 200 and "unavailable" in r.json,
                      "a fail-open answer with an 'unavailable' note").json
    assert body["scores"] == {} and body["matched"] == {}, body
    assert body["model"] == MODEL and body["blocks"] == 2 and body["tokens"] == 32, body
    assert isinstance(body["unavailable"], str) and body["unavailable"], body
    wait_down(client)
    reply = score_reply(client, first)             # known down: still 200, never 503
    assert reply.status == 200 and reply.json["scores"] == {} and reply.json["unavailable"], reply

    second = tokens(12, 2)
    pod.send(stored(second))

    redis_server.start()
    wait_recovered(client)
    reply = score_reply(client, second)
    assert reply.status == 200, reply
    assert reply.json["scores"] == {"pod-open": 2.0}, reply
    assert "unavailable" not in reply.json, reply


# -- 3. Redis not running when kvcm starts ----------------------------------------------------

def test_serve_starts_without_redis_and_becomes_ready_when_it_comes_up(shared, redis_server, services):
    redis_server.kill()                            # nothing listens on the URL's port
    server = services.serve("--index", redis_server.url)   # READY=1 all the same
    client = server.client

    reply = client.get("/ready")
    assert reply.status == 503, reply
    assert "shared index" in reply.error, reply
    assert client.get("/health").status == 200
    assert metric(client, "kvcm_redis_up") == 0
    check_unavailable_reply(score_reply(client, tokens(21, 1)))

    pod = services.engine(server, "pod-early")
    early = tokens(21, 2)
    pod.send(stored(early))                        # ingested before the store was ever reached
    assert metric(client, "kvcm_redis_backlog_events") > 0
    assert ready_status(client) == 503
    wait_reconnect_attempts(client)

    redis_server.start()
    wait_recovered(client)
    assert scores(client, early) == {"pod-early": 2.0}

    late = tokens(22, 2)
    pod.send(stored(late))
    scored(client, late, {"pod-early": 2.0}, "a block stored once the store is up")

    assert server.alive(), server.stderr()
    assert "Traceback" not in server.stderr(), server.stderr()
    assert server.stop(signal.SIGTERM) == 0, server.stderr()


# -- 4. the bounded backlog -------------------------------------------------------------------

BACKLOG = 1000
FILLERS = 1100


def test_a_full_backlog_drops_batches_and_clears_their_pod(shared, durable_redis, services):
    server = services.serve("--index", durable_redis.url, "--redis-backlog", str(BACKLOG))
    client = server.client
    dropped_pod = services.engine(server, "pod-dropped")
    kept_pod = services.engine(server, "pod-kept")

    old = tokens(41, 2)                            # stored before the outage, removed in a dropped batch
    control = tokens(42, 2)                        # the other pod's, before the outage: must survive
    dropped_pod.send(stored(old))
    kept_pod.send(stored(control))
    scored(client, old, {"pod-dropped": 2.0}, "the dropped pod's block before the outage")
    scored(client, control, {"pod-kept": 2.0}, "the kept pod's block before the outage")

    durable_redis.kill()
    wait_down(client)

    kept = tokens(43, 2)                           # the kept pod's batch during the outage
    kept_pod.send(stored(kept))
    early = tokens(44, 2)                          # kept in the backlog, removed in a dropped batch
    dropped_pod.send(stored(early))
    burst(dropped_pod, [[stored(tokens(10_000 + i, 1))] for i in range(FILLERS)])
    dropped_pod.send(removed(old, [0, 1]), removed(early, [0, 1]))   # the backlog is full: dropped

    published = 1 + 1 + FILLERS + 2                # events at the least (each removed hash may count)
    held = metric(client, "kvcm_redis_backlog_events")
    dropped = metric(client, "kvcm_redis_backlog_dropped_events_total")
    assert 0 < held <= BACKLOG + 2, held           # + at most one clear marker per pod
    assert dropped >= published - BACKLOG, dropped
    assert metric(client, "kvcm_redis_up") == 0
    assert server.alive(), server.stderr()

    durable_redis.start()                          # with what it held before the kill
    wait_recovered(client)
    assert metric(client, "kvcm_redis_backlog_dropped_events_total") == dropped

    assert scores(client, control) == {"pod-kept": 2.0}   # the store kept its data: old could be stale
    assert scores(client, kept) == {"pod-kept": 2.0}      # the other pod's batches were written, not cleared
    assert scores(client, old) == {}, "a stale entry: the pod was not cleared after its batches were dropped"
    assert scores(client, early) == {}, "a stale entry: the clear came before the pod's kept batches"

    fresh = tokens(45, 2)                          # the cleared pod is indexed again afterwards
    dropped_pod.send(stored(fresh))
    scored(client, fresh, {"pod-dropped": 2.0}, "the cleared pod's next block")
    assert scores(client, control) == {"pod-kept": 2.0}

    assert server.alive(), server.stderr()
    assert "Traceback" not in server.stderr(), server.stderr()
    assert server.stop(signal.SIGTERM) == 0, server.stderr()


# -- 5. event order across an outage ----------------------------------------------------------

def test_the_event_order_is_kept_across_an_outage(durable_redis, services):
    service = services.inproc("--index", durable_redis.url)
    client = service.client
    pod = services.engine(service, "pod-order")
    p = {n: tokens(50 + n, 2) for n in range(7)}

    pod.send(stored(p[0]))                         # untouched: shows the store kept its data
    pod.send(stored(p[3]))
    pod.send(stored(p[4]))
    for n in (0, 3, 4):
        scored(client, p[n], {"pod-order": 2.0}, "block set %d before the outage" % n)

    durable_redis.kill()
    wait_down(client)

    pod.send(stored(p[1]))                         # store, remove, store: present
    pod.send(removed(p[1], [0, 1]))
    pod.send(stored(p[1]))
    pod.send(stored(p[2]))                         # store, remove: absent
    pod.send(removed(p[2], [0, 1]))
    pod.send(removed(p[3], [0, 1]))                # stored before, removed while down: absent
    pod.send(removed(p[4], [0, 1]))                # stored before, removed and stored again: present
    pod.send(stored(p[4]))
    pod.send(stored(p[5]), removed(p[5], [0, 1]), stored(p[5]))    # the same, inside one batch
    pod.send(stored(p[6]), removed(p[6], [0, 1]))
    assert metric(client, "kvcm_redis_backlog_events") > 0

    durable_redis.start()
    wait_recovered(client)
    expected = {0: True, 1: True, 2: False, 3: False, 4: True, 5: True, 6: False}
    got = {n: scores(client, ids) for n, ids in p.items()}
    assert got == {n: {"pod-order": 2.0} if present else {} for n, present in expected.items()}


# -- 6. DELETE /v1/pods/{pod} -----------------------------------------------------------------

def test_deleting_a_pod_clears_the_shared_index_and_is_503_while_redis_is_down(durable_redis, services):
    service = services.inproc("--index", durable_redis.url)
    client = service.client
    a = services.engine(service, "pod-a")
    b = services.engine(service, "pod-b")

    ids = tokens(61, 2)
    a.send(stored(ids))
    b.send(stored(ids))
    scored(client, ids, {"pod-a": 2.0, "pod-b": 2.0}, "both pods")

    reply = client.delete("/v1/pods/pod-a")
    assert reply.status == 200, reply
    assert reply.json == {"pod": "pod-a", "removed": 2}, reply
    assert scores(client, ids) == {"pod-b": 2.0}          # applied before the reply
    assert client.stream("pod-a", MODEL) is None          # its stream state went too
    assert client.stream("pod-b", MODEL)["blocks"] == {"gpu": 2}

    durable_redis.kill()
    wait_down(client)
    check_unavailable_reply(client.delete("/v1/pods/pod-b"))

    durable_redis.start()
    wait_recovered(client)
    assert scores(client, ids) == {"pod-b": 2.0}          # the refused delete changed nothing
    reply = client.delete("/v1/pods/pod-b")
    assert reply.status == 200 and reply.json == {"pod": "pod-b", "removed": 2}, reply
    assert scores(client, ids) == {}

    a.send(stored(ids))                                   # a cleared pod is indexed again
    scored(client, ids, {"pod-a": 2.0}, "the cleared pod's next store")
