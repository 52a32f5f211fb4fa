"""Raw HTTP/1.1 server on asyncio (DESIGN.md §5): parsing, limits, keep-alive, pipelining.

A scheduler calls kvcm on every request it routes, so the budget for `/v1/score` is tens of
microseconds above a bare round trip. That is why this is an `asyncio.Protocol` and not a
framework: input is parsed straight off the receive buffer with `find`/`split`, routing is
a dict lookup for static paths, and a handler that answers synchronously is written back in
the same `data_received` call, without a Task.

Rules the code below keeps:

- Order. Responses leave in request order. While an async handler's response is pending,
  later responses (even synchronous ones) wait in the connection's queue as finished bytes.
- Bounds. Headers ≤ `max_header` bytes, bodies ≤ `max_body` (refused from `Content-Length`
  before any of the body is read), at most `MAX_PIPELINE` unanswered requests per connection,
  and the transport's write-buffer limits: when a client stops reading, we stop reading from
  it, so its requests stay in the kernel instead of our memory.
- Time. A new connection's first request head must arrive within `header_timeout` of the
  connection (one that never sends a byte is closed then), a later head within
  `header_timeout` of its first byte (a slow drip does not extend it: slowloris); a body
  must arrive within `body_timeout` of the end of its head (and may pause at most
  `idle_timeout`); an idle keep-alive connection lives `idle_timeout`, less when the server
  is full: a new connection then takes the slot of an idle one; a client that stops reading
  our responses is dropped after `idle_timeout`. So a slot held by a slow client is free
  again within `header_timeout` or `body_timeout`.
- Host. An HTTP/1.1 request without a Host header, or any request with two, is answered 400
  (RFC 9112 §3.2).
- TLS. With an `ssl.SSLContext` the server speaks HTTPS; the handshake must finish within
  `header_timeout`.
- Closing. Closing a socket that still has unread input makes the kernel send a reset, and
  a reset can destroy a response the client has not read yet. So every close we initiate is
  a "lingering close": send the response, shut down our write side, discard whatever the
  client still sends (up to `drain_bytes` / `drain_timeout`), close on its EOF.
- Isolation. Every failure (bad bytes, handler exceptions, timeouts) is answered or closed
  on its own connection; nothing propagates to other clients or the loop.
"""

import asyncio
import collections
import email.utils
import functools
import http
import inspect
import logging
import time
from urllib.parse import unquote

import orjson

from kvcm._core import busy_poll
from kvcm.ratelog import RateLimitedLog

__all__ = [
    "BadRequest",
    "HttpError",
    "HttpServer",
    "Request",
    "Response",
    "Router",
    "StreamingResponse",
    "error_response",
    "json_response",
]

log = logging.getLogger("kvcm.http")
# Every line below can be caused by a client (or by a bug a client triggers): one per reason
# per interval.
rate_log = RateLimitedLog(log)

MAX_HEADER = 16 * 1024            # request line + headers
MAX_BODY = 8 * 1024 * 1024
MAX_PIPELINE = 64                 # unanswered requests per connection before we stop reading
MAX_BUSY_POLL = 0.01              # seconds a loop may spin after an answer
MAX_SPIN_READS = 8                # requests one callback may read from its spins before the
                                  # loop's other connections and timers get their turn
MAX_CHUNK_LINE = 1024             # chunk-size line with its extensions
WRITE_HIGH, WRITE_LOW = 64 * 1024, 16 * 1024

# bytes.translate(None, delete) removes every allowed byte; anything left is invalid. One C
# pass per check, no regex.
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEX = b"0123456789abcdefABCDEF"
_HEAD_OK = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)) + b"\t\r\n"

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Chunked-body reader states (values of _Connection._chunk_left when not inside chunk data).
_SIZE_LINE, _DATA_CRLF, _TRAILERS = -1, -2, -3

# Connection states.
_HEAD, _BODY, _CHUNKED, _DISCARD = "head", "body", "chunked", "discard"


# --------------------------------------------------------------------------------------------
# Requests, responses, errors


class HttpError(Exception):
    """Raise from a handler (or the router does) to answer with a JSON error."""

    def __init__(self, status, message, type=None, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.headers = headers

    def response(self):
        return error_response(self.status, self.message, self.type, self.headers)


class BadRequest(HttpError):
    """400: the request is well-formed HTTP but its content is not acceptable."""

    def __init__(self, message, type=None):
        super().__init__(400, message, type)


class Request:
    """One parsed request. `path` is percent-decoded, `query` is the raw text after `?`,
    header names are lower-case and repeated headers are joined with ", "."""

    __slots__ = ("method", "path", "query", "headers", "body", "http_version", "peer",
                 "params", "trailers")

    def __init__(self, method, path, query="", headers=None, body=b"", http_version="1.1",
                 peer=None, params=None, trailers=None):
        self.method = method
        self.path = path
        self.query = query
        self.headers = {} if headers is None else headers
        self.body = body
        self.http_version = http_version
        self.peer = peer
        self.params = {} if params is None else params
        self.trailers = {} if trailers is None else trailers

    def json_type_ok(self):
        """True when the Content-Type (if any) is one a JSON body may come as."""
        content_type = self.headers.get("content-type")
        return content_type is None or _may_be_json(content_type)

    def json(self):
        """The body as JSON; 415 for a Content-Type a JSON body does not come as, 400 for
        invalid JSON."""
        if not self.json_type_ok():
            raise HttpError(415, "Content-Type must be application/json, got %r" % self.headers["content-type"])
        if not self.body:
            raise BadRequest("request body is empty; expected a JSON document")
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as e:
            raise BadRequest("request body is not valid JSON: %s" % e) from None

    def __repr__(self):
        return "<Request %s %s HTTP/%s>" % (self.method, self.path, self.http_version)


# What clients label a JSON body with: its own type, what `curl -d` sends, and plain text
# (llm-d's handlers read these as JSON too). The body must still parse as JSON.
_JSON_BODY_TYPES = frozenset(("application/json", "application/x-www-form-urlencoded", "text/plain"))


def _may_be_json(value):
    media, _, params = value.partition(";")
    if media.strip().lower() not in _JSON_BODY_TYPES:
        return False
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class Response:
    """status, body bytes (a str is UTF-8 encoded), content type, extra (name, value) headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status, body=b"", content_type="application/json", headers=()):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers

    def __repr__(self):
        return "<Response %d, %d bytes>" % (self.status, len(self.body))


class StreamingResponse:
    """A response whose body is produced while it is sent: `chunks` is an async iterable of
    bytes (a str is UTF-8 encoded), each written as soon as it arrives, with chunked transfer
    coding (to an HTTP/1.0 client unframed, and the connection closes after it). Order holds
    as for any response: the head leaves once every earlier answer on the connection has.

    When the client goes away (closes, or just shuts down its sending side) or the server's
    shutdown grace ends, the iteration is cancelled and the iterator closed, so its `finally`
    blocks run; an iterator that never started runs no code at all. An exception from the
    iterator aborts the connection: the status line is already sent, so an incomplete body is
    the only signal left.
    """

    __slots__ = ("status", "chunks", "content_type", "headers")

    def __init__(self, status, chunks, content_type="application/octet-stream", headers=()):
        self.status = status
        self.chunks = chunks
        self.content_type = content_type
        self.headers = headers

    def __repr__(self):
        return "<StreamingResponse %d>" % self.status


def _close_chunks(response):
    """Closes the iterator of a StreamingResponse that will never be sent."""
    aclose = getattr(response.chunks, "aclose", None)
    if aclose is not None:
        asyncio.ensure_future(aclose())


def json_response(status, obj):
    return Response(status, orjson.dumps(obj))


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "payload_too_large",
    429: "rate_limit_error",
    503: "unavailable",
}


def error_response(status, message, type=None, headers=()):
    """`{"error": {"message", "type", "code"}}`; `type` defaults from the status."""
    if type is None:
        type = _ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    body = orjson.dumps({"error": {"message": message, "type": type, "code": status}})
    return Response(status, body, headers=headers)


_INTERNAL_ERROR = error_response(500, "internal server error")


class _ProtocolError(Exception):
    """A request we answer with an error and then close the connection after."""

    def __init__(self, status, message, request=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.request = request


# --------------------------------------------------------------------------------------------
# Routing


class _Route:
    __slots__ = ("pattern", "parts", "handlers", "allow")

    def __init__(self, pattern):
        self.pattern = pattern
        # (literal, None) or (None, capture name), one per "/"-separated segment
        self.parts = []
        for segment in pattern.split("/"):
            if segment.startswith("{") and segment.endswith("}"):
                name = segment[1:-1]
                if not name.isidentifier():
                    raise ValueError("route %r: capture {%s} is not an identifier" % (pattern, name))
                self.parts.append((None, name))
            elif "{" in segment or "}" in segment:
                raise ValueError("route %r: a capture must be a whole segment" % pattern)
            else:
                self.parts.append((segment, None))
        self.handlers = {}
        self.allow = ""

    def bind(self, segments):
        """The captures if the decoded path segments match, else None."""
        if len(segments) != len(self.parts):
            return None
        params = {}
        for (literal, name), segment in zip(self.parts, segments):
            if name is None:
                if segment != literal:
                    return None
            elif not segment:
                return None
            else:
                params[name] = segment
        return params

    def handler_for(self, method):
        handler = self.handlers.get(method)
        if handler is None and method == "HEAD":
            handler = self.handlers.get("GET")
        return handler


class Router:
    """Method + path → handler. Patterns are literal segments and whole-segment captures,
    e.g. "/v1/pods/{pod}"; captures are percent-decoded into request.params."""

    def __init__(self):
        self._routes = []      # every route, in registration order
        self._static = {}      # pattern → route, for patterns without captures
        self._by_pattern = {}

    def add(self, method, pattern, handler):
        method = method.upper()
        if not method or method.encode("ascii", "replace").translate(None, _TOKEN):
            raise ValueError("invalid method %r" % method)
        if not pattern.startswith("/"):
            raise ValueError("route %r must start with /" % pattern)
        route = self._by_pattern.get(pattern)
        if route is None:
            route = self._by_pattern[pattern] = _Route(pattern)
            self._routes.append(route)
            if all(name is None for _, name in route.parts):
                self._static[pattern] = route
        if method in route.handlers:
            raise ValueError("route %s %s is already registered" % (method, pattern))
        route.handlers[method] = handler
        methods = set(route.handlers)
        if "GET" in methods:
            methods.add("HEAD")
        route.allow = ", ".join(sorted(methods))

    def match(self, method, raw_path):
        """(handler, params) for a method and a not yet percent-decoded path; raises
        HttpError 404 (no such path) or 405 (path exists, method does not; with Allow)."""
        if "%" not in raw_path:
            route = self._static.get(raw_path)
            if route is not None:
                handler = route.handler_for(method)
                if handler is not None:
                    return handler, {}
            segments = raw_path.split("/")
        else:
            # Split before decoding so an encoded "/" stays inside its segment.
            segments = [unquote(s) for s in raw_path.split("/")]
        allowed = set()
        for route in self._routes:
            params = route.bind(segments)
            if params is None:
                continue
            handler = route.handler_for(method)
            if handler is not None:
                return handler, params
            allowed.update(route.allow.split(", "))
        path = "/".join(segments)
        if allowed:
            allow = ", ".join(sorted(allowed))
            raise HttpError(405, "method %s is not allowed on %s (allowed: %s)" % (method, path, allow),
                            headers=(("Allow", allow),))
        raise HttpError(404, "no route for %s" % path)


# --------------------------------------------------------------------------------------------
# Response serialization


def _status_line(status):
    if not (type(status) is int and 100 <= status <= 599):
        raise ValueError("invalid HTTP status %r" % (status,))
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode())
    return line


_STATUS_LINES = {}
for _status in (200, 201, 204, 400, 404, 405, 408, 411, 413, 414, 415, 431, 500, 503, 505):
    _status_line(_status)


def _content_type_line(content_type):
    if not content_type:
        return b""
    line = _CONTENT_TYPE_LINES.get(content_type)
    if line is None:
        line = b"Content-Type: %s\r\n" % _header_value(content_type)
        if len(_CONTENT_TYPE_LINES) < 64:
            _CONTENT_TYPE_LINES[content_type] = line
    return line


_CONTENT_TYPE_LINES = {}


def _header_value(value):
    value = str(value)
    if "\r" in value or "\n" in value:
        raise ValueError("response header value %r contains CR or LF" % value)
    return value.encode("latin-1")


def _extra_header_lines(headers):
    lines = []
    for name, value in headers:
        if not name or name.encode("ascii", "replace").translate(None, _TOKEN):
            raise ValueError("invalid response header name %r" % name)
        lines.append(b"%s: %s\r\n" % (name.encode("ascii"), _header_value(value)))
    return b"".join(lines)


# "Date: …\r\nServer: kvcm\r\n", rebuilt when the second changes.
_date_second = -1
_date_lines = b""


def _common_lines():
    global _date_second, _date_lines
    now = int(time.time())
    if now != _date_second:
        _date_lines = b"Date: %s\r\nServer: kvcm\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        _date_second = now
    return _date_lines


_CONNECTION_CLOSE = b"Connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"


def _serialize(response, head_only, close, http10):
    """The response as bytes. HEAD keeps the headers (Content-Length included) but no body."""
    status = response.status
    status_line = _STATUS_LINES.get(status) or _status_line(status)
    body = response.body
    if close:
        connection = _CONNECTION_CLOSE
    elif http10:
        connection = _CONNECTION_KEEP_ALIVE
    else:
        connection = b""
    if status == 204:
        length, body = b"", b""
    else:
        length = b"Content-Length: %d\r\n" % len(body)
    extra = _extra_header_lines(response.headers) if response.headers else b""
    return b"".join((status_line, _common_lines(), _content_type_line(response.content_type), length,
                     connection, extra, b"\r\n", b"" if head_only else body))


_CHUNKED = b"Transfer-Encoding: chunked\r\n"


def _serialize_stream_head(response, close, chunked):
    """The head of a StreamingResponse: no Content-Length; chunked unless HTTP/1.0."""
    status = response.status
    status_line = _STATUS_LINES.get(status) or _status_line(status)
    extra = _extra_header_lines(response.headers) if response.headers else b""
    return b"".join((status_line, _common_lines(), _content_type_line(response.content_type),
                     _CHUNKED if chunked else b"", _CONNECTION_CLOSE if close else b"", extra, b"\r\n"))


class _Stream:
    """Sends one StreamingResponse when its slot reaches the head of its connection's queue;
    when it ends, pops that slot and lets the answers queued behind it go."""

    __slots__ = ("conn", "request", "response", "close", "start", "task", "_writable")

    def __init__(self, conn, request, response, close, start):
        self.conn = conn
        self.request = request
        self.response = response
        self.close = close or request.http_version == "1.0"   # unframed: the close ends it
        self.start = start
        self.task = None
        self._writable = None

    def begin(self):
        if self.task is None:
            self.conn._stream = self
            self.task = asyncio.ensure_future(self._run())
            self.conn._server._tasks.add(self.task)
            self.task.add_done_callback(self._done)

    def writable(self):
        """The client reads again (resume_writing)."""
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def _run(self):
        conn, response = self.conn, self.response
        chunked = self.request.http_version != "1.0"
        write = conn._transport.write
        chunks = response.chunks
        try:
            write(_serialize_stream_head(response, self.close, chunked))
            if self.request.method != "HEAD":
                async for chunk in chunks:
                    if isinstance(chunk, str):
                        chunk = chunk.encode()
                    if not chunk:
                        continue      # an empty chunk would end the body
                    write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                    while conn._write_paused:
                        self._writable = conn._loop.create_future()
                        await self._writable
                if chunked:
                    write(b"0\r\n\r\n")
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _done(self, task):
        conn = self.conn
        conn._server._tasks.discard(task)
        conn._stream = None
        failed = task.cancelled() or task.exception() is not None
        if not task.cancelled() and task.exception() is not None:
            rate_log.error("stream-failed", "streaming the response to %s %s failed", self.request.method,
                           self.request.path, exc_info=task.exception())
        if self.start:
            conn._server._report(self.request, self.response.status, self.start)
        if conn._closed or conn._lingering:
            return
        if failed:
            conn._abort()
            return
        conn._queue.popleft()         # this stream's slot, at the head since begin()
        if self.close:
            conn._queue.clear()
            conn._close_gracefully()
            return
        conn._flush()


# --------------------------------------------------------------------------------------------
# The connection


class _Connection(asyncio.Protocol):
    """One TCP connection: parser, dispatch, ordered responses, timers, closing."""

    __slots__ = ("_server", "_loop", "_match", "_transport", "_peer", "_admitted", "_buf",
                 "_state", "_queue", "_request", "_raw_path", "_keep_alive", "_need", "_body",
                 "_chunk_left", "_head_started", "_fresh", "_body_deadline", "_write_paused",
                 "_reading_paused", "_peer_eof", "_lingering", "_closed", "_discarded", "_deadline",
                 "_timer", "_timer_at", "_stream", "_lane", "_spin_fd")

    def __init__(self, server):
        self._server = server
        self._loop = server._loop
        self._match = server.router.match
        self._lane = server.lane
        self._transport = None
        self._peer = None
        self._admitted = False
        self._buf = bytearray()           # unconsumed input
        self._state = _HEAD
        # Responses not yet written, oldest first: [bytes, or None while its handler runs, or
        # a _Stream, close]
        self._queue = collections.deque()
        self._stream = None               # the _Stream being sent
        self._request = None              # the request whose body is being read
        self._raw_path = ""
        self._keep_alive = True
        self._need = 0                    # Content-Length of the body being read
        self._body = None                 # chunked body so far
        self._chunk_left = _SIZE_LINE
        self._head_started = False        # a head is on its way; its deadline is set
        self._fresh = True                # no request has arrived yet
        self._body_deadline = 0.0         # when the body being read must be complete
        self._write_paused = False
        self._reading_paused = False
        self._peer_eof = False
        self._lingering = False           # we are closing; input is discarded
        self._closed = False
        self._discarded = 0
        # One timer per connection, re-armed lazily: moving the deadline later costs a float
        # store; the timer, when it fires early, re-arms itself at the current deadline.
        self._deadline = 0.0
        self._timer = None
        self._timer_at = 0.0
        self._spin_fd = -1                # the socket a busy poll may read from itself

    # ---- asyncio callbacks

    def connection_made(self, transport):
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = tuple(peer[:2]) if isinstance(peer, tuple) else None
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        server = self._server
        if server._poll_fd is not None and server.ssl is None:
            sock = transport.get_extra_info("socket")     # TLS bytes are the transport's to read
            self._spin_fd = sock.fileno() if sock is not None else -1
        self._admitted = server._admit(self)
        # the first head is due header_timeout after the connection, even if no byte comes
        self._head_started = True
        self._set_deadline(self._loop.time() + server.header_timeout)
        if not self._admitted:
            message = "server is shutting down" if server.closing else "too many connections"
            self._reject(_ProtocolError(503, message))

    def data_received(self, data):
        if self._state is _DISCARD:
            self._discarded += len(data)
            if self._discarded > self._server.drain_bytes:
                self._abort()
            return
        try:
            reads = MAX_SPIN_READS
            while data is not None:
                buf = self._buf
                if buf:
                    buf += data
                    self._process(buf)
                elif not (self._lane is not None and self._take_lane(data)):
                    self._process(data)
                data, reads = self._await_next(reads - 1)
        except Exception:
            rate_log.error("connection-failed", "HTTP connection from %s failed; dropping it", self._peer,
                           exc_info=True)
            self._abort()

    def eof_received(self):
        self._peer_eof = True
        if self._stream is not None:
            self._stream.task.cancel()   # a client that stops sending mid-stream has left
        if not self._lingering and (self._queue or self._write_paused):
            return True     # answers still to send; _settle closes afterwards
        self._close_now()
        return False        # closing already; True would make a TLS transport warn on every close

    def pause_writing(self):
        self._write_paused = True
        self._update_reading()
        self._set_deadline(self._loop.time() + self._server.idle_timeout)

    def resume_writing(self):
        self._write_paused = False
        if self._stream is not None:
            self._stream.writable()
        self._continue()

    def connection_lost(self, exc):
        self._closed = True
        if self._stream is not None:
            self._stream.task.cancel()
        for data, _ in self._queue:
            if type(data) is _Stream and data.task is None:
                _close_chunks(data.response)
        self._queue.clear()
        self._buf = bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._forget(self)

    def _await_next(self, reads):
        """With busy polling on, spins until the loop has its next event (or the budget is
        spent) when this connection has answered everything it received and no handler is
        running anywhere: the next request then finds the loop's thread awake. An event
        from any source ends the spin, so it only delays timers, by at most the budget (and
        the MAX_SPIN_READS requests a callback may serve from its spins).

        The spin may read this connection's next bytes itself (up to `reads` times, from a
        plain socket whose answers are all written): the scoring lane answers those it
        takes there and then, and the first it leaves is returned. Returns (those bytes or
        None, the reads left)."""
        server = self._server
        if (server._poll_fd is None or self._queue or self._buf or self._state is not _HEAD
                or server._tasks or server.closing or self._closed):
            return None, reads
        conn_fd = self._spin_fd
        if reads <= 0 or self._reading_paused or self._peer_eof or self._transport.get_write_buffer_size():
            conn_fd = -1
        lane = self._lane
        if conn_fd >= 0 and lane is not None:
            # the Date line as of the spin's start: at most its answers' budgets old
            outcome = lane.spin(server._poll_fd, server.busy_poll, conn_fd, self._transport, _common_lines(), reads)
            answered = lane.answered()
            if answered:
                reads -= len(answered)
                server.busy_polls[2] += len(answered)
                for route, seconds in answered:
                    self._lane_answered(route, seconds)
        else:
            outcome = busy_poll(server._poll_fd, server.busy_poll, conn_fd)
        if outcome is True:
            server.busy_polls[0] += 1
        elif outcome is False:
            server.busy_polls[1] += 1
        else:
            server.busy_polls[2] += 1
            return outcome, reads
        return None, reads

    # ---- input

    def _process(self, buf):
        """Parses and dispatches every complete request in buf (self._buf or fresh bytes)."""
        pos = 0
        size = len(buf)
        queue = self._queue
        try:
            while not self._write_paused and len(queue) < MAX_PIPELINE:
                state = self._state
                if state is _HEAD:
                    # Empty lines between requests are allowed (RFC 9112 §2.2).
                    while buf.startswith(b"\r\n", pos):
                        pos += 2
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        self._check_partial_head(buf, pos)
                        break
                    if end - pos > self._server.max_header:
                        raise self._head_too_large(buf, pos)
                    request, length, expect_continue = self._parse_head(bytes(buf[pos:end]))
                    pos = end + 4
                    self._head_started = self._fresh = False
                    if length == 0:
                        self._dispatch(request)
                    elif length > 0 and size - pos >= length:
                        request.body = bytes(memoryview(buf)[pos:pos + length])
                        pos += length
                        self._dispatch(request)
                    else:
                        self._request = request
                        self._body_deadline = self._loop.time() + self._server.body_timeout
                        if length > 0:
                            self._state = _BODY
                            self._need = length
                        else:
                            self._state = _CHUNKED
                            self._body = bytearray()
                            self._chunk_left = _SIZE_LINE
                        # 100 only when the body is still to come (RFC 9110 §10.1.1).
                        if expect_continue and pos == size:
                            self._write(_CONTINUE, False)
                elif state is _BODY:
                    need = self._need
                    if size - pos < need:
                        break
                    request = self._request
                    request.body = bytes(memoryview(buf)[pos:pos + need])
                    pos += need
                    self._request = None
                    self._state = _HEAD
                    self._dispatch(request)
                elif state is _CHUNKED:
                    pos, done = self._read_chunks(buf, pos, size)
                    if not done:
                        break
                    request = self._request
                    request.body = bytes(self._body)
                    self._request = self._body = None
                    self._state = _HEAD
                    self._dispatch(request)
                else:
                    break
        except _ProtocolError as e:
            self._reject(e)
        if self._state is _DISCARD:
            self._buf.clear()
        elif buf is self._buf:
            if pos:
                del buf[:pos]
        elif pos < size:
            self._buf += memoryview(buf)[pos:]
        self._settle()

    def _take_lane(self, data):
        """True when the scoring lane answered data, one whole request (HttpServer.lane)."""
        server = self._server
        if self._state is not _HEAD or self._queue or self._write_paused or server.closing:
            return False
        route = self._lane.serve(data, self._transport, _common_lines())
        if not route:
            return False
        self._lane_answered(route, self._lane.seconds)
        return True

    def _lane_answered(self, route, seconds):
        """What follows an answer of the lane to a whole request read on this connection."""
        server = self._server
        self._fresh = self._head_started = False
        self._keep_alive = True        # the lane takes only keep-alive HTTP/1.1 requests
        self._set_deadline(self._loop.time() + server.idle_timeout)
        if server._timed:
            server._report_lane(route, seconds, self._peer)

    def _lane_body(self, request):
        """True when the scoring lane answered a request the parser above read (one that came
        in several reads, or behind another in one): a plain keep-alive HTTP/1.1 POST to a
        lane path whose body the general handler would read."""
        server = self._server
        route = server._lane_routes.get(self._raw_path)
        if (route is None or request.query or request.http_version != "1.1" or not self._keep_alive
                or server.closing or self._peer_eof or not request.json_type_ok()):
            return False
        out = self._lane.serve_body(route, request.body, _common_lines())
        if out is None:
            return False
        self._write(out, False)
        if server._timed:
            server._report_lane(route, self._lane.seconds, self._peer)
        return True

    def _check_partial_head(self, buf, pos):
        """Fails early on a head that can never become valid, instead of waiting for it."""
        size = len(buf) - pos
        if size > self._server.max_header:
            raise self._head_too_large(buf, pos)
        if not size or (size == 1 and buf[pos] == 0x0D):
            return
        # The method is the first thing to arrive: non-token bytes there mean this is not
        # HTTP (TLS handshakes, binary garbage).
        space = buf.find(b" ", pos, pos + 33)
        method = buf[pos:space if space >= 0 else pos + 33]
        if method.translate(None, _TOKEN) or (space < 0 and size > 32) or space == pos:
            raise _ProtocolError(400, "malformed request line")
        if buf.find(b"\n\n", pos) >= 0 or buf.find(b"\n\r\n", pos) >= 0:
            raise _ProtocolError(400, "request head lines must end with CRLF")

    def _head_too_large(self, buf, pos):
        limit = self._server.max_header
        if buf.find(b"\r\n", pos, pos + limit) < 0:
            return _ProtocolError(414, "request line is longer than %d bytes" % limit)
        return _ProtocolError(431, "request headers are larger than %d bytes" % limit)

    def _parse_head(self, head):
        """(Request, body length (-1 = chunked), whether to send 100 Continue) for one head;
        raises _ProtocolError. Also sets self._raw_path and self._keep_alive."""
        if head.translate(None, _HEAD_OK):
            raise _ProtocolError(400, "control character in request head")
        # latin-1 maps bytes 1:1, so from here on everything is str
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
            raise _ProtocolError(400, "request head lines must end with CRLF")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _ProtocolError(400, "malformed request line")
        method, target, version = parts
        if version == "HTTP/1.1":
            http_version = "1.1"
        elif version == "HTTP/1.0":
            http_version = "1.0"
        elif (len(version) == 8 and version.startswith("HTTP/") and version[5].isdigit()
              and version[6] == "." and version[7].isdigit() and version.isascii()):
            raise _ProtocolError(505, "HTTP version %s is not supported" % version)
        else:
            raise _ProtocolError(400, "malformed HTTP version")
        if method not in _KNOWN_METHODS and (not method or method.encode("latin-1").translate(None, _TOKEN)):
            raise _ProtocolError(400, "malformed method")
        # printable ASCII; the split already excluded spaces
        if not (target and target.isascii() and target.isprintable()):
            raise _ProtocolError(400, "malformed request target")
        if target[0] != "/":
            if target.startswith(("http://", "https://")):
                # absolute-form (RFC 9112 §3.2.2): route on its path
                slash = target.find("/", target.index("//") + 2)
                target = target[slash:] if slash >= 0 else "/"
            elif target != "*":
                raise _ProtocolError(400, "malformed request target")
        raw_path, _, query = target.partition("?")
        path = unquote(raw_path) if "%" in raw_path else raw_path
        headers = _parse_fields(lines, 1)
        request = Request(method, path, query, headers, b"", http_version, self._peer)
        self._raw_path = raw_path
        host = headers.get("host")
        if host is None:
            if http_version == "1.1":
                raise _ProtocolError(400, "HTTP/1.1 request without a Host header", request)
        elif "," in host:               # repeated Host headers arrive joined
            raise _ProtocolError(400, "more than one Host header", request)

        connection = headers.get("connection")
        if connection is None:
            keep_alive = http_version == "1.1"
        else:
            options = {option.strip() for option in connection.lower().split(",")}
            keep_alive = "close" not in options and (http_version == "1.1" or "keep-alive" in options)
        self._keep_alive = keep_alive

        expect_continue = False
        expect = headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise _ProtocolError(417, "unsupported expectation %r" % expect, request)
            expect_continue = http_version == "1.1"

        transfer_encoding = headers.get("transfer-encoding")
        content_length = headers.get("content-length")
        if transfer_encoding is not None:
            if content_length is not None:
                raise _ProtocolError(400, "both Content-Length and Transfer-Encoding", request)
            if transfer_encoding.lower() != "chunked":
                raise _ProtocolError(501, "transfer coding %r is not supported (only chunked)"
                                     % transfer_encoding, request)
            return request, -1, expect_continue
        if content_length is not None:
            if not (content_length.isdigit() and content_length.isascii()):
                # the same header repeated arrives joined: "5, 5" is fine, "5, 6" is not
                values = {value.strip() for value in content_length.split(",")}
                content_length = values.pop() if len(values) == 1 else ""
                if not (content_length.isdigit() and content_length.isascii()):
                    raise _ProtocolError(400, "invalid Content-Length", request)
            length = int(content_length)
            if length > self._server.max_body:
                raise _ProtocolError(413, "request body of %d bytes is larger than the limit of %d"
                                     % (length, self._server.max_body), request)
            return request, length, expect_continue and length > 0
        # Without Content-Length or Transfer-Encoding a request has no body (RFC 9112 §6.3):
        # a POST that needs none (an admin action) is fine; handlers that read one say 400.
        return request, 0, False

    def _read_chunks(self, buf, pos, size):
        """Consumes chunked-body input from buf[pos:size]; returns (pos, whether complete)."""
        body = self._body
        while True:
            left = self._chunk_left
            if left > 0:
                take = min(left, size - pos)
                if take <= 0:
                    return pos, False
                body += memoryview(buf)[pos:pos + take]
                pos += take
                self._chunk_left = left = left - take
                if left:
                    return pos, False
                self._chunk_left = _DATA_CRLF
            elif left == _DATA_CRLF:
                if size - pos < 2:
                    return pos, False
                if buf[pos:pos + 2] != b"\r\n":
                    raise _ProtocolError(400, "chunk data is longer than its size", self._request)
                pos += 2
                self._chunk_left = _SIZE_LINE
            elif left == _SIZE_LINE:
                eol = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if eol < 0:
                    if size - pos >= MAX_CHUNK_LINE:
                        raise _ProtocolError(400, "chunk size line is too long", self._request)
                    return pos, False
                # chunk-size [ BWS ; extensions ]; extensions are ignored
                digits = bytes(buf[pos:eol]).split(b";", 1)[0].rstrip(b" \t")
                pos = eol + 2
                if not digits or len(digits) > 16 or digits.translate(None, _HEX):
                    raise _ProtocolError(400, "invalid chunk size %r" % digits.decode("latin-1"),
                                         self._request)
                chunk = int(digits, 16)
                if chunk == 0:
                    self._chunk_left = _TRAILERS
                elif len(body) + chunk > self._server.max_body:
                    raise _ProtocolError(413, "chunked request body is larger than the limit of %d"
                                         % self._server.max_body, self._request)
                else:
                    self._chunk_left = chunk
            else:
                if buf.startswith(b"\r\n", pos):
                    return pos + 2, True
                limit = self._server.max_header
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0 and size - pos <= limit:
                    return pos, False
                if end < 0 or end - pos > limit:
                    raise _ProtocolError(431, "request trailers are larger than %d bytes" % limit,
                                         self._request)
                trailer = bytes(buf[pos:end])
                if trailer.translate(None, _HEAD_OK) or trailer.count(b"\n") != trailer.count(b"\r\n"):
                    raise _ProtocolError(400, "malformed trailer", self._request)
                self._request.trailers = _parse_fields(trailer.decode("latin-1").split("\r\n"), 0)
                return end + 4, True

    # ---- dispatch and output

    def _dispatch(self, request):
        if self._lane is not None and request.method == "POST" and self._lane_body(request):
            return
        server = self._server
        keep_alive = self._keep_alive and not server.closing and not self._peer_eof
        if not keep_alive:
            self._state = _DISCARD    # nothing after this request is read
        start = time.perf_counter() if server._timed else 0.0
        try:
            handler, request.params = self._match(request.method, self._raw_path)
            result = handler(request)
        except HttpError as e:
            result = e.response()
        except Exception:
            rate_log.error("handler-failed", "handler for %s %s failed", request.method, request.path,
                           exc_info=True)
            result = _INTERNAL_ERROR
        if type(result) is not Response and not isinstance(result, Response):
            if isinstance(result, StreamingResponse):
                stream = _Stream(self, request, result, not keep_alive, start)
                self._queue.append([stream, stream.close])
                if self._queue[0][0] is stream:
                    stream.begin()
                return
            if inspect.isawaitable(result):
                self._defer(request, result, keep_alive, start)
                return
            rate_log.error("not-a-response", "handler for %s %s returned %r, not a Response", request.method,
                           request.path, result)
            result = _INTERNAL_ERROR
        self._write(self._render(request, result, not keep_alive), not keep_alive)
        if start:
            server._report(request, result.status, start)

    def _render(self, request, response, close):
        try:
            return _serialize(response, request.method == "HEAD", close, request.http_version == "1.0")
        except Exception:
            rate_log.error("serialize-failed", "cannot serialize the response to %s %s", request.method,
                           request.path, exc_info=True)
            return _serialize(_INTERNAL_ERROR, request.method == "HEAD", close, request.http_version == "1.0")

    def _defer(self, request, awaitable, keep_alive, start):
        slot = [None, False]
        self._queue.append(slot)
        task = asyncio.ensure_future(awaitable)
        self._server._tasks.add(task)
        task.add_done_callback(functools.partial(self._handler_done, request, keep_alive, start, slot))

    def _handler_done(self, request, keep_alive, start, slot, task):
        self._server._tasks.discard(task)
        try:
            response = task.result()
        except HttpError as e:
            response = e.response()
        except asyncio.CancelledError:
            response = error_response(503, "request cancelled: server is shutting down")
        except Exception:
            rate_log.error("handler-failed", "handler for %s %s failed", request.method, request.path,
                           exc_info=True)
            response = _INTERNAL_ERROR
        streaming = isinstance(response, StreamingResponse)
        if not streaming and not isinstance(response, Response):
            rate_log.error("not-a-response", "handler for %s %s returned %r, not a Response", request.method,
                           request.path, response)
            response = _INTERNAL_ERROR
        if start and not streaming:
            self._server._report(request, response.status, start)
        if self._closed or self._lingering:
            if streaming:
                _close_chunks(response)
            return
        queue = self._queue
        close = not keep_alive
        if (not close and self._server.closing and queue[-1] is slot and self._state is _HEAD
                and not self._buf):
            close = True              # the last answer before a graceful shutdown says so
            self._state = _DISCARD
        if streaming:
            stream = _Stream(self, request, response, close, start)
            slot[0], slot[1] = stream, stream.close
        else:
            slot[0], slot[1] = self._render(request, response, close), close
        self._flush()
        data, _ = self._await_next(MAX_SPIN_READS)
        if data is not None:
            self.data_received(data)

    def _flush(self):
        """Writes the finished answers at the head of the queue, in order, up to a stream
        (which starts, and flushes what follows it when it ends)."""
        queue = self._queue
        while queue and queue[0][0] is not None:
            data, close = queue[0]
            if type(data) is _Stream:
                data.begin()
                break
            queue.popleft()
            self._transport.write(data)
            if close:
                queue.clear()
                self._close_gracefully()
                return
        self._continue()

    def _write(self, data, close):
        if self._queue:
            self._queue.append([data, close])
            return
        self._transport.write(data)
        if close:
            self._close_gracefully()

    def _reject(self, error):
        """Answers a _ProtocolError, then closes (after any answers queued before it)."""
        self._state = _DISCARD
        request = error.request
        response = error_response(error.status, error.message)
        head_only = request is not None and request.method == "HEAD"
        self._write(_serialize(response, head_only, True, False), True)
        if self._server._timed:
            self._server._report(request, error.status, 0.0)

    def _continue(self):
        """After the queue drained or writing resumed: parse what is buffered, or settle."""
        if self._buf and self._state is not _DISCARD and not self._lingering:
            self._process(self._buf)
        else:
            self._settle()

    def _settle(self):
        """Sets reading, timers and closing for the state input processing left us in."""
        if self._lingering or self._closed:
            return
        self._update_reading()
        if self._queue or self._write_paused:
            return    # waiting on a handler or on the client; the timer re-arms meanwhile
        state = self._state
        if state is _DISCARD or self._peer_eof or (self._server.closing and state is _HEAD and not self._buf):
            self._close_gracefully()
            return
        now = self._loop.time()
        if state is _HEAD:
            if not self._buf and not self._fresh:
                self._head_started = False
                self._set_deadline(now + self._server.idle_timeout)
            elif not self._head_started:
                self._head_started = True
                self._set_deadline(now + self._server.header_timeout)
        else:
            self._set_deadline(min(self._body_deadline, now + self._server.idle_timeout))

    def _idle(self):
        """Between requests on a keep-alive connection: nothing read, owed or being sent."""
        return (self._state is _HEAD and not self._fresh and not self._buf and not self._queue
                and not self._lingering and not self._closed and not self._write_paused)

    def _update_reading(self):
        pause = (self._write_paused or len(self._queue) >= MAX_PIPELINE) and self._state is not _DISCARD
        if pause != self._reading_paused and not self._closed:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    # ---- closing

    def _close_gracefully(self):
        """Lingering close: our answers, then FIN, then discard input until the client's EOF."""
        if self._lingering or self._closed:
            return
        if self._peer_eof or not self._transport.can_write_eof():
            self._close_now()
            return
        self._lingering = True
        self._state = _DISCARD
        self._buf.clear()
        self._transport.write_eof()
        self._update_reading()
        self._set_deadline(self._loop.time() + self._server.drain_timeout)

    def _close_now(self):
        """Closes after the write buffer flushes; aborts if it has not after drain_timeout."""
        if self._closed:
            return
        self._lingering = True
        self._state = _DISCARD
        self._transport.close()
        self._set_deadline(self._loop.time() + self._server.drain_timeout)

    def _shutdown(self):
        """HttpServer.close(): idle connections close now, busy ones after their answers."""
        if self._closed or self._lingering:
            return
        if not self._queue and self._state is _HEAD and not self._buf and not self._write_paused:
            self._close_now()

    def _abort(self):
        if not self._closed:
            self._lingering = True
            self._state = _DISCARD
            self._transport.abort()

    # ---- timer

    def _set_deadline(self, when):
        self._deadline = when
        timer = self._timer
        if timer is None or when < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self):
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._set_deadline(self._deadline)
        elif self._lingering or self._write_paused:
            self._abort()               # the client neither reads nor closes
        elif self._queue:
            self._set_deadline(now + self._server.idle_timeout)   # a handler is still working
        elif self._state is _HEAD and not self._buf:
            self._close_now()           # idle keep-alive connection, or one that never sent a byte
        else:
            self._reject(_ProtocolError(408, "request not received in time", self._request))


def _parse_fields(lines, start):
    """Header (or trailer) lines (str) → {lower-case name: value}, repeats joined with ", "."""
    fields = {}
    names = _FIELD_NAMES
    for i in range(start, len(lines)):
        name, colon, value = lines[i].partition(":")
        key = names.get(name)
        if key is None:
            key = _field_name(name, colon, lines[i])
        value = value.strip(" \t")
        previous = fields.get(key)
        fields[key] = value if previous is None else previous + ", " + value
    return fields


def _field_name(name, colon, line):
    """The lower-case key for a header name not yet in the cache; raises for invalid ones
    (no space before the colon, no obs-fold: RFC 9112 §5.1, §5.2)."""
    if not colon or not name or name.encode("latin-1").translate(None, _TOKEN):
        raise _ProtocolError(400, "malformed header line %r" % line[:64])
    key = name.lower()
    if len(_FIELD_NAMES) < 1024:   # names clients repeat; bounded against random ones
        _FIELD_NAMES[name] = key
    return key


# Header name as sent → lower-case key, for names already validated.
_FIELD_NAMES = {}
_KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


# --------------------------------------------------------------------------------------------
# The server


class HttpServer:
    """Serves a Router over HTTP/1.1 on the running loop.

    on_response(request, status, seconds) is called once per answer (request is None for
    input that never became a request, e.g. garbage or a refused connection; seconds is 0.0
    for answers the protocol layer gave; for answers of the lane, a Request with only its
    method, path and peer). access_log, a logging.Logger, gets one INFO line per answer.

    lane, a kvcm._core.ScoreLane, answers the plain requests of its paths before any of the
    parsing below (a read that is one whole such request), and the bodies of keep-alive
    HTTP/1.1 POSTs to them that the parsing below read (split over reads, or pipelined).

    busy_poll (seconds, uvloop only): after a connection has answered all it received, the
    loop's thread spins up to this long for its next event instead of going to sleep; when
    that event is the connection's next request (plain TCP), the spin reads it itself.
    """

    def __init__(self, router, *, max_body=MAX_BODY, header_timeout=10.0, body_timeout=30.0,
                 idle_timeout=120.0, max_connections=1000, access_log=None, on_response=None,
                 max_header=MAX_HEADER, drain_timeout=5.0, drain_bytes=None, ssl=None, lane=None,
                 busy_poll=0.0):
        for name, value in (("max_body", max_body), ("header_timeout", header_timeout),
                            ("body_timeout", body_timeout), ("idle_timeout", idle_timeout),
                            ("max_connections", max_connections), ("max_header", max_header),
                            ("drain_timeout", drain_timeout)):
            if not value > 0:
                raise ValueError("%s must be positive, got %r" % (name, value))
        if not 0 <= busy_poll <= MAX_BUSY_POLL:
            raise ValueError("busy_poll must be between 0 and %g seconds, got %r" % (MAX_BUSY_POLL, busy_poll))
        self.router = router
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.ssl = ssl
        self.max_connections = max_connections
        self.max_header = max_header
        self.drain_timeout = drain_timeout
        # Enough to swallow a refused body slightly over the limit, bounded all the same.
        self.drain_bytes = max(16 * 1024 * 1024, 2 * max_body) if drain_bytes is None else drain_bytes
        self.lane = lane
        if lane is not None:
            lane.limit(max_header, max_body)
            self._lane_requests = [None] + [Request("POST", path) for path in lane.paths]
            self._lane_routes = {path: route for route, path in enumerate(lane.paths, 1)}
        self._access_log = access_log
        self.on_response = on_response
        self.busy_poll = busy_poll
        # spins that ended with an event for the loop, with the budget spent, with the
        # connection's next request read by the spin itself
        self.busy_polls = [0, 0, 0]
        self._poll_fd = None          # the loop's epoll fd while busy polling
        self.closing = False
        self._loop = None
        self._servers = []
        self._connections = set()     # every live connection, refused ones included
        self._admitted = 0
        self._tasks = set()           # running async handlers
        self._all_closed = None

    @property
    def on_response(self):
        return self._on_response

    @on_response.setter
    def on_response(self, hook):
        self._on_response = hook
        self._timed = hook is not None or self._access_log is not None
        # a hook that offers it times each lane path's answers straight into its own place
        timer_for = getattr(hook, "timer_for", None)
        self._lane_timers = None if timer_for is None or self.lane is None else \
            [None] + [timer_for(request, 200) for request in self._lane_requests[1:]]

    @property
    def access_log(self):
        return self._access_log

    @access_log.setter
    def access_log(self, logger):
        self._access_log = logger
        self._timed = logger is not None or self._on_response is not None

    def _factory(self):
        return _Connection(self)

    def _bind_loop(self):
        self._loop = asyncio.get_running_loop()
        backend_fd = getattr(self._loop, "_get_backend_id", None)   # uvloop: its epoll fd
        if self.busy_poll and backend_fd is None:
            log.warning("busy polling needs uvloop; this loop sleeps between requests")
        self._poll_fd = backend_fd() if self.busy_poll and backend_fd is not None else None

    async def start(self, host="127.0.0.1", port=0):
        """Listens on host:port (port 0 picks a free one, see .port)."""
        self._bind_loop()
        server = await self._loop.create_server(self._factory, host, port, reuse_address=True, backlog=1024,
                                                **self._tls())
        self._servers.append(server)
        return self

    async def start_on_socket(self, sock):
        """Serves on an already listening socket (systemd socket activation)."""
        self._bind_loop()
        server = await self._loop.create_server(self._factory, sock=sock, backlog=1024, **self._tls())
        self._servers.append(server)
        return self

    def _tls(self):
        if self.ssl is None:
            return {}
        return {"ssl": self.ssl, "ssl_handshake_timeout": self.header_timeout}

    @property
    def sockets(self):
        return [sock for server in self._servers for sock in server.sockets]

    @property
    def port(self):
        return self.sockets[0].getsockname()[1]

    async def close(self, timeout=10.0):
        """Stops accepting, lets in-flight requests finish for up to `timeout` seconds
        (idle connections close at once), then aborts what is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        self._all_closed = asyncio.Event()
        for connection in list(self._connections):
            connection._shutdown()
        if self._connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d HTTP connections still open after %.1fs; aborting them",
                            len(self._connections), timeout)
        for connection in list(self._connections):
            connection._abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for server in self._servers:
            await server.wait_closed()

    def _admit(self, connection):
        self._connections.add(connection)
        if self.closing:
            return False
        if self._admitted >= self.max_connections and not self._close_an_idle_connection():
            return False
        self._admitted += 1
        return True

    def _close_an_idle_connection(self):
        """Full: a keep-alive connection waiting for its next request gives its slot to a new
        one (it closes as after its idle timeout). False when every slot is busy."""
        for other in self._connections:
            if other._admitted and other._idle():
                other._close_now()
                other._admitted = False
                self._admitted -= 1
                return True
        return False

    def _forget(self, connection):
        self._connections.discard(connection)
        if connection._admitted:
            self._admitted -= 1
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _report_lane(self, route, seconds, peer):
        timer = self._lane_timers[route] if self._lane_timers is not None and self._access_log is None else None
        if timer is not None:
            timer(seconds)
            return
        request = self._lane_requests[route]
        if self._access_log is not None:
            request = Request(request.method, request.path, peer=peer)
        self._record(request, 200, seconds)

    def _report(self, request, status, start):
        self._record(request, status, time.perf_counter() - start if start else 0.0)

    def _record(self, request, status, seconds):
        if self._on_response is not None:
            try:
                self._on_response(request, status, seconds)
            except Exception:
                rate_log.error("hook-failed", "on_response hook failed", exc_info=True)
        if self._access_log is not None:
            if request is None:
                self._access_log.info('- "-" %d %.3fms', status, seconds * 1e3)
            else:
                peer = "%s:%s" % request.peer if request.peer else "-"
                target = request.path + ("?" + request.query if request.query else "")
                self._access_log.info('%s "%s %s HTTP/%s" %d %.3fms', peer, request.method, target,
                                     request.http_version, status, seconds * 1e3)
