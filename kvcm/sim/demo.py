"""`make demo`: what KV-cache-aware routing buys, measured on simulated engines.

Starts one `kvcm serve` and a few `kvcm sim` engines (word-level tokenizer, a small KV cache,
a TTFT that grows with the uncached prompt tokens), then sends one shared-prefix workload
twice: routed by kvcm's scores (each request goes to the engine whose cache holds most of
its prefix), and routed at random. Between the two, every engine's cache is reset. Prints
the prompt-token cache-hit rate and the mean time to first token of both, side by side.

Run it with `python -m kvcm.sim.demo [--engines N] [--requests N] …`; everything listens on
free ports of 127.0.0.1 and is stopped at the end.
"""

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import time

from kvcm.sim.text import WordTokenizer

MODEL = "demo/model"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until(condition, what, deadline=30.0):
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise SystemExit("demo: timed out waiting for %s" % what)
        time.sleep(0.02)


def answers(port, path):
    def check():
        try:
            return request(port, "GET", path, timeout=2)[0] == 200
        except OSError:
            return False
    return check


def streamed(port, prompt, max_tokens):
    """Sends one streaming completion; (seconds to the first token, prompt tokens, cached)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit("demo: the engine answered %d: %s" % (response.status, response.read()[:200]))
        first, usage = None, None
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
        return first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    finally:
        conn.close()


def workload(rng, groups, count, prefix_words):
    """`count` prompts, each one of `groups` long shared prefixes (a system prompt, a
    document) followed by a question of its own."""
    prefixes = [" ".join("g%dw%d" % (g, i) for i in range(prefix_words)) for g in range(groups)]
    weights = [1.0 / (g + 1) for g in range(groups)]          # some prefixes are more popular
    prompts = []
    for i in range(count):
        prefix = rng.choices(prefixes, weights)[0]
        prompts.append(prefix + " question %d: " % i + " ".join("q%dw%d" % (i, j) for j in range(12)))
    return prompts


class Cluster:
    def __init__(self, args):
        self.procs = []
        self.serve_port, zmq_port = free_port(), free_port()
        self._start("serve", "--http-host", "127.0.0.1", "--http-port", self.serve_port,
                    "--zmq-bind", "tcp://127.0.0.1:%d" % zmq_port, "--log-level", "warning")
        wait_until(answers(self.serve_port, "/ready"), "kvcm serve")
        self.ports = []
        for i in range(args.engines):
            port = free_port()
            self._start("sim", "--host", "127.0.0.1", "--port", port, "--model", MODEL, "--seed", i,
                        "--zmq-endpoint", "tcp://127.0.0.1:%d" % zmq_port, "--kv-cache-size", args.kv_cache_size,
                        "--prefill-overhead", "2ms", "--prefill-time-per-token", args.prefill_time_per_token,
                        "--inter-token-latency", "1ms", "--max-num-seqs", "8", "--log-level", "warning")
            self.ports.append(port)
        for port in self.ports:
            wait_until(answers(port, "/health/ready"), "kvcm sim on port %d" % port)
        self.pods = {"127.0.0.1:%d" % port: port for port in self.ports}

    def _start(self, *args):
        self.procs.append(subprocess.Popen([sys.executable, "-m", "kvcm", *map(str, args)],
                                           stdin=subprocess.DEVNULL))

    def streams(self):
        return json.loads(request(self.serve_port, "GET", "/v1/pods")[1])["pods"]

    def reset(self):
        """Empties every engine's cache and waits until kvcm knows (the reset's
        AllBlocksCleared also proves each engine's events reach kvcm)."""
        def clean():
            for port in self.ports:
                request(port, "POST", "/reset_prefix_cache")
            seen = {s["pod"]: s["blocks"].get("gpu", 0) for s in self.streams()}
            return all(seen.get(pod) == 0 for pod in self.pods)
        wait_until(clean, "kvcm to see every engine's reset")

    def best_pod(self, token_ids, rng):
        status, body = request(self.serve_port, "POST", "/v1/score", {"model": MODEL, "token_ids": token_ids})
        scores = json.loads(body)["scores"] if status == 200 else {}
        if not scores:
            return rng.choice(sorted(self.pods))
        best = max(scores.values())
        return rng.choice(sorted(pod for pod, score in scores.items() if score == best))

    def close(self):
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(cluster, prompts, policy, args):
    tokenizer = WordTokenizer()
    rng = random.Random(args.seed)
    ttfts, prompt_tokens, cached = [], 0, 0
    for prompt in prompts:
        if policy == "kvcm":
            pod = cluster.best_pod(tokenizer.encode(prompt), rng)
        else:
            pod = rng.choice(sorted(cluster.pods))
        first, total, hit = streamed(cluster.pods[pod], prompt, args.max_tokens)
        ttfts.append(first)
        prompt_tokens += total
        cached += hit
    return cached / prompt_tokens, sum(ttfts) / len(ttfts)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kvcm.sim.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=3, help="simulated engines (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=150, help="requests per policy (default: %(default)s)")
    parser.add_argument("--groups", type=int, default=8, help="distinct shared prefixes (default: %(default)s)")
    parser.add_argument("--prefix-words", type=int, default=300, help="tokens per shared prefix (default: %(default)s)")
    parser.add_argument("--kv-cache-size", type=int, default=80,
                        help="KV blocks per engine: room for a few prefixes each (default: %(default)s)")
    parser.add_argument("--prefill-time-per-token", default="0.2ms",
                        help="simulated prefill time per uncached token (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="workload and routing seed (default: %(default)s)")
    args = parser.parse_args(argv)

    prompts = workload(random.Random(args.seed), args.groups, args.requests, args.prefix_words)
    print("kvcm demo: %d engines, %d requests of %d shared prefixes (%d tokens each), %d KV blocks per engine"
          % (args.engines, args.requests, args.groups, args.prefix_words, args.kv_cache_size))
    cluster = Cluster(args)
    try:
        results = {}
        for policy in ("kvcm", "random"):
            cluster.reset()
            results[policy] = run(cluster, prompts, policy, args)
    finally:
        cluster.close()
    print()
    print("%-22s %16s %16s" % ("routing", "cache hit rate", "mean TTFT"))
    for policy, label in (("kvcm", "kvcm /v1/score"), ("random", "random")):
        hit_rate, ttft = results[policy]
        print("%-22s %15.1f%% %13.1f ms" % (label, 100 * hit_rate, 1000 * ttft))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
