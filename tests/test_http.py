"""kvcm.http over real TCP: raw sockets against an HttpServer on a uvloop loop in a thread.

No timing assertions: timeouts are configured short and the tests wait, with generous
deadlines, for the behaviour (an answer, a close) to happen.
"""

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import select
import socket
import threading
import time

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings, strategies as st

import kvcm.http
from kvcm.ratelog import RateLimitedLog
from kvcm.http import (BadRequest, HttpError, HttpServer, Request, Response, Router, WRITE_HIGH,
                       error_response, json_response)

DEADLINE = 10.0          # any single wait; only reached when something is broken
MAX_BODY = 64 * 1024     # the test servers' body limit


# --------------------------------------------------------------------------------------------
# The application under test


class App:
    """Routes covering every handler shape; `gate` holds /gate requests until released."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.entered = threading.Event()
        self.router = router = Router()
        router.add("GET", "/health", lambda request: json_response(200, {"status": "ok"}))
        router.add("GET", "/sync/{n}", lambda request: json_response(200, {"n": int(request.params["n"])}))
        router.add("GET", "/async/{n}", self.delayed)
        router.add("POST", "/echo", lambda request: Response(200, request.body, "application/octet-stream"))
        router.add("POST", "/inspect", self.inspect)
        router.add("GET", "/inspect/{a}/{b}", self.inspect)
        router.add("POST", "/json", lambda request: json_response(200, {"got": request.json()}))
        router.add("GET", "/sized/{n}", self.sized)
        router.add("GET", "/gate", self.gated)
        router.add("GET", "/boom", self.boom)
        router.add("GET", "/aboom", self.async_boom)
        router.add("GET", "/not-a-response", lambda request: {"status": "ok"})
        router.add("GET", "/teapot", self.teapot)
        router.add("DELETE", "/v1/pods/{pod}", lambda request: json_response(200, request.params))

    @staticmethod
    async def delayed(request):
        # ?ms= lets a pipeline make earlier requests finish later than later ones
        ms = int(request.query.partition("ms=")[2] or 0)
        await asyncio.sleep(ms / 1000)
        return json_response(200, {"n": int(request.params["n"]), "async": True})

    @staticmethod
    def inspect(request):
        return json_response(200, {
            "method": request.method, "path": request.path, "query": request.query,
            "headers": request.headers, "trailers": request.trailers, "params": request.params,
            "version": request.http_version, "peer": request.peer,
            "body": request.body.decode("latin-1")})

    @staticmethod
    def sized(request):
        # the body starts with the query's seq so a reader can check the order
        seq = request.query.partition("seq=")[2]
        return Response(200, seq.encode().ljust(int(request.params["n"]), b"."), "text/plain")

    async def gated(self, request):
        self.entered.set()
        await self.gate.wait()
        return json_response(200, {"gate": "passed"})

    @staticmethod
    def boom(request):
        raise RuntimeError("sync handler failure")

    @staticmethod
    async def async_boom(request):
        await asyncio.sleep(0)
        raise RuntimeError("async handler failure")

    @staticmethod
    def teapot(request):
        raise HttpError(418, "short and stout", headers=(("X-Tea", "earl grey"),))


class Served:
    """An HttpServer for App on its own uvloop loop, in a background thread."""

    def __init__(self, **options):
        self.app = App()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options.setdefault("max_body", MAX_BODY)
        self.server = HttpServer(self.app.router, **options)
        self.call(self.server.start("127.0.0.1", 0))
        self.port = self.server.port
        self.clients = []

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(3 * DEADLINE)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def inspect(self, fn):
        """fn() evaluated on the server's loop (server state is only touched there)."""
        done = concurrent.futures.Future()

        def run():
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return done.result(DEADLINE)

    def until(self, fn, what):
        end = time.monotonic() + DEADLINE
        while not self.inspect(fn):
            if time.monotonic() > end:
                raise AssertionError("timed out waiting for " + what)
            time.sleep(0.01)

    def release_gate(self):
        self.loop.call_soon_threadsafe(self.app.gate.set)

    def connections(self):
        return self.inspect(lambda: list(self.server._connections))

    def stop(self):
        for client in self.clients:
            client.close()
        if not self.server.closing:
            self.call(self.server.close(2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture
def serve():
    started = []

    def start(**options):
        served = Served(**options)
        started.append(served)
        return served
    yield start
    for served in started:
        served.stop()


@pytest.fixture
def served(serve):
    return serve()


# --------------------------------------------------------------------------------------------
# A raw-socket client


class Reply:
    def __init__(self, version, status, headers, body):
        self.version, self.status, self.headers, self.body = version, status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<Reply %d %r %r>" % (self.status, self.headers, self.body[:200])


class Client:
    def __init__(self, served, tls=None):
        self.sock = socket.create_connection(("127.0.0.1", served.port), timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = b""
        served.clients.append(self)

    def close(self):
        self.sock.close()

    def fileno(self):
        return self.sock.fileno()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed; unparsed %r" % self.buf[:200])
        self.buf += data

    def reply(self, head=False):
        """Reads one response (an interim 100 is a response too)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            assert name.lower() not in headers, "repeated response header %s" % name
            headers[name.lower()] = value.strip()
        status = int(status)
        if status < 200:
            assert "content-length" not in headers
            return Reply(version, status, headers, b"")
        length = int(headers["content-length"])
        if head:
            length = 0
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Reply(version, status, headers, body)

    def request(self, method, path, body=None, headers=(), head=False):
        self.send(request_bytes(method, path, body, headers))
        return self.reply(head=head or method == "HEAD")

    def expect_eof(self):
        """The server closed cleanly (FIN, not a reset) and sent nothing more."""
        assert self.buf == b"", "unexpected bytes %r" % self.buf[:200]
        data = self.sock.recv(65536)
        assert data == b"", "unexpected bytes %r" % data[:200]

    def received(self):
        """Everything the server sends until it closes (by EOF or by reset)."""
        data = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return data
                data += chunk
        except ConnectionResetError:
            return data

    def ended(self):
        """True once the connection is gone, whether by EOF or by reset."""
        self.received()
        return True


def request_bytes(method, path, body=None, headers=()):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
    lines += ["%s: %s" % header for header in headers]
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def chunked(chunks, extension="", trailers=""):
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension.encode(), c) for c in chunks)
    return out + b"0\r\n" + trailers.encode() + b"\r\n"


def assert_error(reply, status, type=None):
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    if type is not None:
        assert error["type"] == type


# --------------------------------------------------------------------------------------------
# Basics


def test_response_headers(served):
    client = Client(served)
    reply = client.request("GET", "/health")
    assert reply.version == "HTTP/1.1" and reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["server"] == "kvcm"
    assert email.utils.parsedate_to_datetime(reply.headers["date"]).tzname() == "UTC"
    assert "connection" not in reply.headers      # HTTP/1.1 keep-alive is the default


def test_keep_alive_many_requests(served):
    client = Client(served)
    for i in range(300):
        if i % 3 == 2:
            reply = client.request("POST", "/echo", b"payload %d" % i)
            assert reply.body == b"payload %d" % i
        else:
            path = "/sync/%d" % i if i % 3 == 0 else "/async/%d" % i
            reply = client.request("GET", path)
            assert reply.status == 200 and reply.json()["n"] == i
    assert len(served.connections()) == 1


# --------------------------------------------------------------------------------------------
# Busy polling: after answering, the loop spins for its next event instead of sleeping


def test_busy_poll_reports_whether_the_fd_became_readable():
    a, b = socket.socketpair()
    ep = select.epoll()
    try:
        ep.register(a.fileno(), select.EPOLLIN)
        assert kvcm.http.busy_poll(ep.fileno(), 0.002) is False     # the budget ran out
        b.sendall(b"x")
        assert kvcm.http.busy_poll(ep.fileno(), 5.0) is True        # an event, at once
        assert kvcm.http.busy_poll(ep.fileno(), 5.0) is True        # still there: nothing consumed
        assert ep.poll(0) == [(a.fileno(), select.EPOLLIN)]
    finally:
        ep.close()
        a.close()
        b.close()


def test_busy_poll_reads_the_connection_it_is_given_and_leaves_everything_else_to_the_loop():
    conn, peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    ep = select.epoll()
    try:
        for sock in (conn, other):
            sock.setblocking(False)
            ep.register(sock.fileno(), select.EPOLLIN)
        assert kvcm.http.busy_poll(ep.fileno(), 0.002, conn.fileno()) is False
        peer.sendall(b"next request")
        assert kvcm.http.busy_poll(ep.fileno(), 5.0, conn.fileno()) == b"next request"
        assert kvcm.http.busy_poll(ep.fileno(), 0.002, conn.fileno()) is False     # consumed
        peer.sendall(b"x" * 100_000)        # a spin reads at most 64 KiB; the rest stays
        taken = kvcm.http.busy_poll(ep.fileno(), 5.0, conn.fileno())
        assert taken == b"x" * len(taken) and 0 < len(taken) <= 65536
        assert len(taken) + len(conn.recv(200_000)) == 100_000
        other_peer.sendall(b"y")            # another socket's event is the loop's
        assert kvcm.http.busy_poll(ep.fileno(), 5.0, conn.fileno()) is True
        assert other.recv(10) == b"y"
        peer.shutdown(socket.SHUT_WR)       # so is the connection's end
        assert kvcm.http.busy_poll(ep.fileno(), 5.0, conn.fileno()) is True
        assert conn.recv(10) == b""
    finally:
        ep.close()
        for sock in (conn, peer, other, other_peer):
            sock.close()


def test_busy_polling_spins_once_after_each_answer_and_every_connection_is_served(serve):
    # Sync, async and body-carrying requests on two connections: each answer is followed by
    # one spin (an async handler's after its task ends, not while it runs), and a request
    # on the other connection ends the spin with an event.
    served = serve(busy_poll=0.005)
    first, second = Client(served), Client(served)
    answered = 0
    for i in range(60):
        client = (first, second)[i % 2]
        if i % 3 == 2:
            reply = client.request("POST", "/echo", b"payload %d" % i)
            assert reply.body == b"payload %d" % i
        else:
            reply = client.request("GET", "/sync/%d" % i if i % 3 == 0 else "/async/%d" % i)
            assert reply.status == 200 and reply.json()["n"] == i
        answered += 1
    served.until(lambda: sum(served.server.busy_polls) == answered, "a spin after every answer")
    event, budget_spent, _ = served.inspect(lambda: list(served.server.busy_polls))
    assert event > 0
    # a client that sends nothing more: the spin after its answer runs out (looking at the
    # server any sooner would be an event that ends it)
    assert first.request("GET", "/sync/1").status == 200
    time.sleep(0.5)
    served.until(lambda: served.server.busy_polls[1] > budget_spent, "a spin that ran out")
    assert sum(served.inspect(lambda: list(served.server.busy_polls))) == answered + 1


def one_connections_requests(client):
    """Sync, async, body and chunked requests one after another, some split over sends and
    some larger than one read, pipelined ones: the spin that reads each one's successor
    itself must leave the parser exactly where the loop's reads would."""
    answered = 0
    for i in range(120):
        kind = i % 6
        if kind == 0:
            assert client.request("GET", "/sync/%d" % i).json() == {"n": i}
        elif kind == 1:
            assert client.request("GET", "/async/%d" % i).json()["n"] == i
        elif kind == 2:
            assert client.request("POST", "/echo", b"payload %d" % i).body == b"payload %d" % i
        elif kind == 3:
            body = b"%d" % i * 50_000       # more than one read (served with max_body=200_000)
            assert client.request("POST", "/echo", body).body == body
        elif kind == 4:
            whole = request_bytes("POST", "/echo", b"split %d" % i)
            client.send(whole[:20])
            time.sleep(0.001)
            client.send(whole[20:])
            assert client.reply().body == b"split %d" % i
        else:
            client.send(b"".join(pipelined_request(n) for n in range(i, i + 4)))
            assert [client.reply().status for _ in range(4)] == [200] * 4
            answered += 3
        answered += 1
    return answered


def test_busy_polling_reads_a_connections_next_request_itself_a_bounded_number_of_times(serve):
    served = serve(busy_poll=kvcm.http.MAX_BUSY_POLL, max_body=200_000)
    client = Client(served)
    one_connections_requests(client)
    assert served.inspect(lambda: served.server.busy_polls[2]) > 0
    # after MAX_SPIN_READS requests from its spins a callback leaves the next to the loop,
    # whose other connections and timers get their turn first
    before = served.inspect(lambda: served.server.busy_polls[2])
    for i in range(90):
        assert client.request("GET", "/sync/%d" % i).json() == {"n": i}
    read = served.inspect(lambda: served.server.busy_polls[2]) - before
    assert read <= 90 * kvcm.http.MAX_SPIN_READS // (kvcm.http.MAX_SPIN_READS + 1)


def test_busy_polling_over_tls_leaves_reading_to_the_transport(serve, certificates):
    from kvcm.serve import tls_context
    from tls import client_context

    ca, cert, key = certificates
    served = serve(ssl=tls_context(str(cert), str(key)), busy_poll=kvcm.http.MAX_BUSY_POLL, max_body=200_000)
    one_connections_requests(Client(served, tls=client_context(ca)))
    event, _, read = served.inspect(lambda: list(served.server.busy_polls))
    assert event > 0 and read == 0


def test_without_busy_polling_the_loop_never_spins(served):
    client = Client(served)
    for i in range(20):
        assert client.request("GET", "/async/%d" % i).status == 200
    assert served.inspect(lambda: (served.server._poll_fd, served.server.busy_polls)) == (None, [0, 0, 0])


@pytest.mark.parametrize("seconds", [-0.001, 0.011, float("nan")])
def test_busy_poll_budget_is_checked(seconds):
    with pytest.raises(ValueError, match="busy_poll must be between 0 and 0.01 seconds"):
        HttpServer(Router(), busy_poll=seconds)


def pipelined_request(i):
    kind = i % 4
    if kind == 0:    # async; earlier ones sleep longer, so they finish after later ones
        return request_bytes("GET", "/async/%d?ms=%d" % (i, max(0, 60 - i)))
    if kind == 1:
        return request_bytes("GET", "/sync/%d" % i)
    if kind == 2:
        return request_bytes("POST", "/echo", b'{"n": %d}' % i)
    return (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked([b'{"n": ', b"%d}" % i]))


@pytest.mark.parametrize("count", [50, 300])   # 300: beyond MAX_PIPELINE, reading pauses and resumes
def test_pipelining_answers_in_order(served, count):
    client = Client(served)
    client.send(b"".join(pipelined_request(i) for i in range(count)))
    for i in range(count):
        reply = client.reply()
        assert reply.status == 200 and reply.json()["n"] == i, (i, reply)
        assert reply.json().get("async", False) == (i % 4 == 0)


def test_head_sends_headers_without_body(served):
    client = Client(served)
    body = client.request("GET", "/health").body
    reply = client.request("HEAD", "/health")
    assert reply.status == 200 and reply.headers["content-length"] == str(len(body))
    # had a body been sent, it would be parsed as the start of this reply
    assert client.request("GET", "/sync/7").json() == {"n": 7}
    reply = client.request("HEAD", "/echo")
    assert reply.status == 405 and reply.headers["allow"] == "POST"
    assert client.request("GET", "/sync/8").json() == {"n": 8}


# --------------------------------------------------------------------------------------------
# Errors: every status, the JSON shape, and whether the connection survives


LONG_TARGET = b"/" + b"a" * (17 * 1024)
MANY_HEADERS = b"".join(b"X-Header-%d: %s\r\n" % (i, b"v" * 90) for i in range(200))

PROTOCOL_ERRORS = [
    # id, raw request, status, closes, headers the reply must carry
    ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)), 400, True, {}),
    ("no-version", b"GET /health\r\n\r\n", 400, True, {}),
    ("http11-without-host", b"GET /health HTTP/1.1\r\n\r\n", 400, True, {}),
    ("two-hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, True, {}),
    ("http10-two-hosts", b"GET /health HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, True, {}),
    ("bad-version", b"GET /health http/1.1\r\n\r\n", 400, True, {}),
    ("double-space", b"GET  /health HTTP/1.1\r\nHost: t\r\n\r\n", 400, True, {}),
    ("relative-target", b"GET health HTTP/1.1\r\nHost: t\r\n\r\n", 400, True, {}),
    ("nul-in-target", b"GET /he\x00alth HTTP/1.1\r\nHost: t\r\n\r\n", 400, True, {}),
    ("header-without-colon", b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n", 400, True, {}),
    ("space-before-colon", b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400, True, {}),
    ("obs-fold", b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  2\r\n\r\n", 400, True, {}),
    ("bare-lf", b"GET /health HTTP/1.1\nHost: x\n\n", 400, True, {}),
    ("control-char", b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n", 400, True, {}),
    ("cl-and-te", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n", 400, True, {}),
    ("cl-not-a-number", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n", 400, True, {}),
    ("cl-negative", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", 400, True, {}),
    ("cl-conflicting", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     400, True, {}),
    ("unknown-path", b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404, False, {}),
    ("wrong-method", b"DELETE /health HTTP/1.1\r\nHost: t\r\n\r\n", 405, False, {"allow": "GET, HEAD"}),
    ("expectation", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nExpect: 200-ok\r\n\r\nx",
     417, True, {}),
    ("te-gzip", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501, True, {}),
    ("http-2", b"GET /health HTTP/2.0\r\n\r\n", 505, True, {}),
    ("http-1.2", b"GET /health HTTP/1.2\r\n\r\n", 505, True, {}),
    ("request-line-too-long", b"GET " + LONG_TARGET + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, True, {}),
    ("headers-too-large", b"GET /health HTTP/1.1\r\nHost: t\r\n" + MANY_HEADERS + b"\r\n", 431, True, {}),
    ("body-too-large", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
     413, True, {}),
    ("handler-http-error", b"GET /teapot HTTP/1.1\r\nHost: t\r\n\r\n", 418, False, {"x-tea": "earl grey"}),
]


@pytest.mark.parametrize("raw, status, closes, headers", [p[1:] for p in PROTOCOL_ERRORS],
                         ids=[p[0] for p in PROTOCOL_ERRORS])
def test_protocol_errors(served, raw, status, closes, headers):
    client = Client(served)
    client.send(raw)
    reply = client.reply()
    assert_error(reply, status)
    for name, value in headers.items():
        assert reply.headers[name] == value
    if closes:
        assert reply.headers["connection"] == "close"
        client.expect_eof()
    else:
        assert "connection" not in reply.headers
        assert client.request("GET", "/health").status == 200


@pytest.mark.parametrize("status, type", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (405, "invalid_request_error"), (413, "payload_too_large"),
    (415, "invalid_request_error"), (500, "server_error"), (503, "unavailable")])
def test_error_types_default_from_status(status, type):
    response = error_response(status, "why")
    assert response.status == status and response.content_type == "application/json"
    assert json.loads(response.body) == {"error": {"message": "why", "type": type, "code": status}}
    assert json.loads(error_response(status, "why", type="custom").body)["error"]["type"] == "custom"


@pytest.fixture
def fresh_rate_log(monkeypatch):
    """kvcm.http's rate-limited log, with no reason logged yet."""
    monkeypatch.setattr(kvcm.http, "rate_log", RateLimitedLog(kvcm.http.log))


@pytest.mark.parametrize("path", ["/boom", "/aboom", "/not-a-response"])
def test_handler_failure_is_500_and_connection_survives(served, path, caplog, fresh_rate_log):
    client = Client(served)
    with caplog.at_level(logging.ERROR, logger="kvcm.http"):
        assert_error(client.request("GET", path), 500, "server_error")
        assert client.request("GET", "/sync/3").json() == {"n": 3}
    assert "GET %s" % path in caplog.text


def test_handler_failures_are_logged_once_per_interval(served, caplog, fresh_rate_log):
    client = Client(served)
    with caplog.at_level(logging.ERROR, logger="kvcm.http"):
        for path in ["/boom", "/aboom"] * 10:
            assert_error(client.request("GET", path), 500, "server_error")
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None, caplog.text


@pytest.mark.parametrize("content_type, body, status", [
    (None, b'{"a": 1}', 200),
    ("application/json", b'{"a": 1}', 200),
    ("application/json; charset=utf-8", b'{"a": 1}', 200),
    ("Application/JSON;charset=\"UTF-8\"", b'{"a": 1}', 200),
    ("text/plain", b'{"a": 1}', 200),                        # llm-d's clients send these too
    ("application/x-www-form-urlencoded", b'{"a": 1}', 200),   # what `curl -d` says
    ("text/plain; charset=utf-8", b'{"a": 1}', 200),
    ("application/x-www-form-urlencoded", b"a=1", 400),
    ("application/xml", b'{"a": 1}', 415),
    ("text/csv", b'{"a": 1}', 415),
    ("application/json; charset=latin-1", b'{"a": 1}', 415),
    ("application/json", b'{"a": ', 400),
    ("application/json", b"\xff\xfe", 400),
    ("application/json", b"", 400),
])
def test_json_body(served, content_type, body, status):
    client = Client(served)
    headers = [("Content-Type", content_type)] if content_type else []
    reply = client.request("POST", "/json", body, headers)
    if status == 200:
        assert reply.status == 200 and reply.json() == {"got": {"a": 1}}
    else:
        assert_error(reply, status)
    assert client.request("GET", "/health").status == 200


def test_a_post_without_a_body_is_a_request_with_an_empty_body(served):
    client = Client(served)
    client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = client.reply()
    assert (reply.status, reply.body) == (200, b"")
    assert_error(client.request("POST", "/json", None), 400)    # a handler that needs one says so
    assert client.request("GET", "/health").status == 200


def test_request_json_outside_server():
    assert Request("POST", "/", body=b"[1, 2]").json() == [1, 2]
    with pytest.raises(BadRequest) as bad:
        Request("POST", "/", body=b"{").json()
    assert bad.value.status == 400
    with pytest.raises(HttpError) as unsupported:
        Request("POST", "/", headers={"content-type": "text/csv"}, body=b"[]").json()
    assert unsupported.value.status == 415


# --------------------------------------------------------------------------------------------
# Routing and the request object


def test_router_match():
    router = Router()
    get, delete, put = object(), object(), object()
    router.add("GET", "/things/{id}", get)
    router.add("DELETE", "/things/special", delete)
    router.add("put", "/things/{id}/{part}", put)
    assert router.match("GET", "/things/special") == (get, {"id": "special"})
    assert router.match("HEAD", "/things/7") == (get, {"id": "7"})
    assert router.match("DELETE", "/things/special") == (delete, {})
    assert router.match("PUT", "/things/a%2Fb/c%20d") == (put, {"id": "a/b", "part": "c d"})
    with pytest.raises(HttpError) as e:
        router.match("POST", "/things/special")
    assert e.value.status == 405 and dict(e.value.headers) == {"Allow": "DELETE, GET, HEAD"}
    for path in ("/things", "/things/", "/things/a/b/c", "/other"):
        with pytest.raises(HttpError) as e:
            router.match("GET", path)
        assert e.value.status == 404, path


@pytest.mark.parametrize("method, pattern", [
    ("GET", "/things/{id}"),          # already registered
    ("GET", "things"),                # not absolute
    ("GET", "/x/{a b}"),              # capture is not an identifier
    ("GET", "/x/pre{a}"),             # capture is not a whole segment
    ("GE T", "/x"),                   # method is not a token
])
def test_router_rejects_bad_routes(method, pattern):
    router = Router()
    router.add("GET", "/things/{id}", object())
    with pytest.raises(ValueError):
        router.add(method, pattern, object())


def test_request_fields(served):
    client = Client(served)
    raw = (b"GET /inspect/x%20y/a%2Fb?q=%20&r=1 HTTP/1.1\r\nHost: h\r\nX-Many: 1\r\n"
           b"x-many: 2\r\nX-Spaces:   padded \t\r\n\r\n")
    client.send(raw)
    seen = client.reply().json()
    assert seen["method"] == "GET" and seen["version"] == "1.1"
    assert seen["path"] == "/inspect/x y/a/b" and seen["query"] == "q=%20&r=1"
    assert seen["params"] == {"a": "x y", "b": "a/b"}
    assert seen["headers"] == {"host": "h", "x-many": "1, 2", "x-spaces": "padded"}
    assert seen["peer"] == list(client.sock.getsockname())
    assert seen["body"] == ""


def test_absolute_form_target_and_leading_empty_lines(served):
    client = Client(served)
    client.send(b"\r\n\r\nGET http://example.com/sync/5?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert client.reply().json() == {"n": 5}
    seen = client.request("DELETE", "/v1/pods/10.0.0.1%3A8000").json()
    assert seen == {"pod": "10.0.0.1:8000"}


# --------------------------------------------------------------------------------------------
# Bodies


@pytest.mark.parametrize("size", [0, 1, 50_000, MAX_BODY])
def test_content_length_bodies(served, size):
    client = Client(served)
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    assert client.request("POST", "/echo", body).body == body
    assert client.request("GET", "/health").status == 200


CHUNK_SETS = {
    "one": [b"hello"],
    "mixed": [b"a", b"b" * 10, b"c" * 4096],
    "large": [b"x" * 60000, b"yz"],
}


@pytest.mark.parametrize("chunks", CHUNK_SETS.values(), ids=CHUNK_SETS.keys())
@pytest.mark.parametrize("extension", ["", ";name=value", ' ;a;b="q r"'])
@pytest.mark.parametrize("trailers", ["", "X-Checksum: 42\r\nX-Other: y\r\n"])
def test_chunked_bodies(served, chunks, extension, trailers):
    client = Client(served)
    client.send(b"POST /inspect HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked(chunks, extension, trailers))
    seen = client.reply().json()
    assert seen["body"] == b"".join(chunks).decode()
    assert seen["trailers"] == ({"x-checksum": "42", "x-other": "y"} if trailers else {})
    assert client.request("GET", "/health").status == 200


@pytest.mark.parametrize("chunks", [[b"hello", b" world"], [b"x" * 3000]], ids=["small", "3k"])
def test_request_delivered_byte_by_byte(served, chunks):
    client = Client(served)
    raw = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(chunks, ";e=1", "T: v\r\n")
           + request_bytes("POST", "/echo", b"after"))
    for i in range(len(raw)):
        client.send(raw[i:i + 1])
    assert client.reply().body == b"".join(chunks)
    assert client.reply().body == b"after"


@pytest.mark.parametrize("bad", [
    b"zz\r\n", b"-1\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"\r\n", b"5\r\nhelloXX\r\n0\r\n\r\n",
    b"1;" + b"e" * 2000 + b"\r\n", b"1" * 17 + b"\r\n"],
    ids=["not-hex", "negative", "0x-prefix", "empty-size", "data-too-long", "long-extension", "overflow"])
def test_bad_chunks(served, bad):
    client = Client(served)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + bad)
    assert_error(client.reply(), 400)
    client.expect_eof()


def test_chunked_body_over_limit(served):
    client = Client(served)
    half = b"x" * (MAX_BODY // 2 + 1)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked([half, half]))
    assert_error(client.reply(), 413, "payload_too_large")
    client.expect_eof()


def test_413_from_content_length_before_the_body(served):
    client = Client(served)
    body = b"b" * (4 * MAX_BODY)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
    reply = client.reply()          # answered before a single body byte was sent
    assert_error(reply, 413)
    assert reply.headers["connection"] == "close"
    # the client keeps sending the body it announced; the server drains it and closes cleanly
    client.send(body)
    client.sock.shutdown(socket.SHUT_WR)
    client.expect_eof()


def test_413_reaches_a_client_still_sending(served):
    client = Client(served)
    body = b"b" * (2 * 1024 * 1024)
    # sendall returns only once the server has taken (and discarded) most of the body
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert_error(client.reply(), 413)
    client.expect_eof()


def test_drain_after_413_is_bounded(serve):
    served = serve(drain_bytes=64 * 1024)
    client = Client(served)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
    assert_error(client.reply(), 413)
    with pytest.raises(OSError):    # the server gave up on us: reset, not an endless drain
        for _ in range(1024):
            client.send(b"b" * (1 << 20))
    served.until(lambda: not served.server._connections, "the connection to go")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_expect_100_continue(served, framing):
    client = Client(served)
    length = b"Content-Length: 11" if framing == "content-length" else b"Transfer-Encoding: chunked"
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\n%s\r\nExpect: 100-continue\r\n\r\n" % length)
    interim = client.reply()
    assert interim.status == 100 and interim.version == "HTTP/1.1"
    client.send(b"hello world" if framing == "content-length" else chunked([b"hello", b" world"]))
    assert client.reply().body == b"hello world"


@pytest.mark.parametrize("version, sent_with_head", [("1.1", b"hello world"), ("1.1", b"hello"),
                                                     ("1.0", b"")])
def test_no_100_continue_when_the_body_is_on_its_way_or_for_http10(served, version, sent_with_head):
    client = Client(served)
    client.send(b"POST /echo HTTP/%s\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n%s"
                % (version.encode(), sent_with_head))
    client.send(b"hello world"[len(sent_with_head):])
    reply = client.reply()
    assert reply.status == 200 and reply.body == b"hello world"


def test_no_100_continue_for_a_body_over_the_limit(served):
    client = Client(served)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (MAX_BODY + 1))
    assert_error(client.reply(), 413)     # the first thing the client hears is the refusal
    client.expect_eof()


# --------------------------------------------------------------------------------------------
# Connection management


@pytest.mark.parametrize("headers, keep_alive", [("", False), ("Connection: keep-alive\r\n", True),
                                                 ("Connection: Keep-Alive, foo\r\n", True)])
def test_http10(served, headers, keep_alive):
    client = Client(served)
    client.send(b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n%s\r\nabc" % headers.encode())
    reply = client.reply()
    assert reply.status == 200 and reply.body == b"abc"
    if keep_alive:
        assert reply.headers["connection"] == "keep-alive"
        client.send(b"GET /sync/2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert client.reply().json() == {"n": 2}
    else:
        assert reply.headers["connection"] == "close"
        client.expect_eof()


@pytest.mark.parametrize("path", ["/sync/1", "/async/1?ms=20"])
def test_connection_close_is_honoured(served, path):
    client = Client(served)
    client.send(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode()
                + request_bytes("GET", "/sync/2"))       # never answered
    reply = client.reply()
    assert reply.json()["n"] == 1 and reply.headers["connection"] == "close"
    client.expect_eof()


@pytest.mark.parametrize("paths", [["/sync/1"], ["/async/1?ms=30"], ["/async/1?ms=30", "/sync/2", "/async/3"]],
                         ids=["sync", "async", "pipelined"])
def test_half_closed_client_gets_its_responses(served, paths):
    client = Client(served)
    client.send(b"".join(request_bytes("GET", path) for path in paths))
    client.sock.shutdown(socket.SHUT_WR)
    for path in paths:
        assert client.reply().json()["n"] == int(path.split("/")[2].split("?")[0])
    client.expect_eof()


def test_half_request_then_eof_closes(served):
    client = Client(served)
    client.send(b"GET /health HTTP/1.1\r\nHost: x")
    client.sock.shutdown(socket.SHUT_WR)
    client.expect_eof()


HALF_REQUESTS = {
    "head": b"GET /health HTTP/1.1\r\nHost: loc",
    "body": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc",
    "chunked": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
}


@pytest.mark.parametrize("half", HALF_REQUESTS.values(), ids=HALF_REQUESTS.keys())
def test_stalled_request_gets_408_while_others_are_served(serve, half):
    served = serve(header_timeout=0.3, idle_timeout=0.3)
    stalled = Client(served)
    stalled.send(half)
    other = Client(served)
    for i in range(20):
        assert other.request("GET", "/sync/%d" % i).json() == {"n": i}
    assert_error(stalled.reply(), 408)
    stalled.expect_eof()
    # the other client's connection idles out silently (after having been served)
    other.expect_eof()


def test_slowloris_drip_does_not_extend_the_header_deadline(serve):
    served = serve(header_timeout=0.3, idle_timeout=60)
    client = Client(served)
    head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 10_000
    end = time.monotonic() + 3 * DEADLINE
    sent = 0
    while not select.select([client.sock], [], [], 0.02)[0]:
        assert time.monotonic() < end, "no answer to a header that never ends"
        client.send(head[sent:sent + 1])
        sent += 1
    assert sent < len(head)
    assert_error(client.reply(), 408)
    client.expect_eof()


def test_a_connection_that_never_sends_a_byte_is_closed_after_the_header_timeout(serve):
    served = serve(header_timeout=0.3, idle_timeout=3 * DEADLINE)
    silent = Client(served)
    silent.expect_eof()          # the socket's own timeout (DEADLINE) is far below idle_timeout
    served.until(lambda: not served.server._connections, "the connection to be forgotten")


def test_slow_bodies_are_cut_off_by_the_body_timeout_and_free_their_slots(serve):
    """Bodies dripping a byte at a time never pause for idle_timeout, so only the body
    deadline ends them; meanwhile every slot is taken, afterwards a new client is served."""
    served = serve(max_connections=4, header_timeout=3 * DEADLINE, body_timeout=0.5, idle_timeout=3 * DEADLINE)
    slow = [Client(served) for _ in range(4)]
    heads = [b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n",
             b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"] * 2
    for client, head in zip(slow, heads):
        client.send(head + b"x")
    refused = Client(served)
    refused.send(request_bytes("GET", "/health"))
    assert_error(refused.reply(), 503)
    waiting, end = list(slow), time.monotonic() + 3 * DEADLINE
    while waiting:
        assert time.monotonic() < end, "slow bodies were never cut off"
        for client in select.select(waiting, [], [], 0.05)[0]:
            assert_error(client.reply(), 408)
            waiting.remove(client)
        for client in waiting:
            client.send(b"x")
    served.until(lambda: served.server._admitted == 0, "the slow clients' slots to be released")
    assert Client(served).request("GET", "/health").status == 200


def test_the_body_deadline_does_not_cut_a_body_that_arrives_in_time(serve):
    served = serve(body_timeout=3 * DEADLINE, idle_timeout=3 * DEADLINE)
    client = Client(served)
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
    client.send(b"def")
    assert client.reply().body == b"abcdef"


@pytest.mark.parametrize("requests", [0, 1])
def test_idle_connections_are_closed(serve, requests):
    served = serve(idle_timeout=0.2, header_timeout=0.2)
    client = Client(served)
    for _ in range(requests):
        assert client.request("GET", "/health").status == 200
    client.expect_eof()
    served.until(lambda: not served.server._connections, "the connection to be forgotten")


def test_max_connections(serve):
    served = serve(max_connections=2)
    first, second = Client(served), Client(served)
    for client in (first, second):
        assert client.request("GET", "/health").status == 200
        client.send(b"GET /sync/1 HTTP/1.1\r\nHost: t\r\n")     # a head on its way: the slot is busy
    refused = Client(served)
    refused.send(request_bytes("GET", "/health"))
    assert_error(refused.reply(), 503, "unavailable")
    refused.expect_eof()
    first.send(b"\r\n")
    assert first.reply().json() == {"n": 1}     # the admitted ones go on
    first.close()
    served.until(lambda: served.server._admitted == 1, "the closed connection to be released")
    assert Client(served).request("GET", "/health").status == 200


def test_a_full_server_gives_an_idle_keep_alive_slot_to_a_new_connection(serve):
    served = serve(max_connections=2, idle_timeout=60)
    idle, busy = Client(served), Client(served)
    for client in (idle, busy):
        assert client.request("GET", "/health").status == 200
    busy.send(b"GET /sync/2 HTTP/1.1\r\nHost: t\r\n")
    newcomer = Client(served)
    assert newcomer.request("GET", "/sync/3").json() == {"n": 3}
    idle.expect_eof()                                   # closed as by its idle timeout
    busy.send(b"\r\n")
    assert busy.reply().json() == {"n": 2}
    assert served.inspect(lambda: served.server._admitted) == 2


def test_garbage_does_not_disturb_other_clients(served):
    good = Client(served)
    assert good.request("GET", "/sync/1").status == 200
    for garbage, status in ((b"\x00" * 100, 400), (b"\xff\xfe" * 5000, 400), (b"HELLO\r\n\r\n", 400),
                            (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"x" * 20000, 431)):
        bad = Client(served)
        bad.send(garbage)
        assert_error(bad.reply(), status)
        bad.ended()
        assert good.request("GET", "/sync/2").json() == {"n": 2}


def test_concurrent_clients(served):
    async def client(i):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            for j in range(5):
                path = "/async/%d?ms=1" % (i * 10 + j) if j % 2 else "/sync/%d" % (i * 10 + j)
                writer.write(request_bytes("GET", path))
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert json.loads(await reader.readexactly(length))["n"] == i * 10 + j
        finally:
            writer.close()
        return i

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(100))), 3 * DEADLINE)
    assert uvloop.run(main()) == list(range(100))


def test_a_client_that_never_reads_does_not_grow_buffers_or_block_others(served):
    size = 16 * 1024
    request = b"GET /sized/%d?seq=%%08d HTTP/1.1\r\nHost: t\r\nX-Pad: %s\r\n\r\n" % (size, b"p" * 2000)
    slow = Client(served)
    assert slow.request("GET", "/health").status == 200     # the server has the connection
    slow.sock.setblocking(False)
    sent, rest = 0, b""
    try:
        while sent < 200_000:     # ~400 MB of requests if the server read them all
            data = request % sent
            sent += 1
            rest = data[slow.sock.send(data):]
            if rest:
                break
    except BlockingIOError:
        pass
    assert sent < 200_000, "the server kept reading from a client that does not read"
    (connection,) = [c for c in served.connections() if c._peer == slow.sock.getsockname()]
    assert served.inspect(lambda: connection._reading_paused)
    assert served.inspect(lambda: len(connection._buf)) < 1024 * 1024
    assert served.inspect(lambda: connection._transport.get_write_buffer_size()) <= WRITE_HIGH + size + 512
    other = Client(served)
    for i in range(10):
        assert other.request("GET", "/sync/%d" % i).json() == {"n": i}
    # once the slow client reads, it gets every answer, in order
    slow.sock.setblocking(True)
    finish = threading.Thread(target=slow.send, args=(rest,))   # the request cut short
    finish.start()
    for i in range(sent):
        reply = slow.reply()
        assert reply.status == 200 and reply.body[:8] == b"%08d" % i, i
    finish.join(DEADLINE)


def test_a_client_that_never_reads_is_dropped_after_idle_timeout(serve):
    served = serve(idle_timeout=0.3, drain_timeout=60)   # dropped by the stall, not a linger
    slow = Client(served)
    assert slow.request("GET", "/health").status == 200
    slow.sock.setblocking(False)
    try:
        while True:
            slow.sock.send(request_bytes("GET", "/sized/65536"))
    except BlockingIOError:
        pass
    except ConnectionResetError:
        pass                 # on a slow machine the drop can come before our buffers are full
    served.until(lambda: not served.server._connections, "the stalled connection to be dropped")


# --------------------------------------------------------------------------------------------
# Server lifecycle and hooks


def test_close_finishes_in_flight_requests(served):
    busy, idle = Client(served), Client(served)
    assert idle.request("GET", "/health").status == 200
    busy.send(request_bytes("GET", "/gate"))
    assert served.app.entered.wait(DEADLINE)
    closing = served.submit(served.server.close(3 * DEADLINE))
    idle.expect_eof()                                  # idle connections go at once
    with pytest.raises(ConnectionRefusedError):        # no longer accepting
        Client(served)
    assert not closing.done()
    served.release_gate()
    reply = busy.reply()
    assert reply.status == 200 and reply.json() == {"gate": "passed"}
    assert reply.headers["connection"] == "close"
    busy.expect_eof()
    busy.close()
    closing.result(DEADLINE)


def test_close_gives_up_after_its_timeout(served):
    busy = Client(served)
    busy.send(request_bytes("GET", "/gate"))
    assert served.app.entered.wait(DEADLINE)
    served.call(served.server.close(0.2))              # the gate is never released
    assert busy.ended()
    assert served.inspect(lambda: not served.server._tasks and not served.server._connections)


def test_start_on_socket(serve):
    served = serve()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    served.call(served.server.start_on_socket(sock))
    assert sock.getsockname()[1] in [s.getsockname()[1] for s in served.server.sockets]
    client = socket.create_connection(sock.getsockname(), timeout=DEADLINE)
    client.sendall(request_bytes("GET", "/sync/4"))
    assert b'{"n":4}' in client.recv(65536)
    client.close()


def test_on_response_hook_and_access_log(serve, access_log):
    seen = []
    access, records = access_log
    served = serve(on_response=lambda request, status, seconds: seen.append(
        (request.path if request else None, status, seconds >= 0)), access_log=access)
    client = Client(served)
    assert client.request("GET", "/health").status == 200
    assert client.request("GET", "/async/1").status == 200
    assert client.request("GET", "/nope").status == 404
    client.send(b"\x01\x02 garbage\r\n\r\n")
    assert client.reply().status == 400
    served.until(lambda: len(seen) == 4, "four hook calls")
    assert seen == [("/health", 200, True), ("/async/1", 200, True), ("/nope", 404, True), (None, 400, True)]
    assert '"GET /health HTTP/1.1" 200' in records[0] and '"GET /nope HTTP/1.1" 404' in records[2]


@pytest.mark.parametrize("option", ["max_body", "header_timeout", "idle_timeout", "max_connections"])
def test_server_rejects_non_positive_limits(option):
    with pytest.raises(ValueError):
        HttpServer(Router(), **{option: 0})


# --------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    from tls import make_certificates

    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_served(serve, certificates):
    from kvcm.serve import tls_context
    from tls import client_context

    ca, cert, key = certificates
    served = serve(ssl=tls_context(str(cert), str(key)), header_timeout=0.5)
    served.client_tls = client_context(ca)
    return served


def test_tls_serves_keep_alive_pipelined_and_bodies(tls_served):
    client = Client(tls_served, tls=tls_served.client_tls)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert client.sock.selected_alpn_protocol() in (None, "http/1.1")
    for i in range(3):
        assert client.request("GET", "/sync/%d" % i).json() == {"n": i}
    client.send(b"".join(pipelined_request(i) for i in range(20)))
    for i in range(20):
        assert client.reply().json()["n"] == i
    assert client.request("POST", "/echo", b"x" * 60_000).body == b"x" * 60_000
    client.send(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert client.reply().status == 200
    assert client.ended()


def test_tls_port_refuses_plain_http_and_an_unknown_certificate_authority(tls_served):
    import ssl

    plain = Client(tls_served)
    plain.send(request_bytes("GET", "/health"))
    assert b"HTTP/1.1" not in plain.received()
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(tls_served, tls=ssl.create_default_context())
    assert Client(tls_served, tls=tls_served.client_tls).request("GET", "/health").status == 200


def test_tls_handshake_must_finish_within_the_header_timeout(tls_served):
    silent = Client(tls_served)          # TCP only: no ClientHello ever comes
    assert silent.ended()


# --------------------------------------------------------------------------------------------
# Property-based: whatever bytes a client sends, the answers are well-formed and never 500


_FUZZ_STATUSES = {200, 400, 404, 405, 411, 413, 414, 417, 418, 431, 501, 505}
_METHODS = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "PUT", "PATCH", "OPTIONS", "BREW"]),
                     st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=8))
_TARGETS = st.one_of(st.sampled_from(["/health", "/sync/1", "/echo", "/json", "/inspect", "/inspect/a/b", "/nope",
                                      "*", "http://x/sync/2", "https://x", "/sync/%31", "/v1/pods/a%2Fb", "/teapot"]),
                     st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=20))
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", "http/1.1", "HTTP/11", ""])
_NAMES = st.one_of(st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect",
                                    "Content-Type", "X-Any"]),
                   st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=10))
_VALUES = st.one_of(st.sampled_from(["t", "0", "5", "-1", "99999999999", "chunked", "gzip", "close", "keep-alive",
                                     "100-continue", "application/json", "a, b", ""]),
                    st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=16))


@st.composite
def _raw_requests(draw):
    head = "%s %s %s\r\n" % (draw(_METHODS), draw(_TARGETS), draw(_VERSIONS))
    head += "".join("%s: %s\r\n" % pair for pair in draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=6)))
    raw = head.encode("latin-1") + b"\r\n" + draw(st.binary(max_size=64))
    for _ in range(draw(st.integers(0, 3))):      # byte-level damage anywhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=3)) + raw[at + draw(st.integers(0, 3)):]
    return raw


def _answers(data, heads):
    """The statuses of the responses in data; fails on anything that is not a response.
    `heads`: whether a HEAD request was sent (its answer has no body)."""
    statuses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:200]
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", 0)) if int(status) >= 200 else 0
        if heads and (not rest or rest.startswith(b"HTTP/1.1 ")):
            length = 0
        assert len(rest) >= length, (lines, rest[:200])
        statuses.append(int(status))
        data = rest[length:]
    return statuses


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.lists(_raw_requests(), min_size=1, max_size=3).map(b"".join))
def test_fuzz_request_heads(served, raw):
    client = Client(served)
    client.send(raw)
    client.sock.shutdown(socket.SHUT_WR)
    data = client.received()
    client.close()
    statuses = _answers(data, b"HEAD" in raw)
    assert set(statuses) <= _FUZZ_STATUSES | {100}, (raw, statuses)
    assert Client(served).request("GET", "/health").status == 200     # and the server is unharmed
