#!/usr/bin/env python3
"""How long one huge batch holds `kvcm serve`'s event loop.

    python benchmarks/huge_batch.py [--repeats 3] [--megabytes 16.7]

Each run starts `python -m kvcm serve` (HTTP and ZMQ on 127.0.0.1, free ports, no `KVCM_*`
variables), publishes one batch of vLLM-like BlockStored events (16 blocks with token ids
each, half from block 0, so auto mode rehashes them) and sends `GET /health` back to back on
a keep-alive connection until the batch is applied. The longest `/health` round trip is the
longest stall a client saw. Reporting is run.py's: a table and a JSON line; values are
medians over the runs. Results: benchmarks/RESULTS.md ("huge_batch").
"""
import argparse
import http.client
import json
import os
import random
import re
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

import run  # noqa: E402  (reporting helpers and the token workload)
from kvcm import _core  # noqa: E402
from kvcm.publisher import Publisher, encode_batch  # noqa: E402
from run import BLOCK, NS, pc, report, row  # noqa: E402

POD = "huge-batch"


def start_server():
    log = tempfile.NamedTemporaryFile(prefix="kvcm-bench-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCM_")}
    proc = subprocess.Popen([sys.executable, "-m", "kvcm", "serve", "--http-host", "127.0.0.1", "--http-port", "0",
                             "--zmq-bind", "tcp://127.0.0.1:*"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        with open(log.name) as f:
            m = re.search(r"kvcm serving: http ([\d.]+):(\d+), zmq (\S+)", f.read())
        if m:
            return proc, log, int(m.group(2)), m.group(3)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("kvcm serve did not start: %s" % open(log.name).read()[-2000:])
        time.sleep(0.02)


def batch_events(seed, nbytes):
    """Chains of 2 BlockStored events of 16 blocks (vLLM's hashes), the first from block 0,
    until their encoding passes nbytes."""
    rng = random.Random(seed)
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    events, size = [], 0
    while size < nbytes:
        tokens = run.random_tokens(rng, 2 * BLOCK * BLOCK)
        keys = list(hasher.keys(tokens))
        chain = [run.stored_event(keys[:BLOCK], None, tokens[:BLOCK * BLOCK]),
                 run.stored_event(keys[BLOCK:], keys[BLOCK - 1], tokens[BLOCK * BLOCK:])]
        events += chain
        size += len(msgpack.packb(chain))
    return events


def one_run(seed, nbytes):
    payload = msgpack.packb([time.time(), batch_events(seed, nbytes), 0])
    proc, log, port, zmq_endpoint = start_server()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def streams():
            conn.request("GET", "/v1/pods")
            return {(p["pod"], p["dp_rank"]): p for p in json.loads(conn.getresponse().read())["pods"]}

        with Publisher(zmq_endpoint, topic="kv@%s@%s" % (POD, NS)) as pub:
            while (POD, 0) not in streams():          # ZMQ's slow joiner
                pub.publish_raw(encode_batch([]))
                time.sleep(0.02)
            rtts = []
            t0 = pc()
            seq = pub.publish_raw(payload)
            while True:
                for _ in range(50):
                    t = pc()
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                    rtts.append(pc() - t)
                entry = streams()[(POD, 0)]
                if entry["last_seq"] == seq and entry["state"] not in ("replaying", "applying"):
                    break
                if pc() - t0 > 60e9:
                    raise RuntimeError("the batch was not applied within 60 s")
            applied = pc() - t0
        conn.close()
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        os.unlink(log.name)
    rtts.sort()
    return {"bytes": len(payload), "stall": rtts[-1], "health_p50": rtts[len(rtts) // 2], "applied": applied}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megabytes", type=float, default=16.7)
    args = parser.parse_args()
    runs = []
    for r in range(args.repeats):
        load = os.getloadavg()
        res = one_run(r + 1, int(args.megabytes * 1e6))
        runs.append(res)
        print("  run %d: %.1f MB applied in %.0f ms; longest /health %.1f ms (p50 %.0f µs); load %s"
              % (r + 1, res["bytes"] / 1e6, res["applied"] / 1e6, res["stall"] / 1e6, res["health_p50"] / 1e3,
                 ", ".join("%.1f" % x for x in load)))
    med = {k: statistics.median(x[k] for x in runs) for k in ("stall", "health_p50", "applied")}
    report("huge_batch", [
        row("longest GET /health while one %.1f MB batch is ingested" % (runs[0]["bytes"] / 1e6), med["stall"] / 1e6,
            "ms", note="median /health %.0f µs" % (med["health_p50"] / 1e3)),
        row("publish to applied, the whole batch", med["applied"] / 1e6, "ms"),
    ], repeats=args.repeats, source=run.source_version())


if __name__ == "__main__":
    main()
