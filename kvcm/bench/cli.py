"""`kvcm bench index` and `kvcm bench routing`: flags, and what each run prints or writes.

Results go to stdout (a summary table, or one JSON object with --json); progress to stderr;
--report FILE writes a self-contained HTML page. The modules that measure are imported only
when a bench runs, so the other sub-commands start as fast as before.
"""

import os
import sys

from kvcm.bench.placement import PLACEMENTS, Placement, PlacementError

TARGETS = ("kvcm", "dynamo", "llmd")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError("not a number: %r" % text) from None
        if value <= 0:
            raise ValueError("must be positive: %r" % text)
        return value
    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise ValueError("must not be negative: %r" % text)
        return value
    parse.__name__ = kind.__name__
    return parse


def _rate(text):
    """requests/s, or N% (of a measured rate)."""
    number = text[:-1] if text.endswith("%") else text
    if float(number) < 0:
        raise ValueError("must not be negative: %r" % text)
    return text if float(number) else ""


def _output_options(p):
    g = p.add_argument_group("output")
    g.add_argument("--repeats", type=_positive(int), default=3,
                   help="runs of every measurement, targets alternating (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the summary table")
    g.add_argument("--report", metavar="FILE", help="also write a self-contained HTML report with plots")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--seed", type=int, default=0, help="workload seed (default: %(default)s)")


def add_index_arguments(p):
    g = p.add_argument_group("targets")
    g.add_argument("--target", default="kvcm",
                   help="comma-separated, run alternately in one run: %s (default: %%(default)s)" % ", ".join(TARGETS))
    g.add_argument("--url", help="a running target's HTTP address (one target only); kvcm and dynamo are "
                                 "started by bench otherwise")
    g.add_argument("--zmq", help="where the engines publish to a running kvcm or llmd target (its SUB endpoint)")
    g.add_argument("--kvcm-api", choices=("native", "dynamo"), default="native",
                   help="the API bench uses with the kvcm target: kvcm's own (/v1/score, engines connect), "
                        "or Dynamo's (/register, /query) (default: %(default)s)")
    g.add_argument("--dynamo-python", metavar="PATH",
                   help="a Python that has the ai-dynamo-runtime package: bench starts `PATH -m dynamo.indexer`")
    g.add_argument("--dynamo-threads", type=_positive(int), default=2,
                   help="dynamo.indexer --threads (default: %(default)s)")
    g.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for the `kvcm serve` bench starts (repeatable)")

    g = p.add_argument_group("workload")
    g.add_argument("--engines", type=_positive(int), default=16, help="simulated engines (default: %(default)s)")
    g.add_argument("--blocks", type=_positive(int), default=262_144,
                   help="blocks the engines store in the ingest phase (default: %(default)s)")
    g.add_argument("--prompt-tokens", default="1024,4096,32768",
                   help="conversation lengths, TOKENS[:WEIGHT],...; queries are asked at each (default: %(default)s)")
    g.add_argument("--query-tokens", metavar="TOKENS,...",
                   help="prompt lengths to query at (prefixes of longer conversations); default: --prompt-tokens)")
    g.add_argument("--system-prompts", type=_non_negative(int), default=4,
                   help="system prompts shared by every engine (default: %(default)s)")
    g.add_argument("--system-tokens", type=_non_negative(int), default=128,
                   help="tokens of each system prompt (default: %(default)s)")
    g.add_argument("--unique-fraction", type=float, default=0.1,
                   help="conversations sharing no system prompt (default: %(default)s)")
    g.add_argument("--turns", type=_positive(int), default=4,
                   help="turns a conversation grows by (default: %(default)s)")
    g.add_argument("--engine-capacity", type=_non_negative(int), default=0,
                   help="KV blocks per engine; beyond it the least recently finished conversations are evicted "
                        "(BlockRemoved); 0: room for everything (default)")
    g.add_argument("--events-per-batch", type=_positive(int), default=4, help="events per batch (default: %(default)s)")
    g.add_argument("--event-format", choices=("map", "array", "mixed"), default="map",
                   help="vLLM >= 0.24 maps, vLLM 0.20 arrays, or both in turn (default: %(default)s)")
    g.add_argument("--block-size", type=_positive(int), default=16, help="tokens per block (default: %(default)s)")
    g.add_argument("--model", default="bench", help="model name the engines publish (default: %(default)s)")
    g.add_argument("--trace", metavar="FILE",
                   help="a JSONL of prompts ({\"token_ids\": [...]} or {\"prompt\": \"...\"}) instead of generated ones")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="a local tokenizer directory: for prompt traces and the llmd target (text prompts)")

    g = p.add_argument_group("phases")
    g.add_argument("--queries", type=_positive(int), default=2000,
                   help="closed-loop queries per prompt length and run (default: %(default)s)")
    g.add_argument("--distinct", type=_positive(int), default=64,
                   help="distinct prompts asked per prompt length, cycled through (at most the held "
                        "conversations that long; default: %(default)s): a router scores the prefixes its "
                        "engines hold again and again, and kvcm's key memo remembers them; ask more than its "
                        "--key-memo-blocks hold to measure new prompts")
    g.add_argument("--concurrency", type=_positive(int), default=1,
                   help="closed-loop requests in flight (default: %(default)s)")
    g.add_argument("--client-spin", action="store_true",
                   help="the query and floor client polls its socket for each answer instead of sleeping in "
                        "recv (--concurrency 1): on a VM whose idle vCPUs halt at once, waking it is a VM exit "
                        "in every target's latency alike; the score-while-ingesting client still sleeps")
    g.add_argument("--warmup", type=_non_negative(int), default=200,
                   help="requests before each length's measurement, excluded and reported (default: %(default)s)")
    g.add_argument("--open-rate", type=_rate, default="50%",
                   help="open-loop requests/s per length, latency counted from when each was due; N%% offers N%% "
                        "of the closed-loop rate the first run measured at that length, to every target alike; "
                        "0: off (default: %(default)s)")
    g.add_argument("--open-seconds", type=_positive(float), default=3.0,
                   help="open-loop duration per length (default: %(default)s)")
    g.add_argument("--probes", type=_non_negative(int), default=200,
                   help="publish -> visible probes per run; 0: off (default: %(default)s)")
    g.add_argument("--ingest-rate", type=_non_negative(float), default=200_000.0,
                   help="blocks/s published while scoring in the last phase; 0: off (default: %(default)s)")
    g.add_argument("--placement", choices=PLACEMENTS, default="none",
                   help="split: score while ingesting with the client and kvcm's event loop on the first half of "
                        "the CPUs, the engines and kvcm's ingest thread on the rest (kvcm serve --http-cpus, "
                        "--ingest-cpus); colocate: the floor and the queries with the client and every thread of "
                        "the target on one CPU, as a router pinned beside its index (give kvcm no --busy-poll-us: "
                        "it would spin on the client's CPU); none: where the system puts them "
                        "(default: %(default)s)")
    g.add_argument("--swi-seconds", type=_positive(float), default=2.0,
                   help="each window (idle, then ingesting) of that phase (default: %(default)s)")
    _output_options(p)


def add_routing_arguments(p):
    from kvcm.bench.routing import add_arguments

    add_arguments(p)
    _output_options(p)


def add_bench_arguments(parser):
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=type(parser))
    sub.required = True
    p = sub.add_parser("index", help="ingest, freshness, query latency and memory of a KV-cache index, "
                                     "side by side with other indexes",
                       description="Measure a KV-cache index on a generated (or recorded) workload of simulated "
                                   "vLLM engines: ingest blocks/s, publish -> visible latency, query latency by "
                                   "prompt length (closed and open loop), scoring while ingesting, RSS per block. "
                                   "--target kvcm,dynamo measures both alternately in one run.")
    add_index_arguments(p)
    p = sub.add_parser("routing", help="cache hit rate and TTFT of routing policies on simulated engines",
                       description="Start K `kvcm sim` engines and one kvcm (or use running ones), replay a "
                                   "multi-turn multi-tenant chat at a set rate through a built-in router, once per "
                                   "policy, and compare prefix-cache hit rate, TTFT, latency, throughput and load "
                                   "balance.")
    add_routing_arguments(p)


def _targets(args, placement, usage_error):
    from kvcm.bench import targets as t

    names = [n.strip() for n in args.target.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise usage_error("--target: unknown %s (choose from %s)" % (", ".join(unknown) or "''", ", ".join(TARGETS)))
    if len(set(names)) != len(names):
        raise usage_error("--target: each target once")
    if args.url and len(names) > 1:
        raise usage_error("--url names one running target: give one --target with it")
    specs = []
    for name in names:
        if name == "kvcm":
            api = t.APIS[args.kvcm_api](args.model, args.block_size)
            serve_args = args.serve_arg + placement.serve_args()
            start = None if args.url else (lambda spec: t.start_kvcm(spec, serve_args))
            specs.append(t.TargetSpec("kvcm", api, url=args.url, zmq=args.zmq, start=start))
        elif name == "dynamo":
            api = t.DynamoApi(args.model, args.block_size)
            if not args.url and not args.dynamo_python:
                raise usage_error("--target dynamo needs --dynamo-python PATH (a Python with ai-dynamo-runtime) or --url")
            python = args.dynamo_python

            def start(spec, python=python):
                return t.start_dynamo(spec, python, args.dynamo_threads)
            specs.append(t.TargetSpec("dynamo", api, url=args.url, start=None if args.url else start))
        else:
            if not args.url:
                raise usage_error("--target llmd needs --url (and --zmq) of a server speaking llm-d's API")
            if not args.tokenizer:
                raise usage_error("--target llmd asks by prompt text: give --tokenizer DIR (the server's tokenizer)")
            specs.append(t.TargetSpec("llmd", t.LlmdApi(args.model, args.block_size), url=args.url, zmq=args.zmq))
    return specs


def run_index(args, usage_error):
    from kvcm.bench import index, report, summary, workload
    from kvcm.bench.progress import Progress

    try:
        placement = Placement.named(args.placement)
    except PlacementError as exc:
        raise usage_error(str(exc)) from None
    specs = _targets(args, placement, usage_error)
    if placement.name == "colocate" and args.url:
        raise usage_error("--placement colocate places the target's process: it needs a target bench starts, "
                          "not --url")
    if args.client_spin and args.concurrency != 1:
        raise usage_error("--client-spin drives one connection: it needs --concurrency 1")
    if args.client_spin and placement.name == "colocate":
        raise usage_error("--client-spin with --placement colocate would spin on the target's CPU: choose one")
    try:
        spec = workload.Spec(engines=args.engines, blocks=args.blocks,
                             prompt_tokens=tuple(workload.parse_lengths(args.prompt_tokens)),
                             system_prompts=args.system_prompts, system_tokens=args.system_tokens,
                             unique_fraction=args.unique_fraction, turns=args.turns,
                             engine_capacity=args.engine_capacity, events_per_batch=args.events_per_batch,
                             event_format=args.event_format, block_size=args.block_size, model=args.model,
                             seed=args.seed)
        spec.check()
        trace = workload.read_trace(args.trace) if args.trace else None
        query_tokens = [n for n, _ in workload.parse_lengths(args.query_tokens)] if args.query_tokens else None
    except workload.WorkloadError as exc:
        raise usage_error(str(exc)) from None
    tokenizer = None
    if args.tokenizer:
        from kvcm.tokenize import Tokenizer, TokenizerLoadError
        try:
            tokenizer = Tokenizer(args.tokenizer)
            tokenizer.backend
        except (TokenizerLoadError, OSError) as exc:
            raise usage_error("--tokenizer: %s" % exc) from None
    if any(s.api.needs_text for s in specs) and tokenizer is None:
        raise usage_error("this target asks by prompt text: give --tokenizer DIR")
    settings = index.Settings(
        targets=specs, spec=spec, trace=trace, tokenizer=tokenizer if any(s.api.needs_text for s in specs) or trace
        else None, repeats=args.repeats, queries=args.queries, distinct=args.distinct, concurrency=args.concurrency,
        client_spin=args.client_spin, warmup=args.warmup,
        open_rate=args.open_rate, open_seconds=args.open_seconds, probes=args.probes,
        ingest_rate=args.ingest_rate or 200_000.0, swi_seconds=args.swi_seconds,
        skip=() if args.ingest_rate else ("swi",), query_tokens=query_tokens, placement=placement, argv=args.argv)
    result = index.run(settings, lambda steps: Progress(steps, args.quiet))
    _finish(args, result, summary.index_text, report.index_report)
    return 0


def _finish(args, result, text, html):
    from kvcm.bench import summary

    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(html(result))
    if args.json:
        sys.stdout.write(summary.to_json(result) + "\n")
    else:
        sys.stdout.write(text(result) + "\n")
        if args.report:
            sys.stdout.write("report: %s\n" % os.path.abspath(args.report))


def run_routing(args, usage_error):
    from kvcm.bench import report, routing

    result = routing.run(args, usage_error)
    _finish(args, result, routing.text, report.routing_report)
    return 0


def main(args, usage_error):
    if args.bench_command == "index":
        return run_index(args, usage_error)
    return run_routing(args, usage_error)
