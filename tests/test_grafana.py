"""The Grafana dashboards in packaging/grafana/: every PromQL expression they hold is parsed,
and every metric it queries must be one a running `kvcm serve` exports on /metrics (the
default in-memory serve for kvcm.json, a serve with --index redis://… for kvcm-redis.json).
Histogram series (_bucket, _sum, _count) and counters (_total) are matched to the families
the TYPE lines declare, so a family counts even before it has samples."""

import json
import re

import pytest

from conftest import ROOT
from sim_harness import Serve

DASHBOARDS = ROOT / "packaging" / "grafana"

# PromQL words that are neither metrics nor followed by "(": operators and modifiers
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan", "atan2", "start", "end"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",), "info": ("_info",)}


def metric_names(expr):
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)       # string literals
    expr = re.sub(r"\{[^{}]*\}", " ", expr)                                     # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)                                   # ranges, subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)                                    # Grafana variables
    expr = re.sub(r"\boffset\s+-?[\dsmhdwy]+", " ", expr)                       # offset 5m
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", " ", expr)       # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        word = match.group(0)
        if expr[match.end():].lstrip().startswith("(") or word.lower() in _KEYWORDS:
            continue     # a function or an aggregation, or an operator
        names.add(word)
    return names


def exported_series(metrics_text):
    """Every series name /metrics can hold: each declared family with its type's suffixes."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            if kind == "counter" and family.endswith("_total"):
                family = family[:-6]     # the text format names a counter family with or without it
            names.update(family + suffix for suffix in _SUFFIXES[kind])
    return names


def expressions(dashboard):
    """(panel title, expr) of every query, rows' nested panels and template queries included."""
    out = []

    def walk(panels):
        for panel in panels:
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", ()) if t.get("expr"))
            walk(panel.get("panels", ()))
    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out.append(("$" + variable["name"], variable["query"]["query"]))
    return out


def load(name):
    return json.loads((DASHBOARDS / name).read_text())


# -- the expression reader --------------------------------------------------------------------------

@pytest.mark.parametrize("expr, names", [
    ('sum by (reason) (rate(kvcm_ingest_event_drops_total{instance=~"$instance"}[$__rate_interval])) > 0',
     {"kvcm_ingest_event_drops_total"}),
    ("histogram_quantile(0.99, sum by (le) (rate(kvcm_http_request_duration_seconds_bucket{a=\"b{c}\"}[5m])))",
     {"kvcm_http_request_duration_seconds_bucket"}),
    ("sum(rate(a_total[1m])) / sum(rate(b_total[1m])) * 100", {"a_total", "b_total"}),
    ("time() - kvcm_start_time_seconds", {"kvcm_start_time_seconds"}),
    ("sum(x) by (pod) and on(pod) y offset 5m unless z{t='v'} or 1e3", {"x", "y", "z"}),
    ("label_values(kvcm_start_time_seconds, instance)", {"kvcm_start_time_seconds", "instance"}),
])
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


def test_a_metric_kvcm_does_not_export_is_found():
    exported = exported_series("# TYPE kvcm_a counter\n# TYPE kvcm_b_total counter\n# TYPE kvcm_h histogram\n"
                               "# TYPE kvcm_g gauge\n")
    assert {"kvcm_a_total", "kvcm_b_total", "kvcm_h_bucket", "kvcm_h_count", "kvcm_g"} <= exported
    assert "kvcm_b_total_total" not in exported
    assert metric_names("rate(kvcm_a_total[1m]) + kvcm_nope") - exported == {"kvcm_nope"}
    assert "kvcm_a" not in exported and "kvcm_g_total" not in exported


# -- the dashboards against a running kvcm ------------------------------------------------------------

def check_dashboard(dashboard, metrics_text):
    exported = exported_series(metrics_text) | {"instance"}     # label_values(metric, instance)
    queried = set()
    for title, expr in expressions(dashboard):
        unknown = metric_names(expr) - exported
        assert not unknown, "panel %r queries %s, which kvcm does not export" % (title, sorted(unknown))
        queried |= metric_names(expr)
    ids = [p["id"] for p in _all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0], "type": "datasource",
                                                  "name": "datasource"}
    for panel in _all_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["refId"] for t in panel["targets"]), panel["title"]
    return queried


def _all_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def metrics_of_serve(*args):
    """/metrics of a fresh `kvcm serve ARGS`."""
    serve = Serve(*args)
    try:
        return serve.client.get("/metrics").body.decode()
    finally:
        serve.stop()
        serve.close()


def test_the_dashboard_queries_only_what_kvcm_serve_exports():
    queried = check_dashboard(load("kvcm.json"), metrics_of_serve())
    # what an operator looks for: ingest and drops, stream health, index fill and evictions,
    # scoring rate, latency and hit ratio, blocks per pod
    assert {"kvcm_ingest_messages_total", "kvcm_ingest_blocks_stored_total", "kvcm_ingest_event_drops_total",
            "kvcm_ingest_message_drops_total", "kvcm_ingest_gaps_total", "kvcm_ingest_replays_total",
            "kvcm_ingest_restarts_total", "kvcm_index_blocks", "kvcm_index_capacity_blocks",
            "kvcm_index_evictions_total", "kvcm_http_request_duration_seconds_count",
            "kvcm_http_request_duration_seconds_bucket", "kvcm_score_warm_requests_total",
            "kvcm_score_requests_total", "kvcm_pod_blocks", "kvcm_hash_parity_mismatch_total"} <= queried
    assert not any(name.startswith("kvcm_redis_") for name in queried)


def test_the_shared_index_dashboard_queries_only_what_kvcm_exports(redis_server):
    queried = check_dashboard(load("kvcm-redis.json"), metrics_of_serve("--index", redis_server.url))
    assert {"kvcm_redis_up", "kvcm_redis_backlog_events", "kvcm_redis_errors_total",
            "kvcm_redis_call_duration_seconds_bucket", "kvcm_redis_records_written_total"} <= queried
