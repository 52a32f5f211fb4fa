#!/usr/bin/env python3
"""Soak: kvcm under steady engine ingest, scoring clients and a hostile mix, for minutes.

    python benchmarks/soak.py [--minutes 10] [--ingest-rate 200000] [--clients 8]
                              [--query-rate 800] [--engines 8]

One `kvcm serve` of this tree (Qwen2.5 fixture tokenizer, 127.0.0.1, free ports) and:

- engines: --engines ZMQ publishers. Each first stores 16 resident prompts of 1,024 tokens
  (never removed: what the scorers ask for), then churns: it stores one 64-block prompt per
  batch and removes the prompt stored WINDOW batches earlier, cycling through a fixed set, so
  the index holds a constant number of entries while blocks flow at --ingest-rate stored
  blocks per second (plus as many removed).
- scorers: --clients keep-alive connections asking `POST /v1/score` by token ids of the
  resident prompts on a fixed schedule (--query-rate per second in all, open loop: a late
  answer is charged from when the request was due), in a process of their own:
  --idle-seconds with nothing else running, the whole soak, then --idle-seconds idle again
  (the idle baseline is both idle phases: the machine's own load may drift meanwhile).
  A non-200 answer is an error; every 10 s a few answers are also checked for content.
- hostile mix, from the soak's start: connections that trickle a header one byte a second,
  malformed request heads, oversized heads, invalid JSON, requests with their own chat
  template (refused: kvcm runs without --trust-request-chat-template), unknown paths; and a
  ZMQ publisher of junk: random payloads, truncated batches, ever new topics.

Reported per minute: the server's RSS (its own and with template workers), scoring p50/p99
and errors; at the end the pass criteria of the soak: RSS flat after the first minute
(growth under 2 % or 8 MiB), no error or wrong answer for a well-formed request and every
block an engine sent applied, soak p99 at most 2 x idle p99. Results: benchmarks/RESULTS.md.
"""

import argparse
import multiprocessing
import os
import random
import re
import socket
import sys
import threading
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import orjson  # noqa: E402

from kvcm._core import BlockHasher  # noqa: E402
from kvcm.bench.load import Connection, HttpError, open_loop, request_bytes  # noqa: E402
from kvcm.bench.targets import NativeApi, TargetSpec, start_kvcm, tree_rss_bytes  # noqa: E402
from kvcm.bench.workload import random_tokens  # noqa: E402
from kvcm.publisher import Publisher, block_removed, block_stored, encode_batch  # noqa: E402
from run import NS as QWEN, QWEN_DIR, loadavg, report, row  # noqa: E402

BS = 16
PROMPT_BLOCKS = 64               # one churned prompt: 1,024 tokens, 4 events of 16 blocks
RESIDENT = 16                    # resident prompts per engine
CYCLE = 1024                     # churned prompts per engine, stored in turn
WINDOW = 512                     # of which this many are held at any time
CHUNK_S = 60.0                   # one row of the per-minute table
SAMPLE_S = 5.0


def mib(b):
    return b / 2 ** 20


def rss_pair(pid):
    """(RSS of the server process, RSS with its children: the template workers)."""
    with open("/proc/%d/status" % pid) as f:
        own = int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1)) * 1024
    return own, tree_rss_bytes(pid)


# ---- engines --------------------------------------------------------------------------------

class Engine:
    """One engine's resident prompts and its churn cycle, pre-encoded."""

    def __init__(self, hasher, rng):
        self.resident = [random_tokens(rng, PROMPT_BLOCKS * BS) for _ in range(RESIDENT)]
        self.resident_payloads = [self._stored(hasher, t) for t in self.resident]
        self.stores, self.removes = [], []
        for _ in range(CYCLE):
            tokens = random_tokens(rng, PROMPT_BLOCKS * BS)
            keys = list(hasher.keys(tokens))
            self.stores.append(self._stored(hasher, tokens, keys))
            self.removes.append(encode_batch([block_removed(keys)], ts=1.7e9))

    @staticmethod
    def _stored(hasher, tokens, keys=None):
        keys = keys if keys is not None else list(hasher.keys(tokens))
        events = [block_stored(keys[i:i + 16], keys[i - 1] if i else None, tokens[i * BS:(i + 16) * BS], BS)
                  for i in range(0, PROMPT_BLOCKS, 16)]
        return encode_batch(events, ts=1.7e9)


class Ingest(threading.Thread):
    """Publishes every engine's churn, engines in turn, at `rate` stored blocks per second."""

    def __init__(self, engines, pubs, rate):
        super().__init__(daemon=True)
        self.engines, self.pubs, self.rate = engines, pubs, rate
        self.stop = threading.Event()
        self.stored = 0
        self.error = None

    def run(self):
        try:
            t0, due, i = time.perf_counter(), 0.0, 0
            while not self.stop.is_set():
                k = i % CYCLE
                for engine, pub in zip(self.engines, self.pubs):
                    pub.publish_raw(engine.stores[k])
                    pub.publish_raw(engine.removes[(k - WINDOW) % CYCLE])
                    self.stored += PROMPT_BLOCKS
                    due += PROMPT_BLOCKS / self.rate
                i += 1
                wait = t0 + due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
        except BaseException as exc:   # reported by the main thread
            self.error = exc


def prime(engines, pubs):
    """Resident prompts, then the window that the first removals of the cycle expect."""
    for engine, pub in zip(engines, pubs):
        for payload in engine.resident_payloads:
            pub.publish_raw(payload)
        for k in range(CYCLE - WINDOW, CYCLE):
            pub.publish_raw(engine.stores[k])
    return len(engines) * (RESIDENT + WINDOW) * PROMPT_BLOCKS


# ---- scorers (a process of their own) -------------------------------------------------------

def scorer_main(conn, address, requests, rate, clients, idle_s, soak_s):
    """Waits for "idle", sends ("idle", summary) after the idle phase, waits for "go", then
    sends one ("chunk", summary) per minute of the soak and ("done", None); then waits for
    "idle" again and sends the second idle phase's ("idle", summary)."""
    def phase(seconds):
        lat, errors, end = array("q"), [], time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0.5:
                return lat, errors
            try:
                lat.extend(open_loop(address, requests, int(rate * left), rate, clients))
            except (HttpError, OSError) as exc:
                errors.append(str(exc)[:200])

    conn.recv()
    conn.send(("idle", phase(idle_s)))
    conn.recv()
    t_end = time.monotonic() + soak_s
    while time.monotonic() < t_end - 0.5:
        conn.send(("chunk", phase(min(CHUNK_S, t_end - time.monotonic()))))
    conn.send(("done", None))
    conn.recv()
    conn.send(("idle", phase(idle_s)))


# ---- hostile mix ----------------------------------------------------------------------------

def hostile_requests(host):
    score = b"POST /v1/score HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % host
    template = orjson.dumps({"model": QWEN, "messages": [{"role": "user", "content": "hi"}],
                             "chat_template": "{% for m in messages %}{{ m.content * 1000000 }}{% endfor %}"})
    wrong_ids = orjson.dumps({"model": QWEN, "token_ids": [-1, "a", 2]})
    return {
        "malformed request line": b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n",
        "oversized head": b"GET /health HTTP/1.1\r\nHost: %s\r\nX-Pad: %s\r\n\r\n" % (host, b"a" * 200_000),
        "invalid JSON": score + b"Content-Length: 9\r\n\r\n{\"model\":",
        "refused template": score + b"Content-Length: %d\r\n\r\n%s" % (len(template), template),
        "wrong token ids": score + b"Content-Length: %d\r\n\r\n%s" % (len(wrong_ids), wrong_ids),
        "unknown path": b"GET /%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (b"x" * 300, host),
        "no Host": b"GET /health HTTP/1.1\r\n\r\n",
    }


class Hostile(threading.Thread):
    """Slow connections, junk requests and junk ZMQ frames, until stopped. Counts what each
    got back; "no answer" is a request kvcm neither answered nor closed within 15 s."""

    SLOW = 16

    def __init__(self, address, zmq_endpoint, kinds):
        super().__init__(daemon=True)
        self.address, self.kinds = address, kinds
        self.stop = threading.Event()
        self.outcomes = {}
        self.slow_closed = 0
        self.zmq_frames = 0
        self.pub = Publisher(zmq_endpoint, topic="kv@junk@m", hwm=10_000, replay_thread=False)
        self.rng = random.Random("soak hostile")
        self.error = None

    def _count(self, key):
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def _ask(self, name, data):
        try:
            with socket.create_connection(self.address, timeout=15) as s:
                s.sendall(data)
                head = s.recv(64)
            m = re.match(rb"HTTP/1\.1 (\d)", head)
            self._count("%s: %s" % (name, "%sxx" % m.group(1).decode() if m else "closed"))
        except socket.timeout:
            self._count("%s: no answer" % name)
        except OSError:
            self._count("%s: closed" % name)

    def _trickle(self, slow):
        """Keeps SLOW connections sending a header one byte per round; replaces closed ones."""
        for i, s in enumerate(slow):
            try:
                if s is None:
                    s = socket.create_connection(self.address, timeout=5)
                    s.sendall(b"POST /v1/score HTTP/1.1\r\nX-Slow: ")
                    slow[i] = s
                else:
                    s.sendall(b"a")
            except OSError:
                self.slow_closed += 1
                if s is not None:
                    s.close()
                slow[i] = None

    def _junk_frames(self, n):
        rng = self.rng
        good = encode_batch([block_stored([1, 2], None, list(range(32)), BS)])
        for _ in range(n):
            kind = rng.randrange(3)
            if kind == 0:
                frames = [b"kv@junk-%d@m" % rng.getrandbits(32), b"\0" * 8, rng.randbytes(rng.randrange(1, 300))]
            elif kind == 1:
                frames = [b"kv@junk@m", rng.getrandbits(64).to_bytes(8, "big"), good[:rng.randrange(1, len(good))]]
            else:
                frames = [b"not-a-kv-topic", b"\0" * 3, good]
            self.pub.send_frames(frames)
            self.zmq_frames += 1

    def run(self):
        slow = [None] * self.SLOW
        cases = list(hostile_requests(b"%s:%d" % (self.address[0].encode(), self.address[1])).items())
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                if "slow" in self.kinds:
                    self._trickle(slow)
                for name, data in cases:
                    if name in self.kinds or "http" in self.kinds:
                        self._ask(name, data)
                if "zmq" in self.kinds:
                    self._junk_frames(100)
                self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))
        except BaseException as exc:   # reported by the main thread
            self.error = exc
        finally:
            for s in slow:
                if s is not None:
                    s.close()
            self.pub.close()


# ---- the run --------------------------------------------------------------------------------

def call(address, request):
    """One request on a connection of its own: kvcm closes keep-alive connections idle for
    longer than its idle timeout, and these calls are minutes apart."""
    with Connection(address) as conn:
        return conn.call(request)


def metrics(address):
    status, body = call(address, request_bytes("GET", "/metrics"))
    if status != 200:
        raise RuntimeError("GET /metrics: HTTP %d" % status)
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def check_answers(address, api, engines, rng, n=8):
    """How many of n resident prompts do not come back as fully held by their engine."""
    wrong = 0
    for _ in range(n):
        e = rng.randrange(len(engines))
        tokens = rng.choice(engines[e].resident)
        status, body = call(address, request_bytes("POST", "/v1/score", orjson.dumps({"model": QWEN, "token_ids": tokens})))
        if status != 200 or api.matched(body).get(e) != len(tokens):
            wrong += 1
    return wrong


def percentiles_us(lat):
    s = sorted(lat)
    if not s:
        return None, None
    return s[len(s) // 2] / 1e3, s[min(len(s) - 1, len(s) * 99 // 100)] / 1e3


def soak(args):
    rng = random.Random("soak")
    hasher = BlockHasher("sha256", None, BS)
    t = time.monotonic()
    engines = [Engine(hasher, rng) for _ in range(args.engines)]
    print("built %d engines' batches in %.1f s" % (len(engines), time.monotonic() - t), flush=True)
    api = NativeApi(QWEN, BS)
    queries = [request_bytes("POST", "/v1/score", orjson.dumps({"model": QWEN, "token_ids": toks}))
               for e in engines for toks in e.resident]
    rng.shuffle(queries)

    ours, theirs = multiprocessing.Pipe()
    spec = TargetSpec("kvcm", api, start=lambda s: start_kvcm(s, ["--tokenizer", "%s=%s" % (QWEN, QWEN_DIR)]))
    target = spec.start()
    pid = target.process.pid
    # the scorers fork before this process has threads or ZMQ sockets
    scorer = multiprocessing.get_context("fork").Process(
        target=scorer_main, args=(theirs, target.address, queries, args.query_rate, args.clients,
                                  args.idle_seconds, args.minutes * 60), daemon=True)
    scorer.start()
    try:
        pubs = [Publisher(target.zmq, topic=api.topic(i), hwm=1_000_000, replay_thread=False)
                for i in range(len(engines))]
        address = target.address
        deadline = time.monotonic() + 60
        expected = prime(engines, pubs)
        while metrics(address).get("kvcm_ingest_blocks_stored_total", 0) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError("the primed blocks never all arrived (slow joiners?)")
            prime(engines, pubs)   # the first sends may precede the subscription
            time.sleep(1)
        wrong = check_answers(address, api, engines, rng, 64)
        if wrong:
            raise RuntimeError("%d of 64 resident prompts not fully held after priming" % wrong)
        base = metrics(address)
        ours.send("idle")
        rss_idle = []
        t_idle = time.monotonic()
        while not ours.poll(SAMPLE_S):
            rss_idle.append(rss_pair(pid))
        _, (idle_lat, idle_errors) = ours.recv()
        print("idle: %d requests, p50/p99 %s µs, %d errors, %.0f s" % (
            len(idle_lat), percentiles_us(idle_lat), len(idle_errors), time.monotonic() - t_idle), flush=True)

        ingest = Ingest(engines, pubs, args.ingest_rate)
        hostile = Hostile(target.address, target.zmq, set(args.hostile.split(",")))
        ingest.start()
        hostile.start()
        ours.send("go")
        t0 = time.monotonic()
        minutes, samples, wrong = [], [], 0
        while True:
            if ours.poll(SAMPLE_S):
                kind, payload = ours.recv()
                if kind == "done":
                    break
                lat, errors = payload
                rss = [s for s in samples if s[0] > t0 + CHUNK_S * len(minutes)]
                wrong_now = check_answers(address, api, engines, rng)
                wrong += wrong_now
                minutes.append({"lat": lat, "errors": errors, "wrong": wrong_now, "rss": rss,
                                "load": loadavg(), "stored": ingest.stored})
                p50, p99 = percentiles_us(lat)
                print("minute %d: p50 %.0f p99 %.0f µs, %d errors, RSS %.1f MiB, load %s" % (
                    len(minutes), p50 or 0, p99 or 0, len(errors), mib(rss[-1][1]) if rss else 0,
                    loadavg()), flush=True)
            samples.append((time.monotonic(), *rss_pair(pid)))
            for th in (ingest, hostile):
                if th.error is not None:
                    raise th.error
        seconds = time.monotonic() - t0
        ingest.stop.set()
        hostile.stop.set()
        ingest.join()
        hostile.join()
        sent = ingest.stored
        deadline = time.monotonic() + 120
        while True:   # the backlog drains; every sent block must be applied
            end = metrics(address)
            applied = end.get("kvcm_ingest_blocks_stored_total", 0) - base.get("kvcm_ingest_blocks_stored_total", 0)
            if applied >= sent or time.monotonic() > deadline:
                break
            time.sleep(1)
        wrong += check_answers(address, api, engines, rng, 64)
        ours.send("idle")   # the idle baseline again: the machine's load may have changed meanwhile
        _, (idle2_lat, idle2_errors) = ours.recv()
        idle_lat.extend(idle2_lat)
        idle_errors += idle2_errors
        for p in pubs:
            p.close()
        return summarize(args, idle_lat, idle_errors, rss_idle, minutes, samples, seconds, sent, applied,
                         wrong, hostile, base, end)
    finally:
        scorer.kill()
        target.close()


def summarize(args, idle_lat, idle_errors, rss_idle, minutes, samples, seconds, sent, applied, wrong,
              hostile, base, end):
    rows = []
    idle_p50, idle_p99 = percentiles_us(idle_lat)
    rows.append(row("idle: score p50 (p99)", idle_p50, "µs", p99=idle_p99,
                    note="%d requests before and after the soak, %d errors" % (len(idle_lat), len(idle_errors))))
    rows.append(row("idle: RSS", mib(rss_idle[-1][0]) if rss_idle else 0, "MiB"))
    for i, m in enumerate(minutes):
        p50, p99 = percentiles_us(m["lat"])
        rss = m["rss"][-1] if m["rss"] else (0, 0, 0)
        rows.append(row("minute %d: score p50 (p99)" % (i + 1), p50, "µs", p99=p99,
                        note="%d req, %d errors, %d wrong; RSS %.1f MiB (with workers %.1f); load %s" % (
                            len(m["lat"]), len(m["errors"]), m["wrong"], mib(rss[1]), mib(rss[2]), m["load"])))
    all_lat = array("q")
    for m in minutes:
        all_lat.extend(m["lat"])
    p50, p99 = percentiles_us(all_lat)
    rows.append(row("soak: score p50 (p99)", p50, "µs", p99=p99,
                    budget=None, note="%d requests over %.0f s" % (len(all_lat), seconds)))
    ratio = p99 / idle_p99 if p99 and idle_p99 else float("inf")
    rows.append(row("soak p99 / idle p99", ratio, "x", budget=("<=", 2.0)))
    after = [s for s in samples if s[0] >= samples[0][0] + CHUNK_S] or samples
    warm = after[0][1]
    growth = max(s[1] for s in after) - warm
    rows.append(row("RSS growth after the first minute", mib(growth), "MiB",
                    budget=("<=", max(8.0, mib(warm) * 0.02)),
                    note="from %.1f to %.1f MiB (max %.1f)" % (mib(warm), mib(after[-1][1]),
                                                              mib(max(s[1] for s in after)))))
    errors = sum(len(m["errors"]) for m in minutes)
    rows.append(row("errors + wrong answers (well-formed requests)", errors + wrong, "", budget=("<=", 0),
                    note="%d errors, %d wrong; first: %s" % (errors, wrong, next(
                        (m["errors"][0] for m in minutes if m["errors"]), "-"))))
    rows.append(row("engine blocks sent - applied", sent - applied, "blocks", budget=("<=", 0),
                    note="%d stored blocks sent, %.0f k/s" % (sent, sent / seconds / 1e3)))

    def delta(prefix):
        return {k[len(prefix):]: v - base.get(k, 0) for k, v in end.items() if k.startswith(prefix) and v != base.get(k, 0)}
    rows.append(row("hostile: HTTP outcomes", sum(hostile.outcomes.values()), "requests",
                    note="; ".join("%s %d" % kv for kv in sorted(hostile.outcomes.items()))))
    rows.append(row("hostile: slow connections closed by kvcm", hostile.slow_closed, ""))
    rows.append(row("hostile: junk ZMQ frames sent", hostile.zmq_frames, "",
                    note="kvcm drops: %s" % {**delta("kvcm_ingest_message_drops_total"),
                                             **delta("kvcm_ingest_event_drops_total")}))
    no_answer = sum(v for k, v in hostile.outcomes.items() if k.endswith("no answer"))
    rows.append(row("hostile requests left unanswered", no_answer, "", budget=("<=", 0)))
    report("soak (%d min, %d blocks/s, %d clients at %d/s)" % (args.minutes, args.ingest_rate, args.clients,
                                                               args.query_rate), rows)
    return all(r.get("met", True) for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--ingest-rate", type=int, default=200_000, help="stored blocks per second")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--query-rate", type=int, default=800, help="score requests per second, all clients")
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--hostile", default="slow,http,zmq",
                    help="which hostile parts: slow, http (or one request's name), zmq; none: ''")
    args = ap.parse_args()
    return 0 if soak(args) else 1


if __name__ == "__main__":
    sys.exit(main())
