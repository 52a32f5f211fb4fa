"""Helpers of the service tests (test_api, test_serve, test_indexer): kvcm running for real —
in-process on a uvloop thread, or `python -m kvcm serve` as a subprocess with a fake
NOTIFY_SOCKET — HTTP over real TCP, ZMQ publishing that waits until kvcm subscribes, and
what the vLLM captures leave in the index, written in token prefixes so that expected scores
need no hashing. Nothing is timed: waits poll a condition under a generous deadline."""

import asyncio
import collections
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

import httpclient
from aio import free_port, poll_until as until
from captures import event_fields, hash_value
from conftest import ROOT, SHARED
from kvcm._core import BlockHasher
from kvcm.config import LLMD_ENV, LLMD_IGNORED
from kvcm.publisher import Publisher, block_removed, block_stored, encode_batch

TOKENIZERS = SHARED / "fixtures" / "tokenizers"
QWEN = "Qwen/Qwen3-0.6B"          # the captures' model; tokenized with the qwen2.5 fixture
BLOCK = 16
WAIT = 20.0                       # one condition; only reached when something is broken
TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}
PROBE_RANKS = itertools.count(1000)


# -- HTTP -------------------------------------------------------------------------------------

class Client(httpclient.Client):
    """Requests to one kvcm, each on a fresh TCP connection."""

    def score(self, model, **fields):
        return self.ok("POST", "/v1/score", dict(fields, model=model))

    def tokenize(self, model, **fields):
        return self.ok("POST", "/v1/tokenize", dict(fields, model=model))

    def streams(self, pod=None):
        """/v1/pods entries (without the publishers' probe streams), of one pod if given."""
        return [s for s in self.ok("GET", "/v1/pods")["pods"]
                if s["dp_rank"] < 1000 and (pod is None or s["pod"] == pod)]

    def stream(self, pod, model, dp_rank=0):
        for s in self.ok("GET", "/v1/pods")["pods"]:
            if (s["pod"], s["model"], s["dp_rank"]) == (pod, model, dp_rank):
                return s
        return None

    def caught_up(self, pod, model, seq, dp_rank=0):
        """Waits until the stream applied seq (and no replay runs); returns its entry."""
        def done():
            s = self.stream(pod, model, dp_rank)
            return s if s is not None and s["last_seq"] == seq and s["state"] not in ("replaying", "applying") else None
        return until(done, "stream %s/%s/dp%d to reach seq %d" % (pod, model, dp_rank, seq))

    def connected(self, pub):
        """Publishes empty batches with a DP rank of their own (seq 0, so the first to arrive
        is applied and the rest are duplicates) until kvcm shows that stream, then one with
        seq 1, and waits until kvcm applied it: a PUB drops what it sends before the
        connection and the subscription exist, and a probe still on its way when this returned
        would come back as a stream after the caller forgot the pod (in a snapshot, a stream
        that cannot resume, so its pod cleared). Two batches applied per call."""
        rank = next(PROBE_RANKS)

        def probe(seq):     # outside the publisher's seq counter and replay buffer
            pub.send_frames((pub.topic.encode(), seq.to_bytes(8, "big"), encode_batch([], dp_rank=rank)))

        def probe_stream():
            return next((s for s in self.ok("GET", "/v1/pods")["pods"] if s["dp_rank"] == rank), None)

        until(lambda: probe(0) or probe_stream(), "kvcm to receive from %s" % pub.endpoint)
        probe(1)
        until(lambda: probe_stream()["last_seq"] == 1, "kvcm to apply the last probe sent to %s" % pub.endpoint)

    def metrics(self):
        """{(sample name, ((label, value), ...)): value} from /metrics."""
        reply = self.get("/metrics")
        assert reply.status == 200, reply
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4"), reply.headers
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.body.decode())
                for s in family.samples}


# -- engines ---------------------------------------------------------------------------------

HASHER = BlockHasher("sha256", None, BLOCK)     # vLLM's default: sha256, PYTHONHASHSEED unset


def tokens(seed, blocks, tail=0):
    """`blocks` full blocks (+ `tail` tokens) of token ids, different for every seed."""
    return [(seed * 7919 + i * 104729) % 150_000 for i in range(blocks * BLOCK + tail)]


def stored(ids, start=0, *, hasher=HASHER, medium="GPU", salt=None, lora_name=None):
    """BlockStored of the full blocks of ids from block `start` (its parent the block
    before), hashed like vLLM >= 0.31 (a cache salt tagged on block 0; events carry it
    untagged)."""
    keys = list(hasher.keys(ids, None if salt is None else [(("cache_salt", salt),)]))
    extra = None
    if salt is not None or lora_name is not None:
        extra = [[x for x in (lora_name, salt if i == 0 else None) if x is not None] or None
                 for i in range(len(keys))][start:]
    return block_stored(keys[start:], keys[start - 1] if start else None, ids[start * BLOCK:len(keys) * BLOCK],
                        BLOCK, medium=medium, extra_keys=extra, lora_name=lora_name,
                        lora_id=None if lora_name is None else 1)


def offloaded(ids, blocks, medium="CPU"):
    """A token-less BlockStored (offload connectors) of the first `blocks` blocks."""
    return block_stored(list(HASHER.keys(ids))[:blocks], None, [], 0, medium=medium)


def removed(ids, blocks, medium="GPU"):
    """BlockRemoved of the given block positions of ids."""
    keys = list(HASHER.keys(ids))
    return block_removed([keys[i] for i in blocks], medium=medium)


class Engine:
    """One vLLM-like publisher feeding a kvcm: a real PUB socket (connecting to `endpoint`,
    or bound when it has a `*` port: connect mode), one seq counter per DP rank, and a send()
    that waits until kvcm applied the batch."""

    def __init__(self, client, endpoint, pod, model, *, topic=None, **publisher):
        self.client, self.pod, self.model = client, pod, model
        self.pub = Publisher(endpoint, topic="kv@%s@%s" % (pod, model) if topic is None else topic, **publisher)
        self.seqs = collections.Counter()

    def connect(self):
        self.client.connected(self.pub)
        return self

    def send(self, *events, dp_rank=0, seq=None):
        seq = self.seqs[dp_rank] if seq is None else seq
        self.seqs[dp_rank] = seq + 1
        self.pub.publish_raw(encode_batch(events, dp_rank=dp_rank), seq=seq)
        self.client.caught_up(self.pod, self.model, seq, dp_rank)
        return seq

    def close(self):
        self.pub.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- kvcm in-process ---------------------------------------------------------------------------

class InProcess:
    """kvcm.serve.Service started on a uvloop loop in a background thread: HTTP on a free
    port of `host`, the ZMQ SUB bound on a free port of 127.0.0.1, flags as `kvcm serve`
    takes them (the environment is not read)."""

    def __init__(self, *args, host="127.0.0.1"):
        from kvcm.config import load_config
        from kvcm.serve import Service

        argv = ["--http-host", host, "--http-port", "0", "--zmq-bind", "tcp://127.0.0.1:*", *args]
        self.service = Service(load_config(argv, environ={}), argv)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvcm-service", daemon=True)
        self._thread.start()
        notify = os.environ.pop("NOTIFY_SOCKET", None)    # never tell a real manager we are ready
        try:
            self.call(self.service.start())
        except BaseException:
            self.close()
            raise
        finally:
            if notify is not None:
                os.environ["NOTIFY_SOCKET"] = notify
        self.port = self.service.http.port
        self.zmq_endpoint = self.service.indexer.ingest.bound[0]
        self.client = Client("127.0.0.1", self.port)

    def call(self, coro, timeout=WAIT):
        """Runs a coroutine on the service's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        async def stop():
            await self.service.http.close(2.0)
            await self.service.indexer.close()
        try:
            if self.loop.is_running():
                self.call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT)
            self.loop.close()


# -- kvcm serve as a subprocess ----------------------------------------------------------------

class Notify:
    """A fake systemd notify socket: AF_UNIX datagrams, in a short temporary directory
    (socket paths are limited to 108 bytes)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kvcm-nfy-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages = []

    def _receive(self):
        try:
            self.messages.append(self.sock.recv(65536).decode())
        except socket.timeout:
            pass

    def wait_for(self, line, alive=lambda: True):
        """The first message holding `line` as one of its lines; fails if alive() turns
        False before it came."""
        def found():
            for message in self.messages:
                if line in message.split("\n"):
                    return message
            if not alive():
                raise AssertionError("kvcm exited before sending %s" % line)
            self._receive()
            return None
        return until(found, line)

    def lines(self):
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.05)
        return [line for message in self.messages for line in message.split("\n")]

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def clean_env(**overrides):
    """The test's environment without KVCM_*, systemd or llm-d variables, plus overrides."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KVCM_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))
           and k not in LLMD_ENV and k not in LLMD_IGNORED}
    env.update(overrides)
    return env


class Serve:
    """`python -m kvcm serve ARGS` (or `command` ARGS) with stdout/stderr in files and a fake
    NOTIFY_SOCKET."""

    def __init__(self, *args, env=None, command=None, **popen):
        self.notify = Notify()
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self.args = list(args)
        command = [sys.executable, "-m", "kvcm", "serve"] if command is None else command
        self.proc = subprocess.Popen(
            [*command, *self.args], cwd=ROOT,
            env=clean_env(NOTIFY_SOCKET=self.notify.path, **(env or {})),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, **popen)

    @classmethod
    def standard(cls, *args, zmq_offsets=(0,), **kw):
        """A server on free ports with the Qwen fixture tokenizer for the captures' model;
        .http_port and .zmq_port (bound at zmq_port + each offset, as DP ranks do)."""
        http_port, zmq_port = free_port(), free_port(max(zmq_offsets) + 1)
        binds = [a for off in zmq_offsets for a in ("--zmq-bind", "tcp://127.0.0.1:%d" % (zmq_port + off))]
        server = cls("--http-host", "127.0.0.1", "--http-port", str(http_port), *binds,
                     "--tokenizer", "%s=%s" % (QWEN, TOKENIZERS / "qwen2.5-instruct"), *args, **kw)
        server.http_port, server.zmq_port = http_port, zmq_port
        server.client = Client("127.0.0.1", http_port)
        return server

    @property
    def zmq_endpoint(self):
        return "tcp://127.0.0.1:%d" % self.zmq_port

    def alive(self):
        return self.proc.poll() is None

    def wait_ready(self):
        """The READY=1 message (fails with kvcm's stderr if it exits first)."""
        try:
            return self.notify.wait_for("READY=1", alive=self.alive)
        except AssertionError as exc:
            raise AssertionError("%s; stderr:\n%s" % (exc, self.stderr())) from None

    def wait(self, timeout=WAIT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("kvcm serve %s did not exit; stderr:\n%s" % (self.args, self.stderr())) from None

    def send(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM):
        """Sends sig and returns the exit status."""
        if self.alive():
            self.send(sig)
        return self.wait()

    def stderr(self):
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def close(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()
        self.notify.close()


@pytest.fixture
def serve(shared):
    """serve(*args, **kw) -> a started Serve.standard (READY received), killed after the test
    if it is still running. A fixture: import it into the test module."""
    started = []

    def make(*args, **kw):
        server = Serve.standard(*args, **kw)
        started.append(server)
        server.ready = server.wait_ready()
        return server
    yield make
    for server in started:
        server.close()


def run_serve(*args, env=None, timeout=WAIT):
    """`kvcm serve ARGS` expected to exit by itself: (status, stdout, stderr). A server that
    starts instead of failing is killed after `timeout` and reported."""
    try:
        proc = subprocess.run([sys.executable, "-m", "kvcm", "serve", *args], cwd=ROOT,
                              env=clean_env(**(env or {})), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("kvcm serve %s kept running; stderr:\n%s" % (args, exc.stderr)) from None
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def run_cli(*args, timeout=WAIT):
    """`python -m kvcm ARGS`: (status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "kvcm", *args], cwd=ROOT, env=clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


# -- what events leave in the index, by token prefix -------------------------------------------

def _salt(fields):
    """The cache salt of a run's block 0: a string left in its untagged extra keys once the
    LoRA name is taken out."""
    extra = fields.get("extra_keys") or []
    items = list(extra[0] or []) if extra else []
    lora = fields.get("lora_name")
    if lora and items and items[0] == lora:
        items.pop(0)
    return items[0] if items and isinstance(items[0], str) else None


class PrefixModel:
    """(namespace, cache salt, tokens of blocks 0..i) -> {(pod, tier)}: DESIGN.md §4's set
    semantics over token content, which is what scoring by token ids sees whatever keys the
    index uses. Event hashes only name prefixes (hash -> prefix, from the runs that carried
    token ids)."""

    def __init__(self, block_size=BLOCK, weights=TIER_WEIGHTS):
        self.block_size = block_size
        self.weights = weights
        self.holders = collections.defaultdict(set)
        self.names = {}          # event hash -> (namespace, salt, prefix)

    def apply(self, pod, model, events):
        bs = self.block_size
        for event in events:
            tag, fields = event_fields(event)
            tier = (fields.get("medium") or "GPU").lower()
            hashes = [hash_value(h) for h in fields.get("block_hashes") or ()]
            if tag == "BlockStored":
                ids = fields.get("token_ids") or []
                if ids:
                    parent = fields.get("parent_block_hash")
                    if parent is None:
                        name = (fields.get("lora_name") or model, _salt(fields), ())
                    else:
                        name = self.names[hash_value(parent)]
                    for i, h in enumerate(hashes):
                        name = name[:2] + (name[2] + tuple(ids[i * bs:(i + 1) * bs]),)
                        self.names[h] = name
                for h in hashes:
                    self.holders[self.names[h]].add((pod, tier))
            elif tag == "BlockRemoved":
                for h in hashes:
                    self.holders[self.names[h]].discard((pod, tier))
            elif tag == "AllBlocksCleared":
                for holders in self.holders.values():
                    holders.discard((pod, "gpu"))

    def chains(self):
        """(namespace, salt, tokens) of every stored prefix that no other one extends."""
        names = set(self.names.values())
        return sorted((n for n in names
                       if not any(o[:2] == n[:2] and len(o[2]) > len(n[2]) and o[2][:len(n[2])] == n[2]
                                  for o in names)), key=lambda n: (n[0], n[1] or "", n[2]))

    def expected(self, namespace, ids, salt=None):
        """(scores, matched) as /v1/score reports them: a pod's run of consecutive blocks
        from block 0, each worth the best weight among the tiers it holds it in."""
        bs = self.block_size
        runs = {}                                  # pod -> [blocks, score, tier counts]
        for i in range(len(ids) // bs):
            held = collections.defaultdict(set)
            for pod, tier in self.holders.get((namespace, salt, tuple(ids[:(i + 1) * bs])), ()):
                held[pod].add(tier)
            going = list(held) if i == 0 else [pod for pod, run in runs.items() if run[0] == i]
            for pod in going:
                if held.get(pod):
                    run = runs.setdefault(pod, [0, 0.0, collections.Counter()])
                    run[0] += 1
                    run[1] += max(self.weights.get(t, 1.0) for t in held[pod])
                    run[2].update(held[pod])
        scores = {pod: run[1] for pod, run in runs.items()}
        matched = {pod: {"blocks": run[0], "tokens": run[0] * bs, "tiers": dict(run[2])}
                   for pod, run in runs.items()}
        return scores, matched
