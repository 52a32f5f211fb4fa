"""The phases of one `kvcm bench index` run against one freshly started target.

Order: connect (warm-up, not timed) -> ingest -> RSS -> publish->visible -> queries (closed
loop, then open loop) -> scoring while ingesting. Each returns a plain dict (the runner
aggregates runs) and keeps what the report plots.

Clocks: time.perf_counter_ns (monotonic) for everything timed; the bench process's own CPU
time (os.times) where the generator's cost is shown.
"""

import os
import random
import time

from kvcm.bench import load
from kvcm.bench.engines import Background
from kvcm.bench.stats import Latency
from kvcm.bench.workload import Query, marker_progress

INGEST_TIMEOUT_S = 600.0
POLL_S = 0.002
VISIBLE_TIMEOUT_S = 10.0
RAMP_S = 0.2


def _cpu():
    t = os.times()
    return t.user + t.system


def ingest(ctx):
    """Blocks/s from the first send until every engine's closing marker is visible through
    the query API. The batches go out from a thread while this one polls the lowest marker
    not yet seen by every engine (and the closing one): two small queries per poll, so the
    target is barely disturbed. Also samples the target's RSS and the visible blocks."""
    w, api, conn = ctx.workload, ctx.target.api, ctx.conn
    streams = w.streams
    total = sum(s.blocks for s in streams)
    closing = len(w.markers) - 1
    marker_req = [api.query(w.marker_query(j)) for j in range(len(w.markers))]
    seen = [0] * len(streams)            # markers seen per engine (in order, so a count)
    cpu0 = _cpu()
    t0 = time.perf_counter_ns()
    sender = Background(ctx.engines.send, streams)
    curve, rss = [], []
    deadline = t0 + INGEST_TIMEOUT_S * 1e9
    while True:
        frontier = min(seen)
        if frontier < closing:
            engines = api.matched(conn.call(marker_req[frontier])[1])
            for e in engines:
                seen[e] = max(seen[e], frontier + 1)
        engines = api.matched(conn.call(marker_req[closing])[1])
        t = time.perf_counter_ns()
        for e in engines:
            seen[e] = closing + 1
        curve.append(((t - t0) / 1e9, sum(marker_progress(s, seen[s.engine]) for s in streams)))
        rss.append(((t - t0) / 1e9, ctx.target.rss_bytes()))
        if min(seen) > closing:
            break
        if t > deadline:
            raise TimeoutError("ingest not visible after %.0f s" % INGEST_TIMEOUT_S)
        ctx.progress.tick()
        time.sleep(POLL_S)
    t_first, t_last = sender.result()
    cpu = _cpu() - cpu0
    seconds = (t - t0) / 1e9
    return {"blocks": total, "seconds": seconds, "blocks_per_s": total / seconds,
            "generator": {"send_seconds": (t_last - t_first) / 1e9, "polls": len(curve),
                          "bench_cpu_share": cpu / seconds},
            "curve": curve, "rss_curve": [(s, r) for s, r in rss if r is not None]}


def freshness(ctx, probes):
    """Publish -> visible: one engine publishes a fresh 1-block prompt, then this process
    polls the query API for it back to back; latency from just before the send to the first
    answer naming that engine. Resolution: one query round trip (reported)."""
    w, api, conn = ctx.workload, ctx.target.api, ctx.conn
    rng = random.Random("probes %d" % w.spec.seed)
    samples, polls, rtts = [], [], []
    for k in range(probes):
        engine = k % w.spec.engines
        payload, conv = w.probe(rng, engine)
        req = api.query(Query(conv.tokens, {}, conv.text))
        n = 0
        t0 = time.perf_counter_ns()
        ctx.engines.publish(engine, payload)
        while True:
            t = time.perf_counter_ns()
            status, body = conn.call(req)
            t1 = time.perf_counter_ns()
            n += 1
            if status == 200 and engine in api.matched(body):
                break
            rtts.append(t1 - t)
            if t1 - t0 > VISIBLE_TIMEOUT_S * 1e9:
                raise TimeoutError("a probe block was not visible after %.0f s" % VISIBLE_TIMEOUT_S)
        samples.append(t1 - t0)
        polls.append(n)
        time.sleep(0.002)
    polls.sort()
    return {"latency": Latency(samples), "poll_rtt": Latency(rtts), "polls_p50": polls[len(polls) // 2]}


def check_answers(ctx, queries):
    """Asks every query once (the warm-up) and compares with the generator's answer:
    (mismatches, first mismatch)."""
    api, conn = ctx.target.api, ctx.conn
    bad, first = 0, None
    for q in queries:
        status, body = conn.call(api.query(q))
        got = api.matched(body) if status == 200 else {"status": status}
        if got != q.expected:
            bad += 1
            first = first or {"expected": q.expected, "got": got, "tokens": len(q.tokens)}
    return bad, first


def queries(ctx, length, qs, count, concurrency, open_rate, warmup, spin=False):
    """Latency of queries of one prompt length: `warmup` requests first (excluded, their
    p50 reported), then `count` closed-loop at `concurrency` (`spin`: a client that polls
    for its answers, load.closed_loop), then open loop at the rate open_rate(closed-loop
    requests/s) returns (0 or None: no open loop)."""
    api, address = ctx.target.api, ctx.target.address
    requests = [api.query(q) for q in qs]
    bad, first = check_answers(ctx, qs)
    warm = load.closed_loop(address, requests, warmup, concurrency, spin=spin) if warmup else []
    cpu0, t0 = _cpu(), time.perf_counter_ns()
    closed = load.closed_loop(address, requests, count, concurrency, spin=spin)
    seconds = (time.perf_counter_ns() - t0) / 1e9
    cpu = _cpu() - cpu0
    out = {"length": length, "distinct": len(qs), "mismatches": bad, "first_mismatch": first,
           "warmup": Latency(warm), "closed": Latency(closed), "closed_rps": count / seconds,
           "client_cpu_us_per_request": cpu / count * 1e6}
    rate = open_rate(out["closed_rps"]) if open_rate else None
    if rate:
        n = max(1, min(count, int(rate * ctx.open_seconds)))
        lags = []
        out["open"] = Latency(load.open_loop(address, requests, n, rate, lags=lags))
        out["open_lag"] = Latency(lags)
        out["open_rate"] = rate
    return out


def floor(ctx, count, concurrency, spin=False):
    """GET /health round trips: what any request costs on this machine and server."""
    api = ctx.target.api
    load.closed_loop(ctx.target.address, [api.health()], min(200, count), concurrency, spin=spin)
    return Latency(load.closed_loop(ctx.target.address, [api.health()], count, concurrency, spin=spin))


def score_while_ingesting(ctx, qs, streams, rate, seconds, concurrency, placement):
    """Query latency idle, then while the engines publish `streams` at `rate` blocks/s
    (sized to last the window), both measured by a client process of its own; then how
    long after the last send the target needed to make the streams' closing marker visible
    (its backlog). The placement (kvcm.bench.placement) says where the client runs and
    where the engines publish from."""
    api, address = ctx.target.api, ctx.target.address
    requests = [api.query(q) for q in qs]
    client_cpus = placement.swi_client_cpus
    # the client runs in a process of its own: the pacer is a thread of this one, and its
    # GIL would otherwise delay the client's reading of answers by up to a switch interval
    idle = load.closed_loop_apart(address, requests, 10 ** 9, concurrency, seconds, cpus=client_cpus)
    with placement.engines_side():
        pacer = Background(ctx.engines.send_paced, streams, rate)
        time.sleep(RAMP_S)
        loaded = load.closed_loop_apart(address, requests, 10 ** 9, concurrency, seconds, cpus=client_cpus)
        blocks, sent_seconds = pacer.result(timeout=INGEST_TIMEOUT_S)
    t_sent = time.perf_counter()
    swi = ctx.workload.swi_marker
    request = api.query(Query(swi.tokens, {}, swi.text))
    engines = {s.engine for s in streams}
    deadline = t_sent + VISIBLE_TIMEOUT_S * 6
    catch_up = None
    while time.perf_counter() < deadline:
        if engines <= set(api.matched(ctx.conn.call(request)[1])):
            catch_up = time.perf_counter() - t_sent
            break
        time.sleep(POLL_S)
    return {"idle": Latency(idle), "loaded": Latency(loaded), "rate": rate,
            "sent_blocks_per_s": blocks / sent_seconds if sent_seconds else 0.0, "catch_up_s": catch_up}
