"""kvcm.http.StreamingResponse (added for the simulator's SSE) over real TCP: chunked framing,
chunks sent as produced, pipelining order, HEAD, HTTP/1.0, client disconnects, iterator
errors, write backpressure and shutdown."""

import asyncio
import socket
import threading

import pytest
import uvloop

from kvcm.http import HttpServer, Router, StreamingResponse, json_response
from sim_harness import WAIT, until


class App:
    """/stream/{n}: n chunks "c0", "c1", …; /gated: a chunk per release(); /fail: raises
    after one chunk; /big/{n}: n chunks of 256 KiB; /sync/{n}: a plain response."""

    def __init__(self):
        self.loop = None
        self.gate = None
        self.closed = threading.Event()     # a stream's finally ran
        self.produced = 0
        r = self.router = Router()
        r.add("GET", "/stream/{n}", lambda req: StreamingResponse(200, self.chunks(int(req.params["n"])), "text/plain",
                                                                  headers=(("X-Kind", "stream"),)))
        r.add("GET", "/astream/{n}", self.async_stream)
        r.add("GET", "/gated", lambda req: StreamingResponse(200, self.gated(), "text/event-stream"))
        r.add("GET", "/fail", lambda req: StreamingResponse(200, self.failing()))
        r.add("GET", "/big/{n}", lambda req: StreamingResponse(200, self.big(int(req.params["n"]))))
        r.add("GET", "/sync/{n}", lambda req: json_response(200, {"n": int(req.params["n"])}))

    async def chunks(self, n):
        try:
            for i in range(n):
                yield "c%d" % i if i % 2 else b"c%d" % i
                yield b""                    # empty chunks are skipped, not a terminator
        finally:
            self.closed.set()

    async def async_stream(self, req):
        await asyncio.sleep(0)
        return StreamingResponse(201, self.chunks(int(req.params["n"])))

    async def gated(self):
        try:
            while True:
                item = await self.gate.get()
                if item is None:
                    return
                yield item
        finally:
            self.closed.set()

    async def failing(self):
        yield b"first"
        raise RuntimeError("generator broke")

    async def big(self, n):
        for i in range(n):
            self.produced = i + 1
            yield bytes([65 + i % 26]) * (1 << 18)

    def release(self, item):
        self.loop.call_soon_threadsafe(self.gate.put_nowait, item)


@pytest.fixture
def served():
    app = App()
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        app.loop = loop
        app.gate = asyncio.Queue()
        return await HttpServer(app.router, idle_timeout=30.0).start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT)
    yield app, server
    asyncio.run_coroutine_threadsafe(server.close(1.0), loop).result(WAIT)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def connect(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    return sock, Reader(sock)


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()

    def until(self, marker):
        while marker not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise AssertionError("EOF before %r; have %r" % (marker, self.buf[-100:]))
            self.buf += data
        end = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def head(self):
        lines = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}

    def exactly(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise AssertionError("EOF after %d of %d bytes" % (len(self.buf), n))
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def chunked_body(self):
        body = bytearray()
        while True:
            size = int(self.until(b"\r\n")[:-2], 16)
            data = self.exactly(size + 2)
            assert data.endswith(b"\r\n")
            if not size:
                return bytes(body)
            body += data[:-2]

    def eof(self):
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.buf += data


def test_chunked_framing_and_headers(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /stream/3 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers = r.head()
    assert status == 200 and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["content-type"] == "text/plain" and headers["x-kind"] == "stream"
    assert r.until(b"0\r\n\r\n") == b"2\r\nc0\r\n2\r\nc1\r\n2\r\nc2\r\n0\r\n\r\n"
    assert app.closed.is_set()
    sock.sendall(b"GET /sync/7 HTTP/1.1\r\nHost: x\r\n\r\n")     # the connection stays usable
    assert r.head()[0] == 200 and r.until(b"}") == b'{"n":7}'
    sock.close()


def test_chunks_leave_as_they_are_produced(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /gated HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.head()[0] == 200
    for word in (b"data: one\n\n", b"data: two\n\n"):
        app.release(word)
        assert r.until(word + b"\r\n") == b"%x\r\n%s\r\n" % (len(word), word)   # before the next is released
    app.release(None)
    assert r.until(b"0\r\n\r\n") == b"0\r\n\r\n"
    sock.close()


def test_pipelined_answers_keep_their_order_around_a_stream(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /sync/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /gated HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /sync/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /astream/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /sync/3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.head()[0] == 200 and r.until(b"}") == b'{"n":1}'
    assert r.head()[0] == 200
    app.release(b"x")
    assert r.until(b"x\r\n") == b"1\r\nx\r\n"
    assert b"HTTP/1.1" not in r.buf          # /sync/2 waits behind the open stream
    app.release(None)
    assert r.chunked_body() == b""
    assert r.head()[0] == 200 and r.until(b"}") == b'{"n":2}'
    status, headers = r.head()
    assert status == 201 and r.chunked_body() == b"c0"       # from an async handler
    assert r.head()[0] == 200 and r.until(b"}") == b'{"n":3}'
    sock.close()


def test_head_sends_the_head_only(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"HEAD /stream/3 HTTP/1.1\r\nHost: x\r\n\r\nGET /sync/4 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers = r.head()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert r.head()[0] == 200 and r.until(b"}") == b'{"n":4}'
    assert not app.closed.is_set()           # a generator that never started runs no code
    sock.close()


def test_http10_gets_an_unframed_body_and_a_close(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /stream/2 HTTP/1.0\r\n\r\n")
    status, headers = r.head()
    assert status == 200 and "transfer-encoding" not in headers and headers["connection"] == "close"
    assert r.eof() and r.buf == b"c0c1"
    sock.close()


@pytest.mark.parametrize("leave", ["close", "shutdown"])
def test_a_client_that_leaves_cancels_the_stream(served, leave):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /gated HTTP/1.1\r\nHost: x\r\n\r\n")
    r.head()
    app.release(b"one")
    r.until(b"one")
    if leave == "close":
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)        # stops sending; nothing more is written to it
    until(app.closed.is_set, "the stream's finally block")
    until(lambda: not server._tasks, "the stream task to end")
    if leave == "shutdown":
        assert r.eof() and b"0\r\n\r\n" not in r.buf
        sock.close()


def test_an_iterator_error_aborts_the_connection(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\nGET /sync/5 HTTP/1.1\r\nHost: x\r\n\r\n")
    r.head()
    assert r.eof()
    assert b"first" in r.buf and b"0\r\n\r\n" not in r.buf and b'{"n":5}' not in r.buf
    sock.close()
    other, r2 = connect(server)              # the server itself is fine
    other.sendall(b"GET /sync/6 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r2.head()[0] == 200
    other.close()


def test_a_slow_reader_pauses_the_iterator(served):
    app, server = served
    sock, r = connect(server)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.sendall(b"GET /big/64 HTTP/1.1\r\nHost: x\r\n\r\n")     # 16 MiB, more than the socket buffers

    def waiting_for_the_client():
        connections = list(server._connections)
        return any(c._stream is not None and c._stream._writable is not None and not c._stream._writable.done()
                   for c in connections)
    until(waiting_for_the_client, "the stream to wait for the client")
    assert app.produced < 64                 # it stopped pulling chunks
    assert r.head()[0] == 200
    body = r.chunked_body()
    assert len(body) == 64 << 18 and app.produced == 64
    assert body[:1] == b"A" and body[-1:] == bytes([65 + 63 % 26])
    sock.close()


def test_shutdown_cancels_streams_after_the_grace(served):
    app, server = served
    sock, r = connect(server)
    sock.sendall(b"GET /gated HTTP/1.1\r\nHost: x\r\n\r\n")
    r.head()
    asyncio.run_coroutine_threadsafe(server.close(0.05), app.loop).result(WAIT)
    until(app.closed.is_set, "the stream to be cancelled")
    assert r.eof()
    sock.close()
