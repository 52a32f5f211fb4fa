#!/usr/bin/env python3
"""The longest an index store holds the index lock while the index grows.

    python benchmarks/index_growth.py [--blocks 7000000] [--core PATH]

Stores 16 new keys per `Index.store` call until --blocks blocks, timing every call, and
prints the largest calls (each holds the index lock, so a lookup may wait that long) and the
whole fill's time. --core PATH takes kvcm from another checkout with a built core (to compare
sources). Results: benchmarks/RESULTS.md ("A lookup never waits for a whole rehash").
"""
import argparse
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=7_000_000, help="blocks to store (default 7,000,000)")
    parser.add_argument("--core", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose kvcm is measured (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, args.core)
    from kvcm._core import Index

    index = Index(max_blocks=max(args.blocks, 1))
    calls = []
    start = time.perf_counter()
    for call in range(args.blocks // 16):
        # distinct, well-spread keys, as SHA-derived block hashes are
        keys = [(k * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF for k in range(16 * call + 1, 16 * call + 17)]
        t = time.perf_counter_ns()
        index.store("m", "pod-a", "gpu", keys)
        calls.append((time.perf_counter_ns() - t, 16 * (call + 1)))
    total = time.perf_counter() - start
    calls.sort(reverse=True)
    print("%s: %d blocks stored in %.1f s; largest store calls of 16 keys: %s" % (
        args.core, index.stats()["blocks"], total,
        ", ".join("%.1f ms at %.2f M blocks" % (ns / 1e6, n / 1e6) for ns, n in calls[:6])))


if __name__ == "__main__":
    main()
