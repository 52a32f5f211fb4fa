"""The operator's view of a running kvcm: one snapshot of its state, served as JSON
(GET /v1/status) and rendered on the server as a self-contained HTML page (GET / and
/status) from that same snapshot, so the page has no figures of its own.

The page needs no JavaScript and loads nothing else (inline style, no scripts, no images; a
Content-Security-Policy forbids the rest), so it works offline and in any browser; it
refreshes itself with a meta refresh. It is read-only: admin actions stay API calls under
the admin rules. Pod, model and namespace names and the diagnoses quoting them come from
remote parties, so everything interpolated is HTML-escaped.

Rates, the recent warm fraction and the score latency percentiles cover about the last
minute: status requests take a sample of the cumulative counters at most every
SAMPLE_EVERY seconds and compare the present with the oldest sample kept.
"""

import collections
import html
import time
import urllib.parse

from kvcm import _build_info
from kvcm.http import Response, json_response
from kvcm.metrics import quantile
from kvcm.urls import redact_url

WINDOW = 60.0          # seconds the recent figures cover, once kvcm has run that long
SAMPLE_EVERY = 5.0
REFRESH = 5            # seconds between page reloads, unless ?refresh=N (0: never)
MAX_REFRESH = 3600
PERCENTILES = (0.5, 0.9, 0.99)

# Nothing may load or run; the page styles itself inline.
PAGE_HEADERS = (("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
                ("Cache-Control", "no-store"),
                ("X-Content-Type-Options", "nosniff"))


class _Sample:
    __slots__ = ("time", "counts", "latency")

    def __init__(self, time, counts, latency):
        self.time, self.counts, self.latency = time, counts, latency


class Status:
    """The status snapshot and its page for one Indexer and its Metrics.

    `not_ready()` returns None when kvcm is ready, else the reason it is not."""

    def __init__(self, indexer, metrics, not_ready):
        self.indexer = indexer
        self.metrics = metrics
        self.not_ready = not_ready
        # from source this asks git, once: here, before the event loop runs
        self._build = _build_info.info()
        # at most one sample per SAMPLE_EVERY, and only those that can still be the oldest
        self._samples = collections.deque([_Sample(time.monotonic(), {}, {})],
                                          maxlen=int(WINDOW / SAMPLE_EVERY) + 2)

    # -- routes ------------------------------------------------------------------------

    async def json(self, request):
        return json_response(200, await self.snapshot())

    async def page(self, request):
        refresh = _refresh(request.query)
        return Response(200, render(await self.snapshot(), refresh), content_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)

    # -- the snapshot ------------------------------------------------------------------

    async def snapshot(self):
        """Everything the page shows, as plain JSON-able data."""
        indexer = self.indexer
        reason = self.not_ready()
        listing = await indexer.pods_async()
        namespaces = indexer.sink.namespaces()
        streams = sorted((self._stream(entry, namespaces) for entry in listing["pods"]),
                         key=lambda s: (s["pod"], s["model"], s["dp_rank"]))
        out = {
            "version": self._build["version"],
            "git_revision": self._build["git_revision"],
            "uptime_s": round(time.time() - self.metrics.start_time, 1),
            "ready": reason is None,
            "ready_reason": "ready" if reason is None else reason,
            "config": self._config(),
            "index": self.indexer.backend.describe(listing),
            "streams": streams,
            "namespaces": [dict(name=name, **info) for name, info in sorted(namespaces.items())],
            "scoring": self._scoring(),
            "recent": self._recent(),
            "drops": self._drops(),
        }
        if "remote" in listing:
            out["remote_pods"] = listing["remote"]
        return out

    def _config(self):
        cfg = self.indexer.config
        return {"hash_algo": cfg.hash_algo, "hash_seed": cfg.hash_seed, "block_size": cfg.block_size,
                "hash_mode": cfg.hash_mode, "index": redact_url(cfg.index), "max_blocks": cfg.max_blocks,
                "zmq_bind": list(self.indexer.ingest.bound), "engines": len(self.indexer.ingest.engines),
                "tier_weights": dict(cfg.tier_weights)}

    def _stream(self, entry, namespaces):
        entry = dict(entry)
        info = namespaces.get(entry["model"])
        entry["hash_mode"] = info["mode"] if info else self.indexer.sink.mode_of(entry["model"])
        entry["diagnosis"] = info["diagnosis"] if info else None
        return entry

    def _scoring(self):
        counts = self.indexer.score_counts
        return {"requests": counts["requests"], "warm_requests": counts["warm"],
                "warm_fraction": _ratio(counts["warm"], counts["requests"])}

    def _counts(self):
        sink = self.indexer.sink.counters
        score = self.indexer.score_counts
        return {"batches": sink["batches"], "blocks_stored": sink["blocks_stored"],
                "blocks_removed": sink["blocks_removed"], "messages": self.indexer.ingest.counters["messages"],
                "score_requests": score["requests"], "score_warm": score["warm"]}

    def _recent(self):
        now = time.monotonic()
        current = _Sample(now, self._counts(), self.metrics.latency_buckets())
        samples = self._samples
        while len(samples) > 1 and now - samples[1].time >= WINDOW:
            samples.popleft()    # the next one is old enough to be the baseline
        base = samples[0]
        if now - samples[-1].time >= SAMPLE_EVERY:
            samples.append(current)
        seconds = max(now - base.time, 1e-9)
        delta = {k: v - base.counts.get(k, 0) for k, v in current.counts.items()}
        latency = {bound: n - base.latency.get(bound, 0) for bound, n in current.latency.items()}
        return {
            "window_s": round(now - base.time, 1),
            "ingest_messages_per_s": delta["messages"] / seconds,
            "ingest_batches_per_s": delta["batches"] / seconds,
            "ingest_blocks_stored_per_s": delta["blocks_stored"] / seconds,
            "ingest_blocks_removed_per_s": delta["blocks_removed"] / seconds,
            "score_requests_per_s": delta["score_requests"] / seconds,
            "score_requests": delta["score_requests"],
            "warm_fraction": _ratio(delta["score_warm"], delta["score_requests"]),
            "score_latency_s": {"p%g" % (q * 100): quantile(q, latency) for q in PERCENTILES},
        }

    def _drops(self):
        sink = self.indexer.sink.counters
        return {"events": {name[5:]: n for name, n in sorted(sink.items()) if name.startswith("drop_") and n},
                "messages": dict(sorted(self.indexer.ingest.counters["drops_by_reason"].items()))}


def _ratio(part, whole):
    return part / whole if whole else None


def _refresh(query):
    values = urllib.parse.parse_qs(query).get("refresh")
    if not values:
        return REFRESH
    try:
        return max(0, min(int(values[-1]), MAX_REFRESH))
    except ValueError:
        return REFRESH


# ---- the page ------------------------------------------------------------------------------

def _e(value):
    return html.escape(str(value), quote=True)


def _count(n):
    return "–" if n is None else "{:,}".format(n)


def _percent(fraction):
    if fraction is None:
        return "–"
    if 0 < fraction < 0.001:
        return "< 0.1 %"
    return "%.1f %%" % (100.0 * fraction)


def _per_second(rate):
    return "%.1f/s" % rate if rate < 100 else "{:,.0f}/s".format(rate)


def _seconds(value):
    if value is None:
        return "–"
    if value < 1e-3:
        return "%.0f µs" % (value * 1e6)
    if value < 1.0:
        return "%.1f ms" % (value * 1e3)
    return "%.2f s" % value


def _age(seconds):
    if seconds is None:
        return "–"
    if seconds < 60:
        return "%.1f s" % seconds
    if seconds < 3600:
        return "%d min %d s" % divmod(int(seconds), 60)
    hours, rest = divmod(int(seconds), 3600)
    if hours < 48:
        return "%d h %d min" % (hours, rest // 60)
    return "%d d %d h" % divmod(hours, 24)


def _seed(seed):
    return "(unset)" if seed is None else repr(seed)


def _rows(pairs):
    return "".join('<tr><th scope="row">%s</th><td data-key="%s">%s</td></tr>' % (_e(label), _e(key), _e(value))
                   for key, label, value in pairs)


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#f5f6f8}
header{background:#1d232a;color:#fff;padding:10px 20px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
main{padding:12px 20px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 14px;margin:0 0 12px}
h2{font-size:15px;margin:4px 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.cards section{flex:1 1 260px;margin:0 0 12px}
table{border-collapse:collapse;width:100%}
th,td{padding:3px 8px;text-align:left;border-bottom:1px solid #eceef1;vertical-align:top}
thead th{font-weight:600;background:#f0f2f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0a7a2f}.warn{color:#9a6700}.bad{color:#b3261e}
.badge{padding:1px 8px;border-radius:10px;font-weight:600}
.badge.ok{background:#d8f5e0}.badge.bad{background:#fbe0dd}
.diag{color:#b3261e;font-size:13px}
footer{color:#5b6570;font-size:12px;padding:0 20px 16px}
footer a{color:#3056a0}
"""

_STATE_CLASS = {"ok": "ok", "replaying": "warn", "degraded": "bad"}


def render(status, refresh=REFRESH):
    """The HTML page of a snapshot (as Status.snapshot() returns it)."""
    ready = status["ready"]
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="refresh" content="%d">' % refresh if refresh else "",
        "<title>kvcm status</title><style>%s</style></head><body>" % _STYLE,
        "<header><h1>kvcm</h1>",
        '<span id="version">version %s (%s)</span>' % (_e(status["version"]), _e(status["git_revision"])),
        '<span id="uptime">up %s</span>' % _e(_age(status["uptime_s"])),
        '<span id="ready" class="badge %s">%s</span>' % ("ok" if ready else "bad", "ready" if ready else "not ready"),
        "</header><main>",
    ]
    if not ready:
        parts.append('<section><p id="ready-reason" class="bad">%s</p></section>' % _e(status["ready_reason"]))
    parts.append('<div class="cards">')
    parts.append(_index_card(status["index"], status["config"]))
    parts.append(_ingest_card(status["recent"], status["streams"]))
    parts.append(_scoring_card(status["scoring"], status["recent"]))
    parts.append("</div>")
    parts.append(_streams_table(status["streams"]))
    parts.append(_namespaces_table(status["namespaces"]))
    if status.get("remote_pods"):
        parts.append(_remote_table(status["remote_pods"]))
    parts.append(_drops_table(status["drops"]))
    parts.append(_settings(status["config"]))
    parts.append("</main><footer>The same data as JSON: <a href=\"/v1/status\">/v1/status</a> · "
                 "Prometheus metrics: <a href=\"/metrics\">/metrics</a> · %s</footer></body></html>\n"
                 % ("refreshes every %d s" % refresh if refresh else "does not refresh"))
    return "".join(parts)


def _index_card(index, config):
    pairs = [("backend", "Backend", index["backend"])]
    if index["backend"] == "memory":
        fill = index["blocks"] / index["capacity"] if index["capacity"] else None
        pairs += [("blocks", "Blocks", "%s of %s (%s)" % (_count(index["blocks"]), _count(index["capacity"]),
                                                         _percent(fill))),
                  ("evictions", "Evictions", _count(index["evictions"]))]
    else:
        pairs += [("up", "Store", "up" if index["up"] else "down: %s" % index["unavailable"]),
                  ("backlog_events", "Backlog", "%s events" % _count(index["backlog_events"]))]
    for tier, n in index["entries_by_tier"].items():
        pairs.append(("entries_" + tier, "Entries (%s)" % tier, _count(n)))
    pairs += [("pods", "Pods", _count(index["pods"])),
              ("engine_map_entries", "Engine map", _count(index["engine_map_entries"]))]
    return '<section id="index"><h2>Index</h2><table>%s</table></section>' % _rows(pairs)


def _ingest_card(recent, streams):
    states = collections.Counter(s["state"] for s in streams)
    summary = ", ".join("%d %s" % (n, state) for state, n in sorted(states.items())) or "none yet"
    pairs = [("streams", "Streams", "%d (%s)" % (len(streams), summary)),
             ("batches_per_s", "Batches", _per_second(recent["ingest_batches_per_s"])),
             ("blocks_stored_per_s", "Blocks stored", _per_second(recent["ingest_blocks_stored_per_s"])),
             ("blocks_removed_per_s", "Blocks removed", _per_second(recent["ingest_blocks_removed_per_s"]))]
    return ('<section id="ingest"><h2>Ingest <small>(last %s)</small></h2><table>%s</table></section>'
            % (_e(_age(recent["window_s"])), _rows(pairs)))


def _scoring_card(scoring, recent):
    latency = recent["score_latency_s"]
    pairs = [("requests_per_s", "Requests", _per_second(recent["score_requests_per_s"])),
             ("recent_warm", "Found a warm pod (recent)", _percent(recent["warm_fraction"])),
             ("warm", "Found a warm pod (since start)", "%s of %s" % (_percent(scoring["warm_fraction"]),
                                                                       _count(scoring["requests"]))),
             ("latency", "Latency p50 / p90 / p99", " / ".join(_seconds(latency[p]) for p in ("p50", "p90", "p99")))]
    return ('<section id="scoring"><h2>Scoring <small>(last %s)</small></h2><table>%s</table></section>'
            % (_e(_age(recent["window_s"])), _rows(pairs)))


def _streams_table(streams):
    # gpu, the default tier, has a column even before any block or while a store is unreachable
    tiers = sorted({tier for s in streams for tier in (s["blocks"] or {})} | {"gpu"})
    head = ["Pod", "Model", "DP rank", "State", "Last seq", "Event age", "Gaps", "Replays", "Restarts",
            "Hash mode"] + ["Blocks (%s)" % t for t in tiers]
    rows = []
    for s in streams:
        blocks = s["blocks"]
        cells = [("pod", s["pod"], ""), ("model", s["model"], ""), ("dp_rank", s["dp_rank"], "n"),
                 ("state", s["state"], _STATE_CLASS.get(s["state"], "")),
                 ("last_seq", _count(s["last_seq"]), "n"), ("age", _age(s["last_event_age_s"]), "n"),
                 ("gaps", _count(s["gaps"]), "n"), ("replays", _count(s["replays"]), "n"),
                 ("restarts", _count(s["restarts"]), "n"), ("hash_mode", s["hash_mode"], "")]
        cells += [("blocks_" + t, "?" if blocks is None else _count(blocks.get(t, 0)), "n") for t in tiers]
        row = "".join('<td data-key="%s" class="%s">%s</td>' % (_e(k), c, _e(v)) for k, v, c in cells)
        rows.append('<tr data-pod="%s" data-model="%s" data-rank="%s">%s</tr>'
                    % (_e(s["pod"]), _e(s["model"]), _e(s["dp_rank"]), row))
        if s["diagnosis"]:
            rows.append('<tr class="diagnosis"><td colspan="%d" class="diag">%s</td></tr>'
                        % (len(head), _e(s["diagnosis"])))
    if not rows:
        rows.append('<tr><td colspan="%d">No engine has published events yet.</td></tr>' % len(head))
    return ('<section><h2>Streams</h2><table id="streams"><thead><tr>%s</tr></thead><tbody>%s</tbody></table>'
            "</section>" % ("".join("<th>%s</th>" % _e(h) for h in head), "".join(rows)))


def _namespaces_table(namespaces):
    rows = []
    for ns in namespaces:
        cells = [("name", ns["name"]), ("kind", "LoRA" if ns["lora"] else "model"), ("mode", ns["mode"]),
                 ("extra_style", ns["extra_style"]), ("diagnosis", ns["diagnosis"] or "")]
        rows.append('<tr data-namespace="%s">%s</tr>' % (_e(ns["name"]), "".join(
            '<td data-key="%s"%s>%s</td>' % (k, ' class="diag"' if k == "diagnosis" else "", _e(v))
            for k, v in cells)))
    if not rows:
        rows.append('<tr><td colspan="5">No model has stored blocks yet.</td></tr>')
    return ('<section><h2>Model namespaces</h2><table id="namespaces"><thead><tr><th>Name</th><th>Kind</th>'
            "<th>Hash mode</th><th>Extra keys</th><th>Diagnosis</th></tr></thead><tbody>%s</tbody></table>"
            "</section>" % "".join(rows))


def _remote_table(remote):
    rows = "".join('<tr data-pod="%s"><td>%s</td><td class="n">%s</td></tr>'
                   % (_e(p["pod"]), _e(p["pod"]), _e(", ".join("%s %s" % (_count(n), t)
                                                            for t, n in sorted((p["blocks"] or {}).items())) or "?"))
                   for p in remote)
    return ('<section><h2>Pods other replicas ingest</h2><table id="remote"><thead><tr><th>Pod</th>'
            "<th>Blocks</th></tr></thead><tbody>%s</tbody></table></section>" % rows)


def _drops_table(drops):
    rows = ["<tr><td>%s</td><td>%s</td><td class=\"n\">%s</td></tr>" % (kind, _e(reason), _count(n))
            for kind, counts in (("event", drops["events"]), ("message", drops["messages"]))
            for reason, n in counts.items()]
    if not rows:
        return '<section><h2>Drops</h2><p id="drops">Nothing dropped.</p></section>'
    return ('<section><h2>Drops</h2><table id="drops"><thead><tr><th>What</th><th>Reason</th><th>Count</th></tr>'
            "</thead><tbody>%s</tbody></table></section>" % "".join(rows))


def _settings(config):
    pairs = [("hash", "Hashing", "--hash-algo %s --hash-seed %s --block-size %d --hash-mode %s"
              % (config["hash_algo"], _seed(config["hash_seed"]), config["block_size"], config["hash_mode"])),
             ("zmq_bind", "ZMQ bound", ", ".join(config["zmq_bind"]) or "none (connect mode)"),
             ("engines", "Engines (connect mode)", _count(config["engines"])),
             ("tier_weights", "Tier weights", ", ".join("%s=%g" % kv for kv in sorted(config["tier_weights"].items())))]
    return '<section id="settings"><h2>Settings</h2><table>%s</table></section>' % _rows(pairs)


__all__ = ["Status", "render"]
