#!/usr/bin/env python3
"""The HTTP floor of kvcm and of Dynamo's indexer: what a round trip costs with no work in it.

    python benchmarks/http_floor.py [--dynamo-python .cache/dynamo-venv/bin/python]

For each server (started afresh, one keep-alive connection): `GET /health`, and a `POST` of a
token-id body of 1 k / 4 k / 32 k tokens to a path that answers 404 (the cost of reading the
body, without parsing it); for kvcm also `POST /v1/score` of the same bodies on an empty
index. Dynamo's server closes the connection after a 404 to a large body, so its body rows
stop there. p50 / p99 in µs. Results: benchmarks/RESULTS.md ("Query by token ids").
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import orjson  # noqa: E402

from kvcm.bench import targets  # noqa: E402
from kvcm.bench.load import Connection, HttpError, request_bytes  # noqa: E402

SIZES = (1024, 4096, 32768)


def latency_us(conn, request, calls):
    conn.call(request)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        conn.call(request)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1e3, samples[len(samples) * 99 // 100] / 1e3


def measure(spec, bodies, score):
    target = spec.start()
    rows = []
    try:
        with Connection(target.address) as conn:
            rows.append(("GET /health", latency_us(conn, request_bytes("GET", "/health"), 3000)))
            for n, body in bodies.items():
                rows.append(("POST %d-token body -> 404" % n,
                             latency_us(conn, request_bytes("POST", "/nothing", body), 1000 if n < 32768 else 300)))
        if score:
            with Connection(target.address) as conn:
                for n, body in bodies.items():
                    rows.append(("POST /v1/score, %d tokens, empty index" % n,
                                 latency_us(conn, request_bytes("POST", "/v1/score", body), 1000 if n < 32768 else 300)))
    except (HttpError, OSError) as e:
        rows.append(("stopped", str(e)))
    finally:
        target.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dynamo-python", help="a Python with ai-dynamo-runtime: measure Dynamo's indexer too")
    args = parser.parse_args()
    rng = random.Random(5)
    bodies = {n: orjson.dumps({"model": "bench", "token_ids": [rng.randrange(151_936) for _ in range(n)]})
              for n in SIZES}
    specs = [(targets.TargetSpec("kvcm", targets.NativeApi("bench", 16), start=targets.start_kvcm), True)]
    if args.dynamo_python:
        specs.append((targets.TargetSpec("dynamo", targets.DynamoApi("bench", 16),
                                         start=lambda s: targets.start_dynamo(s, args.dynamo_python)), False))
    print(json.dumps({"loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
    for spec, score in specs:
        for case, value in measure(spec, bodies, score):
            print("%-8s %-42s %s" % (spec.name, case, "p50 %.1f  p99 %.1f µs" % value if isinstance(value, tuple)
                                     else value))


if __name__ == "__main__":
    main()
