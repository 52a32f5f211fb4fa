"""Helpers of the `kvcm sim` tests: simulators running for real (in-process on a uvloop
thread, or `python -m kvcm sim` / `kvcm serve` as subprocesses), HTTP and SSE over real TCP,
a real ZMQ SUB collecting events, and an independent msgpack reader. Nothing is timed:
waits poll a condition under a generous deadline."""

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import uvloop
import zmq

import httpclient
from aio import free_port, poll_until as until
from conftest import ROOT

WAIT = 20.0     # one condition; only reached when something is broken


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVCM_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "PYTHONHASHSEED", "POD_", "SIM_MODEL",
                                "VLLM_SERVER_DEV_MODE"))}
    env.update(extra)
    return env


# -- HTTP --------------------------------------------------------------------------------------

class Reply(httpclient.Reply):
    """A simulator's reply: its API errors are OpenAI's, with `param`."""

    def _error(self):
        error = self.json["error"]
        assert {"message", "type", "code"} <= set(error) <= {"message", "type", "param", "code"}, self.body
        assert error["code"] == self.status, self.body
        assert isinstance(error["type"], str) and isinstance(error["message"], str), self.body
        return error

    @property
    def param(self):
        error = self._error()
        assert "param" in error, self.body
        return error["param"]


class Client(httpclient.Client):
    """Requests to one simulator, each on a fresh connection."""

    def __init__(self, port, host="127.0.0.1"):
        super().__init__(host, port)

    def request(self, method, path, body=None, headers=None, timeout=None):
        reply = super().request(method, path, body, headers, timeout)
        return Reply(reply.status, reply.headers, reply.body)

    def complete(self, **body):
        return self.ok("POST", "/v1/completions", body)

    def chat(self, **body):
        return self.ok("POST", "/v1/chat/completions", body)

    def tokens(self, prompt):
        return self.ok("POST", "/tokenize", {"prompt": prompt})["tokens"]

    def kv_cache(self):
        return self.ok("GET", "/sim/kv_cache")

    def stream(self, path, body, headers=None):
        """Opens a streaming request; returns the open SSE reader once the head arrived."""
        return SSE(self.host, self.port, path, body, headers)

    def metrics(self):
        from prometheus_client.parser import text_string_to_metric_families

        reply = self.get("/metrics")
        assert reply.status == 200, reply
        return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))):
                s.value for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}


class SSE:
    """One streamed response, read event by event from a raw socket (so the chunked framing
    itself is checked: `raw` keeps every byte after the head)."""

    def __init__(self, host, port, path, body, headers=None):
        self.sock = socket.create_connection((host, port), timeout=WAIT)
        data = json.dumps(body).encode()
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data))
        self._buf = b""
        head = self._until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.raw = b""
        self.body = b""       # the de-chunked body so far
        self.done = False

    def _until(self, marker):
        while marker not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed before %r; got %r" % (marker, self._buf[-200:]))
            self._buf += data
        out, _, self._buf = self._buf.partition(marker)
        return out

    def _chunk(self):
        """The next chunk's data (b"" for the terminating chunk)."""
        size_line = self._until(b"\r\n")
        self.raw += size_line + b"\r\n"
        size = int(size_line, 16)
        while len(self._buf) < size + 2:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed inside a chunk")
            self._buf += data
        chunk, crlf, self._buf = self._buf[:size], self._buf[size:size + 2], self._buf[size + 2:]
        assert crlf == b"\r\n", "chunk of %d bytes not followed by CRLF" % size
        self.raw += chunk + crlf
        return chunk

    def events(self):
        """Every SSE event's data (parsed JSON, or the string "[DONE]") until the end."""
        out = []
        while not self.done:
            out.extend(self.next_events())
        return out

    def next_events(self):
        """The events of the next chunk (at least one chunk is read)."""
        chunk = self._chunk()
        if not chunk:
            self.done = True
            return []
        self.body += chunk
        events = []
        for block in chunk.split(b"\n\n"):
            if not block:
                continue
            assert block.startswith(b"data: "), block
            data = block[6:].decode()
            events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def close(self):
        self.sock.close()


# -- in-process simulators -----------------------------------------------------------------------

class InProcessSim:
    """kvcm.sim.app.Simulator from `kvcm sim` flags (and `environ`, else no environment), on
    a uvloop loop in a background thread; HTTP on free ports of 127.0.0.1 unless --port is
    given; events nowhere unless given."""

    def __init__(self, *args, environ=None):
        from kvcm.sim.app import Simulator
        from kvcm.sim.config import parse_args

        argv = ["--host", "127.0.0.1", "--port", "0", "--zmq-endpoint", "", *args]
        self.simulator = Simulator(parse_args(argv, environ))
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvcm-sim", daemon=True)
        self._thread.start()
        try:
            self.call(self.simulator.start())
        except BaseException:
            self.close()
            raise
        self.ranks = self.simulator.ranks
        self.client = Client(self.ranks[0].port)

    def client_of(self, rank):
        return Client(self.ranks[rank].port)

    def call(self, coro, timeout=WAIT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn, *args):
        """fn(*args) run on the simulator's loop thread (engine state is only read there)."""
        async def run():
            return fn(*args)
        return self.call(run())

    def engine(self, rank=0):
        return self.ranks[rank].engine

    def close(self):
        try:
            if self.loop.is_running() and getattr(self, "ranks", None) is not None:
                self.call(self.simulator.close(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT)
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- subprocesses ----------------------------------------------------------------------------------

class Process:
    """`python -m kvcm ARGS` with stdout/stderr in files."""

    def __init__(self, *args):
        self.args = [str(a) for a in args]
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "kvcm", *self.args], cwd=ROOT, env=clean_env(),
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)

    def alive(self):
        return self.proc.poll() is None

    def stderr(self):
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def wait_http(self, port, path):
        """Waits until GET path answers 200 on port (fails with stderr if the process exits)."""
        client = Client(port)

        def up():
            if not self.alive():
                raise AssertionError("kvcm %s exited (%s); stderr:\n%s" % (self.args, self.proc.returncode,
                                                                         self.stderr()))
            try:
                return client.get(path, timeout=2).status == 200
            except OSError:
                return False
        until(up, "kvcm %s to answer %s" % (self.args[0], path))
        return client

    def stop(self):
        """SIGTERM; the exit status."""
        if self.alive():
            self.proc.terminate()
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError("kvcm %s did not stop; stderr:\n%s" % (self.args, self.stderr())) from None

    def close(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()


class Serve(Process):
    """`kvcm serve` on free ports: HTTP, and SUB sockets bound at zmq_port + each offset."""

    def __init__(self, *args, zmq_span=1):
        self.http_port, self.zmq_port = free_port(), free_port(zmq_span)
        binds = [a for off in range(zmq_span) for a in ("--zmq-bind", "tcp://127.0.0.1:%d" % (self.zmq_port + off))]
        super().__init__("serve", "--http-host", "127.0.0.1", "--http-port", self.http_port, *binds, *args)
        self.client = self.wait_http(self.http_port, "/ready")

    @property
    def zmq_endpoint(self):
        return "tcp://127.0.0.1:%d" % self.zmq_port

    def streams(self):
        return self.client.ok("GET", "/v1/pods")["pods"]

    def score(self, model, token_ids):
        return self.client.ok("POST", "/v1/score", {"model": model, "token_ids": token_ids})


class Sim(Process):
    """`kvcm sim` on free ports of 127.0.0.1 (span ports for its data-parallel ranks)."""

    def __init__(self, *args, span=1):
        self.port = free_port(span)
        super().__init__("sim", "--host", "127.0.0.1", "--port", self.port, *args)
        self.clients = [self.wait_http(self.port + r, "/health/ready") for r in range(span)]
        self.client = self.clients[0]


def connect(serve, sim_client, pod, model):
    """Makes sure kvcm receives the simulator's events: a PUB drops what it sends before its
    connection and kvcm's subscription exist, so reset the (empty) prefix cache, which sends
    AllBlocksCleared, until kvcm lists the stream."""
    def seen():
        reply = sim_client.post("/reset_prefix_cache")
        assert reply.status == 200, reply
        return any(s["pod"] == pod and s["model"] == model for s in serve.streams())
    until(seen, "kvcm serve to receive the events of %s" % pod)


# -- ZMQ ---------------------------------------------------------------------------------------------

class Subscriber:
    """A SUB socket, bound (the simulator connects, llm-d style) or connected, subscribed to
    everything; `messages()` returns the frames received so far."""

    def __init__(self, endpoint=None, connect=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.subscribe(b"")
        if connect is not None:
            self.sock.connect(connect)
            self.endpoint = connect
        else:
            self.sock.bind(endpoint or "tcp://127.0.0.1:*")
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received = []

    def messages(self):
        while self.sock.poll(0):
            self.received.append(self.sock.recv_multipart())
        return self.received

    def wait(self, count, what="KV event batches"):
        until(lambda: len(self.messages()) >= count, "%d %s" % (count, what))
        return self.received

    def close(self):
        self.ctx.destroy(linger=0)


def dealer_replay(endpoint, start):
    """Asks a replay ROUTER for every batch from `start`: the reply messages (frames after the
    DEALER's empty delimiter), end marker included."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        replies = []
        while True:
            assert sock.poll(int(WAIT * 1000)), "no replay answer from %s" % endpoint
            frames = sock.recv_multipart()
            assert frames[0] == b"", frames
            replies.append(frames[1:])
            if b"\xff" * 8 in frames[1:3] and frames[-1] == b"":
                return replies
    finally:
        ctx.destroy(linger=0)


# -- an independent msgpack reader -------------------------------------------------------------------

class Packed:
    """A decoded msgpack container, with the header byte it was written with."""

    def __init__(self, value, header):
        self.value, self.header = value, header


def unpack(data):
    """Decodes one msgpack document written with the types KV events use (nil, bool, ints,
    float64, str, bin, array, map); maps and arrays come back as Packed(list | list of
    pairs, header byte). Written from the msgpack spec, independent of the encoder."""
    value, end = _read(memoryview(data), 0)
    assert end == len(data), "%d trailing bytes" % (len(data) - end)
    return value


def _read(b, i):
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if 0x80 <= t <= 0x8F:
        return _map(b, i, t & 0x0F, t)
    if 0x90 <= t <= 0x9F:
        return _array(b, i, t & 0x0F, t)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return bytes(b[i:i + n]).decode(), i + n
    if t >= 0xE0:
        return t - 0x100, i
    if t == 0xC0:
        return None, i
    if t in (0xC2, 0xC3):
        return t == 0xC3, i
    fixed = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
             0xCB: ">d"}
    if t in fixed:
        size = struct.calcsize(fixed[t])
        return struct.unpack_from(fixed[t], b, i)[0], i + size
    if t in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}[t]
        n = int.from_bytes(b[i:i + width], "big")
        i += width
        raw = bytes(b[i:i + n])
        return (raw if t >= 0xC4 and t <= 0xC6 else raw.decode()), i + n
    if t in (0xDC, 0xDD):
        width = 2 if t == 0xDC else 4
        return _array(b, i + width, int.from_bytes(b[i:i + width], "big"), t)
    if t in (0xDE, 0xDF):
        width = 2 if t == 0xDE else 4
        return _map(b, i + width, int.from_bytes(b[i:i + width], "big"), t)
    raise AssertionError("msgpack type byte 0x%02x is not used by KV events" % t)


def _array(b, i, n, header):
    items = []
    for _ in range(n):
        item, i = _read(b, i)
        items.append(item)
    return Packed(items, header), i


def _map(b, i, n, header):
    pairs = []
    for _ in range(n):
        key, i = _read(b, i)
        value, i = _read(b, i)
        pairs.append((key, value))
    return Packed(pairs, header), i


def plain(value):
    """A decoded value with Packed replaced by lists and dicts (key order kept)."""
    if isinstance(value, Packed):
        if value.header in (0xDE, 0xDF) or 0x80 <= value.header <= 0x8F:
            return {k: plain(v) for k, v in value.value}
        return [plain(v) for v in value.value]
    return value
