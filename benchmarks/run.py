#!/usr/bin/env python3
"""Benchmarks of kvcm's Cython core against the budgets of DESIGN.md §9.

    python benchmarks/run.py                 # everything except `memory`
    python benchmarks/run.py lookup store    # the named ones
    python benchmarks/run.py --memory        # everything, the slow 10 M-entry memory one too

Each benchmark prints a small table and one JSON line ({"bench": ..., "rows": [...]}).
Values are medians over --repeats runs; latency rows give p50/p99 of single calls (median
over the runs of each), after a warm-up pass, with the cost of reading the clock subtracted
(the Python call itself is included: a Python caller pays it). Workloads are seeded, so runs
are comparable. Results and the analysis of misses: benchmarks/RESULTS.md.
"""
import argparse
import contextlib
import gc
import hashlib
import json
import os
import pickle
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvcm import _core, _reference  # noqa: E402

pc = time.perf_counter_ns
NS = "Qwen/Qwen3-0.6B"
# the fixture tokenizer that the service benchmarks give kvcm serve for NS
QWEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "shared", "fixtures", "tokenizers", "qwen2.5-instruct")
VOCAB = 151_936  # Qwen3's vocabulary: realistic token ids need 17-18 bits
BLOCK = 16

# ---- timing and reporting ------------------------------------------------------------------


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def pass_ns(fn, arg_sets):
    """Wall time of calling fn(*args) once for every args in arg_sets."""
    t0 = pc()
    for args in arg_sets:
        fn(*args)
    return pc() - t0


def median_per_call_ns(fn, arg_sets, repeats):
    """Median over `repeats` passes of the mean time of one call."""
    return statistics.median(pass_ns(fn, arg_sets) for _ in range(repeats)) / len(arg_sets)


def _clock_cost_ns():
    samples = []
    for _ in range(20_000):
        t0 = pc()
        t1 = pc()
        samples.append(t1 - t0)
    return statistics.median(samples)


def latency_ns(fn, arg_sets, rounds, repeats):
    """(p50, p99) in ns of single calls fn(*args): after one warm-up pass, each of `repeats`
    runs calls it `rounds` times over arg_sets; the result is the median over runs of each."""
    clock = _clock_cost_ns()
    pass_ns(fn, arg_sets)
    p50s, p99s = [], []
    for _ in range(repeats):
        samples = []
        for _ in range(rounds):
            for args in arg_sets:
                t0 = pc()
                fn(*args)
                t1 = pc()
                samples.append(t1 - t0 - clock)
        samples.sort()
        p50s.append(samples[len(samples) // 2])
        p99s.append(samples[len(samples) * 99 // 100])
    return statistics.median(p50s), statistics.median(p99s)


def row(case, value, unit, p99=None, budget=None, note=""):
    """One result. budget: ("<=" or ">=", limit), judged on value (the median or p50)."""
    r = {"case": case, "value": value, "unit": unit}
    if p99 is not None:
        r["p99"] = p99
    if budget is not None:
        op, limit = budget
        r["budget"] = "%s %s" % (op, _fmt(limit))
        r["met"] = value <= limit if op == "<=" else value >= limit
    if note:
        r["note"] = note
    return r


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    return "%.1f" % v if abs(v) >= 10 else "%.3g" % v


def report(bench, rows, **info):
    cols = ("case", "value", "p99", "unit", "budget", "met", "note")
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("\n== %s ==" % bench)
    for line in [list(cols), ["-" * w for w in widths]] + cells:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print(json.dumps({"bench": bench, **info, "rows": rows}))
    sys.stdout.flush()


def random_keys(seed, n):
    """n uniform 64-bit keys (kvcm keys are SHA-derived, hence uniform), reproducibly."""
    return array("Q", random.Random(seed).randbytes(8 * n))


@contextlib.contextmanager
def sha256_kernel(name):
    """Runs the block with SHA-256 kernel `name` ("portable" or "default"), then restores."""
    saved = os.environ.get("KVCM_SHA256")
    if name == "portable":
        os.environ["KVCM_SHA256"] = "portable"
    else:
        os.environ.pop("KVCM_SHA256", None)
    try:
        yield _core._select_sha256_kernel()
    finally:
        if saved is None:
            os.environ.pop("KVCM_SHA256", None)
        else:
            os.environ["KVCM_SHA256"] = saved
        _core._select_sha256_kernel()


def ns_per_compression(repeats):
    """The active kernel's cost of one 64-byte SHA-256 compression, from a 1 MiB message."""
    big = os.urandom(1 << 20)
    return median_per_call_ns(_core.sha256, [(big,)] * 20, repeats) / (len(big) / 64)


# ---- 1. tokens -> keys ---------------------------------------------------------------------


def vllm_style_keys(tokens, root):
    """vLLM's hashing loop for hash_algo=sha256 (hashlib over pickle protocol 5), stripped of
    its per-block extra-key and BlockHash object work: a lower bound of vLLM's own cost."""
    parent, keys = root, []
    for i in range(0, len(tokens) - BLOCK + 1, BLOCK):
        parent = hashlib.sha256(pickle.dumps((parent, tuple(tokens[i:i + BLOCK]), None), protocol=5)).digest()
        keys.append(int.from_bytes(parent[-8:], "big"))
    return keys


def side_by_side_ns(fns, repeats, calls):
    """{name: ns per call} for each fn of `fns` ({name: (fn, args)}): in each of `repeats`
    rounds every fn runs `calls` times in turn, so they share the machine's load; medians
    over the rounds, and for each fn the median of its per-round ratio to the first fn."""
    per = {name: [] for name in fns}
    for name, (fn, args) in fns.items():
        fn(*args)  # warm-up
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            per[name].append(pass_ns(fn, [args] * calls) / calls)
    first = next(iter(fns))
    ratios = {name: statistics.median(a / b for a, b in zip(per[name], per[first])) for name in fns}
    return {name: statistics.median(v) for name, v in per.items()}, ratios


def chain_compressions(algo, tokens, root):
    """SHA-256 compressions the chain of `tokens` needs: each block's message plus its
    padding (>= 9 bytes), in 64-byte blocks."""
    if algo == "sha256":
        encode = lambda parent, block: _reference.pickle5_encode((parent, block, None))  # noqa: E731
    elif algo == "sha256_cbor":
        encode = lambda parent, block: _reference.cbor_encode([parent, list(block), None])  # noqa: E731
    else:
        encode = lambda parent, block: _reference.cbor_encode([int.from_bytes(parent, "big"), list(block), None])  # noqa: E731
    digests = _reference.BlockHasher(algo, block_size=BLOCK).digests(tokens)
    parents = [root] + digests[:-1]
    return sum((len(encode(parent, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]))) + 9 + 63) // 64
               for i, parent in enumerate(parents))


def bench_hash4096(repeats):
    """4096 random token ids (uniform over a 152k vocabulary), block 16: 256 chained blocks.

    The floor is one SHA-256 call over exactly as many compressions as the chain needs
    (hashlib for SHA-NI, kvcm's own kernel for the portable one), timed side by side with
    the hasher; vLLM's loop is its Python hashing. Inputs: a list of ints (what orjson and
    tokenizers give) and buffers (array('I'), array('Q'))."""
    rng = random.Random(4096)
    tokens = [rng.randrange(VOCAB) for _ in range(4096)]
    inputs = {"list": tokens, "array('I')": array("I", tokens), "array('Q')": array("Q", tokens)}
    rows = []
    for algo in ("sha256", "sha256_cbor", "kvcm"):
        core, ref = _core.BlockHasher(algo, block_size=BLOCK), _reference.BlockHasher(algo, block_size=BLOCK)
        assert list(core.keys(tokens)) == list(ref.keys(tokens))
        compressions = chain_compressions(algo, tokens, core.root)
        message = os.urandom(compressions * 64 - 9)  # padded, exactly `compressions` blocks
        fns = {"floor": (lambda m: hashlib.sha256(m).digest(), (message,))}
        for kind, toks in inputs.items():
            fns[kind] = (core.keys, (toks,))
        if algo == "sha256":
            assert vllm_style_keys(tokens, core.root) == list(core.keys(tokens))
            fns["vllm"] = (vllm_style_keys, (tokens, core.root))
        ns, ratio = side_by_side_ns(fns, repeats, 50)
        rows.append(row("%s, SHA floor (hashlib, %d compressions)" % (algo, compressions), ns["floor"] / 1e3, "µs"))
        for kind in inputs:
            rows.append(row("%s, %s" % (algo, kind), ns[kind] / 1e3, "µs"))
            rows.append(row("%s, %s / floor" % (algo, kind), ratio[kind], "x", budget=("<=", 1.5)))
        if algo == "sha256":
            rows.append(row("sha256, vLLM's loop (hashlib+pickle)", ns["vllm"] / 1e3, "µs"))
            for kind in inputs:
                rows.append(row("sha256, vLLM's loop / %s" % kind, ratio["vllm"] / ratio[kind], "x", budget=(">=", 10)))
        with sha256_kernel("portable") as name:
            ns, ratio = side_by_side_ns({"floor": (_core.sha256, (message,)), "list": (core.keys, (tokens,))},
                                        repeats, 20)
            rows.append(row("%s, %s kernel: floor" % (algo, name), ns["floor"] / 1e3, "µs"))
            rows.append(row("%s, %s kernel: list" % (algo, name), ns["list"] / 1e3, "µs"))
            rows.append(row("%s, %s kernel: list / floor" % (algo, name), ratio["list"], "x", budget=("<=", 1.5)))
        ref_us = median_per_call_ns(ref.keys, [(tokens,)] * 3, 1) / 1e3
        rows.append(row("%s, _reference" % algo, ref_us, "µs"))
    report("hash4096", rows, kernel=_core.sha256_backend(), loadavg=loadavg())


def bench_key_memo(repeats):
    """Tokens -> keys through the key memo (kvcm/key_memo.h, the default 65,536 blocks, every
    page of it touched by 400 earlier prompts) against the same hasher without it, at 1 k,
    4 k and 32 k ids (array('Q'), as the HTTP fast path hands them over). Hot: 8 prompts
    whose blocks the memo holds, as prefixes a router scored before. New: prompts hashed
    once each (every block a miss; the first 256 staged), taking turns with as many
    without the memo; each is read just before (as a parsed body is) so that neither side
    pays for fetching the ids, and its staged entries go into the table after the clock
    stops, as the scoring lane enters them once its answer is sent."""
    rng = random.Random(65536)

    def prompt(n):
        return array("Q", [rng.randrange(VOCAB) for _ in range(n)])
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    rows = []
    for n, calls in ((1024, 400), (4096, 200), (32768, 40)):
        memo = _core.KeyMemo(65536, BLOCK)
        for _ in range(400):
            hasher.keys(prompt(4096), memo=memo)
        hot = [(prompt(n),) for _ in range(8)]
        for (p,) in hot * (n // BLOCK // 256 + 1):     # a call enters 256 new blocks at most
            assert list(hasher.keys(p, memo=memo)) == list(hasher.keys(p))
        for name, fn in (("hot, without the memo", hasher.keys),
                         ("hot, through the memo", lambda p: hasher.keys(p, memo=memo))):
            p50, p99 = latency_ns(fn, hot, max(1, 4000 // n), repeats)
            rows.append(row("%d ids: %s" % (n, name), p50 / 1e3, "µs", p99=p99 / 1e3))
        clock = _clock_cost_ns()
        new = {"without the memo": [], "through the memo": []}
        for _ in range(repeats * calls):
            for name, m in (("without the memo", None), ("through the memo", memo)):
                p = prompt(n)
                p.tobytes()
                t0 = pc()
                hasher.keys(p, memo=m)
                new[name].append(pc() - t0 - clock)
                memo.enter_staged()
        for name, samples in new.items():
            samples.sort()
            rows.append(row("%d ids: new, %s" % (n, name), samples[len(samples) // 2] / 1e3, "µs",
                            p99=samples[len(samples) * 99 // 100] / 1e3))
    report("key_memo", rows, kernel=_core.sha256_backend(), loadavg=loadavg())


# ---- 2. raw SHA-256 ------------------------------------------------------------------------


def openssl_speed(nbytes):
    """bytes/s of `openssl speed -seconds 1 -bytes N sha256`, or None without openssl."""
    if not shutil.which("openssl"):
        return None
    out = subprocess.run(["openssl", "speed", "-seconds", "1", "-bytes", str(nbytes), "sha256"],
                         capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith("sha256")][-1]
    return float(last.split()[-1].rstrip("k")) * 1000  # "The 'numbers' are in 1000s of bytes"


def bench_sha256(repeats):
    """One SHA-256 per call; both wrapped in a lambda so they pay the same call overhead."""
    sizes = (64, 128)
    inputs = {n: os.urandom(n) for n in sizes}
    kvcm_sha = lambda x: _core.sha256(x)  # noqa: E731
    hashlib_sha = lambda x: hashlib.sha256(x).digest()  # noqa: E731
    rows = []
    for kernel in ("default", "portable"):
        with sha256_kernel(kernel) as name:
            for n in sizes:
                ns = median_per_call_ns(kvcm_sha, [(inputs[n],)] * 20_000, repeats)
                rows.append(row("kvcm %s, %d B" % (name, n), ns, "ns/hash", note="%.0f MB/s" % (n / ns * 1e3)))
            rows.append(row("kvcm %s, per compression" % name, ns_per_compression(repeats), "ns",
                            note="1 MiB message"))
    for n in sizes:
        ns = median_per_call_ns(hashlib_sha, [(inputs[n],)] * 20_000, repeats)
        rows.append(row("hashlib, %d B" % n, ns, "ns/hash", note="%.0f MB/s" % (n / ns * 1e3)))
    for n in sizes:
        bps = openssl_speed(n)
        if bps:
            rows.append(row("openssl speed, %d B" % n, n / bps * 1e9, "ns/hash", note="%.0f MB/s" % (bps / 1e6)))
    report("sha256", rows)


# ---- 3. lookup + score ---------------------------------------------------------------------

CHAINS, CHAIN_LEN, PODS = 4096, 256, 16  # 4096 x 256 = 1,048,576 distinct blocks
QUERY_CHAINS = 256
# A query chain is held by its owner pod (offset 0) and by 5 more pods with shorter prefixes:
# (pod offset from the owner, prefix length, tier). Offset 3 holds its prefix in two tiers.
QUERY_LAYOUT = ((1, 240, "gpu"), (2, 200, "cpu"), (3, 128, "gpu"), (3, 128, "cpu"), (4, 64, "gpu"), (5, 16, "gpu"))


def pod_name(i):
    return "10.0.0.%d:8000" % (i + 1)


def build_lookup_index():
    """1 M blocks over 16 pods: 4096 chains of 256 blocks, chain c held whole by pod c % 16;
    chains 0..255 are popular prefixes, also held (shorter) by 5 more pods each."""
    keys = random_keys(3, CHAINS * CHAIN_LEN)
    chains = [keys[c * CHAIN_LEN:(c + 1) * CHAIN_LEN] for c in range(CHAINS)]
    index = _core.Index(max_blocks=10_000_000)
    for c, chain in enumerate(chains):
        index.store(NS, pod_name(c % PODS), "gpu", chain)
    for c in range(QUERY_CHAINS):
        for offset, length, tier in QUERY_LAYOUT:
            index.store(NS, pod_name((c + offset) % PODS), tier, chains[c][:length])
    return index, chains[:QUERY_CHAINS]


def bench_lookup(repeats):
    index, queries = build_lookup_index()
    scorer = _core.Scorer()
    expected = {pod_name(0): 256.0, pod_name(1): 240.0, pod_name(2): 160.0, pod_name(3): 128.0,
                pod_name(4): 64.0, pod_name(5): 16.0}
    got = scorer.score(index, NS, queries[0])
    assert {pod: round(s, 6) for pod, s in got.items()} == expected, got
    varied = [(index, NS, q) for q in queries]  # a different popular prefix on every call
    hot = [varied[0]] * len(varied)             # the same prompt prefix again and again
    hot_list = [(index, NS, list(queries[0]))] * len(varied)  # as decoded from JSON
    miss = [(index, NS, random_keys(9, CHAIN_LEN))] * len(varied)  # block 0 unknown
    rows = []
    for case, fn, args, budget in (
            ("score, varied queries", scorer.score, varied, ("<=", 3)),
            ("score, one hot query", scorer.score, hot, ("<=", 3)),
            ("score, one hot query as list", scorer.score, hot_list, None),
            ("score_detailed, varied", scorer.score_detailed, varied, None),
            ("lookup_prefix, varied", index.lookup_prefix, [a[1:] for a in varied], None),
            ("score, miss at block 0", scorer.score, miss, None)):
        p50, p99 = latency_ns(fn, args, 8, repeats)
        mean = median_per_call_ns(fn, args, repeats)
        rows.append(row(case, p50 / 1e3, "µs", p99=p99 / 1e3, budget=budget,
                        note="mean %.2f µs" % (mean / 1e3)))
    walk = (rows[0]["value"] - rows[-1]["value"]) * 1e3 / CHAIN_LEN
    rows.append(row("walk per block ((varied - miss) / 256)", walk, "ns"))
    report("lookup", rows, blocks=len(index), entries=index.stats()["entries"])


# ---- 4. store ------------------------------------------------------------------------------

STORE_BLOCKS, STORE_BATCH = 2_000_000, 16


def bench_store(repeats):
    """BlockStored-like calls of 16 new random keys, one pod, tier gpu, into a fresh index (it
    grows to 2 M blocks); then into a full index of 1 M capacity, so every block evicts one."""
    keys = random_keys(4, STORE_BLOCKS)
    batches = {"array('Q')": [keys[i:i + STORE_BATCH] for i in range(0, STORE_BLOCKS, STORE_BATCH)]}
    batches["list"] = [list(b) for b in batches["array('Q')"]]  # what msgpack hands over
    prefill = random_keys(5, STORE_BLOCKS // 2)

    def run(kind, capacity):
        index = _core.Index(max_blocks=capacity)
        if capacity < STORE_BLOCKS:
            index.store(NS, pod_name(0), "gpu", prefill)
        args = [(NS, pod_name(0), "gpu", b) for b in batches[kind]]
        ns = pass_ns(index.store, args)
        assert len(index) == min(capacity, STORE_BLOCKS)
        return ns

    rows = []
    for kind in ("list", "array('Q')"):
        for case, capacity, budget in (("fresh index", 10_000_000, (">=", 2e6)),
                                       ("full, evicting", STORE_BLOCKS // 2, (">=", 2e6))):
            ns = statistics.median(run(kind, capacity) for _ in range(repeats))
            rows.append(row("%s, %s" % (case, kind), STORE_BLOCKS / ns * 1e9, "blocks/s", budget=budget,
                            note="%.0f ns/block" % (ns / STORE_BLOCKS)))
    gc.collect()
    index = _core.Index()
    for kind, empty in (("list", []), ("array('Q')", array("Q"))):
        call = median_per_call_ns(index.store, [(NS, pod_name(0), "gpu", empty)] * 100_000, repeats)
        rows.append(row("boundary: store() of 0 keys, %s" % kind, call, "ns/call",
                        note="%.0f ns/block of a 16-key call" % (call / STORE_BATCH)))
    report("store", rows)


# ---- 5. memory (in a subprocess, so RSS holds only this) -----------------------------------

MEM_PODS, MEM_PER_POD, MEM_CHUNK = 16, 625_000, 5_000  # 10 M (block, pod) entries
ENGINE_SEEDS = 1 << 40  # engine hashes come from seeds apart from the keys'


def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def _mem_seed(pod, chunk):
    return pod * 1_000_003 + chunk


def memory_child():
    """Stores 10 M distinct blocks, one pod each (parity: no engine map), then maps an engine
    hash to every block; prints one JSON object with RSS after each step."""
    index = _core.Index(max_blocks=10_000_000)
    chunks = [(p, c) for p in range(MEM_PODS) for c in range(MEM_PER_POD // MEM_CHUNK)]
    gc.collect()
    out = {"rss_start": rss_bytes()}
    t0 = pc()
    for p, c in chunks:
        index.store(NS, pod_name(p), "gpu", random_keys(_mem_seed(p, c), MEM_CHUNK))
    out["store_s"] = (pc() - t0) / 1e9
    gc.collect()
    out.update(rss_stored=rss_bytes(), hwm_stored=rss_bytes("VmHWM"), stats=index.stats())
    del out["stats"]["pods"]
    t0 = pc()
    for p, c in chunks:
        index.map_engine(NS, random_keys(ENGINE_SEEDS + _mem_seed(p, c), MEM_CHUNK), random_keys(_mem_seed(p, c), MEM_CHUNK))
    out["map_s"] = (pc() - t0) / 1e9
    gc.collect()
    out.update(rss_mapped=rss_bytes(), hwm_mapped=rss_bytes("VmHWM"),
               engine_map_entries=index.stats()["engine_map_entries"],
               maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(out))


def bench_memory(repeats):
    """One run: RSS is deterministic for a seeded workload, unlike time."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child"],
                          capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.splitlines()[-1])
    entries, blocks = m["stats"]["entries"], m["stats"]["blocks"]
    assert entries == blocks == MEM_PODS * MEM_PER_POD, m["stats"]
    per_entry = (m["rss_stored"] - m["rss_start"]) / entries
    extra = (m["rss_mapped"] - m["rss_stored"]) / blocks
    mib = lambda b: "%.0f MiB" % (b / 2**20)  # noqa: E731
    rows = [
        row("RSS per (block, pod) entry, parity", per_entry, "B", budget=("<=", 64),
            note="%s -> %s, peak %s" % (mib(m["rss_start"]), mib(m["rss_stored"]), mib(m["hwm_stored"]))),
        row("engine map, extra RSS per block", extra, "B", budget=("<=", 24),
            note="%d entries; -> %s, peak %s" % (m["engine_map_entries"], mib(m["rss_mapped"]), mib(m["hwm_mapped"]))),
        row("store 10 M (chunks of %d)" % MEM_CHUNK, entries / m["store_s"], "blocks/s"),
        row("map_engine 10 M (chunks of %d)" % MEM_CHUNK, blocks / m["map_s"], "hashes/s"),
    ]
    report("memory", rows, **m)


# ---- 6. ingest_apply: EventSink.apply in-process --------------------------------------------

APPLY_CHAINS, APPLY_EVENTS_PER_BATCH = 16_384, 8  # 2 events of 16 blocks per chain: 524,288 blocks
APPLY_POD = "10.0.0.1:8000"


def random_tokens(rng, n):
    """n token ids, uniform over Qwen3's vocabulary (17-18 bits: msgpack uint16 or uint32)."""
    return [t % VOCAB for t in array("I", rng.randbytes(4 * n))]


def stored_event(hashes, parent, tokens):
    """A BlockStored event as vLLM >= 0.24 publishes it (map form, int hashes)."""
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BLOCK, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def ingest_batches(seed, chains, events_per_batch=APPLY_EVENTS_PER_BATCH, nil_parents=True):
    """Pre-encoded batch payloads: every chain is 2 BlockStored events of 16 blocks with token
    ids and vLLM's own (sha256, default seed) block hashes. The first event of a chain starts
    at block 0 with a nil parent (so kvcm verifies it by rehashing; with nil_parents=False it
    gets a random parent instead, and nothing is verified), the second continues it with the
    first's last hash as parent. Both events of a chain are in the same batch, in order.
    Returns (payloads, number of blocks)."""
    import msgpack
    rng = random.Random(seed)
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    events = []
    for _ in range(chains):
        tokens = random_tokens(rng, 2 * BLOCK * BLOCK)
        keys = list(hasher.keys(tokens))
        events.append(stored_event(keys[:BLOCK], None if nil_parents else rng.getrandbits(64),
                                   tokens[:BLOCK * BLOCK]))
        events.append(stored_event(keys[BLOCK:], keys[BLOCK - 1], tokens[BLOCK * BLOCK:]))
    payloads = [msgpack.packb([1.7e9 + i, events[i:i + events_per_batch], 0])
                for i in range(0, len(events), events_per_batch)]
    return payloads, len(events) * BLOCK


def bench_ingest_apply(repeats):
    """EventSink.apply of pre-encoded batches (8 BlockStored events of 16 blocks with token
    ids each) into a fresh Index, one stream, per hash mode; plus the decode-only floor
    (EventSink.decode), the same with no event to verify, the transport's call
    pattern and re-announcing blocks the pod already holds. The cases take turns within each
    repeat; the value is the median over repeats."""
    workloads = {True: ingest_batches(6, APPLY_CHAINS), False: ingest_batches(6, APPLY_CHAINS, nil_parents=False)}
    payloads, blocks = workloads[True]
    nbytes = sum(map(len, payloads))

    def run(mode, again=False, header=False, nil_parents=True, fast_path=True):
        payloads = workloads[nil_parents][0]
        index = _core.Index(max_blocks=10_000_000)
        sink = _core.EventSink(index, BLOCK, "sha256", None, mode, fast_path=fast_path)
        ctx = _core.StreamContext(APPLY_POD, NS)
        if again:
            for p in payloads:
                sink.apply(ctx, p)
        t0 = pc()
        if header:  # as kvcm/ingest.py calls it: decode (checked, for dp_rank), then apply the records
            for p in payloads:
                batch = sink.decode(p)
                batch.check()
                sink.apply(ctx, batch)
        else:
            for p in payloads:
                sink.apply(ctx, p)
        ns = pc() - t0
        c = sink.counters
        assert c["blocks_stored"] == blocks, c
        assert c["parity_mismatch"] == 0 and c["drop_unknown_parent"] == 0, c
        assert index.stats()["entries"] == blocks
        return ns, c["parity_verified"] // (2 if again else 1)

    def decode_only():
        sink = _core.EventSink(_core.Index(max_blocks=1024), BLOCK, "sha256", None, "vllm")
        return pass_ns(sink.decode, [(p,) for p in payloads])

    # (case, mode, blocks already held, decode first, nil parents, budget[, fast path])
    cases = (
        ("auto mode", "auto", False, False, True, (">=", 4e6)),
        ("auto mode, every event through the general path (fast_path=False)", "auto", False, False, True, None,
         False),
        ("vllm mode", "vllm", False, False, True, (">=", 2e6)),
        ("kvcm mode (decoupled: every block rehashed, engine map)", "kvcm", False, False, True, (">=", 2e6)),
        ("auto mode, every parent set (nothing to verify)", "auto", False, False, False, None),
        ("auto mode, decode + apply (as ingest.py calls it)", "auto", False, True, True, None),
        ("auto mode, blocks already held (re-announced)", "auto", True, False, True, None))
    times = {case[0]: [] for case in cases}
    verified = {}
    decode = []
    run("vllm")  # warm-up: the first index built faults its pages in; later ones reuse them
    for repeat in range(repeats):  # the cases take turns, so background load hits them alike,
        decode.append(decode_only())  # each repeat starting one case later (no case always first)
        k = repeat % len(cases)
        for case, mode, again, header, nil_parents, _, *fast in cases[k:] + cases[:k]:
            ns, verified[case] = run(mode, again, header, nil_parents, *fast)
            times[case].append(ns)
    ns = statistics.median(decode)
    rows = [row("decode only (EventSink.decode: every event into C records)", blocks / ns * 1e9, "blocks/s",
                note="%.0f ns/block, %.0f MB/s" % (ns / blocks, nbytes / ns * 1e3))]
    events = len(payloads) * APPLY_EVENTS_PER_BATCH
    for case, _, _, _, _, budget, *_ in cases:
        ns = statistics.median(times[case])
        rows.append(row(case, blocks / ns * 1e9, "blocks/s", budget=budget,
                        note="%.0f ns/block, %.1f µs/batch; %d of %d events verified by rehashing"
                        % (ns / blocks, ns / len(payloads) / 1e3, verified[case], events)))
    report("ingest_apply", rows, blocks=blocks, batches=len(payloads), events_per_batch=APPLY_EVENTS_PER_BATCH,
           payload_bytes=nbytes)


SCORE_PODS, SCORE_BACKGROUND_CHAINS = 16, 2048   # background: 2048 chains x 32 blocks on every pod: 1 M entries


def bench_score_handler(repeats):
    """Where `/v1/score` by token ids spends its time, in-process: an Indexer holding a
    4096-token chain (pod i holds its first 16 (i + 1) blocks, so 16 pods are scored) and
    65,536 background blocks held by every pod (1 M entries), put in through its EventSink as
    vLLM's events; each step of the
    handler timed alone. (The whole request over HTTP is `kvcm bench index`'s.)"""
    import orjson

    from kvcm.api import Api, _token_ids
    from kvcm.config import load_config
    from kvcm.http import Request, json_response
    from kvcm.indexer import Indexer
    from kvcm.metrics import Metrics
    indexer = Indexer(load_config(["--zmq-bind", ""]))
    hasher = _core.BlockHasher("sha256", block_size=BLOCK)
    tokens = random_tokens(random.Random(11), 32768)
    keys = list(hasher.keys(tokens))[:256]
    background = ingest_batches(100, SCORE_BACKGROUND_CHAINS)[0]
    for i in range(SCORE_PODS):
        ctx = _core.StreamContext(pod_name(i), NS)
        n = BLOCK * (i + 1)
        events = [stored_event(keys[b:min(b + BLOCK, n)], keys[b - 1] if b else None,
                               tokens[b * BLOCK:min(b + BLOCK, n) * BLOCK]) for b in range(0, n, BLOCK)]
        indexer.sink.apply(ctx, encode_events(events))
        for payload in background:
            indexer.sink.apply(ctx, payload)
    handler = Api(indexer, Metrics(indexer)).score
    metrics = Metrics(indexer)
    rows = []
    for n in (1024, 4096, 32768):
        ids = tokens[:n]
        body = orjson.dumps({"model": NS, "token_ids": ids})
        parsed = orjson.loads(body)
        fast_ids = _core.json_token_ids(body)[0]
        query = indexer.keys(NS, ids)
        result = indexer.score_tokens(NS, ids)
        assert len(result["scores"]) == SCORE_PODS, result
        request = Request("POST", "/v1/score", headers={"content-type": "application/json"}, body=body)
        steps = (
            ("orjson.loads(body)", lambda: orjson.loads(body)),
            ("json_token_ids(body): the fast path's ids", lambda: _core.json_token_ids(body)),
            ("api._token_ids (validation)", lambda: _token_ids(parsed)),
            ("keys (hash %d blocks)" % (n // BLOCK), lambda: indexer.keys(NS, ids)),
            ("keys from array('Q')", lambda: indexer.keys(NS, fast_ids)),
            ("scorer.score_detailed", lambda: indexer.scorer.score_detailed(indexer.index, NS, query, None)),
            ("score_tokens (keys + score + result dict)", lambda: indexer.score_tokens(NS, ids)),
            ("json_response(result)", lambda: json_response(200, result)),
            ("metrics.observe_request", lambda: metrics.observe_request("/v1/score", "POST", 200, 1e-4)),
            ("Api.score(request): the whole handler", lambda: handler(request)),
        )
        for name, fn in steps:
            p50, p99 = latency_ns(fn, [()], 200, repeats)
            rows.append(row("%d tokens: %s" % (n, name), p50 / 1e3, "µs", p99=p99 / 1e3))
    report("score_handler", rows, loadavg=os.getloadavg())


def _conversation(backend, ntok, rng):
    """Chat messages (a system prompt, then user / assistant turns of ~500 tokens) whose
    rendering is about ntok tokens; the words are the vocabulary's, so encoding is real work."""
    words = [w for w in sorted(backend.get_vocab()) if w.isascii() and w.isalpha() and len(w) > 2]
    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))
    messages = [{"role": "system", "content": text(100)}]
    while len(backend.encode(" ".join(m["content"] for m in messages)).ids) < ntok:
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": text(300)})
    return messages


def bench_prompt_path(repeats):
    """Scoring by prompt and by chat messages against `tokenizers`' own encode time, in
    process (Api.score on a Request, awaited): the prompt is a conversation's text, the chat
    the same conversation as messages. For chat, `handler, next turn` is the multi-turn case:
    the conversation without its last message was scored just before (the segment cache has
    its pieces, kvcm/segment_cache.py); `handler, cold` clears the cache before each call."""
    import asyncio

    import orjson

    from kvcm.api import Api
    from kvcm.config import load_config
    from kvcm.http import Request
    from kvcm.indexer import Indexer
    from kvcm.metrics import Metrics
    indexer = Indexer(load_config(["--zmq-bind", "", "--tokenizer", "m=" + QWEN_DIR]))
    api = Api(indexer, Metrics(indexer))
    tok = indexer.tokenizers.get("m")
    backend, cache = tok.backend, tok.segment_cache
    loop = asyncio.new_event_loop()

    def handle(body):
        request = Request("POST", "/v1/score", headers={"content-type": "application/json"}, body=body)
        response = loop.run_until_complete(api.score(request))
        assert response.status == 200, response.body[:200]

    def clear():
        cache._pieces.clear()
        cache._tokens = 0

    def best_us(fn, before=None, calls=3):
        """min over rounds of one call's time (before() runs untimed first): the machine is shared."""
        times = []
        for _ in range(repeats * calls):
            if before is not None:
                before()
            t0 = pc()
            fn()
            times.append(pc() - t0)
        return min(times) / 1e3

    rows = []
    for ntok in (1024, 4096, 32768):
        messages = _conversation(backend, ntok, random.Random(ntok))
        text = tok.render_chat(messages)
        n = len(backend.encode(text, add_special_tokens=False).ids)
        prompt_body = orjson.dumps({"model": "m", "prompt": text})
        chat_body = orjson.dumps({"model": "m", "messages": messages})
        earlier = orjson.dumps({"model": "m", "messages": messages[:-1]})
        handle(prompt_body)
        handle(chat_body)
        lib = best_us(lambda: backend.encode(text).ids)
        rows.append(row("%d tokens: tokenizers encode" % n, lib, "µs"))
        rows.append(row("%d tokens: tokenizers encode_batch_fast" % n,
                        best_us(lambda: backend.encode_batch_fast([text])[0].ids), "µs"))
        prompt = best_us(lambda: handle(prompt_body))
        rows.append(row("%d tokens: prompt, handler" % n, prompt, "µs", note="%.2f x encode" % (prompt / lib)))
        rows.append(row("%d tokens: chat, render" % n, best_us(lambda: tok.render_chat(messages)), "µs"))
        cold = best_us(lambda: handle(chat_body), before=clear)
        rows.append(row("%d tokens: chat, handler, cold" % n, cold, "µs", note="%.2f x encode" % (cold / lib)))
        warm = best_us(lambda: handle(chat_body), before=lambda: (clear(), handle(earlier)))
        rows.append(row("%d tokens: chat, handler, next turn" % n, warm, "µs",
                        note="%.2f x encode, %d messages" % (warm / lib, len(messages))))
    loop.close()
    report("prompt_path", rows, tokenizer=os.path.basename(QWEN_DIR), loadavg=loadavg())


def encode_events(events):
    import msgpack
    return msgpack.packb([1.7e9, events, 0])


def source_version():
    """The commit the core was built from, with "+dirty" when its sources have local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    def git(*argv):
        return subprocess.run(("git",) + argv, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "kvcm/*.pyx", "kvcm/*.pxi", "kvcm/*.h")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# ---- main ----------------------------------------------------------------------------------

BENCHMARKS = {"hash4096": bench_hash4096, "key_memo": bench_key_memo, "sha256": bench_sha256, "lookup": bench_lookup,
              "store": bench_store, "memory": bench_memory, "ingest_apply": bench_ingest_apply,
              "score_handler": bench_score_handler, "prompt_path": bench_prompt_path}
SLOW = {"memory"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (%s); default: all but %s" % (", ".join(BENCHMARKS), ", ".join(SLOW)))
    parser.add_argument("--memory", action="store_true", help="also run the slow memory benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error("unknown benchmark(s): %s (choose from %s)" % (", ".join(sorted(unknown)), ", ".join(BENCHMARKS)))
    names = args.names or [n for n in BENCHMARKS if n not in SLOW or args.memory]
    print(json.dumps({"source": source_version(), "python": platform.python_version(), "machine": platform.machine(),
                      "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "sha256_kernel": _core.sha256_backend(),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
    gc.disable()  # no collector pauses inside timed loops; nothing here makes cycles
    for name in names:
        BENCHMARKS[name](args.repeats)
        gc.collect()


if __name__ == "__main__":
    main()
