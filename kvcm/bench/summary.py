"""The end of a `kvcm bench` run for people (a table) and for machines (one JSON object).

The table has one column per target (or routing policy) and, for an index comparison, one
per ratio against the first target; every row says how it was measured in its last
column (runs and spread), so a number is never shown without its confidence.
"""

import orjson

from kvcm.bench.stats import fmt


def public(result):
    """The result without what only the report uses."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def to_json(result):
    return orjson.dumps(public(result), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def table(header, rows):
    """Plain text columns; the first left-aligned, the others right-aligned but the last."""
    cells = [[str(c) for c in header]] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _median(entry, *path):
    for key in path:
        if entry is None:
            return None
        entry = entry.get(key)
    return entry.get("median") if isinstance(entry, dict) else entry


def index_rows(result):
    """(header, rows) of `kvcm bench index`'s summary."""
    targets = result["targets"]
    labels = list(targets)
    first = targets[labels[0]]
    metrics = [("ingest, blocks/s", ("ingest_blocks_per_s",), True),
               ("RSS growth, bytes per block", ("rss_bytes_per_block",), False),
               ("publish -> visible p50, µs", ("publish_to_visible", "p50_us"), False),
               ("publish -> visible p99, µs", ("publish_to_visible", "p99_us"), False),
               ("GET /health p50, µs (floor)", ("floor_us", "p50"), False)]
    for n in first["query"]:
        for p in ("p50", "p99", "p999"):
            metrics.append(("query %s tokens %s, µs" % (n, p), ("query", n, "%s_us" % p), False))
        if "open_loop" in first["query"][n]:
            metrics.append(("  open loop @%s/s p99, µs" % fmt(first["query"][n]["open_loop"]["rate"]),
                            ("query", n, "open_loop", "p99_us"), False))
    if "score_while_ingesting" in first:
        s = first["score_while_ingesting"]
        metrics.append(("query %s tokens p99 while ingesting %s blocks/s, µs" % (s["length"], fmt(s["rate_blocks_per_s"])),
                        ("score_while_ingesting", "loaded_p99_us"), False))
        metrics.append(("  p99 loaded / idle", ("score_while_ingesting", "p99_loaded_over_idle"), False))
    header = ["metric"] + labels + ["%s / %s" % (lb, labels[0]) for lb in labels[1:]] + ["confidence (%s)" % labels[0]]
    rows = []
    for name, path, _ in metrics:
        values = [_median(targets[lb], *path) for lb in labels]
        if all(v is None for v in values):
            continue
        ratios = ["%.2f×" % (v / values[0]) if v and values[0] else "-" for v in values[1:]]
        entry = first
        for key in path:
            entry = (entry or {}).get(key)
        note = entry.get("note", "") if isinstance(entry, dict) else ""
        rows.append([name] + [v if v is not None else "-" for v in values] + ratios + [note])
    return header, rows


def index_text(result):
    w = result["workload"]
    header, rows = index_rows(result)
    lines = ["", "kvcm bench index: %d engines, %s blocks (%s entries held), %d repeats; load %s -> %s" % (
        w["engines"], fmt(w["blocks"]), fmt(w["held_entries"]), w["repeats"],
        result["machine"]["loadavg_start"], result["machine"]["loadavg_end"]), "", table(header, rows)]
    notes = []
    if w.get("client_spin"):
        notes.append("query and floor latencies by a client that polls for each answer (--client-spin): its own "
                     "wake-up is in no target's latency")
    placed = w.get("placement") or {}
    if placed.get("name") == "split":
        notes.append("scoring while ingesting, placed: the client and kvcm's event loop on CPU %s, the engines "
                     "and kvcm's ingest on CPU %s (targets bench cannot place run where the system puts them)"
                     % (placed["scoring_cpus"], placed["ingest_cpus"]))
    elif placed.get("name") == "colocate":
        notes.append("floor and queries colocated: the client and every thread of each target on CPU %s while "
                     "they run" % placed["cpu"])
    for label, t in result["targets"].items():
        g = t["generator"]
        notes.append("%s: generator sent everything in %s s (%s of a core in this process during ingest); "
                     "connect warm-up %s s, not timed" % (
                         label, fmt(_median(g, "send_seconds")), "%.0f%%" % (100 * (_median(g, "bench_cpu_share_during_ingest") or 0)),
                         fmt(_median(t, "warmup", "connect_seconds"))))
        send, took = _median(g, "send_seconds"), _median(t, "ingest_seconds")
        if send and took and send > 0.8 * took:
            notes.append("%s: the generator's sending took %.0f%% of the ingest time: it may have set the pace, "
                         "not the target" % (label, 100 * send / took))
        lags = ["%s tokens %s µs" % (n, fmt(q["open_loop"]["sent_late_p99_us"]))
                for n, q in t["query"].items() if "open_loop" in q]
        if lags:
            notes.append("%s: open loop, how late requests went out p99 (no free connection, or this client "
                         "behind; inside those latencies): %s" % (
                label, ", ".join(lags)))
        for n, q in t["query"].items():
            if q["mismatches"]:
                notes.append("%s: %d answers at %s tokens differ from the workload's (first: %s)" % (
                    label, q["mismatches"], n, q["first_mismatch"]))
    lines += [""] + notes
    if w["lengths_without_queries"]:
        lines.append("no held conversation is %s tokens long: raise --blocks or --engine-capacity to query them"
                     % ", ".join(map(str, w["lengths_without_queries"])))
    return "\n".join(lines)
