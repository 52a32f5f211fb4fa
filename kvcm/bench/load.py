"""HTTP load for `kvcm bench`: raw keep-alive connections and the two ways of driving them.

- `Connection`: one keep-alive HTTP/1.1 connection; `call()` sends pre-encoded request bytes
  and reads the whole response (Content-Length or chunked) before returning.
- `closed_loop()`: `concurrency` connections, each sending its next request as soon as the
  last one is answered. Latency is send -> response. One connection is driven with blocking
  calls, without a selector: the client's own time is inside every latency, and waiting in
  recv() costs it the least. With `spin`, that connection polls for its answer instead of
  sleeping in recv(): where an idle CPU halts at once (a VM's vCPU, `haltpoll` without
  polling), waking the client is a VM exit of tens of microseconds that would be in every
  target's latency alike.
- `open_loop()`: requests are due on a fixed schedule (`rate` per second) whatever the
  answers do. Latency runs from when a request was due, not from when it could be sent, so
  a stalled server is charged for every request that piled up behind the stall (no
  coordinated omission). Requests wait for a free connection; at most `connections` are in
  flight.

Every wait is bounded: a server that stops answering fails the run with a clear error.
Timestamps come from time.perf_counter_ns (monotonic).
"""

import multiprocessing
import os
import selectors
import socket
import struct
import time
from array import array

now_ns = time.perf_counter_ns
TIMEOUT_S = 30.0
READ_SIZE = 1 << 18
_FORK = multiprocessing.get_context("fork")


class HttpError(RuntimeError):
    """A target answered with an error status, closed the connection or timed out."""


def request_bytes(method, path, body=b"", host="127.0.0.1"):
    """One HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    if not body and method == "GET":
        return b"%s %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (method.encode(), path.encode(), host.encode())
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        method.encode(), path.encode(), host.encode(), len(body), body)


def response_end(buf):
    """(status, body start, end) of the first complete response in buf, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    start = head_end + 4
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        end = start + int(head[i + 17:j if j > 0 else len(head)])
        return (int(buf[9:12]), start, end) if len(buf) >= end else None
    if b"transfer-encoding: chunked" in head:
        pos = start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return int(buf[9:12]), start, pos
    return int(buf[9:12]), start, start   # no body (e.g. 204)


def dechunk(body):
    """The payload of a chunked body (bodies with Content-Length are returned as they are)."""
    out, pos = [], 0
    while pos < len(body):
        line_end = body.find(b"\r\n", pos)
        try:
            size = int(body[pos:line_end].split(b";")[0], 16)
        except ValueError:
            return body
        if size == 0:
            break
        out.append(body[line_end + 2:line_end + 2 + size])
        pos = line_end + 2 + size + 2
    return b"".join(out)


def split_address(url):
    """http://host:port[/...] -> (host, port)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("expected http://HOST:PORT, got %r" % url)
    return host.strip("[]"), int(port)


class _Reads:
    """Where a client's reads land. sock.recv(n) allocates its n bytes before it reads; at
    256 KiB, wherever the heap has no such chunk free, that is an mmap and its page faults
    (8 µs against 0.6 µs in a fresh process on the machine bench was measured on), inside the
    latency being measured and in every turn of a polling client. Reads go into one buffer
    instead; what came is copied out."""

    __slots__ = ("buf", "view")

    def __init__(self):
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)

    def recv(self, sock, flags=0):
        return self.view[:sock.recv_into(self.buf, READ_SIZE, flags)].tobytes()


class Connection:
    """One keep-alive connection; call() -> (status, body)."""

    def __init__(self, address, timeout=TIMEOUT_S, spin=False):
        self.address, self.timeout, self.spin = address, timeout, spin
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if spin:
            # a socket with a timeout poll()s, sleeping, before every recv: _poll keeps the
            # time, and the kernel bounds a send (sendall then fails with EAGAIN)
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))
        self.buf = b""
        self.reads = _Reads()

    def call(self, request):
        self.sock.sendall(request)
        buf = self.buf
        while True:
            ends = response_end(buf)
            if ends is not None:
                break
            try:
                chunk = self._poll() if self.spin else self.reads.recv(self.sock)
            except socket.timeout:
                raise HttpError("no answer from %s:%d within %g s" % (*self.address, self.timeout)) from None
            if not chunk:
                raise HttpError("%s:%d closed the connection" % self.address)
            buf += chunk
        status, start, end = ends
        self.buf = buf[end:]
        body = buf[start:end]
        if b"transfer-encoding: chunked" in buf[:start].lower():
            body = dechunk(body)
        return status, body

    def _poll(self):
        """recv() without sleeping: tries until there are bytes (or the timeout passes)."""
        deadline = None
        while True:
            try:
                return self.reads.recv(self.sock, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise socket.timeout() from None

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Slot:
    __slots__ = ("sock", "buf", "sent", "due")

    def __init__(self, sock):
        self.sock, self.buf, self.sent, self.due = sock, b"", 0, 0


def _open(address, n):
    slots = []
    try:
        for _ in range(n):
            s = socket.create_connection(address, timeout=TIMEOUT_S)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            slots.append(_Slot(s))
    except OSError:
        for slot in slots:
            slot.sock.close()
        raise
    return slots


def _drive(address, requests, count, n_conns, schedule, until_ns=None, lags=None):
    """The engine of both loops: sends requests[i % len] for i < count (and, with until_ns,
    until then) over n_conns connections; schedule(i) is when request i is due (ns), or None
    to send as soon as a connection is free. Returns array('q') of latencies in ns, from due
    (or sent) to answered; `lags` (a list) gets how late each request was sent after it was
    due: the client's own delay, already inside the latencies."""
    lat = array("q")
    reads = _Reads()
    slots = _open(address, n_conns)
    sel = selectors.DefaultSelector()
    free = list(slots)
    nreq = len(requests)
    i = 0
    try:
        for slot in slots:
            sel.register(slot.sock, selectors.EVENT_READ, slot)
        while True:
            t = now_ns()
            sending = i < count and (until_ns is None or t < until_ns)
            if not sending and len(free) == n_conns:
                return lat
            while sending and free:
                due = schedule(i)
                if due is not None and due > t:
                    break
                slot = free.pop(0)   # round robin: every connection stays in use
                slot.due = due if due is not None else t
                slot.sent = t
                if lags is not None:
                    lags.append(t - slot.due)
                slot.sock.sendall(requests[i % nreq])
                i += 1
                sending = i < count
            timeout = TIMEOUT_S
            if sending and free:
                timeout = max(0.0, (schedule(i) - now_ns()) / 1e9)
            events = sel.select(timeout)
            if not events and len(free) < n_conns and \
                    now_ns() - min(s.sent for s in slots if s not in free) > TIMEOUT_S * 1e9:
                raise HttpError("no answer from %s:%d within %.0f s" % (*address, TIMEOUT_S))
            for key, _ in events:
                slot = key.data
                data = reads.recv(slot.sock)
                if not data:
                    raise HttpError("%s:%d closed a connection" % address)
                slot.buf += data
                ends = response_end(slot.buf)
                if ends is None:
                    continue
                t = now_ns()
                if ends[0] != 200:
                    raise HttpError("HTTP %d: %r" % (ends[0], slot.buf[ends[1]:ends[2]][:200]))
                lat.append(t - slot.due)
                slot.buf = slot.buf[ends[2]:]
                free.append(slot)
    finally:
        sel.close()
        for slot in slots:
            slot.sock.close()


def closed_loop(address, requests, count, concurrency=1, seconds=None, spin=False):
    """Latencies (ns) of `count` requests (or as many as `seconds` allow), `concurrency`
    in flight, each sent when a connection is free; `spin` (one connection only): the client
    polls for each answer instead of sleeping."""
    until = now_ns() + int(seconds * 1e9) if seconds else None
    if concurrency == 1:
        return _one_at_a_time(address, requests, count, until, spin)
    if spin:
        raise ValueError("a spinning client drives one connection")
    return _drive(address, requests, count, concurrency, lambda i: None, until)


def _one_at_a_time(address, requests, count, until_ns, spin=False):
    lat = array("q")
    nreq = len(requests)
    with Connection(address, spin=spin) as conn:
        for i in range(count):
            t = now_ns()
            if until_ns is not None and t >= until_ns:
                break
            status, body = conn.call(requests[i % nreq])
            if status != 200:
                raise HttpError("HTTP %d: %r" % (status, body[:200]))
            lat.append(now_ns() - t)
    return lat


def closed_loop_apart(address, requests, count, concurrency=1, seconds=None, cpus=None):
    """closed_loop() in a forked process of its own, for while this process does other work
    (a generator thread): the client's latencies then never include waiting for this
    process's GIL. The child runs on `cpus` if given, touches no ZMQ socket and leaves by
    os._exit."""
    parent, child = _FORK.Pipe(duplex=False)
    proc = _FORK.Process(target=_closed_loop_child,
                         args=(child, address, requests, count, concurrency, seconds, cpus), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll((seconds or 0) + 2 * TIMEOUT_S):
            raise HttpError("the client process did not answer within %.0f s" % ((seconds or 0) + 2 * TIMEOUT_S))
        ok, value = parent.recv()
    except EOFError:
        raise HttpError("the client process ended without an answer") from None
    finally:
        parent.close()
        proc.join(TIMEOUT_S)
    if not ok:
        raise HttpError(value)
    return array("q", value)


def _closed_loop_child(conn, address, requests, count, concurrency, seconds, cpus):
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        conn.send((True, closed_loop(address, requests, count, concurrency, seconds).tobytes()))
    except Exception as exc:   # handed to the parent
        conn.send((False, "%s: %s" % (type(exc).__name__, exc)))
    finally:
        conn.close()


def open_loop(address, requests, count, rate, connections=16, lags=None):
    """Latencies (ns) of `count` requests due at `rate` per second from now, measured from
    when each was due (see the module docstring); at most `connections` in flight."""
    start = now_ns() + 1_000_000
    interval = 1e9 / rate
    return _drive(address, requests, count, connections, lambda i: start + int(i * interval), lags=lags)
