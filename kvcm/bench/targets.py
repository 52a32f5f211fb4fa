"""What `kvcm bench index` measures: a target is a server process and the API it speaks.

APIs (`Api` subclasses) say how engines reach the index and how to ask it:
- `NativeApi`: kvcm's own. Engines connect to the index's ZMQ SUB with topic
  `kv@<engine>@<model>` (bind topology); `POST /v1/score` by token ids.
- `DynamoApi`: NVIDIA Dynamo's standalone indexer. Engines bind their PUB sockets and are
  registered with `POST /register`; `POST /query` by token ids answers matched tokens per
  worker and data-parallel rank.
- `LlmdApi`: llm-d's `POST /score_completions` by prompt text (the index tokenizes); engines
  connect as in the bind topology. Its score is matched blocks (tier-weighted).

Servers: `kvcm` (bench starts `kvcm serve`, or uses --url/--zmq of a running one), `dynamo`
(`python -m dynamo.indexer` started with --dynamo-python, or --url), `llmd` (--url/--zmq of
any server speaking llm-d's API). A kvcm that also speaks Dynamo's API is measured either
way by choosing the API (`--kvcm-api`), independently of who runs the server.
"""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import orjson

from kvcm.bench.load import Connection, HttpError, request_bytes, split_address

START_TIMEOUT_S = 60.0


class TargetError(RuntimeError):
    """A target that cannot be started, reached or understood."""


def engine_name(i):
    return "engine-%d" % i


def _engine_of(name):
    m = re.fullmatch(r"engine-(\d+)", name)
    return int(m.group(1)) if m else None


class Api:
    name = None
    topology = "bind"
    needs_text = False

    def __init__(self, model, block_size):
        self.model, self.block_size = model, block_size

    def topic(self, i):
        return "kv@%s@%s" % (engine_name(i), self.model)

    def register(self, conn, endpoints):
        """Makes the index listen to engines {index: PUB endpoint} (register topology)."""

    def query(self, query):
        """The request bytes asking for `query`'s matches."""
        raise NotImplementedError

    def matched(self, body):
        """{engine index: matched tokens} from a response body."""
        raise NotImplementedError

    def health(self):
        return request_bytes("GET", "/health")


class NativeApi(Api):
    name = "native"

    def query(self, query):
        return request_bytes("POST", "/v1/score", orjson.dumps({"model": self.model, "token_ids": query.tokens}))

    def matched(self, body):
        out = {}
        for pod, m in (orjson.loads(body).get("matched") or {}).items():
            i = _engine_of(pod)
            if i is not None and m.get("tokens"):
                out[i] = m["tokens"]
        return out


class DynamoApi(Api):
    name = "dynamo"
    topology = "register"

    def topic(self, i):
        return ""   # vLLM's default topic: the index names the worker by its endpoint

    def register(self, conn, endpoints):
        for i, endpoint in endpoints.items():
            body = orjson.dumps({"instance_id": i + 1, "endpoint": endpoint, "model_name": self.model,
                                 "block_size": self.block_size})
            status, reply = conn.call(request_bytes("POST", "/register", body))
            if status >= 300:
                raise TargetError("POST /register answered %d: %s" % (status, reply[:200].decode(errors="replace")))

    def query(self, query):
        return request_bytes("POST", "/query", orjson.dumps({"token_ids": query.tokens, "model_name": self.model}))

    def matched(self, body):
        out = {}
        for worker, ranks in (orjson.loads(body).get("scores") or {}).items():
            tokens = max(ranks.values()) if isinstance(ranks, dict) and ranks else ranks
            if tokens:
                out[int(worker) - 1] = tokens
        return out


class LlmdApi(Api):
    name = "llmd"
    needs_text = True

    def query(self, query):
        return request_bytes("POST", "/score_completions", orjson.dumps({"prompt": query.text, "model": self.model}))

    def matched(self, body):
        scores = orjson.loads(body) or {}
        return {i: round(score) * self.block_size for pod, score in scores.items()
                if (i := _engine_of(pod)) is not None and score}


APIS = {"native": NativeApi, "dynamo": DynamoApi, "llmd": LlmdApi}


# ---- processes ------------------------------------------------------------------------------

def kvcm_command(*args):
    """argv running this kvcm's sub-command: the binary itself when frozen."""
    if getattr(sys, "frozen", False):
        return [sys.executable, *map(str, args)]
    return [sys.executable, "-m", "kvcm", *map(str, args)]


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("KVCM_")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid):
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return []
    out = []
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree_pids(pid):
    """pid and every descendant."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def tree_rss_bytes(pid):
    """VmRSS of pid and every descendant, in bytes."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class Process:
    """A server process bench started: its log goes to a temporary file."""

    def __init__(self, argv, env=None):
        self.log = tempfile.NamedTemporaryFile(prefix="kvcm-bench-", suffix=".log", delete=False)
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env or clean_env(), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_for(self, what, check):
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_text()[-1500:]
                self.close()
                raise TargetError("%s did not start (%s):\n%s" % (what, " ".join(self.argv[:4]), tail))
            time.sleep(0.02)

    def rss_bytes(self):
        return tree_rss_bytes(self.pid)

    def pids(self):
        return tree_pids(self.pid)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def _answers(address, path="/health"):
    def check():
        try:
            with Connection(address, timeout=2) as c:
                return c.call(request_bytes("GET", path))[0] == 200
        except (OSError, HttpError):
            return False
    return check


class Target:
    """A running index: HTTP address, ZMQ endpoint (bind topology), its process if bench
    started it (None: external, RSS not measured)."""

    def __init__(self, name, api, address, zmq=None, process=None):
        self.name, self.api, self.address, self.zmq, self.process = name, api, address, zmq, process

    def rss_bytes(self):
        return self.process.rss_bytes() if self.process is not None else None

    def pids(self):
        """The processes of a target bench started; [] for an external one."""
        return self.process.pids() if self.process is not None else []

    def close(self):
        if self.process is not None:
            self.process.close()


class TargetSpec:
    """How to get one target, started afresh for every run."""

    def __init__(self, name, api, *, url=None, zmq=None, start=None):
        self.name, self.api, self.url, self.zmq, self._start = name, api, url, zmq, start

    @property
    def label(self):
        return self.name if self.api.name in (self.name, "native") else "%s (%s API)" % (self.name, self.api.name)

    def start(self):
        if self._start is not None:
            return self._start(self)
        address = split_address(self.url)
        if not _answers(address)():
            raise TargetError("%s: nothing answers GET /health at %s" % (self.name, self.url))
        if self.api.topology == "bind" and not self.zmq:
            raise TargetError("%s: --zmq ENDPOINT is needed (where engines publish)" % self.name)
        return Target(self.name, self.api, address, self.zmq)


def start_kvcm(spec, extra_args=()):
    """`kvcm serve` on 127.0.0.1, free ports, a fresh in-memory index."""
    zmq = ["--zmq-bind", "tcp://127.0.0.1:*"] if spec.api.topology == "bind" else ["--zmq-bind", ""]
    proc = Process(kvcm_command("serve", "--http-host", "127.0.0.1", "--http-port", 0, *zmq,
                                "--block-size", spec.api.block_size, "--log-level", "info", *extra_args))
    pattern = re.compile(r"kvcm serving: http ([\d.]+):(\d+), zmq (\S+)")
    m = proc.wait_for("kvcm serve", lambda: pattern.search(proc.log_text()))
    address = (m.group(1), int(m.group(2)))
    return Target(spec.name, spec.api, address, m.group(3) if spec.api.topology == "bind" else None, proc)


def start_dynamo(spec, python, threads=2):
    """`python -m dynamo.indexer` on a free port (it listens on every address, so the port
    is picked here; a lost race is retried on another)."""
    for attempt in range(3):
        port = free_port()
        proc = Process([python, "-m", "dynamo.indexer", "--port", str(port), "--threads", str(threads),
                        "--block-size", str(spec.api.block_size), "--model-name", spec.api.model])
        try:
            proc.wait_for("dynamo.indexer", _answers(("127.0.0.1", port)))
        except TargetError:
            if attempt == 2:
                raise
            continue
        return Target(spec.name, spec.api, ("127.0.0.1", port), None, proc)
