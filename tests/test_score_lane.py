"""The scoring lane (kvcm/_score_lane.pxi, kvcm/http_lane.h) against the general path.

Two real HTTP servers over TCP share one Api and one Indexer: one hands every read to the
lane first, the other parses everything the general way. Every generated request (heads
plain and unusual, bodies plain and invalid, the lane's paths and others) must get the same
answer, byte for byte but for the Date line, from both; plain requests must take the lane."""

import asyncio
import itertools
import re
import socket
import threading
import time

import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings, strategies as st

from kvcm.api import Api, RequestTimer
from kvcm.config import load_config
from kvcm.http import HttpServer, Request
from kvcm.indexer import Indexer
from kvcm.metrics import Metrics

from id_bodies import MODEL, body

BLOCK = 16
HELD = [list(range(i, i + 3 * BLOCK)) for i in (0, 1000)]   # two pods' prompts


class Servers:
    """The two servers, on a loop of their own thread."""

    def __init__(self, idle_timeout=120.0, args=()):
        self.loop = asyncio.new_event_loop()
        self.indexer = Indexer(load_config(["--block-size", str(BLOCK), "--zmq-bind", "", *args], environ={}))
        for n, ids in enumerate(HELD):
            self.indexer.index.store(MODEL, "pod-%d" % n, "gpu", self.indexer.keys(MODEL, ids))
        self.metrics = Metrics(self.indexer)
        self.api = Api(self.indexer, self.metrics)
        self.lane = self.api.lane()
        hook = RequestTimer(self.metrics)
        # a first head may take a minute: only the idle timeout closes a connection in these tests
        timeouts = {"idle_timeout": idle_timeout, "header_timeout": 60.0}
        self.with_lane = HttpServer(self.api.router, lane=self.lane, on_response=hook, **timeouts)
        self.general = HttpServer(self.api.router, on_response=hook, **timeouts)
        self.run(self._start())

    async def _start(self):
        for server in (self.with_lane, self.general):
            await server.start("127.0.0.1", 0)
        handler, _ = self.api.router.match("POST", "/register")     # one Dynamo worker serving MODEL
        register = {"instance_id": 1, "endpoint": "tcp://127.0.0.1:9", "model_name": MODEL, "block_size": BLOCK}
        response = await handler(Request("POST", "/register", body=orjson.dumps(register), peer=("127.0.0.1", 1)))
        assert response.status == 201

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def exchange(self, server, raw):
        """Sends raw on a fresh connection; the answers until the server closes or goes quiet."""
        return self.run(_exchange(server.port, raw))

    def close(self):
        for server in (self.with_lane, self.general):
            self.run(server.close(1.0))
        self.run(self.indexer.close())
        self.loop.close()


async def _exchange(port, raw, quiet=0.15):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 16), quiet)
            if not chunk:
                break
            data += chunk
    except asyncio.TimeoutError:
        pass
    writer.close()
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", data)


@pytest.fixture(scope="module")
def servers():
    s = Servers()
    yield s
    s.close()


def answer_alike(servers, raw):
    before = servers.lane.served
    got = servers.exchange(servers.with_lane, raw)
    taken = servers.lane.served - before
    want = servers.exchange(servers.general, raw)
    assert got == want, raw[:300]
    return got, taken


def plain(path, payload, headers=b"Host: kvcm\r\nContent-Type: application/json\r\n"):
    return b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path, headers, len(payload), payload)


def test_plain_requests_take_the_lane_and_answer_as_the_general_path(servers):
    for path, field in ((b"/v1/score", "model"), (b"/query", "model_name")):
        for ids in HELD + [HELD[0][:20] + [7] * 40, []]:
            got, taken = answer_alike(servers, plain(path, orjson.dumps({field: MODEL, "token_ids": ids})))
            assert taken == 1 and got.startswith(b"HTTP/1.1 200 OK\r\n")
    got, _ = answer_alike(servers, plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[1]})))
    assert orjson.loads(got.split(b"\r\n\r\n", 1)[1])["scores"] == {"pod-1": 3.0}


def test_the_lane_enters_a_new_prompts_blocks_in_the_key_memo_once_it_has_answered(servers):
    """The general path leaves them staged for the next call to enter first; the lane
    enters them after writing its answer. Either way the next ask finds them."""
    memo = servers.indexer.sink.key_memo
    new_general, new_lane = list(range(5000, 5000 + 5 * BLOCK)), list(range(6000, 6000 + 7 * BLOCK))
    servers.exchange(servers.general, plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": new_general})))
    assert memo.staged == 5
    before = servers.lane.served
    servers.exchange(servers.with_lane, plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": new_lane})))
    assert servers.lane.served == before + 1 and memo.staged == 0
    hits = memo.hits
    for ids in (new_general, new_lane):
        servers.exchange(servers.with_lane, plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": ids})))
    assert memo.hits == hits + 12 and memo.staged == 0


@pytest.fixture(scope="module")
def weighted():
    """Servers whose scores are fractions, one tier's so small that orjson writes it in
    exponent form (so the lane leaves that answer to the Python half)."""
    s = Servers(args=["--tier-weights", "gpu=1,cpu=0.8,disk=0.00003"])
    yield s
    s.close()


_POD_NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
_MODELS = itertools.count()


@given(held=st.lists(st.tuples(_POD_NAMES, st.sampled_from(["gpu", "cpu", "disk"]), st.integers(1, 5)),
                     max_size=8))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_answers_the_lane_writes_itself_are_the_general_paths(weighted, held):
    """/v1/score's answer written in C (kvcm/json_out.h): pod names with quotes, backslashes,
    control and non-ASCII characters, several tiers, fractional scores; counted alike."""
    model = "model-%d" % next(_MODELS)
    ids = list(range(5 * BLOCK))
    keys = weighted.indexer.keys(model, ids)
    for pod, tier, blocks in held:
        weighted.indexer.index.store(model, pod, tier, keys[:blocks])
    before = dict(weighted.indexer.score_counts)
    got, taken = answer_alike(weighted, plain(b"/v1/score", orjson.dumps({"model": model, "token_ids": ids})))
    assert taken == 1 and got.startswith(b"HTTP/1.1 200 OK\r\n")
    counts = weighted.indexer.score_counts    # both servers count into the same Indexer
    assert (counts["requests"] - before["requests"], counts["warm"] - before["warm"]) == (2, 2 if held else 0)


# a body the lane takes: only the head of the requests below can send them the general way
_OK = b'{"model":"%s","token_ids":[1,2]}' % MODEL.encode()
_LEN = b"Content-Length: %d\r\n" % len(_OK)


def _head(lines, line=b"POST /v1/score HTTP/1.1", body=_OK):
    return line + b"\r\n" + lines + b"\r\n" + body


_ONE = plain(b"/v1/score", b'{"model": "%s", "token_ids": [1]}' % MODEL.encode())


@pytest.mark.parametrize("raw", [
    # not the lane's: another method, path, version
    _head(b"Host: a\r\n" + _LEN, line) for line in (
        b"PUT /v1/score HTTP/1.1", b"POST /v1/score?x=1 HTTP/1.1", b"POST /v1/%73core HTTP/1.1",
        b"POST /v1/score HTTP/1.0")] + [
    # heads that change the reading, or that the general parser refuses
    _head(lines) for lines in (
        _LEN, b"Host: a\r\nHost: b\r\n" + _LEN, b"Host: a, b\r\n" + _LEN,
        b"Host: a\r\nConnection: close\r\n" + _LEN, b"Host: a\r\nContent-Length: +%d\r\n" % len(_OK),
        b"Host: a\r\nContent-Type: application/xml\r\n" + _LEN,
        b"Host: a\r\nX: \x01\r\n" + _LEN, b"Host: a\r\n X: folded\r\n" + _LEN,
        b"Host: a\n" + _LEN, b"Host : a\r\n" + _LEN, b"Host: a\r\nContent-Length: 99999999999\r\n",
        b"Host: a\r\nX: " + b"y" * 20000 + b"\r\n" + _LEN)] + [
    _head(b"Host: a\r\nContent-Length: 0\r\n", body=b""),
    # the lane's paths, but bodies it leaves to the general path
    plain(b"/v1/score", b'{"model": "%s", "prompt": "hi", "token_ids": [1]}' % MODEL.encode()),
    plain(b"/v1/score", b'{"model": 3, "token_ids": [1]}'),
    plain(b"/v1/score", b'{"token_ids": [1]}'),
    plain(b"/v1/score", b'{"model": "%s", "token_ids": [-1]}' % MODEL.encode()),
    plain(b"/v1/score", b'[1, 2]'),
    plain(b"/query", b'{"model_name": "nobody", "token_ids": [1]}'),
    plain(b"/query", b'{"token_ids": [1]}'),
    plain(b"/query", b'{"model_name": "%s", "token_ids": [1], "lora_name": ""}' % MODEL.encode()),
])
def test_what_the_lane_leaves_is_answered_by_the_general_path(servers, raw):
    got, taken = answer_alike(servers, raw)
    assert taken == 0


@pytest.mark.parametrize("raw, taken", [
    # heads the general parser reads (the lane's own reader leaves them), bodies the lane takes
    (_head(b"Host: a\r\n" + _LEN, b"POST http://a/v1/score HTTP/1.1"), 1),
    (_head(b"Host: a\r\nContent-Type: text/plain\r\n" + _LEN), 1),
    (_head(b"Host: a\r\nX: \xe9\r\n" + _LEN), 1),
    (_head(b"Host: a\r\n" + _LEN + _LEN), 1),
    (_head(b"Host: a\r\nExpect: 100-continue\r\n" + _LEN), 1),
    (_head(b"Host: a\r\nTransfer-Encoding: chunked\r\n", body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(_OK), _OK)), 1),
    # requests behind one another in one read
    (_ONE * 2, 2),
    (_ONE + b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n" + _ONE, 2),
])
def test_requests_the_general_parser_reads_have_their_bodies_answered_by_the_lane(servers, raw, taken):
    assert answer_alike(servers, raw)[1] == taken


def test_a_request_whose_body_comes_in_a_later_read_takes_the_lane(servers):
    """What HTTP clients do with bodies of a few kB: the head in one write, the body in another."""
    raw = plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[1] * 100}))
    cut = raw.index(b"\r\n\r\n") + 4

    async def split():
        reader, writer = await asyncio.open_connection("127.0.0.1", servers.with_lane.port)
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(raw[cut:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = await asyncio.wait_for(reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1))), 10)
        writer.close()
        return orjson.loads(body)

    served = servers.lane.served
    assert servers.run(split())["scores"] == {"pod-1": 3.0}
    assert servers.lane.served == served + 1


@pytest.mark.parametrize("headers", [
    b"Host: kvcm\r\n",
    b"host: kvcm\r\ncontent-type: Application/JSON\r\n",
    b"HOST:kvcm\r\nCONNECTION: Keep-Alive\r\nUser-Agent: router/1.0\r\nAccept: */*\r\n",
    b"Host: \r\nX-Request-Id: 4f1c\t \r\nContent-Type:  application/json  \r\n",
])
def test_plain_heads_written_differently_take_the_lane(servers, headers):
    _, taken = answer_alike(servers, plain(b"/v1/score", b'{"model":"%s","token_ids":[0,1,2]}' % MODEL.encode(),
                                           headers))
    assert taken == 1


_HEADS = st.lists(st.sampled_from([
    b"Host: kvcm\r\n", b"host: a\r\n", b"Host: a, b\r\n", b"Content-Type: application/json\r\n",
    b"content-type: text/plain\r\n", b"Content-Type: application/json; charset=utf-8\r\n",
    b"Content-Type: image/png\r\n", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
    b"Connection: upgrade\r\n", b"User-Agent: x\r\n", b"X: \x7f\r\n", b"X:\r\n", b": v\r\n", b"X-Y z: 1\r\n",
    b"Expect: 100-continue\r\n", b"Expect: nothing\r\n"]), max_size=5)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([b"/v1/score", b"/query", b"/v1/hash", b"/v1/scorex"]), heads=_HEADS, payload=body(),
       length_delta=st.sampled_from([0, 0, 0, 0, -1, 1]))
def test_generated_requests_answer_alike(servers, path, heads, payload, length_delta):
    length = max(0, len(payload) + length_delta)
    raw = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (path, b"".join(heads), length, payload)
    answer_alike(servers, raw)


def test_a_request_split_over_reads_and_pipelined_ones_are_answered_in_order(servers):
    one = plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[0]}))
    two = plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[1]}))

    async def talk():
        reader, writer = await asyncio.open_connection("127.0.0.1", servers.with_lane.port)
        writer.write(one[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(one[40:] + two + one)
        answers = []
        data = b""
        while len(answers) < 3:
            data += await asyncio.wait_for(reader.read(1 << 16), 10)
            while b"\r\n\r\n" in data:
                head, rest = data.split(b"\r\n\r\n", 1)
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                if len(rest) < length:
                    break
                answers.append(orjson.loads(rest[:length])["scores"])
                data = rest[length:]
        writer.close()
        return answers

    assert servers.run(talk()) == [{"pod-0": 3.0}, {"pod-1": 3.0}, {"pod-0": 3.0}]


def test_lane_answers_are_timed_into_the_request_histogram(servers):
    def count():
        return servers.metrics.latency_buckets(("/v1/score",))[float("inf")] if servers.metrics.latency_buckets(
            ("/v1/score",)) else 0
    before, taken = count(), servers.lane.served
    for _ in range(5):
        servers.exchange(servers.with_lane, plain(b"/v1/score", b'{"model":"%s","token_ids":[1]}' % MODEL.encode()))
    assert servers.lane.served - taken == 5
    assert count() - before == 5


def test_lane_answers_reach_any_hook_and_the_access_log(servers, access_log):
    """The request timer takes lane answers straight into its histogram; any other hook
    still gets each one, and with an access log every lane answer is logged and timed."""
    server, timer = servers.with_lane, servers.with_lane.on_response
    request = plain(b"/v1/score", b'{"model":"%s","token_ids":[1]}' % MODEL.encode())
    seen = []
    access, records = access_log

    def timed():
        return servers.metrics.latency_buckets(("/v1/score",)).get(float("inf"), 0)
    try:
        server.on_response = lambda request, status, seconds: seen.append((request.path, status))
        servers.exchange(server, request)
        assert seen == [("/v1/score", 200)]
        server.on_response, server.access_log = timer, access
        before = timed()
        servers.exchange(server, request)
        assert timed() == before + 1
        assert len(records) == 1 and '"POST /v1/score HTTP/1.1" 200' in records[0], records
    finally:
        server.on_response, server.access_log = timer, None


def test_a_connection_idle_after_a_lane_answer_closes_after_the_idle_timeout():
    s = Servers(idle_timeout=0.3)
    try:
        async def idle():
            reader, writer = await asyncio.open_connection("127.0.0.1", s.with_lane.port)
            writer.write(plain(b"/v1/score", b'{"model":"%s","token_ids":[1]}' % MODEL.encode()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            await asyncio.wait_for(reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1))), 10)
            assert await asyncio.wait_for(reader.read(1), 10) == b""   # closed by the server, not the deadline
            writer.close()
        served = s.lane.served
        s.run(idle())
        assert s.lane.served == served + 1
    finally:
        s.close()


class SpinningServer:
    """A busy-polling server with the lane on a uvloop loop of its own thread, holding what
    Servers holds (plus `extra` pods on HELD[0]'s first block), for clients that block."""

    def __init__(self, extra_pods=()):
        self.indexer = Indexer(load_config(["--block-size", str(BLOCK), "--zmq-bind", ""], environ={}))
        for n, ids in enumerate(HELD):
            self.indexer.index.store(MODEL, "pod-%d" % n, "gpu", self.indexer.keys(MODEL, ids))
        for pod in extra_pods:
            self.indexer.index.store(MODEL, pod, "gpu", self.indexer.keys(MODEL, HELD[0][:BLOCK]))
        self.metrics = Metrics(self.indexer)
        api = Api(self.indexer, self.metrics)
        self.lane = api.lane()
        self.server = HttpServer(api.router, lane=self.lane, on_response=RequestTimer(self.metrics),
                                 busy_poll=0.005)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start("127.0.0.1", 0))

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def inspect(self, fn):
        async def read():
            return fn()
        return self.call(read())

    def connect(self, rcvbuf=None):
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", self.server.port))
        sock.settimeout(30)
        return sock

    def close(self):
        self.call(self.server.close(1.0))
        self.call(self.indexer.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _read_answer(sock, data):
    """(one whole response, the bytes after it) from sock, starting with data."""
    while b"\r\n\r\n" not in data:
        data += sock.recv(1 << 16)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(1 << 16)
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", head + b"\r\n\r\n" + rest[:length]), rest[length:]


def _lane_answers(metrics):
    buckets = metrics.latency_buckets(("/v1/score",))
    return buckets[float("inf")] if buckets else 0


def test_a_busy_polling_lane_answers_the_requests_its_spins_read(servers):
    """The spin reads a connection's next request and the lane answers it there, sending
    the answer itself: the same answers as the general path, each counted and timed."""
    requests = [plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": ids}))
                for ids in HELD + [HELD[0][:20], []]]
    want = [servers.exchange(servers.general, raw) for raw in requests]
    s = SpinningServer()
    try:
        sock = s.connect()
        for n in range(400):
            sock.sendall(requests[n % len(requests)])
            got, rest = _read_answer(sock, b"")
            assert (got, rest) == (want[n % len(requests)], b"")
        sock.close()
        assert s.lane.served == 400
        assert s.inspect(lambda: s.indexer.sink.key_memo.staged) == 0      # entered after each answer
        assert s.inspect(lambda: s.server.busy_polls[2]) > 0       # requests read by spins
        assert s.inspect(lambda: _lane_answers(s.metrics)) == 400
    finally:
        s.close()


def test_answers_the_socket_cannot_take_at_once_are_finished_by_the_transport_in_order():
    """A client that sends request after request without reading: the answers (~40 kB each)
    fill the socket, the spin's send takes part of one, the transport writes the rest, and
    the requests after it are answered behind it: every answer arrives whole and in order."""
    pods = ["pod-%s-%03d" % ("x" * 50, i) for i in range(400)]
    s = SpinningServer(extra_pods=pods)
    try:
        raw = plain(b"/v1/score", orjson.dumps({"model": MODEL, "token_ids": HELD[0]}))
        sock = s.connect(rcvbuf=4096)
        sock.sendall(raw)
        first, _ = _read_answer(sock, b"")
        assert len(first) > 40_000 and all(pod.encode() in first for pod in pods)
        for _ in range(120):
            sock.sendall(raw)
            time.sleep(0.002)       # a read of its own for each
        data = b""
        for _ in range(120):
            got, data = _read_answer(sock, data)
            assert got == first
        sock.close()
        assert s.inspect(lambda: s.server.busy_polls[2]) > 0
        assert s.lane.served == 121
    finally:
        s.close()
