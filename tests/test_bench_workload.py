"""`kvcm bench`'s workload generator, percentiles and HTTP load, on tiny workloads.

The generator's batches are decoded here with the msgpack package and replayed into a model
of each engine (set semantics, as DESIGN.md §4 states them): what the model holds must be
what the generator says each engine holds, its hashes must be vLLM's (kvcm._reference, the
pure-Python twin), and its expected answers must be the model's."""

import json
import socket
import threading
import time

import msgpack
import pytest

from kvcm import _reference
from kvcm.bench import load, workload
from kvcm.bench.stats import Latency, Spread
from kvcm.bench.workload import Spec, Workload, WorkloadError

TINY = dict(engines=3, blocks=600, prompt_tokens=((64, 1.0), (256, 1.0)), system_tokens=32)


def replay(stream_payloads):
    """{engine: held hashes}, the events in order, from the engines' payloads alone."""
    held, events = {}, []
    for engine, payloads in stream_payloads.items():
        blocks = held.setdefault(engine, set())
        for payload in payloads:
            ts, batch, dp_rank = msgpack.unpackb(payload)
            assert dp_rank == 0
            for event in batch:
                if isinstance(event, dict):
                    kind, hashes = event["type"], event["block_hashes"]
                    fields = event
                else:
                    kind, hashes = event[0], event[1]
                    fields = {"parent_block_hash": event[2], "token_ids": event[3]} if kind == "BlockStored" else {}
                events.append((engine, kind, hashes, fields))
                if kind == "BlockStored":
                    blocks.update(hashes)
                elif kind == "BlockRemoved":
                    blocks.difference_update(hashes)
    return held, events


def built(**kw):
    w = Workload(Spec(**{**TINY, **kw}))
    w.build()
    return w


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others():
    a, b, c = built(seed=7), built(seed=7), built(seed=8)
    assert [s.payloads for s in a.streams] == [s.payloads for s in b.streams]
    assert [s.payloads for s in a.streams] != [s.payloads for s in c.streams]


@pytest.mark.parametrize("form", ["map", "array", "mixed"])
def test_replaying_the_batches_holds_what_the_generator_says_each_engine_holds(form):
    w = built(event_format=form, engine_capacity=120)
    held, events = replay({s.engine: s.payloads for s in w.streams})
    kinds = {k for _, k, _, _ in events}
    assert kinds == {"BlockStored", "BlockRemoved"}            # the capacity made engines evict
    for engine in w.engines:
        assert held[engine.index] == set(engine.held)
        assert len(held[engine.index]) <= 120 + w.spec.system_prompts * 2 + len(w.markers)
    assert sum(s.blocks for s in w.streams) == sum(len(h) for _, k, h, _ in events if k == "BlockStored")
    shapes = {type(e[3]) for e in events}
    assert shapes == {dict}
    if form == "array":
        assert all(not isinstance(b, dict) for s in w.streams for p in s.payloads for b in msgpack.unpackb(p)[1])


def test_every_stored_block_carries_vllm_s_hash_of_its_tokens_and_parent():
    w = built()
    reference = _reference.BlockHasher("sha256", None, 16)
    _, events = replay({s.engine: s.payloads for s in w.streams})
    digests = {}                                   # key -> full digest, to chain as vLLM does
    checked = 0
    for _, kind, hashes, fields in events:
        if kind != "BlockStored":
            continue
        parent = fields["parent_block_hash"]
        tokens = fields["token_ids"]
        assert len(tokens) == 16 * len(hashes)
        chained = None if parent is None else digests[parent]
        assert list(reference.keys(tokens, None, chained)) == hashes
        for key, digest in zip(hashes, reference.digests(tokens, None, chained)):
            digests[key] = digest
        checked += len(hashes)
    assert checked == sum(s.blocks for s in w.streams)


def test_expected_answers_are_the_replayed_engines_runs_from_block_0():
    w = built(engine_capacity=150)
    held, _ = replay({s.engine: s.payloads for s in w.streams})
    reference = _reference.BlockHasher("sha256", None, 16)
    asked = 0
    for n in (64, 256):
        for q in w.queries(n, 20):
            keys = list(reference.keys(q.tokens))
            want = {}
            for engine, blocks in held.items():
                run = 0
                while run < len(keys) and keys[run] in blocks:
                    run += 1
                if run:
                    want[engine] = run * 16
            assert q.expected == want
            assert max(want.values()) == n                    # its owner holds the whole prompt
            asked += 1
    assert asked == 40


def test_the_block_budget_is_kept_and_markers_count_progress_in_order():
    w = built()
    total = sum(s.blocks for s in w.streams)
    assert 600 <= total <= 600 + 3 * len(w.markers)
    for s in w.streams:
        assert len(s.marker_blocks) == len(w.markers)
        assert s.marker_blocks == sorted(s.marker_blocks) and s.marker_blocks[-1] == s.blocks
        assert workload.marker_progress(s, len(w.markers)) == s.blocks
        assert workload.marker_progress(s, 0) == 0
    closing = w.expected(w.marker_query(len(w.markers) - 1).tokens)
    assert closing == {0: 16, 1: 16, 2: 16}                   # every engine stored the closing marker


def test_a_trace_of_token_lists_becomes_the_conversations(tmp_path):
    prompts = [[i % 5000 + 7 * k for i in range(96)] for k in range(12)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"token_ids": p}) for p in prompts[:6]) + "\n"
                     + "\n".join(json.dumps(p) for p in prompts[6:]) + "\n")
    items = workload.read_trace(str(trace))
    w = Workload(Spec(engines=2, blocks=200, prompt_tokens=((96, 1.0),)), items)
    w.build()
    for q in w.queries(96, 10):
        assert any(q.tokens == p for p in prompts)
        assert sorted(q.expected.values())[-1] == 96


@pytest.mark.parametrize("text, message", [
    ("1024,abc", "not TOKENS or TOKENS:WEIGHT"),
    ("0", "must be positive"),
    ("1024:-1", "must be positive"),
])
def test_bad_prompt_lengths_are_refused_with_a_reason(text, message):
    with pytest.raises(WorkloadError, match=message):
        workload.parse_lengths(text)


def test_weighted_lengths_parse():
    assert workload.parse_lengths("1024:5, 4096") == [(1024, 5.0), (4096, 1.0)]


@pytest.mark.parametrize("content, message", [
    ("not json\n", "not JSON"),
    ('{"token_ids": [1, -2]}\n', "expected token ids or a prompt"),
    ("\n\n", "no prompts"),
])
def test_bad_traces_are_refused_with_the_line(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=message):
        workload.read_trace(str(path))


def test_percentiles_come_from_the_recorded_values():
    lat = Latency(range(1000, 101_000, 1000))              # 1 .. 100 µs
    s = lat.summary()
    assert s["count"] == 100
    assert s["p50_us"] == pytest.approx(50, rel=0.01)
    assert s["p99_us"] == pytest.approx(99, rel=0.01)
    assert Latency().summary() == {"count": 0}
    cdf = lat.cdf_us()
    assert [p for _, p in cdf] == sorted(p for _, p in cdf)
    assert cdf[-1][0] == pytest.approx(100, rel=0.001)


def test_spread_names_its_runs_and_warns_when_there_is_one():
    assert Spread([10, 12, 11]).median == 11
    assert Spread([10, 12, 11]).note().startswith("3 runs")
    assert "no spread" in Spread([5]).note()
    assert "re-measure" in Spread([10, 20, 15]).note()


class _StallingServer:
    """HTTP on a real socket that answers every request with 200 and holds its first
    answer for `stall` seconds; records when (perf_counter_ns) the stall began and ended."""

    def __init__(self, stall, status=200):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        self.stall, self.stalled, self.status = stall, None, status
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        buf, first = b"", True
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    if first:
                        t0 = time.perf_counter_ns()
                        time.sleep(self.stall)
                        self.stalled = time.perf_counter_ns() - t0
                        first = False
                    conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % self.status)

    def close(self):
        self.sock.close()


def test_open_loop_charges_a_stall_to_every_request_due_during_it():
    server = _StallingServer(0.05)
    try:
        lat = load.open_loop(server.address, [load.request_bytes("GET", "/health")], 20, rate=1e9, connections=1)
    finally:
        server.close()
    assert len(lat) == 20
    # all 20 were due at once; each was answered after the stall, so each waited at least it
    assert min(lat) >= server.stalled


def test_closed_loop_charges_a_stall_only_to_the_request_that_met_it():
    server = _StallingServer(0.05)
    try:
        lat = load.closed_loop(server.address, [load.request_bytes("GET", "/health")], 20)
    finally:
        server.close()
    assert lat[0] >= server.stalled
    assert sum(1 for v in lat if v >= server.stalled) == 1


def test_a_closed_loop_of_one_connection_stops_at_its_deadline_and_fails_on_an_error_status():
    server = _StallingServer(0.0)
    try:
        assert len(load.closed_loop(server.address, [load.request_bytes("GET", "/health")], 10**9, seconds=0.2)) > 0
    finally:
        server.close()
    server = _StallingServer(0.0, status=503)
    try:
        with pytest.raises(load.HttpError, match="HTTP 503"):
            load.closed_loop(server.address, [load.request_bytes("GET", "/health")], 5)
    finally:
        server.close()


def test_responses_are_framed_by_length_and_by_chunks():
    assert load.response_end(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab") is None
    pipelined = b"HTTP/1.1 404 X\r\ncontent-length: 3\r\n\r\nabcHTTP"
    status, start, end = load.response_end(pipelined)
    assert (status, pipelined[start:end], pipelined[end:]) == (404, b"abc", b"HTTP")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    status, start, end = load.response_end(chunked)
    assert (status, end) == (200, len(chunked))
    assert load.dechunk(chunked[start:end]) == b"abcde"
    assert load.response_end(chunked[:-3]) is None
