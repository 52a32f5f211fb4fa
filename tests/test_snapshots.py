"""Snapshots with real processes: `kvcm serve --state-dir` subprocesses fed by real PUB sockets
with replay buffers (kvcm.publisher), beside a control kvcm that never stops. After a SIGTERM
or a SIGKILL and a restart, and for a replica bootstrapped from another, the index must equal
the control's: the same /v1/score answer for every sequence stored, the same per-pod counts.
Streams that cannot be resumed are cleared, never trusted."""

import os
import random
import signal

import pytest

from aio import poll_until as until
from serving import QWEN, Serve, removed, serve, stored, tokens  # noqa: F401  (serve: a fixture)
from kvcm.publisher import Publisher, encode_batch

PODS = ("e1", "e2")
TOKEN = "s3cret"
ADMIN = {"Authorization": "Bearer " + TOKEN}   # ignored by a kvcm without --admin-token


class Engines:
    """vLLM-like engines (connect mode: each binds its PUB and replay ROUTER), a history of
    what they published, and the checks that compare kvcm instances with each other."""

    def __init__(self, pods=PODS, buffer_steps=10_000):
        self.pubs = {pod: Publisher("tcp://127.0.0.1:*", topic="kv@%s@%s" % (pod, QWEN),
                                    replay_endpoint="tcp://127.0.0.1:*", buffer_steps=buffer_steps)
                     for pod in pods}
        self.sequences = []
        self.rng = random.Random(14)

    def flags(self):
        return [a for pod, pub in self.pubs.items()
                for a in ("--engine", "%s=%s,replay=%s,model=%s" % (pod, pub.endpoint, pub.replay_endpoint, QWEN))]

    def connect(self, *servers):
        """Waits until every server receives from every engine, then forgets the probe
        streams that took (kvcm.serving's Client.connected) so the first batch is seq 0."""
        for server in servers:
            for pod, pub in self.pubs.items():
                server.client.connected(pub)
                server.client.ok("DELETE", "/v1/pods/%s" % pod, headers=ADMIN)

    def publish(self, n):
        """n batches over the engines: new sequences stored on GPU, some offloaded to CPU,
        some blocks removed again."""
        for _ in range(n):
            pod = self.rng.choice(list(self.pubs))
            r = self.rng.random()
            if r < 0.6 or not self.sequences:
                ids = tokens(len(self.sequences) + 1, self.rng.randrange(2, 9))
                self.sequences.append(ids)
                events = [stored(ids)]
            elif r < 0.8:
                ids = self.rng.choice(self.sequences)
                events = [stored(ids, medium="CPU")]
            else:
                ids = self.rng.choice(self.sequences)
                events = [removed(ids, range(self.rng.randrange(len(ids) // 16)))]
            self.pubs[pod].publish_raw(encode_batch(events))

    def caught_up(self, *servers):
        for server in servers:
            for pod, pub in self.pubs.items():
                if pub.next_seq:
                    server.client.caught_up(pod, QWEN, pub.next_seq - 1)

    def picture(self, server):
        """What a scheduler sees: the answer for every sequence, and the pods' block counts."""
        client = server.client
        scores = [client.score(QWEN, token_ids=ids) for ids in self.sequences]
        counts = {s["pod"]: s["blocks"] for s in client.streams()}
        return scores, counts

    def assert_same(self, server, control):
        assert self.picture(server) == self.picture(control)

    def close(self):
        for pub in self.pubs.values():
            pub.close()


@pytest.fixture
def engines():
    made = []

    def make(**kw):
        made.append(Engines(**kw))
        return made[-1]
    yield make
    for e in made:
        e.close()


def recovery(server):
    return {s["pod"]: s["recovery"] for s in server.client.streams()}


def started_like(serve, engines, state_dir, *extra):
    return serve("--state-dir", str(state_dir), "--snapshot-interval", "3600", *engines.flags(), *extra)


def stopped_beside_a_control(serve, e, state_dir, batches):
    """A control kvcm, and one with --state-dir that ingested `batches` batches beside it
    (the same index) and was stopped with SIGTERM; returns the control."""
    control = serve(*e.flags())
    a = started_like(serve, e, state_dir)
    e.connect(control, a)
    e.publish(batches)
    e.caught_up(control, a)
    e.assert_same(a, control)
    assert a.stop(signal.SIGTERM) == 0
    assert (state_dir / "index.snapshot").is_file()
    return control


def test_sigterm_restart_equals_a_kvcm_that_never_stopped(serve, engines, tmp_path):
    e = engines()
    control = stopped_beside_a_control(serve, e, tmp_path, 40)
    e.publish(30)               # while it is down: stores, offloads and removals
    e.caught_up(control)
    b = started_like(serve, e, tmp_path)
    until(lambda: recovery(b) == dict.fromkeys(PODS, "resumed"), "both streams to resume")
    e.publish(4)                # and it goes on live
    e.caught_up(control, b)
    e.assert_same(b, control)
    assert any(scores["scores"] for scores in e.picture(b)[0])
    metrics = b.client.metrics()
    assert metrics[("kvcm_restore_entries", ())] > 0
    assert metrics[("kvcm_ingest_streams_resumed_total", ())] == 2


def test_sigkill_keeps_the_last_periodic_snapshot_and_replay_fills_in(serve, engines, tmp_path):
    e = engines()
    control = serve(*e.flags())
    a = serve("--state-dir", str(tmp_path), "--snapshot-interval", "0.2", *e.flags())
    e.connect(control, a)
    e.publish(30)
    e.caught_up(control, a)
    written = a.client.metrics()[("kvcm_snapshots_written_total", ())]
    until(lambda: a.client.metrics()[("kvcm_snapshots_written_total", ())] > written + 1,
          "a periodic snapshot after the batches")
    e.publish(20)               # mid-ingest: some of these may or may not be in a snapshot
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    e.publish(10)
    e.caught_up(control)
    b = serve("--state-dir", str(tmp_path), "--snapshot-interval", "3600", *e.flags())
    until(lambda: recovery(b) == dict.fromkeys(PODS, "resumed"), "both streams to resume")
    e.publish(2)
    e.caught_up(control, b)
    e.assert_same(b, control)


def test_a_replay_that_no_longer_reaches_back_clears_the_stream(serve, engines, tmp_path):
    e = engines(buffer_steps=5)
    control = stopped_beside_a_control(serve, e, tmp_path, 30)
    # e1 publishes more than its buffer holds while kvcm is down; e2 nothing
    for _ in range(8):
        e.pubs["e1"].publish_raw(encode_batch([stored(tokens(9000 + e.pubs["e1"].next_seq, 3))]))
    b = started_like(serve, e, tmp_path)
    until(lambda: b.client.ok("GET", "/v1/pods")["pods"] and recovery(b).get("e2") == "resumed",
          "e2 to resume")
    assert "e1" not in recovery(b)          # cleared and forgotten until it publishes again
    assert b.client.metrics()[("kvcm_ingest_streams_cleared_total", ())] == 1
    e.pubs["e1"].publish_raw(encode_batch([stored(tokens(99_999, 2))]))
    until(lambda: recovery(b).get("e1") == "cleared", "e1 to come back, marked cleared")
    # nothing stale: whatever b says e1 holds, e1 holds (the control knows)
    for mine, truth in zip(e.picture(b)[0], e.picture(control)[0]):
        for pod, score in mine["scores"].items():
            assert score <= truth["scores"].get(pod, 0)


def test_an_engine_restarted_while_kvcm_was_down_is_cleared(serve, engines, tmp_path):
    e = engines()
    control = stopped_beside_a_control(serve, e, tmp_path, 20)
    e.pubs["e1"].restart()      # a new process: seq from 0, an empty replay buffer
    for i in range(e.pubs["e2"].next_seq + 5):   # past the old seq: only the digest tells
        e.pubs["e1"].publish_raw(encode_batch([stored(tokens(50_000 + i, 2))]))
    until(lambda: control.client.stream("e1", QWEN)["restarts"] == 1, "the control to see the restart")
    e.caught_up(control)
    b = started_like(serve, e, tmp_path)
    until(lambda: recovery(b).get("e2") == "resumed", "e2 to resume")
    e.pubs["e1"].publish_raw(encode_batch([stored(tokens(77_777, 2))]))
    until(lambda: recovery(b).get("e1") == "cleared", "e1 cleared")
    e.caught_up(control, b)
    # the old e1 entries are gone from b; what the restarted e1 sent while b was down is
    # missing (allowed), never the other way round
    old = e.sequences
    for ids in old:
        assert "e1" not in b.client.score(QWEN, token_ids=ids)["scores"] or \
            "e1" in control.client.score(QWEN, token_ids=ids)["scores"]


def test_bootstrap_from_a_running_replica(serve, engines):
    e = engines()
    a = serve("--admin-token", TOKEN, *e.flags())
    e.connect(a)
    e.publish(40)
    e.caught_up(a)
    assert a.client.request("GET", "/v1/snapshot").status == 401    # an admin endpoint
    b = serve("--admin-token", TOKEN, "--bootstrap-from", "http://127.0.0.1:%d" % a.http_port, *e.flags())
    until(lambda: recovery(b) == dict.fromkeys(PODS, "resumed"), "b's streams to resume")
    e.caught_up(a, b)
    e.assert_same(b, a)
    e.publish(25)               # and both stay equal while they ingest
    e.caught_up(a, b)
    e.assert_same(b, a)


def test_state_dir_is_refused_with_a_shared_index(tmp_path):
    from serving import run_serve
    status, _, err = run_serve("--state-dir", str(tmp_path), "--index", "redis://127.0.0.1:1/0",
                               "--http-port", "0", "--zmq-bind", "tcp://127.0.0.1:0")
    assert status == 2
    assert "--state-dir" in err and "store keeps the state" in err
    assert not os.listdir(tmp_path)
