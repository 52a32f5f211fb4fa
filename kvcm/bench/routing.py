"""`kvcm bench routing`: what precise KV-aware routing buys over simpler policies.

K `kvcm sim` engines (or running vLLM-compatible engines given by URL) publish their KV
events to one kvcm. A multi-turn, multi-tenant chat is replayed through a small built-in
router once per policy, open loop at a set request rate: request i is due at i / rate, and a
user's next turn waits for the answer to the previous one, as a person would. Between
policies every engine's prefix cache is reset (and kvcm sees it), so each starts cold.

Policies:
- `kvcm`: asks kvcm's `/v1/score` for the prompt's token ids; the engine caching the longest
  prefix wins (ties: the least loaded);
- `random`, `round-robin`;
- `least-loaded`: fewest requests in flight from this router;
- `prefix-hash`: a hash of the prompt text's first characters picks the engine (approximate
  affinity without an index).

Per policy: prefix-cache hit rate (sum of the engines' usage `cached_tokens` over the sum of
`prompt_tokens`), TTFT and end-to-end latency p50/p99 (from the send; the wait for a user's
previous turn is not counted), throughput, and load imbalance (most requests on one engine
over the mean). Prompts are tokenized here with the simulator's word tokenizer (the one
`kvcm sim` uses without --tokenizer), so kvcm is asked by token ids.
"""

import concurrent.futures
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shlex
import threading
import time

from kvcm import __version__
from kvcm.bench.stats import Latency, Spread, fmt
from kvcm.bench.summary import table
from kvcm.bench.targets import Process, TargetError, kvcm_command
from kvcm.sim.text import WordTokenizer

POLICIES = ("kvcm", "random", "round-robin", "least-loaded", "prefix-hash")
MODEL = "bench/chat"
REQUEST_TIMEOUT_S = 60.0


def add_arguments(p):
    g = p.add_argument_group("engines")
    g.add_argument("--engines", type=int, default=4, help="kvcm sim engines to start (default: %(default)s)")
    g.add_argument("--engine-url", action="append", default=[], metavar="[POD=]URL",
                   help="use a running vLLM-compatible engine instead (repeatable; POD defaults to host:port, "
                        "the pod its KV events name); needs --kvcm-url")
    g.add_argument("--kvcm-url", help="a running kvcm the engines publish to (default: bench starts one)")
    g.add_argument("--kv-cache-size", type=int, default=256, help="KV blocks per started engine (default: %(default)s)")
    g.add_argument("--prefill-time-per-token", default="0.2ms",
                   help="simulated prefill time per uncached token (default: %(default)s)")
    g.add_argument("--inter-token-latency", default="1ms", help="simulated time per output token (default: %(default)s)")
    g = p.add_argument_group("workload")
    g.add_argument("--policies", default=",".join(POLICIES), help="policies to compare (default: all)")
    g.add_argument("--requests", type=int, default=200, help="requests per policy (default: %(default)s)")
    g.add_argument("--rate", type=float, default=20.0, help="requests/s, open loop (default: %(default)s)")
    g.add_argument("--users", type=int, default=16, help="conversations in flight (default: %(default)s)")
    g.add_argument("--turns", type=int, default=4, help="turns per conversation (default: %(default)s)")
    g.add_argument("--system-prompts", type=int, default=4, help="shared system prompts (default: %(default)s)")
    g.add_argument("--system-words", type=int, default=200, help="words per system prompt (default: %(default)s)")
    g.add_argument("--message-words", type=int, default=40, help="words per user message (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (default: %(default)s)")
    g.add_argument("--prefix-hash-chars", type=int, default=256,
                   help="prompt characters the prefix-hash policy hashes (default: %(default)s)")


# ---- the workload ---------------------------------------------------------------------------

class Turn:
    __slots__ = ("user", "turn", "prompt", "tokens", "previous")

    def __init__(self, user, turn, prompt, tokens, previous):
        self.user, self.turn, self.prompt, self.tokens, self.previous = user, turn, prompt, tokens, previous


def chat_workload(args, seed):
    """The requests, in order: users start with one of the shared system prompts and come
    back turn after turn with the history so far (their messages and a fixed reply each),
    `args.users` conversations at a time, interleaved."""
    rng = random.Random("routing %d" % seed)
    tokenizer = WordTokenizer()

    def words(n, tag):
        return " ".join("%s%x" % (tag, rng.getrandbits(16)) for _ in range(n))
    systems = [words(args.system_words, "s%d_" % i) for i in range(args.system_prompts)] or [""]
    out, users, next_user = [], [], 0
    while len(out) < args.requests:
        while len(users) < args.users:
            users.append({"id": next_user, "history": rng.choice(systems) + "\n", "turn": 0, "last": None})
            next_user += 1
        u = users[len(out) % len(users)]
        prompt = u["history"] + "user: " + words(args.message_words, "u") + "\nassistant:"
        turn = Turn(u["id"], u["turn"], prompt, tokenizer.encode(prompt), u["last"])
        out.append(turn)
        u["history"] = prompt + " " + words(args.max_tokens, "a") + "\n"
        u["turn"] += 1
        u["last"] = len(out) - 1
        if u["turn"] >= args.turns:
            users.remove(u)
    return out


# ---- the cluster ----------------------------------------------------------------------------

class Cluster:
    """kvcm and the engines: started here, or given by URL."""

    def __init__(self, args, usage_error):
        self.procs = []
        self.engines = {}          # pod -> (host, port)
        try:
            self._start(args, usage_error)
        except BaseException:
            self.close()
            raise

    def _start(self, args, usage_error):
        if args.engine_url and not args.kvcm_url:
            raise usage_error("--engine-url needs --kvcm-url (the kvcm the engines publish to)")
        if args.kvcm_url:
            self.kvcm = _address(args.kvcm_url, usage_error)
        else:
            serve = Process(kvcm_command("serve", "--http-host", "127.0.0.1", "--http-port", 0,
                                         "--zmq-bind", "tcp://127.0.0.1:*", "--log-level", "info"))
            self.procs.append(serve)
            pattern = re.compile(r"kvcm serving: http ([\d.]+):(\d+), zmq (\S+)")
            m = serve.wait_for("kvcm serve", lambda: pattern.search(serve.log_text()))
            self.kvcm, zmq = (m.group(1), int(m.group(2))), m.group(3)
        for spec in args.engine_url:
            pod, _, url = spec.rpartition("=")
            address = _address(url, usage_error)
            self.engines[pod or "%s:%d" % address] = address
        if args.engine_url:
            return
        pattern = re.compile(r"rank 0: http ([\d.]+):(\d+), pod (\S+?),")
        sims = []
        for i in range(args.engines):
            sims.append(Process(kvcm_command(
                "sim", "--host", "127.0.0.1", "--port", 0, "--model", MODEL, "--seed", i,
                "--zmq-endpoint", zmq, "--kv-cache-size", args.kv_cache_size, "--prefill-overhead", "2ms",
                "--prefill-time-per-token", args.prefill_time_per_token,
                "--inter-token-latency", args.inter_token_latency, "--max-num-seqs", "8",
                "--max-model-len", 32768, "--log-level", "info")))
            self.procs.append(sims[-1])
        for sim in sims:
            m = sim.wait_for("kvcm sim", lambda sim=sim: pattern.search(sim.log_text()))
            self.engines[m.group(3)] = (m.group(1), int(m.group(2)))

    def streams(self):
        return _json_call(self.kvcm, "GET", "/v1/pods")["pods"]

    def reset(self):
        """Empties every engine's prefix cache and waits until kvcm has seen it (which also
        proves each engine's events reach kvcm)."""
        deadline = time.monotonic() + 60
        while True:
            for address in self.engines.values():
                _call(address, "POST", "/reset_prefix_cache", {})
            held = {s["pod"]: sum(s["blocks"].values()) for s in self.streams()}
            if all(held.get(pod) == 0 for pod in self.engines):
                return
            if time.monotonic() > deadline:
                raise TargetError("kvcm never saw every engine's cache reset (pods it knows: %s)" % sorted(held))
            time.sleep(0.05)

    def close(self):
        for proc in reversed(self.procs):
            proc.close()


def _address(url, usage_error):
    from kvcm.bench.load import split_address
    try:
        return split_address(url)
    except ValueError as exc:
        raise usage_error(str(exc)) from None


def _call(address, method, path, body=None, timeout=REQUEST_TIMEOUT_S):
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _json_call(address, method, path, body=None):
    status, data = _call(address, method, path, body)
    if status != 200:
        raise TargetError("%s %s answered %d: %s" % (method, path, status, data[:200]))
    return json.loads(data)


def stream_completion(address, prompt, max_tokens):
    """One streamed completion: (seconds to the first token, seconds to the end, usage)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(*address, timeout=REQUEST_TIMEOUT_S)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise TargetError("an engine answered %d: %s" % (response.status, response.read()[:200]))
        first, usage = None, None
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
        if usage is None:
            raise TargetError("an engine's stream ended without usage")
        end = time.perf_counter() - start
        return (first if first is not None else end), end, usage
    finally:
        conn.close()


# ---- the router -----------------------------------------------------------------------------

class Router:
    def __init__(self, policy, cluster, args, seed):
        self.policy, self.cluster, self.args = policy, cluster, args
        self.pods = sorted(cluster.engines)
        self.rng = random.Random("router %s %d" % (policy, seed))
        self.lock = threading.Lock()
        self.in_flight = dict.fromkeys(self.pods, 0)
        self.count = dict.fromkeys(self.pods, 0)
        self.next = 0

    def _least_loaded(self, pods):
        low = min(self.in_flight[p] for p in pods)
        return self.rng.choice([p for p in pods if self.in_flight[p] == low])

    def choose(self, turn):
        """(pod, seconds the decision took)."""
        t0 = time.perf_counter()
        scores = None
        if self.policy == "kvcm":
            status, data = _call(self.cluster.kvcm, "POST", "/v1/score", {"model": MODEL, "token_ids": turn.tokens})
            scores = json.loads(data).get("scores") if status == 200 else None
        with self.lock:
            if self.policy == "kvcm" and scores:
                best = max(scores.get(p, 0) for p in self.pods)
                pod = self._least_loaded([p for p in self.pods if scores.get(p, 0) == best])
            elif self.policy in ("kvcm", "least-loaded"):
                pod = self._least_loaded(self.pods)
            elif self.policy == "random":
                pod = self.rng.choice(self.pods)
            elif self.policy == "round-robin":
                pod = self.pods[self.next % len(self.pods)]
                self.next += 1
            else:
                digest = hashlib.sha256(turn.prompt[:self.args.prefix_hash_chars].encode()).digest()
                pod = self.pods[int.from_bytes(digest[:8], "big") % len(self.pods)]
            self.in_flight[pod] += 1
            self.count[pod] += 1
        return pod, time.perf_counter() - t0

    def done(self, pod):
        with self.lock:
            self.in_flight[pod] -= 1


def replay(cluster, router, turns, args):
    """Sends every turn at its due time (open loop), each after its user's previous turn."""
    results = [None] * len(turns)
    finished = [threading.Event() for _ in turns]

    def one(i, turn):
        try:
            if turn.previous is not None and not finished[turn.previous].wait(REQUEST_TIMEOUT_S):
                raise TargetError("a previous turn never finished")
            pod, decide = router.choose(turn)
            try:
                ttft, e2e, usage = stream_completion(cluster.engines[pod], turn.prompt, args.max_tokens)
            finally:
                router.done(pod)
            results[i] = {"pod": pod, "ttft": ttft, "e2e": e2e, "decide": decide, "end": time.perf_counter(),
                          "prompt": usage["prompt_tokens"],
                          "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}
        finally:
            finished[i].set()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(256, len(turns))) as pool:
        futures = []
        for i, turn in enumerate(turns):
            wait = t0 + i / args.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(one, i, turn))
        for f in futures:
            f.result()
    return results, t0


def measure(results, t0, router):
    ok = [r for r in results if r is not None]
    prompt = sum(r["prompt"] for r in ok)
    per_pod = list(router.count.values())
    mean = sum(per_pod) / len(per_pod)
    ttft = Latency(int(r["ttft"] * 1e9) for r in ok)
    e2e = Latency(int(r["e2e"] * 1e9) for r in ok)
    decide = Latency(int(r["decide"] * 1e9) for r in ok)
    return {"requests": len(ok), "hit_rate": sum(r["cached"] for r in ok) / prompt if prompt else 0.0,
            "ttft": ttft, "e2e": e2e, "decide": decide,
            "throughput_rps": len(ok) / (max(r["end"] for r in ok) - t0),
            "imbalance": max(per_pod) / mean if mean else None, "per_engine": dict(router.count)}


def run(args, usage_error):
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise usage_error("--policies: unknown %s (choose from %s)" % (", ".join(unknown) or "''", ", ".join(POLICIES)))
    for name in ("engines", "requests", "users", "turns", "max_tokens"):
        if getattr(args, name) < 1:
            raise usage_error("--%s must be positive" % name.replace("_", "-"))
    if args.rate <= 0:
        raise usage_error("--rate must be positive")
    from kvcm.bench.progress import Progress

    turns = chat_workload(args, args.seed)
    started = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    progress = Progress(args.repeats * len(policies) + 1, args.quiet)
    runs = {p: [] for p in policies}
    try:
        progress.step("starting kvcm and %d engines" % (len(args.engine_url) or args.engines))
        cluster = Cluster(args, usage_error)
        try:
            for r in range(args.repeats):
                order = policies[r % len(policies):] + policies[:r % len(policies)]
                for policy in order:
                    progress.step("%s, run %d" % (policy, r + 1))
                    cluster.reset()
                    router = Router(policy, cluster, args, args.seed + r)
                    m = measure(*replay(cluster, router, turns, args), router)
                    runs[policy].append(m)
                    progress.note("  %-13s hit rate %5.1f%%, TTFT p50 %s ms, p99 %s ms" % (
                        policy, 100 * m["hit_rate"], fmt(m["ttft"].percentile_us(50) / 1e3),
                        fmt(m["ttft"].percentile_us(99) / 1e3)))
        finally:
            cluster.close()
    finally:
        progress.close()
    return summarize(args, policies, runs, started, len(cluster.engines))


def summarize(args, policies, runs, started, engines):
    out = {}
    plots = {}
    for p in policies:
        ms = runs[p]
        ttft = Latency()
        for m in ms:
            ttft.merge(m["ttft"])
        plots[p] = ttft.cdf_us()

        def ms_spread(key, q):
            return Spread([m[key].percentile_us(q) / 1e3 for m in ms])
        out[p] = {"requests": sum(m["requests"] for m in ms), "hit_rate": Spread([m["hit_rate"] for m in ms]).median,
                  "hit_rate_runs": Spread([m["hit_rate"] for m in ms]).to_json(),
                  "ttft_ms": {"p50": ms_spread("ttft", 50).median, "p99": ms_spread("ttft", 99).median,
                              "note": ms_spread("ttft", 50).note()},
                  "e2e_ms": {"p50": ms_spread("e2e", 50).median, "p99": ms_spread("e2e", 99).median},
                  "router_decision_ms": {"p50": ms_spread("decide", 50).median},
                  "throughput_rps": Spread([m["throughput_rps"] for m in ms]).median,
                  "imbalance": Spread([m["imbalance"] for m in ms]).median,
                  "per_engine_last_run": ms[-1]["per_engine"]}
    return {"command": " ".join(["kvcm bench routing", shlex.join(args.argv)]).strip(), "kvcm": __version__,
            "date": started["date"], "engines": engines, "requests": args.requests, "rate": args.rate,
            "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": started["loadavg"], "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
            "policies": out, "_plots": plots}


def rows(result):
    header = ["policy", "hit rate", "TTFT p50 ms", "TTFT p99 ms", "e2e p50 ms", "e2e p99 ms", "req/s",
              "max/mean per engine", "router ms p50", "runs"]
    body = []
    for p, m in result["policies"].items():
        body.append([p, "%.1f%%" % (100 * m["hit_rate"]), m["ttft_ms"]["p50"], m["ttft_ms"]["p99"],
                     m["e2e_ms"]["p50"], m["e2e_ms"]["p99"], m["throughput_rps"], "%.2f" % m["imbalance"],
                     m["router_decision_ms"]["p50"], m["hit_rate_runs"]["note"]])
    return header, body


def text(result):
    header, body = rows(result)
    return "\n".join(["", "kvcm bench routing: %d engines, %d requests per policy at %s/s, %d repeats; load %s -> %s" % (
        result["engines"], result["requests"], fmt(result["rate"]), result["repeats"],
        result["machine"]["loadavg_start"], result["machine"]["loadavg_end"]), "", table(header, body)])
