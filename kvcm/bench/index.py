"""`kvcm bench index`: runs every phase against each target, alternating targets run by run.

One workload is generated (and its cost measured) before anything is started; then, for
each repeat, every target is started afresh and taken through the phases, the first target
rotating from repeat to repeat so no target always runs first. Per target, a value is the
median of its runs' values, with their spread; latency distributions are also merged over
runs for the plots.
"""

import dataclasses
import gc
import os
import platform
import shlex
import time

from kvcm import __version__
from kvcm.bench import phases
from kvcm.bench.engines import Engines
from kvcm.bench.load import Connection
from kvcm.bench.placement import Placement
from kvcm.bench.stats import Latency, Spread
from kvcm.bench.workload import Workload

PHASES = ("ingest", "freshness", "query", "open", "swi")


@dataclasses.dataclass
class Settings:
    targets: list
    spec: object
    trace: list = None
    tokenizer: object = None
    repeats: int = 3
    queries: int = 2000
    distinct: int = 64
    concurrency: int = 1
    client_spin: bool = False           # the query and floor client polls for its answers
    warmup: int = 200
    open_rate: str = "50%"              # requests/s, or N%: of the first closed-loop rate at that length
    open_rates: dict = dataclasses.field(default_factory=dict)
    open_seconds: float = 3.0
    probes: int = 200
    ingest_rate: float = 200_000.0
    swi_seconds: float = 2.0
    swi_tokens: int = 0                 # 0: the middle prompt length
    skip: tuple = ()
    query_tokens: list = None           # None: the workload's prompt lengths
    placement: Placement = dataclasses.field(default_factory=Placement)
    argv: list = dataclasses.field(default_factory=list)


class Context:
    def __init__(self, target, workload, progress, settings):
        self.target, self.workload, self.progress = target, workload, progress
        self.open_seconds = settings.open_seconds
        self.conn = Connection(target.address)
        self.engines = None

    def close(self):
        if self.engines is not None:
            self.engines.close()
        self.conn.close()


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


def prepare(settings):
    """The workload, its queries per length and the score-while-ingesting streams; the
    generator's cost is measured here, before any clock that matters."""
    spec = settings.spec
    t0, cpu0 = time.perf_counter(), time.process_time()
    w = Workload(spec, settings.trace, settings.tokenizer)
    w.build()
    lengths = settings.query_tokens or [n for n, _ in spec.prompt_tokens]
    queries = {n: w.queries(n, settings.distinct) for n in lengths}
    held = w.held_entries()
    swi_streams = None
    if "swi" not in settings.skip:
        swi_streams = w.more(int(settings.ingest_rate * (settings.swi_seconds + phases.RAMP_S)))
    info = {"generate_seconds": time.perf_counter() - t0, "generate_cpu_seconds": time.process_time() - cpu0,
            "blocks": sum(s.blocks for s in w.streams), "held_entries": held,
            "batches": sum(len(s.payloads) for s in w.streams),
            "payload_bytes": sum(len(p) for s in w.streams for p in s.payloads),
            "lengths_without_queries": [n for n in lengths if not queries[n]]}
    return w, queries, swi_streams, info


def run_target(spec, w, queries, swi_streams, settings, progress):
    """One run of every phase against a freshly started target."""
    label = spec.label
    progress.step("%s: start" % label)
    target = spec.start()
    ctx = None
    out = {"loadavg": loadavg()}
    try:
        ctx = Context(target, w, progress, settings)
        ctx.engines = Engines(w, target)
        out["connect"] = ctx.engines.connect(ctx.conn)
        rss_before = target.rss_bytes()
        progress.step("%s: ingest" % label)
        out["ingest"] = phases.ingest(ctx)
        time.sleep(0.2)       # lets allocator and page accounting settle before reading RSS
        rss_after = target.rss_bytes()
        if rss_before is not None:
            out["rss"] = {"before": rss_before, "after": rss_after,
                          "per_block": (rss_after - rss_before) / out["ingest"]["blocks"]}
        progress.note("  %-18s ingest %s blocks/s (%.3f s)%s" % (
            label, "{:,.0f}".format(out["ingest"]["blocks_per_s"]), out["ingest"]["seconds"],
            "; RSS +%.0f B/block" % out["rss"]["per_block"] if "rss" in out else ""))
        if "freshness" not in settings.skip and settings.probes:
            progress.step("%s: publish -> visible" % label)
            out["freshness"] = phases.freshness(ctx, settings.probes)
        with settings.placement.querying(target.pids()):
            out["floor"] = phases.floor(ctx, min(settings.queries, 2000), settings.concurrency,
                                        settings.client_spin)
            out["query"] = {}
            if "query" not in settings.skip:
                for n, qs in queries.items():
                    if qs:
                        out["query"][n] = _query(ctx, label, n, qs, settings)
        if swi_streams is not None:
            n = settings.swi_tokens or _middle([k for k, qs in queries.items() if qs])
            if n and queries.get(n):
                progress.step("%s: scoring while ingesting" % label)
                out["swi"] = phases.score_while_ingesting(ctx, queries[n], swi_streams, settings.ingest_rate,
                                                          settings.swi_seconds, settings.concurrency,
                                                          settings.placement)
                out["swi"]["length"] = n
        return out
    finally:
        if ctx is not None:
            ctx.close()
        target.close()


def _query(ctx, label, n, qs, settings):
    ctx.progress.step("%s: query %d tokens" % (label, n))
    rate = None if "open" in settings.skip or not settings.open_rate else \
        (lambda rps: open_rate(settings, n, rps))
    q = phases.queries(ctx, n, qs, settings.queries, settings.concurrency, rate, settings.warmup,
                       settings.client_spin)
    ctx.progress.note("  %-18s query %6d tokens: p50 %s µs, p99 %s µs%s" % (
        label, n, _us(q["closed"].percentile_us(50)), _us(q["closed"].percentile_us(99)),
        "" if not q["mismatches"] else "; %d ANSWERS DIFFER from the workload's" % q["mismatches"]))
    return q


def open_rate(settings, length, closed_rps):
    """The open-loop rate at one length: given, or a share of the closed-loop rate the first
    run measured there, then kept, so every target and run is offered the same load."""
    spec = settings.open_rate
    if spec.endswith("%"):
        return settings.open_rates.setdefault(length, float(spec[:-1]) / 100 * closed_rps)
    return float(spec)


def _middle(values):
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _us(v):
    return "-" if v is None else "%.0f" % v


def run(settings, progress_factory):
    w, queries, swi_streams, info = prepare(settings)
    # the workload is millions of objects that live to the end: out of the collector's way,
    # and no collection during a run (they would pause this process's clocks, not the target)
    gc.collect()
    gc.freeze()
    gc.disable()
    n_lengths = sum(1 for qs in queries.values() if qs)
    steps = settings.repeats * len(settings.targets) * (4 + n_lengths)
    progress = progress_factory(steps)
    progress.note("workload: %d engines, %s blocks in %s batches (%.1f MB), generated in %.2f s" % (
        settings.spec.engines, "{:,}".format(info["blocks"]), "{:,}".format(info["batches"]),
        info["payload_bytes"] / 1e6, info["generate_seconds"]))
    started = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "loadavg": loadavg()}
    runs = {spec.label: [] for spec in settings.targets}
    try:
        for r in range(settings.repeats):
            order = settings.targets[r % len(settings.targets):] + settings.targets[:r % len(settings.targets)]
            for spec in order:
                runs[spec.label].append(run_target(spec, w, queries, swi_streams, settings, progress))
    finally:
        progress.close()
        gc.enable()
        gc.unfreeze()
    return summarize(settings, info, started, runs)


# ---- aggregation ----------------------------------------------------------------------------

def _merged(latencies):
    out = Latency()
    for lat in latencies:
        out.merge(lat)
    return out


def _pct_spread(latencies, p):
    return Spread([lat.percentile_us(p) for lat in latencies]).to_json()


def summarize_target(runs):
    out = {"runs": len(runs), "loadavg": [r["loadavg"] for r in runs]}
    out["ingest_blocks_per_s"] = Spread([r["ingest"]["blocks_per_s"] for r in runs]).to_json()
    out["ingest_seconds"] = Spread([r["ingest"]["seconds"] for r in runs]).to_json()
    out["warmup"] = {"connect_seconds": Spread([r["connect"]["seconds"] for r in runs]).to_json(),
                     "note": "connecting the engines (hello blocks until every engine is seen): not timed"}
    out["generator"] = {
        "send_seconds": Spread([r["ingest"]["generator"]["send_seconds"] for r in runs]).to_json(),
        "bench_cpu_share_during_ingest": Spread([r["ingest"]["generator"]["bench_cpu_share"] for r in runs]).to_json(),
        "polls": Spread([r["ingest"]["generator"]["polls"] for r in runs]).to_json()}
    if all("rss" in r for r in runs):
        out["rss_bytes_per_block"] = Spread([r["rss"]["per_block"] for r in runs]).to_json()
        out["rss_bytes_after_ingest"] = Spread([r["rss"]["after"] for r in runs]).to_json()
    if all("freshness" in r for r in runs):
        lats = [r["freshness"]["latency"] for r in runs]
        out["publish_to_visible"] = {"p50_us": _pct_spread(lats, 50), "p99_us": _pct_spread(lats, 99),
                                     "resolution_us": _merged(r["freshness"]["poll_rtt"] for r in runs).percentile_us(50),
                                     "probes": _merged(lats).count}
    out["floor_us"] = {"p50": _pct_spread([r["floor"] for r in runs], 50)}
    out["query"] = {}
    for n in sorted({n for r in runs for n in r["query"]}):
        qs = [r["query"][n] for r in runs if n in r["query"]]
        closed = [q["closed"] for q in qs]
        entry = {"p50_us": _pct_spread(closed, 50), "p99_us": _pct_spread(closed, 99),
                 "p999_us": _pct_spread(closed, 99.9), "requests": _merged(closed).count,
                 "distinct_queries": qs[0]["distinct"],
                 "closed_loop_requests_per_s": Spread([q["closed_rps"] for q in qs]).to_json(),
                 "client_cpu_us_per_request": Spread([q["client_cpu_us_per_request"] for q in qs]).to_json(),
                 "warmup": {"requests": _merged(q["warmup"] for q in qs).count,
                            "p50_us": _merged(q["warmup"] for q in qs).percentile_us(50)},
                 "mismatches": sum(q["mismatches"] for q in qs),
                 "first_mismatch": next((q["first_mismatch"] for q in qs if q["first_mismatch"]), None)}
        if all("open" in q for q in qs):
            opens = [q["open"] for q in qs]
            entry["open_loop"] = {"rate": qs[0]["open_rate"], "p50_us": _pct_spread(opens, 50),
                                  "sent_late_p99_us": _merged(q["open_lag"] for q in qs).percentile_us(99),
                                  "p99_us": _pct_spread(opens, 99), "p999_us": _pct_spread(opens, 99.9),
                                  "requests": _merged(opens).count}
        out["query"][str(n)] = entry
    if all("swi" in r for r in runs) and runs:
        s = [r["swi"] for r in runs]
        ratio = [x["loaded"].percentile_us(99) / x["idle"].percentile_us(99) for x in s]
        out["score_while_ingesting"] = {
            "length": s[0]["length"], "rate_blocks_per_s": s[0]["rate"],
            "sent_blocks_per_s": Spread([x["sent_blocks_per_s"] for x in s]).to_json(),
            "idle_p50_us": _pct_spread([x["idle"] for x in s], 50), "idle_p99_us": _pct_spread([x["idle"] for x in s], 99),
            "loaded_p50_us": _pct_spread([x["loaded"] for x in s], 50),
            "loaded_p99_us": _pct_spread([x["loaded"] for x in s], 99),
            "p99_loaded_over_idle": Spread(ratio).to_json(),
            "catch_up_seconds": Spread([x["catch_up_s"] for x in s]).to_json()}
    return out


def plots_of(runs):
    """What the report draws, per target."""
    out = {"ingest": [r["ingest"]["curve"] for r in runs], "rss": [r["ingest"]["rss_curve"] for r in runs],
           "query": {}}
    for n in sorted({n for r in runs for n in r["query"]}):
        out["query"][n] = _merged(r["query"][n]["closed"] for r in runs if n in r["query"]).cdf_us()
    if all("freshness" in r for r in runs):
        out["freshness"] = _merged(r["freshness"]["latency"] for r in runs).cdf_us()
    return out


def ratios(targets):
    """Each other target against the first, on the headline numbers (>1: the other is
    slower or bigger, except ingest, where >1 means faster)."""
    labels = list(targets)
    out = {}
    base = targets[labels[0]]
    for label in labels[1:]:
        other = targets[label]
        r = {}

        def div(a, b):
            return a / b if a and b else None
        r["ingest_blocks_per_s"] = div(other["ingest_blocks_per_s"]["median"], base["ingest_blocks_per_s"]["median"])
        if "rss_bytes_per_block" in base and "rss_bytes_per_block" in other:
            r["rss_bytes_per_block"] = div(other["rss_bytes_per_block"]["median"], base["rss_bytes_per_block"]["median"])
        for n, q in base["query"].items():
            if n in other["query"]:
                r["query_p50_%s" % n] = div(other["query"][n]["p50_us"]["median"], q["p50_us"]["median"])
                r["query_p99_%s" % n] = div(other["query"][n]["p99_us"]["median"], q["p99_us"]["median"])
        out["%s / %s" % (label, labels[0])] = r
    return out


def summarize(settings, info, started, runs):
    spec = settings.spec
    targets = {label: summarize_target(rs) for label, rs in runs.items()}
    return {
        "command": " ".join(["kvcm bench index", shlex.join(settings.argv)]).strip(),
        "kvcm": __version__, "date": started["date"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": started["loadavg"], "loadavg_end": loadavg()},
        "workload": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()},
                     **info, "repeats": settings.repeats, "queries_per_length": settings.queries,
                     "concurrency": settings.concurrency, "client_spin": settings.client_spin,
                     "open_rate": settings.open_rate,
                     "placement": settings.placement.to_json()},
        "targets": targets,
        "ratios": ratios(targets) if len(targets) > 1 else {},
        "_plots": {label: plots_of(rs) for label, rs in runs.items()},
    }

