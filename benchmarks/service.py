#!/usr/bin/env python3
"""Benchmarks of `kvcm serve` (ZMQ ingest and HTTP scoring) against the budgets of DESIGN.md §9.

    python benchmarks/service.py                       # all: ingest_zmq score_while_ingesting http_score
    python benchmarks/service.py http_score --repeats 3
    python benchmarks/service.py chat_path --baseline /tmp/kvcm-before   # a tree to compare with

`kvcm serve` runs as a subprocess (`python -m kvcm serve`, uvloop, default configuration
except: HTTP on 127.0.0.1 and a free port, ZMQ SUB bound to 127.0.0.1 on a free port). KV
events come from kvcm.publisher.Publisher, vLLM's wire format, in separate processes
(multiprocessing, spawn). HTTP requests come from a raw-socket keep-alive client in this
process (one request at a time, the response read fully before the next is sent) or, for
throughput, from one epoll loop over 32 keep-alive connections. Everything is on 127.0.0.1.
Every loop is bounded in count and time; a budget that cannot be reached fails the run
instead of hanging it.

Reporting is run.py's: a table and a JSON line per benchmark; values are medians over
--repeats runs (p50 and p99 are per run, then the median over runs). The load average is
printed with every benchmark, since the machine is shared. Results: benchmarks/RESULTS.md.
"""
import argparse
import gc
import json
import multiprocessing
import os
import platform
import queue
import random
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import msgpack  # noqa: E402
import orjson  # noqa: E402

import run  # noqa: E402  (the core benchmarks: reporting helpers and workloads)
from kvcm import _core  # noqa: E402
from kvcm.publisher import Publisher  # noqa: E402
from run import BLOCK, NS, pc, report, row  # noqa: E402

PODS = 16
EVENTS_PER_BATCH = 8                     # 8 BlockStored x 16 blocks = 128 blocks per batch
BATCH_BLOCKS = EVENTS_PER_BATCH * BLOCK
LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "tokenizers")  # ../shared, as DESIGN.md
LLAMA_DIR = os.path.join(FIXTURES, "llama-3.2-instruct")
TEXT_FILES = (os.path.join(FIXTURES, "LICENSE-Apache-2.0.txt"),
              os.path.join(LLAMA_DIR, "LICENSE"), os.path.join(LLAMA_DIR, "USE_POLICY.md"))
EMPTY_BATCH = msgpack.packb([0.0, [], 0])  # a batch of no events: opens a stream, stores nothing
BATCH_BUDGET = None  # --batch-budget: run kvcm with Ingest(batch_budget=N) (default 256)


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def pod(i):
    return "pod-%d" % i


def topic(i, model=NS):
    return "kv@%s@%s" % (pod(i), model)


# ---- the server ----------------------------------------------------------------------------


class Server:
    """`kvcm serve` in a subprocess; `cpus` pins it (every thread: set before it starts)."""

    def __init__(self, *args, cpus=None, root=ROOT):
        self.log = tempfile.NamedTemporaryFile(prefix="kvcm-bench-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCM_")}
        if BATCH_BUDGET is None:
            launcher = ["-m", "kvcm"]
        else:  # an experiment: kvcm.ingest.Ingest's batch_budget (messages per loop turn) patched
            launcher = ["-c", "import sys; from kvcm import ingest; "
                        "ingest.Ingest.__init__.__kwdefaults__['batch_budget'] = %d; "
                        "from kvcm.cli import main; raise SystemExit(main(sys.argv[1:]))" % BATCH_BUDGET]
        cmd = [sys.executable, *launcher, "serve", "--http-host", "127.0.0.1", "--http-port", "0",
               "--zmq-bind", "tcp://127.0.0.1:*", "--log-level", "info", *args]
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log, preexec_fn=preexec)
        deadline = time.monotonic() + 30
        while True:
            with open(self.log.name) as f:
                m = re.search(r"kvcm serving: http ([\d.]+):(\d+)(?: \(TLS\))?, zmq (\S+)", f.read())
            if m:
                self.port, self.zmq = int(m.group(2)), m.group(3)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log.name) as f:
                    log = f.read()[-2000:]
                self.close()
                raise RuntimeError("kvcm serve did not start: %s" % log)
            time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid

    def cpu_seconds(self, main_thread=False):
        """user + system CPU time of the server process (all threads), or of its main thread
        (the event loop: HTTP, ingest decode and apply)."""
        path = "/proc/%d/task/%d/stat" % (self.pid, self.pid) if main_thread else "/proc/%d/stat" % self.pid
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pin(pid, cpus, main_cpus=None):
    """Sets the CPU affinity of every thread of process pid (0: this process); with
    main_cpus, the main thread's (tid == pid) to main_cpus instead."""
    pid = pid or os.getpid()
    for tid in os.listdir("/proc/%d/task" % pid):
        os.sched_setaffinity(int(tid), main_cpus if main_cpus is not None and int(tid) == pid else cpus)


# ---- a raw-socket keep-alive HTTP client ----------------------------------------------------


def http_request(method, path, body=None):
    """The bytes of one HTTP/1.1 request (keep-alive is HTTP/1.1's default)."""
    if body is None:
        return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (method.encode(), path.encode())
    data = orjson.dumps(body)
    return b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        method.encode(), path.encode(), len(data), data)


HEALTH = http_request("GET", "/health")
METRICS = http_request("GET", "/metrics")
PODS_REQ = http_request("GET", "/v1/pods")


def score_request(model, token_ids=None, prompt=None):
    body = {"model": model}
    if token_ids is not None:
        body["token_ids"] = list(token_ids)
    else:
        body["prompt"] = prompt
    return http_request("POST", "/v1/score", body)


def _response_end(buf):
    """(header end, response end) of the first response in buf, or None if incomplete."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    j = buf.find(b"Content-Length: ", 0, i)
    n = int(buf[j + 16:buf.find(b"\r", j + 16)])
    end = i + 4 + n
    return (i, end) if len(buf) >= end else None


class Client:
    """One keep-alive connection; call() sends a request and reads its whole response."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, request):
        """(status, body)."""
        self.sock.sendall(request)
        buf, recv = self.buf, self.sock.recv
        while True:
            ends = _response_end(buf)
            if ends is not None:
                break
            chunk = recv(1 << 18)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        i, end = ends
        self.buf = buf[end:]
        return int(buf[9:12]), buf[i + 4:end]

    def json(self, request):
        status, body = self.call(request)
        if status != 200:
            raise RuntimeError("HTTP %d: %s" % (status, body[:300]))
        return orjson.loads(body)

    def metrics(self):
        """{name: value} of the unlabelled samples of /metrics."""
        status, body = self.call(METRICS)
        assert status == 200, status
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def close(self):
        self.sock.close()


def wait_until(what, check, timeout, interval=0.005):
    """Calls check() until it returns a true value (returned); RuntimeError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def streams_seen(client):
    """{(pod, model)} of the streams kvcm has seen."""
    return {(p["pod"], p["model"]) for p in client.json(PODS_REQ)["pods"]}


def percentiles(samples):
    s = sorted(samples)
    return s[len(s) // 2], s[len(s) * 99 // 100]


# ---- workloads ------------------------------------------------------------------------------


def stored(hashes, parent, tokens):
    return run.stored_event(hashes, parent, tokens)


def chain_events(tokens, hasher, start_block=0, blocks=None):
    """BlockStored events of 16 blocks (vLLM's hashes) covering tokens[start:start+blocks]
    block-wise: the first with a nil parent when start_block == 0 (auto mode verifies it),
    each later one with its predecessor's last hash."""
    keys = list(hasher.keys(tokens))
    blocks = len(keys) if blocks is None else blocks
    events = []
    for b in range(start_block, blocks, BLOCK):
        e = min(b + BLOCK, blocks)
        events.append(stored(keys[b:e], keys[b - 1] if b else None, tokens[b * BLOCK:e * BLOCK]))
    return events


def random_batches(seed, nbatches, token_lists=16):
    """Pre-encoded batches of EVENTS_PER_BATCH BlockStored events of 16 blocks with 256 token
    ids each; fresh random 64-bit hashes (uniform, like vLLM's), every event's parent set to
    the previous block's hash (so parity mode stores it as is, no verification). Token ids
    come from `token_lists` random lists (uniform over a 152k vocabulary): the decoder reads
    them, their values are not checked when the parent is set."""
    rng = random.Random(seed)
    toks = [run.random_tokens(rng, BLOCK * BLOCK) for _ in range(token_lists)]
    parent, out = rng.getrandbits(64), []
    for b in range(nbatches):
        events = []
        for e in range(EVENTS_PER_BATCH):
            hashes = [rng.getrandbits(64) for _ in range(BLOCK)]
            events.append(stored(hashes, parent, toks[(b * EVENTS_PER_BATCH + e) % token_lists]))
            parent = hashes[-1]
        out.append(msgpack.packb([1.7e9 + b, events, 0]))
    return out


def prefill_payloads(models=((NS, None),), background_per_pod=65_536):
    """The index content of the HTTP benchmarks, as batch payloads: for every (model, tokens)
    a 4096-token query chain (tokens None: random) of which pod i holds the first 16 * (i + 1)
    blocks (so scores differ; pod 15 holds all 256), plus `background_per_pod` random blocks
    per pod of `models[0]` (16 pods x 65,536 = 1 M blocks). Returns ({(pod index, model):
    [payload]}, (block, pod) entries they store, {model: query tokens})."""
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    rng = random.Random(11)
    queries, streams, expected = {}, {}, 0
    for model, tokens in models:
        tokens = list(tokens) if tokens is not None else run.random_tokens(rng, 4096)
        queries[model] = tokens = tokens[:len(tokens) // BLOCK * BLOCK]
        for i in range(PODS):
            n = min(BLOCK * (i + 1), len(tokens) // BLOCK)
            events = chain_events(tokens, hasher, 0, n)
            streams[(i, model)] = [msgpack.packb([1.7e9, events[j:j + EVENTS_PER_BATCH], 0])
                                   for j in range(0, len(events), EVENTS_PER_BATCH)]
            expected += n
    bg_batches = background_per_pod // BATCH_BLOCKS
    for i in range(PODS):
        streams[(i, models[0][0])] += random_batches(1000 + i, bg_batches)
        expected += bg_batches * BATCH_BLOCKS
    return streams, expected, queries


def prefill(server, client, **kw):
    """Publishes prefill_payloads(**kw) through ZMQ, one publisher per stream, and waits
    until kvcm has stored all of it. Returns {model: query tokens}."""
    streams, expected, queries = prefill_payloads(**kw)
    pubs = {}
    try:
        for i, model in streams:
            pubs[(i, model)] = Publisher(server.zmq, topic=topic(i, model))
        connect_publishers(client, pubs)
        base = client.metrics()["kvcm_ingest_blocks_stored_total"]
        for key, pub in pubs.items():
            for p in streams[key]:
                pub.publish_raw(p)
        wait_until("the prefill", lambda: client.metrics()["kvcm_ingest_blocks_stored_total"] - base >= expected,
                   60, 0.05)
    finally:
        for pub in pubs.values():
            pub.close()
    return queries


def connect_publishers(client, pubs, timeout=20):
    """Sends empty batches on every publisher until kvcm lists all their streams (ZMQ's slow
    joiner: a PUB drops what it sends before the SUB's subscription reaches it)."""
    needed = {(pod(i), model) for i, model in pubs}

    def check():
        seen = streams_seen(client)
        for (i, model), p in pubs.items():
            if (pod(i), model) not in seen:
                p.publish_raw(EMPTY_BATCH)
        return needed <= seen
    wait_until("%d publishers to connect" % len(pubs), check, timeout, 0.02)


# ---- publisher processes --------------------------------------------------------------------


def publisher_process(i, endpoint, seed, nbatches, rate, ctl, results, pod_offset=0, cpus=None):
    """One engine: pre-encodes its batches, connects, pokes empty batches until the parent saw
    its stream (ctl["connected"]), then on ctl["go"] sends them all, as fast as it can
    (rate None) or paced at `rate` batches/s while ctl["on"] is set. Waits for ctl["done"]
    before closing (closing drops what is still queued). Every wait is bounded."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    payloads = random_batches(seed, nbatches)
    pub = Publisher(endpoint, topic=topic(i + pod_offset))
    try:
        results.put(("ready", i))
        deadline = time.monotonic() + 120
        while not ctl["connected"].wait(0.02):
            pub.publish_raw(EMPTY_BATCH)
            if time.monotonic() > deadline:
                return
        if not ctl["go"].wait(120):
            return
        t_first = time.perf_counter()
        send = pub.publish_raw
        if rate is None:
            for p in payloads:
                send(p)
        else:
            interval = 1.0 / rate
            k, n = 0, len(payloads)
            while k < n and not ctl["done"].is_set():
                if not ctl["on"].is_set():
                    ctl["on"].wait(0.05)
                    continue
                # a schedule from now on, staggered by publisher so the 16 streams interleave
                base = time.perf_counter() + interval * i / PODS
                j = 0
                while k < n and ctl["on"].is_set():
                    wait = base + j * interval - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    send(payloads[k])
                    k += 1
                    j += 1
        results.put(("sent", i, t_first, time.perf_counter(), k if rate is not None else len(payloads)))
        ctl["done"].wait(120)
    finally:
        pub.close()


class Publishers:
    """PODS publisher processes; `start()` returns once they are encoded and connected."""

    def __init__(self, server, client, seed, nbatches, rate=None, pod_offset=0, cpus=None):
        mp = multiprocessing.get_context("spawn")
        self.ctl = {k: mp.Event() for k in ("connected", "go", "on", "done")}
        self.results = mp.Queue()
        self.client = client
        self.pods = {(pod(i + pod_offset), NS) for i in range(PODS)}
        self.procs = [mp.Process(target=publisher_process, daemon=True,
                                 args=(i, server.zmq, seed * 1000 + i, nbatches, rate, self.ctl, self.results,
                                       pod_offset, cpus))
                      for i in range(PODS)]

    def start(self):
        for p in self.procs:
            p.start()
        ready, deadline = 0, time.monotonic() + 120
        while ready < len(self.procs):
            try:
                msg = self.results.get(timeout=0.5)
                assert msg[0] == "ready", msg
                ready += 1
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError("publisher processes failed to start (exit codes %s)" % dead) from None
        wait_until("the publishers' streams", lambda: self.pods <= streams_seen(self.client),
                   60, 0.02)
        self.ctl["connected"].set()
        time.sleep(0.1)  # let the last pokes land

    def sent(self):
        """[(i, t_first, t_last, batches)] once every publisher has sent everything."""
        return [self.results.get(timeout=120) for _ in self.procs]

    def close(self):
        for k in ("done", "connected", "go"):
            self.ctl[k].set()
        for p in self.procs:
            if p.pid is None:
                continue
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- 1. ingest_zmq --------------------------------------------------------------------------

ZMQ_BATCHES = 1_600  # per publisher: 16 x 1,600 x 128 = 3,276,800 blocks per run
PROBES = 300


def applied_batches(client, streams):
    """Batches kvcm has applied (synchronously, before answering) on the given streams."""
    return sum(p["batches"] for p in client.json(PODS_REQ)["pods"] if (p["pod"], p["model"]) in streams)


def ingest_pass(server, client, seed, pod_offset):
    """blocks/s from the go signal (set just before the first send) until kvcm has applied
    every batch of the PODS publishers (/v1/pods); then /metrics must count every block and
    no gap."""
    with Publishers(server, client, seed, ZMQ_BATCHES, pod_offset=pod_offset) as pubs:
        pubs.start()
        m0 = client.metrics()
        base, expected = m0["kvcm_ingest_blocks_stored_total"], PODS * ZMQ_BATCHES * BATCH_BLOCKS
        batches0 = applied_batches(client, pubs.pods)
        cpu0, main0 = server.cpu_seconds(), server.cpu_seconds(True)
        t0 = time.perf_counter()
        pubs.ctl["go"].set()
        # /v1/pods (~0.1 ms) rather than /metrics (~0.5 ms): polling must not load the loop
        wait_until("all blocks visible",
                   lambda: applied_batches(client, pubs.pods) - batches0 >= PODS * ZMQ_BATCHES, 120, 0.01)
        t1 = time.perf_counter()
        cpu, main = server.cpu_seconds() - cpu0, server.cpu_seconds(True) - main0
        sent = pubs.sent()
        m1 = client.metrics()
        assert m1["kvcm_ingest_blocks_stored_total"] - base == expected, m1
        assert m1["kvcm_ingest_gaps_total"] == m0["kvcm_ingest_gaps_total"], m1
    return {"blocks_per_s": expected / (t1 - t0), "seconds": t1 - t0,
            "send_s": max(s[3] for s in sent) - min(s[2] for s in sent), "server_cpu": cpu / (t1 - t0),
            "main_ns_per_block": main / expected * 1e9,
            "evictions": m1["kvcm_index_evictions_total"] - m0["kvcm_index_evictions_total"]}


def ingest_run(seed):
    """On a fresh server whose capacity is one pass: pass 1 fills the empty index (it grows),
    pass 2 sends as many new blocks into the full index (every block evicts one: the steady
    state; 16 other pods, as the same pods' new publishers would be engine restarts); then
    the publish -> visible probe on the idle server."""
    with Server("--max-blocks", str(PODS * ZMQ_BATCHES * BATCH_BLOCKS)) as server:
        client = Client(server.port)
        fresh = ingest_pass(server, client, 2 * seed, 0)
        full = ingest_pass(server, client, 2 * seed + 1, PODS)  # other pods: no restart
        assert full["evictions"] == PODS * ZMQ_BATCHES * BATCH_BLOCKS, full
        lat = probe_latency(server, client, PROBES)
        client.close()
    return {"fresh": fresh, "full": full, "probe": lat}


_probes = 0


def probe_latency(server, client, n, seconds=None, poll_client=None):
    """Publish -> visible: a probe publisher sends a batch of one BlockStored event with one
    fresh block (16 new random tokens, vLLM's hash, nil parent: verified by rehashing in auto
    mode) to `server` (`client` is its HTTP connection), then this process polls /v1/score by
    those token_ids, back to back on a keep-alive connection (`poll_client`, default `client`:
    another replica of a shared index), until the probe pod is scored; latency = from just
    before the send to the end of the first response that shows it. Resolution: one
    /v1/score round trip (also reported). Stops after n probes or `seconds`."""
    global _probes
    _probes += 1
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    rng = random.Random(_probes)
    probe_pod, model = "probe-%d" % _probes, NS  # a new pod: a new publisher on an old one is a restart
    marker = b'"%s"' % probe_pod.encode()
    poll = poll_client or client
    with Publisher(server.zmq, topic="kv@%s@%s" % (probe_pod, model)) as pub:
        wait_until("the probe stream", lambda: (pub.publish_raw(EMPTY_BATCH), (probe_pod, model) in streams_seen(client))[1],
                   20, 0.02)
        samples, polls, rtts = [], [], []
        deadline = time.monotonic() + (seconds if seconds else 60)
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            tokens = run.random_tokens(rng, BLOCK)
            payload = msgpack.packb([time.time(), [stored(list(hasher.keys(tokens)), None, tokens)], 0])
            req = score_request(model, tokens)
            k = 0
            t0 = pc()
            pub.publish_raw(payload)
            while True:
                t = pc()
                status, body = poll.call(req)
                t1 = pc()
                k += 1
                if marker in body:
                    break
                rtts.append(t1 - t)
                if t1 - t0 > 2e9:
                    raise RuntimeError("probe block not visible after 2 s")
            samples.append(t1 - t0)
            polls.append(k)
            time.sleep(0.002)
    p50, p99 = percentiles(samples)
    return {"p50": p50, "p99": p99, "polls_p50": percentiles(polls)[0],
            "rtt_p50": percentiles(rtts)[0] if rtts else None, "n": len(samples)}


def bench_ingest_zmq(repeats):
    runs = []
    for r in range(repeats):
        la = loadavg()
        res = ingest_run(r + 1)
        res["loadavg"] = la
        runs.append(res)
        print("  run %d: %.2f M blocks/s fresh, %.2f M/s full (evicting), server CPU %.0f%% / %.0f%%, "
              "probe p50 %.0f µs, load %s" % (
                  r + 1, res["fresh"]["blocks_per_s"] / 1e6, res["full"]["blocks_per_s"] / 1e6,
                  res["fresh"]["server_cpu"] * 100, res["full"]["server_cpu"] * 100, res["probe"]["p50"] / 1e3, la),
              flush=True)
    med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
    blocks = PODS * ZMQ_BATCHES * BATCH_BLOCKS
    rows = []
    for key, label in (("fresh", "empty index (growing)"), ("full", "full index (every block evicts)")):
        rows += [
            row("ZMQ -> visible, 16 publishers, %s" % label, med(lambda x: x[key]["blocks_per_s"]), "blocks/s",
                budget=(">=", 1.5e6), note="%d blocks; runs %s M/s" % (
                    blocks, ", ".join("%.2f" % (x[key]["blocks_per_s"] / 1e6) for x in runs))),
            row("  publishers' sending time", med(lambda x: x[key]["send_s"]) * 1e3, "ms",
                note="first send of any to last send of all"),
            row("  server CPU while ingesting", med(lambda x: x[key]["server_cpu"]) * 100, "% of a core",
                note="all threads, /proc/PID/stat"),
            row("  event-loop thread CPU per block", med(lambda x: x[key]["main_ns_per_block"]), "ns",
                note="/proc/PID/task/PID/stat; includes /v1/pods polls every 10 ms"),
        ]
    rows += [
        row("publish -> visible, idle server", med(lambda x: x["probe"]["p50"]) / 1e3, "µs",
            p99=med(lambda x: x["probe"]["p99"]) / 1e3,
            note="%d probes/run; polls p50 %d" % (PROBES, med(lambda x: x["probe"]["polls_p50"]))),
        row("  /v1/score poll round trip (resolution)", med(lambda x: x["probe"]["rtt_p50"] or 0) / 1e3, "µs"),
    ]
    report("ingest_zmq", rows, runs=runs, loadavg_end=loadavg())


# ---- 2. score_while_ingesting ---------------------------------------------------------------

LOAD_RATE = 500_000                  # blocks/s over all publishers (--ingest-rate)
WINDOW_S = 2.5                       # each latency window
CYCLES = 2                           # idle, loaded, idle, loaded per run
SWI_PROBE_S = 1.0                    # publish -> visible probes at the end of each loaded window


def closed_loop(client, req, seconds, max_n=1_000_000):
    """Latencies (ns) of back-to-back requests for `seconds` (at most max_n)."""
    out = []
    call = client.call
    end = pc() + int(seconds * 1e9)
    while len(out) < max_n:
        t0 = pc()
        status, _ = call(req)
        t1 = pc()
        if status != 200:
            raise RuntimeError("HTTP %d" % status)
        out.append(t1 - t0)
        if t1 > end:
            break
    return out


SWI_CONFIGS = {
    # name: (server main thread, server's other threads, this client, publishers) CPUs
    "unpinned": (None, None, None, None),
    # the server's event loop shares core 0 with this client only; its ZMQ I/O thread and
    # the publishers run on core 1: what is left is kvcm's own loop sharing
    "isolated": ({0}, {1}, {0}, {1}),
}


def swi_run(seed, config):
    main_cpus, other_cpus, client_cpus, pub_cpus = SWI_CONFIGS[config]
    rate_batches = LOAD_RATE / BATCH_BLOCKS / PODS
    nbatches = int(rate_batches * CYCLES * (WINDOW_S + SWI_PROBE_S + 2.0))
    saved = os.sched_getaffinity(0)
    with Server() as server:
        client = Client(server.port)
        queries = prefill(server, client)
        req = score_request(NS, queries[NS][:1024])
        assert len(client.json(req)["scores"]) == PODS
        out = {"idle": [], "loaded": [], "rate": [], "probe": []}
        try:
            with Publishers(server, client, seed, nbatches, rate=rate_batches, cpus=pub_cpus) as pubs:
                pubs.start()
                if main_cpus is not None:
                    pin(server.pid, other_cpus, main_cpus)
                    pin(0, client_cpus)
                pubs.ctl["go"].set()
                closed_loop(client, req, 0.3)  # warm-up
                for _ in range(CYCLES):
                    out["idle"].append(percentiles(closed_loop(client, req, WINDOW_S)))
                    b0 = client.metrics()["kvcm_ingest_blocks_stored_total"]
                    pubs.ctl["on"].set()
                    time.sleep(0.3)  # ramp up
                    b1, t1 = client.metrics()["kvcm_ingest_blocks_stored_total"], time.perf_counter()
                    out["loaded"].append(percentiles(closed_loop(client, req, WINDOW_S)))
                    b2, t2 = client.metrics()["kvcm_ingest_blocks_stored_total"], time.perf_counter()
                    out["rate"].append((b2 - b1) / (t2 - t1))
                    out["probe"].append(probe_latency(server, client, 10_000, SWI_PROBE_S))
                    pubs.ctl["on"].clear()
                    time.sleep(0.3)  # drain
                    assert b1 > b0
        finally:
            pin(0, saved)
            client.close()
    return out


def bench_score_while_ingesting(repeats):
    for config in SWI_CONFIGS:
        idle, loaded, rates, probes, las = [], [], [], [], []
        for r in range(repeats):
            las.append(loadavg())
            res = swi_run(100 + r, config)
            idle += res["idle"]
            loaded += res["loaded"]
            rates += res["rate"]
            probes += res["probe"]
            print("  %s run %d: idle p99 %s µs, loaded p99 %s µs at %s k blocks/s, load %s" % (
                config, r + 1, [round(p[1] / 1e3) for p in res["idle"]], [round(p[1] / 1e3) for p in res["loaded"]],
                [round(x / 1e3) for x in res["rate"]], las[-1]), flush=True)
        med = statistics.median
        idle50, idle99 = med(p[0] for p in idle) / 1e3, med(p[1] for p in idle) / 1e3
        load50, load99 = med(p[0] for p in loaded) / 1e3, med(p[1] for p in loaded) / 1e3
        rows = [
            row("/v1/score 1024 tokens, idle", idle50, "µs", p99=idle99,
                note="%d windows of %.1f s" % (len(idle), WINDOW_S)),
            row("/v1/score 1024 tokens, while ingesting", load50, "µs", p99=load99,
                note="ingest %.0f k blocks/s (median)" % (med(rates) / 1e3)),
            row("p99 loaded / p99 idle", load99 / idle99, "x", budget=("<=", 2),
                note="windows: " + ", ".join("%.2f" % (l[1] / i[1]) for i, l in zip(idle, loaded))),
            row("publish -> visible while ingesting", med(p["p50"] for p in probes) / 1e3, "µs",
                p99=med(p["p99"] for p in probes) / 1e3, note="%d probes/window" % med(p["n"] for p in probes)),
        ]
        cpus = dict(zip(("server_main", "server_other", "client", "publishers"),
                        (sorted(c) if c else None for c in SWI_CONFIGS[config])))
        report("score_while_ingesting (%s)" % config, rows, cpus=cpus, loadavg=las,
               loadavg_end=loadavg(), idle=idle, loaded=loaded, rates=rates)


# ---- 3. http_score --------------------------------------------------------------------------

HTTP_ROUNDS, HTTP_BLOCK = 20, 100   # per run: 20 rounds x 100 requests of each case, interleaved


def interleaved(client, cases, rounds=HTTP_ROUNDS, block=HTTP_BLOCK):
    """{case: [ns]}: `rounds` rounds, each `block` back-to-back requests of every case in
    turn, so background load hits every case alike."""
    samples = {name: [] for name in cases}
    call = client.call
    for _ in range(rounds):
        for name, req in cases.items():
            out = samples[name]
            for _ in range(block):
                t0 = pc()
                status, _ = call(req)
                t1 = pc()
                if status != 200:
                    raise RuntimeError("%s: HTTP %d" % (name, status))
                out.append(t1 - t0)
    return samples


def prompt_text(tokenizer, n_tokens):
    """A natural-language prompt of about n_tokens Llama-3.2 tokens (with BOS): licence texts
    from the fixtures, cut at a token boundary."""
    text = "\n\n".join(open(f, encoding="utf-8").read() for f in TEXT_FILES)
    enc = tokenizer.encode(text, add_special_tokens=False)
    return text[:enc.offsets[n_tokens - 2][1]]


def rps(port, req, conns=32, seconds=3.0, warmup=0.5):
    """Requests/s over `conns` keep-alive connections, each with one request in flight, from
    one epoll loop in this process; plus per-request latency p50/p99 and this client's CPU."""
    sel = selectors.EpollSelector()
    socks = []
    try:
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            socks.append(s)
        state = {}
        for s in socks:
            state[s] = [b"", pc()]
            s.send(req)
            sel.register(s, selectors.EVENT_READ)
        t_start = pc()
        t_measure, t_end = t_start + int(warmup * 1e9), t_start + int((warmup + seconds) * 1e9)
        done, lats, cpu0 = 0, [], None
        now = t_start
        while now < t_end:
            events = sel.select(5.0)
            if not events:
                raise RuntimeError("no response for 5 s")
            for key, _ in events:
                s = key.fileobj
                st = state[s]
                data = s.recv(1 << 18)
                if not data:
                    raise ConnectionError("server closed a connection")
                buf = st[0] + data
                ends = _response_end(buf)
                if ends is None:
                    st[0] = buf
                    continue
                now = pc()
                if buf[9:12] != b"200":
                    raise RuntimeError("HTTP %s" % buf[9:12])
                if now >= t_measure:
                    if cpu0 is None:
                        cpu0, t_measure, done = os.times(), now, 0
                    done += 1
                    lats.append(now - st[1])
                st[0] = buf[ends[1]:]
                st[1] = now
                if s.send(req) != len(req):
                    raise RuntimeError("partial send")
        cpu1 = os.times()
        elapsed = (now - t_measure) / 1e9
        p50, p99 = percentiles(lats)
        return {"rps": done / elapsed, "p50": p50, "p99": p99,
                "client_cpu": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed}
    finally:
        sel.close()
        for s in socks:
            s.close()


def score_breakdown(repeats, models):
    """Where /v1/score's time goes, in-process on an Indexer holding the same content (applied
    straight to its EventSink): each step of the handler for token_ids, timed alone."""
    from kvcm.api import Api, _token_ids
    from kvcm.config import load_config
    from kvcm.http import Request, json_response
    from kvcm.indexer import Indexer
    from kvcm.metrics import Metrics
    indexer = Indexer(load_config(["--zmq-bind", ""]))
    streams, expected, queries = prefill_payloads(models=models)
    for (i, model), payloads in streams.items():
        ctx = _core.StreamContext(pod(i), model)
        for p in payloads:
            indexer.sink.apply(ctx, p)
    assert indexer.sink.counters["blocks_stored"] == expected
    metrics = Metrics(indexer)
    handler = Api(indexer, metrics).score
    rows = []
    for n in (1024, 4096):
        ids = queries[NS][:n]
        body = orjson.dumps({"model": NS, "token_ids": ids})
        parsed = orjson.loads(body)
        keys = indexer.keys(NS, ids)
        result = indexer.score_tokens(NS, ids)
        assert len(result["scores"]) == PODS
        request = Request("POST", "/v1/score", headers={"content-type": "application/json"}, body=body)
        steps = (
            ("orjson.loads(body)", lambda: orjson.loads(body)),
            ("api._token_ids (validation)", lambda: _token_ids(parsed)),
            ("keys (hash %d blocks)" % (n // BLOCK), lambda: indexer.keys(NS, ids)),
            ("scorer.score_detailed", lambda: indexer.scorer.score_detailed(indexer.index, NS, keys, None)),
            ("score_tokens (keys + score + result dict)", lambda: indexer.score_tokens(NS, ids)),
            ("json_response(result)", lambda: json_response(200, result)),
            ("metrics.observe_request", lambda: metrics.observe_request("/v1/score", "POST", 200, 1e-4)),
            ("Api.score(request): the whole handler", lambda: handler(request)),
        )
        for name, fn in steps:
            p50, p99 = run.latency_ns(fn, [()], 200, repeats)
            rows.append(row("%d tokens: %s" % (n, name), p50 / 1e3, "µs", p99=p99 / 1e3))
    report("http_score (in-process breakdown of /v1/score by token_ids)", rows, loadavg=loadavg())
    return rows


PROMPT_ROUNDS = 40  # per run: 40 x (one /v1/score by prompt, one of each in-process encode)


def prompt_comparison(client, cases, encoders, rounds=PROMPT_ROUNDS):
    """{name: [ns]} for the prompt requests and the in-process encodes, interleaved one by
    one so that the machine's background load hits them alike."""
    steps = [(name, lambda req=req: client.call(req)) for name, req in cases.items()] + list(encoders.items())
    samples = {name: [] for name, _ in steps}
    for r in range(rounds):
        for name, fn in steps[r % len(steps):] + steps[:r % len(steps)]:  # rotated: no fixed neighbours
            t0 = pc()
            out = fn()
            t1 = pc()
            if name in cases and out[0] != 200:
                raise RuntimeError("%s: HTTP %d" % (name, out[0]))
            samples[name].append(t1 - t0)
    return samples


def bench_http_score(repeats):
    import tokenizers
    from kvcm.tokenize import Tokenizer
    bare = tokenizers.Tokenizer.from_file(LLAMA_DIR + "/tokenizer.json")
    text = prompt_text(bare, 4096)
    llama_ids = bare.encode(text, add_special_tokens=True).ids
    kvcm_tok = Tokenizer(LLAMA_DIR, name=LLAMA)
    assert kvcm_tok.encode(text) == llama_ids
    assert bare.encode_batch_fast([text], add_special_tokens=True)[0].ids == llama_ids
    encoders = {"bare encode()": lambda: bare.encode(text, add_special_tokens=True),
                "bare encode_batch_fast([text])": lambda: bare.encode_batch_fast([text], add_special_tokens=True),
                "kvcm Tokenizer.encode": lambda: kvcm_tok.encode(text)}
    ncpu = os.cpu_count()
    saved_affinity = os.sched_getaffinity(0)
    all_cpus = set(range(ncpu))
    note = "%d tokens, %d chars" % (len(llama_ids), len(text))
    with Server("--tokenizer", "%s=%s" % (LLAMA, LLAMA_DIR)) as server:
        client = Client(server.port)
        queries = prefill(server, client, models=((NS, None), (LLAMA, llama_ids)))
        cases = {"GET /health": HEALTH,
                 "score 1024 token_ids": score_request(NS, queries[NS][:1024]),
                 "score 4096 token_ids": score_request(NS, queries[NS])}
        prompt_cases = {"score prompt ~4k": score_request(LLAMA, prompt=text),
                        "score its %d token_ids" % len(llama_ids): score_request(LLAMA, llama_ids)}
        for name, req in list(cases.items()) + list(prompt_cases.items()):
            got = client.json(req)
            assert name == "GET /health" or len(got["scores"]) == PODS, (name, got)
        configs = [("same core", {0}, {0}), ("different cores", {0}, {1}), ("unpinned", None, None)]
        if ncpu < 2:
            configs = configs[:1]
        try:
            pin(0, {0} if ncpu >= 2 else saved_affinity)
            score_breakdown(repeats, ((NS, None), (LLAMA, llama_ids)))
            for label, server_cpus, client_cpus in configs:
                pin(server.pid, server_cpus or all_cpus)
                pin(0, client_cpus or saved_affinity)
                runs, las = [], []
                for _ in range(repeats):
                    las.append(loadavg())
                    interleaved(client, cases, 2, 50)  # warm-up
                    got = {name: percentiles(v) for name, v in interleaved(client, cases).items()}
                    prompt_comparison(client, prompt_cases, encoders, 3)  # warm-up
                    got.update({name: percentiles(v) for name, v in
                                prompt_comparison(client, prompt_cases, encoders).items()})
                    runs.append(got)
                med = lambda name, k=0: statistics.median(r[name][k] for r in runs) / 1e3  # noqa: E731
                mdiff = lambda a, b: statistics.median(r[a][0] - r[b][0] for r in runs) / 1e3  # noqa: E731
                rows = [row(name, med(name), "µs", p99=med(name, 1)) for name in cases]
                rows.append(row("score 1024 - /health (p50)", mdiff("score 1024 token_ids", "GET /health"), "µs",
                                budget=("<=", 60)))
                rows.append(row("score 4096 - /health (p50)", mdiff("score 4096 token_ids", "GET /health"), "µs"))
                rows += [row(name, med(name), "µs", p99=med(name, 1), note=note if i == 0 else "")
                         for i, name in enumerate(list(prompt_cases) + list(encoders))]
                ids_name = list(prompt_cases)[1]
                rows.append(row("prompt - bare encode() (p50)", mdiff("score prompt ~4k", "bare encode()"), "µs"))
                rows.append(row("prompt - bare encode_batch_fast (p50)",
                                mdiff("score prompt ~4k", "bare encode_batch_fast([text])"), "µs",
                                note="the call kvcm makes (no offsets)"))
                rows.append(row("prompt - (encode_batch_fast + score by its ids) (p50)",
                                statistics.median(r["score prompt ~4k"][0] - r["bare encode_batch_fast([text])"][0]
                                                  - r[ids_name][0] for r in runs) / 1e3, "µs",
                                note="the prompt path's own cost: executor hop, text in JSON"))
                report("http_score (%s)" % label, rows, server_cpus=sorted(server_cpus or all_cpus),
                       client_cpus=sorted(client_cpus or saved_affinity), loadavg=las)
            # throughput: server on core 0, this client on core 1
            split = ncpu >= 2
            pin(server.pid, {0} if split else saved_affinity)
            pin(0, {1} if split else saved_affinity)
            rows, las = [], []
            for name in ("GET /health", "score 1024 token_ids"):
                rs = []
                for _ in range(repeats):
                    las.append(loadavg())
                    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
                    r = rps(server.port, cases[name])
                    r["server_cpu"] = (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
                    rs.append(r)
                med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
                rows.append(row("32 connections: %s" % name, med("rps"), "req/s",
                                note="latency p50 %.0f / p99 %.0f µs; server CPU %.0f%%, client CPU %.0f%%; runs %s" % (
                                    med("p50") / 1e3, med("p99") / 1e3, med("server_cpu") * 100,
                                    med("client_cpu") * 100, ", ".join("%.0f" % r["rps"] for r in rs))))
            report("http_score (throughput, server core 0, client core 1)", rows, loadavg=las)
        finally:
            pin(0, saved_affinity)
            client.close()


QWEN = "Qwen/Qwen3-0.6B"
QWEN_DIR = os.path.join(FIXTURES, "qwen2.5-instruct")
BASELINE = None  # --baseline DIR: a tree of kvcm to compare the chat path against


def chat_request(messages, **options):
    return http_request("POST", "/v1/tokenize", dict(options, model=QWEN, messages=messages))


def bench_chat_path(repeats):
    """A chat request's cost: rendering the model's own template (off the event loop, metered)
    and a request's own template (in a worker process), side by side with --baseline, a tree
    of kvcm before that change (rendered on the loop), request by request in turn."""
    if BASELINE is None:
        raise SystemExit("chat_path needs --baseline DIR (e.g. a `git archive` of the commit before, with "
                         "kvcm/_core*.so copied in)")
    short = [{"role": "system", "content": "You route requests."},
             {"role": "user", "content": "Which pod holds the longest prefix of this conversation? " * 4}]
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "turn %d of a long chat. " % i * 20}
            for i in range(20)]
    cases = {"short chat, model's template": chat_request(short),
             "20-turn chat, model's template": chat_request(long),
             "short chat, request's template": chat_request(short, chat_template=(
                 "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>")),
             "prompt (not a chat), 60 chars": http_request("POST", "/v1/tokenize",
                                                           {"model": QWEN, "prompt": "x " * 30})}
    args = ("--tokenizer", "%s=%s" % (QWEN, QWEN_DIR))
    # the baseline knows no --trust-request-chat-template: it renders any template, on its loop
    with Server(*args, "--trust-request-chat-template") as new, Server(*args, root=BASELINE) as base:
        clients = {"new": Client(new.port), "baseline": Client(base.port)}
        try:
            for name, req in cases.items():
                replies = {side: client.json(req) for side, client in clients.items()}
                if "request's template" not in name:      # the baseline server renders it too
                    assert replies["new"] == replies["baseline"], name
            runs, las = [], []
            for _ in range(repeats):
                las.append(loadavg())
                samples = {(side, name): [] for side in clients for name in cases}
                for _ in range(HTTP_ROUNDS):
                    for name, req in cases.items():
                        for _ in range(HTTP_BLOCK // 2):
                            for side, client in clients.items():      # in turn: the same load on both
                                t0 = pc()
                                status, _ = client.call(req)
                                samples[side, name].append(pc() - t0)
                                assert status == 200, (side, name, status)
                runs.append({key: percentiles(v) for key, v in samples.items()})
            rows = []
            for name in cases:
                med = lambda side, k=0: statistics.median(r[side, name][k] for r in runs) / 1e3  # noqa: E731
                rows.append(row("%s: new" % name, med("new"), "µs", p99=med("new", 1)))
                rows.append(row("%s: baseline" % name, med("baseline"), "µs", p99=med("baseline", 1)))
                rows.append(row("%s: new - baseline (p50)" % name,
                                statistics.median(r["new", name][0] - r["baseline", name][0] for r in runs) / 1e3,
                                "µs"))
            report("chat_path (new vs %s)" % BASELINE, rows, loadavg=las)
        finally:
            for client in clients.values():
                client.close()


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_big_prompts(repeats):
    """Memory of 4 concurrent 8 M-character prompts (`/v1/tokenize`, --max-body 16MiB): RSS
    before, its peak (sampled every 20 ms), and 3 s after the last answer; with --baseline,
    the same against that tree. One run per server (each run is its own server)."""
    import threading
    rng = random.Random(1)
    words = ["routing", "cache", "prefix", "pod", "block", "engine", "score", "token", "alpha", "zeta"]
    text = " ".join(rng.choice(words) for _ in range(1_400_000))[:8_000_000]
    body = http_request("POST", "/v1/tokenize", {"model": QWEN, "prompt": text})
    trees = [("new", ROOT)] + ([("baseline", BASELINE)] if BASELINE else [])
    rows, las = [], []
    for side, root in trees:
        for _ in range(repeats):
            las.append(loadavg())
            with Server("--tokenizer", "%s=%s" % (QWEN, QWEN_DIR), "--max-body", "16MiB", root=root) as server:
                warm = Client(server.port)
                warm.json(http_request("POST", "/v1/tokenize", {"model": QWEN, "prompt": text[:100_000]}))
                warm.close()
                before, peak, done = rss_mib(server.pid), [0.0], threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], rss_mib(server.pid))
                        time.sleep(0.02)
                sampler = threading.Thread(target=sample)
                sampler.start()
                statuses = []

                def one():
                    client = Client(server.port, timeout=600)
                    statuses.append(client.call(body)[0])
                    client.close()
                t0 = time.perf_counter()
                workers = [threading.Thread(target=one) for _ in range(4)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                seconds = time.perf_counter() - t0
                time.sleep(3)
                done.set()
                sampler.join()
                after = rss_mib(server.pid)
            rows.append(row("%s: RSS before / peak / 3 s after" % side, peak[0], "MiB",
                            note="%.0f / %.0f / %.0f MiB; answers %s in %.1f s" % (
                                before, peak[0], after, sorted(statuses), seconds)))
    report("big_prompts", rows, loadavg=las)


# ---- main -----------------------------------------------------------------------------------

def service_source_version():
    """HEAD, with "+dirty" when anything under kvcm/ (the service's Python too) has local changes."""
    try:
        head = subprocess.run(("git", "rev-parse", "--short", "HEAD"), cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(("git", "status", "--porcelain", "--", "kvcm"), cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty (%s)" % ", ".join(line[3:] for line in dirty.splitlines()) if dirty else "")


BENCHMARKS = {"ingest_zmq": bench_ingest_zmq, "score_while_ingesting": bench_score_while_ingesting,
              "http_score": bench_http_score}
EXTRA = {"chat_path": bench_chat_path, "big_prompts": bench_big_prompts}   # run only when named


def main():
    global LOAD_RATE, BATCH_BUDGET, BASELINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (%s); default: all" % ", ".join(BENCHMARKS))
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--ingest-rate", type=int, default=LOAD_RATE, metavar="BLOCKS_PER_S",
                        help="score_while_ingesting's ingest rate (default %d)" % LOAD_RATE)
    parser.add_argument("--baseline", metavar="DIR",
                        help="chat_path: a kvcm source tree (core built) to compare the chat path against")
    parser.add_argument("--batch-budget", type=int, metavar="N",
                        help="experiment: start kvcm with its ingest's batch_budget (messages per loop "
                             "turn, default 256) patched to N")
    args = parser.parse_args()
    LOAD_RATE, BATCH_BUDGET, BASELINE = args.ingest_rate, args.batch_budget, args.baseline
    unknown = set(args.names) - set(BENCHMARKS) - set(EXTRA)
    if unknown:
        parser.error("unknown benchmark(s): %s (choose from %s)" % (", ".join(sorted(unknown)),
                                                                   ", ".join(list(BENCHMARKS) + list(EXTRA))))
    print(json.dumps({"source": service_source_version(), "python": platform.python_version(),
                      "ingest_rate": LOAD_RATE, "batch_budget": BATCH_BUDGET,
                      "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": loadavg(),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
    gc.disable()
    for name in args.names or list(BENCHMARKS):
        dict(BENCHMARKS, **EXTRA)[name](args.repeats)
        gc.collect()


if __name__ == "__main__":
    main()
