"""`--report FILE`: one self-contained HTML page per run.

The page references nothing outside itself: no URL, no file, no script. Plots are SVG drawn
by pygal (imported only here, only when a report is asked for) with its script links turned
off (`js=[]`), inlined into the page; what else pygal writes that names a URL or a file (its
config script, comments, the SVG namespace declarations, which HTML does not need for an
inline <svg>) is dropped. The page opens in any browser without a network.
"""

import html
import math
import re

from kvcm.bench import summary

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
td:last-child{text-align:left;color:#666}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}
.meta{color:#555}svg{width:100%;height:auto}
"""
_NS = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
# pygal adds, besides the scripts `js=[]` turns off, an inline script holding its config
# (which lists its stylesheets as file:// names, already inlined) and comments naming its
# home page: none of them is needed to show the chart.
_SCRIPT_OR_COMMENT = re.compile(r"<script\b.*?</script>|<!--.*?-->", re.S)


def _pygal():
    import pygal
    from pygal.style import Style

    style = Style(background="white", plot_background="white", font_family="system-ui, sans-serif",
                  colors=("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"))
    return pygal, pygal.Config(js=[], style=style, width=640, height=360, disable_xml_declaration=True,
                               explicit_size=False, show_dots=False, legend_at_bottom=True,
                               print_values=False, truncate_legend=40)


def _svg(chart):
    return _SCRIPT_OR_COMMENT.sub("", _NS.sub("", chart.render(is_unicode=True)))


def xy_chart(title, x_title, y_title, series):
    """series: {name: [(x, y)]}."""
    pygal, config = _pygal()
    chart = pygal.XY(config, title=title, x_title=x_title, y_title=y_title, show_dots=False, stroke=True)
    chart.x_value_formatter = chart.value_formatter = lambda v: "%.3g" % v
    for name, points in series.items():
        if points:
            chart.add(name, [(float(x), float(y)) for x, y in points])
    return _svg(chart)


def latency_chart(title, series, unit="µs", scale=1.0):
    """HdrHistogram's usual plot: latency against percentile, the percentile axis in nines
    (p90, p99, p99.9 equally apart), so the tail is as wide as the body. series: {name: cdf}
    as Latency.cdf_us() gives it."""
    pygal, config = _pygal()
    chart = pygal.XY(config, title=title, x_title="percentile", y_title="latency (%s)" % unit,
                     show_dots=False, stroke=True, xrange=(0, 3.5))
    chart.x_labels = [0, 1, 2, 3]
    chart.x_value_formatter = lambda v: "p%.4g" % (100 - 100 / 10 ** v)
    chart.value_formatter = lambda v: "%.3g" % v
    for name, cdf in series.items():
        points = [(-math.log10(1 - p / 100), lat * scale) for lat, p in cdf if p < 100]
        if points:
            chart.add(name, points)
    return _svg(chart)


def bar_chart(title, y_title, groups, series):
    """groups: x labels; series: {name: [value per group]}."""
    pygal, config = _pygal()
    chart = pygal.Bar(config, title=title, y_title=y_title)
    chart.x_labels = [str(g) for g in groups]
    for name, values in series.items():
        chart.add(name, [v if v is not None else None for v in values])
    return _svg(chart)


def _table(header, rows):
    from kvcm.bench.stats import fmt
    out = ["<table><tr>%s</tr>" % "".join("<th>%s</th>" % html.escape(str(h)) for h in header)]
    for r in rows:
        out.append("<tr>%s</tr>" % "".join(
            "<td>%s</td>" % html.escape(fmt(c) if not isinstance(c, str) else c) for c in r))
    out.append("</table>")
    return "".join(out)


def _page(title, meta, sections):
    body = ["<h1>%s</h1>" % html.escape(title), "<p class=meta>%s</p>" % html.escape(meta)]
    for heading, content in sections:
        body.append("<h2>%s</h2>%s" % (html.escape(heading), content))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>%s</title><style>%s</style></head>"
            "<body>%s</body></html>\n" % (html.escape(title), _STYLE, "".join(body)))


def _plots(*svgs):
    return "<div class=plots>%s</div>" % "".join("<div>%s</div>" % s for s in svgs if s)


def index_report(result):
    targets, plots = result["targets"], result["_plots"]
    labels = list(targets)
    w = result["workload"]
    meta = "%s · %s · %d engines, %s blocks, %d repeats · machine: %d CPUs, load %s → %s" % (
        result["command"], result["date"], w["engines"], "{:,}".format(w["blocks"]), w["repeats"],
        result["machine"]["cpus"], result["machine"]["loadavg_start"], result["machine"]["loadavg_end"])
    header, rows = summary.index_rows(result)
    lengths = list(targets[labels[0]]["query"])

    def med(label, *path):
        return summary._median(targets[label], *path)
    side = [bar_chart("Ingest (blocks/s, higher is better)", "blocks/s", ["ingest"],
                      {lb: [med(lb, "ingest_blocks_per_s")] for lb in labels})]
    if lengths:
        side.append(bar_chart("Query p50 by prompt length (µs, lower is better)", "µs", lengths,
                              {lb: [med(lb, "query", n, "p50_us") for n in lengths] for lb in labels}))
        side.append(bar_chart("Query p99 by prompt length (µs)", "µs", lengths,
                              {lb: [med(lb, "query", n, "p99_us") for n in lengths] for lb in labels}))
    if all("rss_bytes_per_block" in targets[lb] for lb in labels):
        side.append(bar_chart("RSS growth per block (bytes, lower is better)", "bytes", ["RSS/block"],
                              {lb: [med(lb, "rss_bytes_per_block")] for lb in labels}))
    dists = [latency_chart("Query latency, %s tokens (all runs)" % n,
                           {lb: plots[lb]["query"].get(int(n), []) for lb in labels}) for n in lengths]
    if all("freshness" in plots[lb] for lb in labels):
        dists.append(latency_chart("Publish → visible", {lb: plots[lb]["freshness"] for lb in labels}))
    ingest = xy_chart("Ingest: blocks visible over time", "seconds from the first send", "blocks visible",
                      {"%s run %d" % (lb, i + 1): c for lb in labels for i, c in enumerate(plots[lb]["ingest"])})
    rss = xy_chart("RSS of the target during ingest", "seconds from the first send", "MiB",
                   {"%s run %d" % (lb, i + 1): [(t, b / 2 ** 20) for t, b in c]
                    for lb in labels for i, c in enumerate(plots[lb]["rss"])})
    return _page("kvcm bench index: %s" % " vs ".join(labels), meta, [
        ("Summary", _table(header, rows)),
        ("Side by side", _plots(*side)),
        ("Latency distributions", _plots(*dists)),
        ("Ingest and memory over time", _plots(ingest, rss)),
    ])


def routing_report(result):
    from kvcm.bench import routing

    policies = result["policies"]
    names = list(policies)
    header, rows = routing.rows(result)
    meta = "%s · %s · %d engines, %d requests per policy at %s/s · load %s → %s" % (
        result["command"], result["date"], result["engines"], result["requests"], result["rate"],
        result["machine"]["loadavg_start"], result["machine"]["loadavg_end"])
    bars = [bar_chart("Prefix cache hit rate (%)", "%", names, {"hit rate": [100 * policies[p]["hit_rate"] for p in names]}),
            bar_chart("TTFT (ms)", "ms", names, {"p50": [policies[p]["ttft_ms"]["p50"] for p in names],
                                                 "p99": [policies[p]["ttft_ms"]["p99"] for p in names]}),
            bar_chart("Requests per engine: max / mean", "×", names,
                      {"imbalance": [policies[p]["imbalance"] for p in names]})]
    cdf = latency_chart("TTFT distribution", result["_plots"], unit="ms", scale=1e-3)
    return _page("kvcm bench routing", meta, [("Summary", _table(header, rows)), ("Policies", _plots(*bars, cdf))])
