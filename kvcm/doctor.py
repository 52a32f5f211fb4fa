"""`kvcm doctor`: says in plain sentences whether an engine's KV events suit kvcm's settings,
or what a running kvcm's streams look like, and what to change when something is wrong.

With --engine it subscribes to an engine's publisher for at most --duration seconds (it
connects, or binds when the endpoint's host is `*`: engines that publish into kvcm's bind
socket then connect to the doctor instead), and stops early once every endpoint it listens
to has shown a run of blocks from block 0 with token ids. The block hashes are checked by
kvcm's own event sink, configured as `kvcm serve` would be with the same flags: what it
verifies is what serve verifies, and a mismatch is named by the sink's own diagnosis. With
--url it reads a running kvcm's /v1/status instead.

Exit status: 0 when everything checked is healthy, 1 with the problems listed, 2 for bad
arguments.
"""

import collections
import json
import logging
import statistics
import sys
import time
import urllib.error
import urllib.request

import msgpack
import zmq

from kvcm._core import DecodeError, EventSink, Index, StreamContext
from kvcm.ingest import _topic_ids, check_endpoint
from kvcm.wire import END_SEQ, dp_endpoint

DEFAULT_DURATION = 10.0
DEFAULT_MAX_SKEW = 2.0
DEFAULT_REPLAY_TIMEOUT = 2.0
KEEP_BATCHES = 256       # batches with a run from block 0, kept per endpoint for the hash check
DESCRIBE_BATCHES = 2000  # batches per endpoint whose events are decoded for the description
KEEP_SKEWS = 1000
MAX_TOPICS = 16
DOCTOR_INDEX_BLOCKS = 200_000   # the doctor's own index: it only needs to hold what it checks

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

# BlockStored's fields in vLLM's array layout (specs/vllm-kv-events.md); the length of the
# array tells the version that wrote it.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_ARRAY_VERSIONS = {6: "vLLM 0.9 to 0.10.1", 7: "vLLM 0.10.2 to 0.13", 8: "vLLM 0.14 to 0.16",
                   9: "vLLM 0.17 to 0.19", 10: "vLLM 0.20 to 0.21", 12: "vLLM 0.22 to 0.23"}
# map keys that only later versions write (each is left out when unset, so absence says little)
_MAP_MARKERS = (("lookahead_token_ids", "0.33"), ("session_id", "0.30"), ("ownership", "0.29"),
                ("locality", "0.26"))
OK, NOTE, PROBLEM = "ok", "note", "PROBLEM"


def add_doctor_arguments(parser):
    """The doctor's own flags; the command line adds kvcm serve's hash flags beside them."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--engine", metavar="ENDPOINT",
                      help="an engine's KV-event publisher: tcp://HOST:5557 or ipc://PATH (connected); "
                           "tcp://*:PORT binds it, for engines that publish into kvcm's bind socket")
    what.add_argument("--url", help="inspect the streams of the kvcm answering HTTP here, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", default=None,
                        help="the engine's model, as kvcm's --engine ...,model=M would give it (default: "
                             "the event topic's)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="the tokenizer directory kvcm would use for the model: checks that the events' "
                             "token ids are its")
    parser.add_argument("--replay-endpoint", default=None, metavar="ENDPOINT",
                        help="the engine's replay endpoint, to check that it answers")
    parser.add_argument("--replay-timeout", type=float, default=DEFAULT_REPLAY_TIMEOUT, metavar="SECONDS",
                        help="how long the replay endpoint may take to answer (default: %g)" % DEFAULT_REPLAY_TIMEOUT)
    parser.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                        help="listen to N ranks: rank r publishes on the endpoint's port + r (default: 1)")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION, metavar="SECONDS",
                        help="listen at most this long (default: %g)" % DEFAULT_DURATION)
    parser.add_argument("--max-skew", type=float, default=DEFAULT_MAX_SKEW, metavar="SECONDS",
                        help="event timestamps further than this from this host's clock are a problem "
                             "(default: %g)" % DEFAULT_MAX_SKEW)


class Report:
    """Lines of (kind, sentence); kind is OK, NOTE or PROBLEM."""

    def __init__(self, title):
        self.title = title
        self.lines = []

    def add(self, kind, text):
        self.lines.append((kind, text))

    @property
    def problems(self):
        return sum(kind == PROBLEM for kind, _ in self.lines)

    def write(self, out):
        out.write("kvcm doctor: %s\n\n" % self.title)
        for kind, text in self.lines:
            out.write("  %-8s %s\n" % (kind, text))
        n = self.problems
        out.write("\n%s\n" % ("No problems found." if not n else "%d problem%s found." % (n, "s" if n > 1 else "")))


def main(args, out=None):
    """`kvcm doctor` with parsed arguments (its own and the hash flags); returns the exit
    status. A bad argument value is one line on stderr and status 2, as for any command."""
    out = out or sys.stdout
    # the report says what the event sink would log
    logging.getLogger("kvcm.events").setLevel(logging.ERROR)
    try:
        if args.url is not None:
            report = inspect_kvcm(args.url)
        else:
            report = EngineCheck(args).run()
    except ValueError as exc:
        sys.stderr.write("kvcm doctor: error: %s\n" % exc)
        return EXIT_USAGE
    report.write(out)
    out.flush()
    return EXIT_PROBLEMS if report.problems else EXIT_OK


# ---- one engine's stream ---------------------------------------------------------------------

def _seed_flag(seed):
    return "(unset)" if seed is None else repr(seed)


def _settings(args, block_size=None):
    return "--hash-algo %s --hash-seed %s --block-size %d" % (
        args.hash_algo, _seed_flag(args.hash_seed), args.block_size if block_size is None else block_size)


def _listens_by_binding(endpoint):
    transport, _, address = endpoint.partition("://")
    return transport == "tcp" and address.rpartition(":")[0] in ("*", "[*]")


class _Listener:
    """What one rank's endpoint delivered while the doctor listened."""

    def __init__(self, rank, endpoint):
        self.rank, self.endpoint = rank, endpoint
        self.sock = None
        self.messages = 0
        self.bad_frames = collections.Counter()     # why messages were not KV-event batches
        self.topics = collections.Counter()
        self.batch_ranks = collections.Counter()
        self.last = {}                # (topic, rank) -> (seq, payload) of the last live batch
        self.gaps = self.restarts = 0
        self.skews = collections.deque(maxlen=KEEP_SKEWS)
        self.described = 0
        self.forms = collections.Counter()          # "map" / "array:N" of BlockStored events
        self.map_keys = set()
        self.events = collections.Counter()         # by tag
        self.block_sizes = collections.Counter()
        self.stored_with_tokens = self.stored_without_tokens = self.offload_without_tokens = 0
        self.hash_kinds = collections.Counter()
        self.batch_lengths = collections.Counter()
        self.kept = []                # (topic, dp rank, payload, runs from block 0 as token lists)

    @property
    def has_runs(self):
        return bool(self.kept)


class EngineCheck:
    """Listens to an engine's publisher (each data-parallel rank's endpoint) and reports."""

    def __init__(self, args):
        """ValueError when an argument's value is unusable."""
        if args.block_size <= 0:
            raise ValueError("--block-size must be positive, got %d" % args.block_size)
        if args.data_parallel_size < 1:
            raise ValueError("--data-parallel-size must be at least 1")
        for flag in ("duration", "replay_timeout", "max_skew"):
            if not getattr(args, flag) > 0:
                raise ValueError("--%s must be positive" % flag.replace("_", "-"))
        if args.replay_endpoint is not None:
            check_endpoint(args.replay_endpoint, "--replay-endpoint")
        self.args = args
        self.listeners = [_Listener(r, check_endpoint(dp_endpoint(args.engine, r), "--engine"))
                          for r in range(args.data_parallel_size)]
        self.report = Report("engine %s, listening up to %g s; kvcm's settings: %s"
                             % (args.engine, args.duration, _settings(args)))
        self.elapsed = 0.0
        # reads batch headers as kvcm does (and checks the hash settings: ValueError)
        self._header_sink = EventSink(Index(16), args.block_size, args.hash_algo, args.hash_seed)

    # -- listening ---------------------------------------------------------------------

    def run(self):
        ctx = zmq.Context()
        try:
            if not self._open(ctx):
                return self.report
            self._listen()
            self._describe_arrival()
            if any(listener.messages for listener in self.listeners):
                self._describe_format()
                self._describe_topics()
                self._describe_ranks()
                self._check_block_size_and_hashes()
                self._check_token_ids()
                self._check_tokenizer()
                self._check_clock()
            self._check_replay(ctx)
        finally:
            ctx.destroy(linger=0)
        return self.report

    def _open(self, ctx):
        for listener in self.listeners:
            sock = listener.sock = ctx.socket(zmq.SUB)
            sock.linger = 0
            sock.rcvhwm = 100_000
            sock.subscribe(b"")
            try:
                if _listens_by_binding(listener.endpoint):
                    sock.bind(listener.endpoint)
                else:
                    sock.connect(listener.endpoint)
            except zmq.ZMQError as exc:
                self.report.add(PROBLEM, "Cannot listen on %s: %s%s." % (
                    listener.endpoint, exc.strerror,
                    " (is kvcm serve bound there? inspect it with --url)" if exc.errno == zmq.EADDRINUSE else ""))
                return False
        return True

    def _listen(self):
        poller = zmq.Poller()
        by_socket = {}
        for listener in self.listeners:
            poller.register(listener.sock, zmq.POLLIN)
            by_socket[listener.sock] = listener
        start = time.monotonic()
        deadline = start + self.args.duration
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for sock, _ in poller.poll(max(1, int(min(left, 0.2) * 1000))):
                listener = by_socket[sock]
                for _ in range(1000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._observe(listener, frames, time.time())
            if all(listener.has_runs for listener in self.listeners):
                break     # enough to judge every endpoint
        self.elapsed = time.monotonic() - start

    def _observe(self, listener, frames, now):
        listener.messages += 1
        if len(frames) != 3:
            listener.bad_frames["%d frames instead of 3" % len(frames)] += 1
            return
        topic, seq8, payload = frames
        if len(seq8) != 8:
            listener.bad_frames["a sequence frame of %d bytes instead of 8" % len(seq8)] += 1
            return
        try:
            ts, rank, _ = self._header_sink.batch_header(payload)
        except DecodeError as exc:
            listener.bad_frames["a payload that is not a KV-event batch (%s)" % exc.reason] += 1
            return
        topic = topic.decode("utf-8", "replace")
        if topic in listener.topics or len(listener.topics) < MAX_TOPICS:
            listener.topics[topic] += 1
        listener.batch_ranks[rank] += 1
        listener.skews.append(now - ts)
        seq = int.from_bytes(seq8, "big")
        previous = listener.last.get((topic, rank))
        if previous is not None:
            if seq < previous[0]:
                listener.restarts += 1
            elif seq > previous[0] + 1:
                listener.gaps += 1
        if previous is not None or len(listener.last) < MAX_TOPICS:
            listener.last[(topic, rank)] = (seq, payload)
        if listener.described < DESCRIBE_BATCHES:
            listener.described += 1
            self._describe_batch(listener, topic, rank, payload)

    def _describe_batch(self, listener, topic, rank, payload):
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False, unicode_errors="replace")
        except Exception:   # the core read it: only what the description needs is missing
            return
        listener.batch_lengths[len(batch)] += 1
        runs = []
        for event in batch[1] if isinstance(batch[1], list) else ():
            fields = self._fields(listener, event)
            if fields is not None:
                run = self._stored(listener, fields)
                if run:
                    runs.append(run)
        if runs and len(listener.kept) < KEEP_BATCHES:
            listener.kept.append((topic, rank, payload, runs))

    @staticmethod
    def _fields(listener, event):
        """The event's fields by name, counting its tag and form; None unless BlockStored."""
        if isinstance(event, list) and event:
            tag = event[0]
            names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
            fields = dict(zip(names, event[1:]))
            form = "array:%d" % len(event)
        elif isinstance(event, dict):
            tag, fields, form = event.get("type"), event, "map"
            listener.map_keys.update(k for k in event if isinstance(k, str))
        else:
            return None
        tag = tag if isinstance(tag, str) else "?"
        listener.events[tag] += 1
        if tag != "BlockStored":
            return None
        listener.forms[form] += 1
        return fields

    @staticmethod
    def _stored(listener, fields):
        """Counts a BlockStored; returns its token ids when it is a run from block 0."""
        for h in (fields.get("block_hashes") or ())[:1]:
            listener.hash_kinds["bytes" if isinstance(h, bytes) else "int"] += 1
        tokens = fields.get("token_ids") or ()
        medium = fields.get("medium")
        if not tokens:
            if isinstance(medium, str) and medium.upper() != "GPU":
                listener.offload_without_tokens += 1
            else:
                listener.stored_without_tokens += 1
            return None
        listener.stored_with_tokens += 1
        size = fields.get("block_size")
        if isinstance(size, int) and not isinstance(size, bool):
            listener.block_sizes[size] += 1
        if fields.get("parent_block_hash") is None and all(isinstance(t, int) for t in tokens):
            return list(tokens)
        return None

    # -- the findings ------------------------------------------------------------------

    def _describe_arrival(self):
        for listener in self.listeners:
            where = listener.endpoint
            if len(self.listeners) > 1:
                where += " (rank %d)" % listener.rank
            if not listener.messages:
                self.report.add(PROBLEM, "No events arrived from %s in %.1f s. Check that the engine publishes "
                                         "there (vLLM: --kv-events-config with enable_kv_cache_events true, publisher "
                                         "zmq), and send it a request while the doctor listens: an idle engine "
                                         "sends nothing." % (where, self.elapsed))
                continue
            batches = sum(listener.batch_ranks.values())
            events = sum(listener.events.values())
            self.report.add(OK, "Events arrive from %s: %d batch%s with %d event%s in %.1f s."
                            % (where, batches, "" if batches == 1 else "es", events, "" if events == 1 else "s",
                               self.elapsed))
            for reason, n in sorted(listener.bad_frames.items()):
                self.report.add(PROBLEM, "%d message%s from %s had %s; kvcm drops them."
                                % (n, "" if n == 1 else "s", where, reason))
            if listener.gaps or listener.restarts:
                self.report.add(NOTE, "While the doctor listened the stream on %s skipped sequence numbers %d "
                                      "time(s) and went back %d time(s) (an engine restart)."
                                % (where, listener.gaps, listener.restarts))

    def _describe_format(self):
        forms = collections.Counter()
        keys, lengths, kinds = set(), collections.Counter(), collections.Counter()
        for listener in self.listeners:
            forms.update(listener.forms)
            keys |= listener.map_keys
            lengths.update(listener.batch_lengths)
            kinds.update(listener.hash_kinds)
        if not forms:
            self.report.add(NOTE, "No BlockStored event arrived, so the event format and the block hashes "
                                  "could not be seen.")
            return
        parts = []
        for form, n in forms.most_common():
            if form == "map":
                newest = next((v for key, v in _MAP_MARKERS if key in keys), None)
                parts.append("map events (vLLM %s or later)" % (newest or "0.24"))
            else:
                size = int(form.split(":")[1])
                version = _ARRAY_VERSIONS.get(size)
                parts.append("array events of %d elements (%s)" % (size, version) if version else
                             "array events of %d elements (not a length vLLM writes: another publisher)" % size)
        if lengths.get(2):
            parts.append("batches without a data-parallel rank (vLLM 0.9.0)")
        kind = "int" if not kinds.get("bytes") else "bytes" if not kinds.get("int") else "mixed"
        hashes = {"int": "block hashes as integers",
                  "bytes": "block hashes as bytes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0; kvcm reads their "
                           "last 8 bytes)",
                  "mixed": "block hashes both as integers and as bytes"}[kind]
        self.report.add(OK, "Format: %s; %s. kvcm reads %s." % ("; ".join(parts), hashes,
                                                               "both" if len(forms) > 1 else "it"))

    def _describe_topics(self):
        model = self.args.model
        for listener in self.listeners:
            for topic in sorted(listener.topics):
                ids = _topic_ids(topic.encode("utf-8"))
                if ids is not None:
                    pod, topic_model = ids
                    text = ("Topic %r: pod %r, model %r (llm-d's kv@POD@MODEL: kvcm's bind mode takes both from it)."
                            % (topic, pod, topic_model))
                    if model is not None and model != topic_model:
                        self.report.add(NOTE, text + " kvcm connected with model=%s files the events under %r "
                                                     "instead." % (model, model))
                    else:
                        self.report.add(OK, text)
                elif model is not None:
                    self.report.add(OK, "Topic %r is not kv@POD@MODEL: kvcm must connect to this engine "
                                        "(--engine NAME=%s,model=%s); in bind mode it would drop these events."
                                    % (topic, self.args.engine, model))
                else:
                    self.report.add(PROBLEM, "Topic %r names no model: kvcm must connect to this engine with the "
                                             "model given (--engine NAME=%s,model=MODEL; check it here with --model), "
                                             "or the engine must publish with topic kv@POD@MODEL."
                                    % (topic, self.args.engine))

    def _describe_ranks(self):
        several = len(self.listeners) > 1
        for listener in self.listeners:
            ranks = sorted(listener.batch_ranks)
            if ranks == [listener.rank]:
                if several or listener.rank:
                    self.report.add(OK, "Data-parallel rank %d publishes on %s." % (listener.rank, listener.endpoint))
                else:
                    self.report.add(OK, "Data-parallel rank: 0 only (no data parallelism on this endpoint).")
            elif several:
                self.report.add(PROBLEM, "%s carries batches of data-parallel rank(s) %s, not %d: vLLM offsets "
                                         "rank r's port by r, and kvcm asks rank r's replay endpoint (port + r) "
                                         "for its gaps."
                                % (listener.endpoint, ", ".join(map(str, ranks)), listener.rank))
            else:
                self.report.add(NOTE, "%s carries data-parallel rank(s) %s: the engine runs data parallel, and rank r "
                                      "publishes on the port + r. Give kvcm every rank's endpoint (a --zmq-bind or "
                                      "--engine per rank) and check them all with --data-parallel-size."
                                % (listener.endpoint, ", ".join(map(str, ranks))))

    def _kept(self):
        return [item for listener in self.listeners for item in listener.kept]

    def _verify(self, block_size):
        """(verified runs, mismatched runs, {namespace: diagnosis}) from kvcm's own event sink,
        configured as kvcm serve (hash mode auto) at block_size, fed the kept batches."""
        sink = EventSink(Index(DOCTOR_INDEX_BLOCKS), block_size, self.args.hash_algo, self.args.hash_seed, "auto",
                         warn=lambda message: None)
        contexts = {}
        for topic, rank, payload, _ in self._kept():
            ids = _topic_ids(topic.encode("utf-8"))
            model = self.args.model or (ids[1] if ids else "(no model)")
            key = (topic, rank)
            if key not in contexts:
                contexts[key] = StreamContext(ids[0] if ids else self.args.engine, model)
            sink.apply(contexts[key], payload)
        c = sink.counters
        diagnoses = {name: ns["diagnosis"] for name, ns in sink.namespaces().items() if ns["diagnosis"]}
        return c["parity_verified"], c["parity_mismatch"], diagnoses

    def _check_block_size_and_hashes(self):
        sizes = collections.Counter()
        for listener in self.listeners:
            sizes.update(listener.block_sizes)
        want = self.args.block_size
        others = sorted(size for size in sizes if size != want)
        if sizes and not others:
            self.report.add(OK, "Block size: %d tokens, as --block-size %d." % (want, want))
        for size in others:
            self.report.add(PROBLEM, "Block size: the engine uses %d-token blocks but --block-size is %d: kvcm would "
                                     "key this model with its own hashes (decoupled mode) instead of the engine's. "
                                     "Set --block-size %d." % (size, want, size))
        if not self._kept():
            if sizes or any(listener.stored_without_tokens for listener in self.listeners):
                self.report.add(PROBLEM, "Block hashes could not be checked: no run of blocks from block 0 with "
                                         "token ids arrived. Send the engine a prompt it has not cached while the "
                                         "doctor listens.")
            return
        # hashes are checked at the engine's block size: the answer then holds once that is fixed
        for size in ([want] if not others else others):
            self._report_hashes(size, size != want)

    def _report_hashes(self, block_size, after_fix):
        verified, mismatched, diagnoses = self._verify(block_size)
        settings = _settings(self.args, block_size)
        prefix = "With --block-size %d, block hashes" % block_size if after_fix else "Block hashes"
        if diagnoses:
            for text in diagnoses.values():
                self.report.add(PROBLEM, "%s do not match: %s" % (prefix, text))
        elif verified:
            self.report.add(OK, "%s match %s (%d run%s from block 0 recomputed): kvcm keeps the engine's own hashes "
                                "(parity)." % (prefix, settings, verified, "" if verified == 1 else "s"))
        elif not mismatched:
            self.report.add(PROBLEM, "Block hashes could not be checked: the runs from block 0 that arrived were all "
                                     "LoRA adapters' or carried multimodal extra keys, which kvcm does not "
                                     "recompute. Send the engine a plain prompt while the doctor listens.")

    def _check_token_ids(self):
        with_tokens = sum(listener.stored_with_tokens for listener in self.listeners)
        without = sum(listener.stored_without_tokens for listener in self.listeners)
        offload = sum(listener.offload_without_tokens for listener in self.listeners)
        if not (with_tokens or without or offload):
            return
        if without:
            self.report.add(PROBLEM, "Token ids: %d of %d GPU BlockStored events carry none, so kvcm can neither "
                                     "check their hashes nor key them itself when the hashes differ."
                            % (without, without + with_tokens))
        elif with_tokens:
            self.report.add(OK, "Token ids: present in every GPU BlockStored event (%d)." % with_tokens)
        if offload:
            self.report.add(NOTE, "%d offload (CPU/storage) BlockStored event(s) carry no token ids, as vLLM's "
                                  "offloading connectors send them: kvcm adds their tier to blocks it already knows."
                            % offload)

    def _check_tokenizer(self):
        if self.args.tokenizer is None:
            return
        from kvcm import tokenize

        try:
            tokenizer = tokenize.Tokenizer(self.args.tokenizer)
        except (OSError, ValueError, tokenize.TokenizerLoadError) as exc:
            self.report.add(PROBLEM, "Tokenizer %s cannot be loaded: %s" % (self.args.tokenizer, exc))
            return
        runs = [run for _, _, _, item_runs in self._kept() for run in item_runs]
        if not runs:
            self.report.add(NOTE, "Tokenizer: no run from block 0 arrived to compare with %s." % self.args.tokenizer)
            return
        vocab = tokenizer.vocab_size
        beyond = max(max(run) for run in runs)
        if beyond >= vocab:
            self.report.add(PROBLEM, "Tokenizer: the events hold token id %d, past the %d ids of %s: the engine uses "
                                     "another tokenizer, so kvcm's scores by prompt would find nothing."
                            % (beyond, vocab, self.args.tokenizer))
            return
        differing = sum(not _round_trips(tokenizer, run) for run in runs)
        if differing:
            self.report.add(PROBLEM, "Tokenizer: re-encoding the text of %d of %d runs from block 0 with %s gives "
                                     "other token ids: the engine uses another tokenizer (or another version of "
                                     "it), so kvcm's scores by prompt would miss." % (differing, len(runs),
                                                                                      self.args.tokenizer))
        else:
            self.report.add(OK, "Tokenizer: %s encodes the text of the %d run%s from block 0 to the events' token ids."
                            % (self.args.tokenizer, len(runs), "" if len(runs) == 1 else "s"))

    def _check_clock(self):
        skews = [s for listener in self.listeners for s in listener.skews]
        if not skews:
            return
        median = statistics.median(skews)
        side = "behind" if median >= 0 else "ahead of"
        text = ("Clock: event timestamps are %.3f s %s this host's clock (%s, transit included)"
                % (abs(median), side, "one batch" if len(skews) == 1 else "median of %d batches" % len(skews)))
        if abs(median) > self.args.max_skew:
            self.report.add(PROBLEM, text + ", more than --max-skew %g s: synchronise the clocks (NTP); a kvcm "
                                            "sharing its index tells engine restarts by these timestamps."
                            % self.args.max_skew)
        else:
            self.report.add(OK, text + ".")

    def _check_replay(self, ctx):
        replay = self.args.replay_endpoint
        if replay is None:
            self.report.add(NOTE, "Replay: no replay endpoint given (--replay-endpoint). Without one kvcm counts a "
                                  "gap in this engine's stream and marks it degraded instead of filling it; vLLM "
                                  "offers one with replay_endpoint in --kv-events-config.")
            return
        for listener in self.listeners:
            self._probe_replay(ctx, dp_endpoint(replay, listener.rank), listener)

    def _probe_replay(self, ctx, endpoint, listener):
        """Asks for the last live batch seen (or, when none was, for nothing: the end marker)."""
        last = max(listener.last.values(), key=lambda item: item[0], default=None)
        start = last[0] if last is not None else (1 << 63)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        replies = []
        try:
            sock.connect(endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            while sock.poll(int(self.args.replay_timeout * 1000)):
                frames = sock.recv_multipart()
                replies.append(frames)
                if END_SEQ in frames[1:3] or len(replies) > 16:
                    break
        except zmq.ZMQError as exc:
            self.report.add(PROBLEM, "Replay: %s: %s." % (endpoint, exc.strerror))
            return
        finally:
            sock.close(linger=0)
        self._report_replay(endpoint, start, last, replies)

    def _report_replay(self, endpoint, start, last, replies):
        if not replies or END_SEQ not in replies[-1][1:3]:
            self.report.add(PROBLEM, "Replay: %s did not answer within %g s: check the address and that the engine "
                                     "binds it (replay_endpoint in --kv-events-config)."
                            % (endpoint, self.args.replay_timeout))
            return
        layout = "vLLM 0.26 or later" if len(replies[-1]) == 4 else "before vLLM 0.26"
        batches = [(f[-2], f[-1]) for f in replies[:-1] if len(f) in (3, 4)]
        if last is None:
            self.report.add(OK, "Replay: %s answers (%s layout)." % (endpoint, layout))
        elif batches and batches[0] == (start.to_bytes(8, "big"), last[1]):
            self.report.add(OK, "Replay: %s answers (%s layout) and holds the live stream's batch %d."
                            % (endpoint, layout, start))
        else:
            self.report.add(PROBLEM, "Replay: %s answers (%s layout) but does not hold batch %d as it was published "
                                     "live: it may belong to another engine or rank." % (endpoint, layout, start))


def _round_trips(tokenizer, ids):
    """Whether decoding ids and encoding the text again gives ids back. A run ends at a block
    boundary, which may cut a word or a character: the last few tokens may differ."""
    text = tokenizer.backend.decode(ids, skip_special_tokens=False)
    again = tokenizer.encode(text, add_special_tokens=False)
    same = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
    return same >= len(ids) - 4


# ---- a running kvcm -----------------------------------------------------------------------------

def inspect_kvcm(url):
    """A report on the streams of the kvcm answering at url, from its /v1/status."""
    report = Report("kvcm at %s" % url)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/status", timeout=10) as response:
            status = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        report.add(PROBLEM, "%s answers /v1/status with HTTP %d: is it kvcm, and a version with a status page?"
                   % (url, exc.code))
        return report
    except (urllib.error.URLError, OSError, ValueError) as exc:
        report.add(PROBLEM, "kvcm does not answer at %s: %s." % (url, getattr(exc, "reason", exc)))
        return report
    cfg = status["config"]
    report.title += " (version %s, up %d s); its settings: --hash-algo %s --hash-seed %s --block-size %d " \
                    "--hash-mode %s" % (status["version"], status["uptime_s"], cfg["hash_algo"],
                                        _seed_flag(cfg["hash_seed"]), cfg["block_size"], cfg["hash_mode"])
    if status["ready"]:
        report.add(OK, "Ready.")
    else:
        report.add(PROBLEM, "Not ready: %s." % status["ready_reason"])
    _report_streams(report, status["streams"])
    for ns in status["namespaces"]:
        if ns["diagnosis"]:
            report.add(PROBLEM, "Model %r is keyed with kvcm's own hashes: %s" % (ns["name"], ns["diagnosis"]))
    drops = [("event", reason, n) for reason, n in status["drops"]["events"].items()] + \
            [("message", reason, n) for reason, n in status["drops"]["messages"].items()]
    for what, reason, n in drops:
        report.add(PROBLEM, "%d %s%s dropped (%s): see kvcm_ingest_%s_drops_total in /metrics and kvcm's log."
                   % (n, what, "" if n == 1 else "s", reason, what))
    return report


def _report_streams(report, streams):
    if not streams:
        report.add(PROBLEM, "No engine has published events to this kvcm yet: run `kvcm doctor --engine ENDPOINT` "
                            "against an engine to see why.")
        return
    for s in streams:
        name = "Stream %s / %s / rank %d" % (s["pod"], s["model"], s["dp_rank"])
        blocks = ", ".join("%d %s" % (n, tier) for tier, n in sorted((s.get("blocks") or {}).items())) or "no blocks"
        text = ("%s: %s, last seq %s, last event %.1f s ago, %d gap(s), %d replay(s), %d restart(s), %s mode, %s."
                % (name, s["state"], s["last_seq"], s["last_event_age_s"], s["gaps"], s["replays"], s["restarts"],
                   s["hash_mode"], blocks))
        if s["state"] == "degraded":
            report.add(PROBLEM, text + " Batches were lost and no replay filled them: give kvcm the engine's replay "
                                       "endpoint (--replay-endpoint POD=EP or --engine ...,replay=EP).")
        else:
            report.add(OK, text)


__all__ = ["EngineCheck", "Report", "add_doctor_arguments", "inspect_kvcm", "main"]
