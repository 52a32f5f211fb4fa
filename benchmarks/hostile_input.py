#!/usr/bin/env python3
"""What kvcm's defences against hostile input cost and save, side by side with a baseline.

    python benchmarks/hostile_input.py chat_path --baseline DIR [--repeats 3]
    python benchmarks/hostile_input.py big_prompts [--baseline DIR] [--repeats 1]

DIR is another tree of kvcm (e.g. `git archive` of an older commit, with kvcm/_core*.so
copied in); both servers run `kvcm serve` from this venv's Python with the Qwen2.5 fixture
tokenizer, on 127.0.0.1 and free ports.

- chat_path: `POST /v1/tokenize` with chat messages, asked of both servers in turn, request
  by request, on one keep-alive connection each: the model's own template (rendered off the
  event loop and metered here), a request's own template (in a worker process here, with
  --trust-request-chat-template), and a plain prompt for reference.
- big_prompts: four concurrent 8 M-character prompts; RSS before, its peak (sampled every
  20 ms) and 3 s after the last answer.
- render_instructions: what the meter costs a render, in instructions (valgrind's
  callgrind), with and without limits, and in the baseline.

Reporting is benchmarks/run.py's: a table and a JSON line per benchmark, with the load
average (the machine is shared). Results: benchmarks/RESULTS.md.
"""

import argparse
import os
import random
import re
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import orjson  # noqa: E402

from kvcm.bench.load import Connection, request_bytes  # noqa: E402
from kvcm.bench.targets import Process, free_port  # noqa: E402
from run import NS as QWEN, QWEN_DIR, loadavg, pc, report, row  # noqa: E402

ROUNDS, BLOCK = 20, 50          # per run: 20 rounds x 50 requests of each case, on each server
# Runs `kvcm` from a given tree with this Python (the baseline may predate any option).
LAUNCHER = "import sys; sys.path.insert(0, sys.argv.pop(1)); from kvcm.cli import main; sys.exit(main(sys.argv[1:]))"


class Server:
    """`kvcm serve` of the tree `root` on a free port."""

    def __init__(self, root, *args):
        self.port = free_port()
        self.process = Process([sys.executable, "-c", LAUNCHER, root, "serve", "--http-host", "127.0.0.1",
                                "--http-port", str(self.port), "--zmq-bind", "tcp://127.0.0.1:%d" % free_port(),
                                "--tokenizer", "%s=%s" % (QWEN, QWEN_DIR), "--log-level", "warning", *args])
        self.process.wait_for("kvcm serve in %s" % root, self._answers)

    def _answers(self):
        try:
            with Connection(("127.0.0.1", self.port), timeout=2) as c:
                return c.call(request_bytes("GET", "/health"))[0] == 200
        except OSError:
            return False

    def rss_mib(self):
        with open("/proc/%d/status" % self.process.pid) as f:
            return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1)) / 1024

    def close(self):
        self.process.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tokenize(**body):
    return request_bytes("POST", "/v1/tokenize", orjson.dumps(dict(body, model=QWEN)))


def chat_path(args):
    if not args.baseline:
        raise SystemExit("chat_path needs --baseline DIR")
    short = [{"role": "system", "content": "You route requests."},
             {"role": "user", "content": "Which pod holds the longest prefix of this conversation? " * 4}]
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "turn %d of a long chat. " % i * 20}
            for i in range(20)]
    cases = {"short chat, model's template": tokenize(messages=short),
             "20-turn chat, model's template": tokenize(messages=long),
             "short chat, request's template": tokenize(messages=short, chat_template=(
                 "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>")),
             "prompt (not a chat), 60 chars": tokenize(prompt="x " * 30)}
    # the baseline may know no --trust-request-chat-template: it renders any template
    with Server(ROOT, "--trust-request-chat-template") as new, Server(args.baseline) as base:
        sides = {"new": Connection(("127.0.0.1", new.port)), "baseline": Connection(("127.0.0.1", base.port))}
        for name, req in cases.items():
            replies = {side: conn.call(req) for side, conn in sides.items()}
            assert all(status == 200 for status, _ in replies.values()), (name, replies)
            if "request's template" not in name:
                assert replies["new"] == replies["baseline"], name
        runs, las = [], []
        for _ in range(args.repeats):
            las.append(loadavg())
            samples = {(side, name): [] for side in sides for name in cases}
            for _ in range(ROUNDS):
                for name, req in cases.items():
                    for _ in range(BLOCK):
                        for side, conn in sides.items():        # in turn: the same load on both
                            t0 = pc()
                            status, _ = conn.call(req)
                            samples[side, name].append(pc() - t0)
                            assert status == 200, (side, name, status)
            runs.append({key: _p50_p99(v) for key, v in samples.items()})
        for conn in sides.values():
            conn.close()
    rows = []
    for name in cases:
        def med(side, k=0):
            return statistics.median(r[side, name][k] for r in runs) / 1e3
        rows.append(row("%s: new" % name, med("new"), "µs", p99=med("new", 1)))
        rows.append(row("%s: baseline" % name, med("baseline"), "µs", p99=med("baseline", 1)))
        rows.append(row("%s: new - baseline (p50)" % name,
                        statistics.median(r["new", name][0] - r["baseline", name][0] for r in runs) / 1e3, "µs"))
    report("chat_path (new vs %s)" % args.baseline, rows, loadavg=las)


def _p50_p99(samples):
    s = sorted(samples)
    return s[len(s) // 2], s[len(s) * 99 // 100]


def big_prompts(args):
    rng = random.Random(1)
    words = ["routing", "cache", "prefix", "pod", "block", "engine", "score", "token", "alpha", "zeta"]
    text = " ".join(rng.choice(words) for _ in range(1_400_000))[:8_000_000]
    big = tokenize(prompt=text)
    rows, las = [], []
    for side, root in [("new", ROOT)] + ([("baseline", args.baseline)] if args.baseline else []):
        for _ in range(args.repeats):
            las.append(loadavg())
            with Server(root, "--max-body", "16MiB") as server:
                with Connection(("127.0.0.1", server.port)) as warm:
                    warm.call(tokenize(prompt=text[:100_000]))
                before, peak, done = server.rss_mib(), [0.0], threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], server.rss_mib())
                        time.sleep(0.02)

                statuses = []

                def one():
                    with Connection(("127.0.0.1", server.port), timeout=600) as conn:
                        statuses.append(conn.call(big)[0])
                sampler = threading.Thread(target=sample)
                sampler.start()
                t0 = time.perf_counter()
                clients = [threading.Thread(target=one) for _ in range(4)]
                for c in clients:
                    c.start()
                for c in clients:
                    c.join()
                seconds = time.perf_counter() - t0
                time.sleep(3)
                done.set()
                sampler.join()
                after = server.rss_mib()
            rows.append(row("%s: peak RSS" % side, peak[0], "MiB", note="before %.0f, 3 s after %.0f MiB; answers %s in "
                            "%.1f s" % (before, after, sorted(statuses), seconds)))
    report("big_prompts", rows, loadavg=las)


# Renders the short chat N times with the Qwen template of the tree in argv[1], metered when
# that tree has limits and argv[2] says so.
RENDERS = """
import sys
sys.path.insert(0, sys.argv[1])
from kvcm import chat
from kvcm.tokenize import Tokenizer
tok = Tokenizer(%r)
messages = {"short": [{"role": "system", "content": "You route requests."},
                      {"role": "user", "content": "Which pod holds the longest prefix of this conversation? " * 4}],
            "20-turn": [{"role": "user" if i %% 2 == 0 else "assistant", "content": "turn %%d of a long chat. " %% i * 20}
                        for i in range(20)]}[sys.argv[4]]
kw = {"limits": chat.Limits(2.0, 8 * 2**20)} if sys.argv[2] == "metered" else {}
for _ in range(int(sys.argv[3])):
    tok.render_chat(messages, **kw)
""" % QWEN_DIR


def render_instructions(args):
    """Instructions per render of the short and the 20-turn chat with the Qwen template
    (callgrind counts them: repeatable whatever the machine's load), from the difference
    between 300 renders and 1."""
    import subprocess
    import tempfile
    cases = [("new, metered", ROOT, "metered"), ("new, no limits", ROOT, "plain")]
    if args.baseline:
        cases.insert(0, ("baseline", args.baseline, "plain"))
    rows = []
    for chat_kind in ("short", "20-turn"):
        for name, root, mode in cases:
            counts = []
            for n in (1, 301):
                with tempfile.NamedTemporaryFile(suffix=".callgrind") as out:
                    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out.name,
                                           sys.executable, "-c", RENDERS, root, mode, str(n), chat_kind],
                                          capture_output=True, text=True, check=True)
                counts.append(int(re.search(r"Collected : (\d+)", proc.stderr).group(1)))
            rows.append(row("%s chat: %s" % (chat_kind, name), (counts[1] - counts[0]) / 300, "instructions"))
    report("render_instructions", rows, loadavg=[loadavg()])


BENCHMARKS = {"chat_path": chat_path, "big_prompts": big_prompts, "render_instructions": render_instructions}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                        help="benchmarks to run: %s" % ", ".join(BENCHMARKS))
    parser.add_argument("--baseline", metavar="DIR", help="a kvcm tree (core built) to compare with")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (default 3)")
    args = parser.parse_args()
    for name in args.names:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()
