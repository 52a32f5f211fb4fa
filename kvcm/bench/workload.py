"""The workload of `kvcm bench index`: what N simulated vLLM engines publish, and what to ask.

Deterministic for a seed. Each engine serves a multi-tenant chat: conversations start with
one of a few system prompts shared by every engine (or, for a fraction of them, with nothing
shared), grow turn by turn (each turn stores the blocks it adds, chained to the last one),
and end at a length drawn from the prompt-length distribution. An engine keeps a few
conversations in flight and holds at most its capacity in blocks: before storing, it evicts
the least recently finished conversation from its tail (BlockRemoved), so what it still
holds is always a prefix, as vLLM's prefix cache keeps it. A recorded trace (token-id lists
or prompts) can replace the generated conversations.

Events are vLLM's: BlockStored with token ids, parent links and vLLM-exact sha256 hashes
(seed unset), BlockRemoved, in the map form of vLLM >= 0.24 or the array form of 0.20,
`events_per_batch` to a batch, pre-encoded before any clock starts.

Markers make progress visible through any query API: every engine's stream carries, at a
few points, one block of a marker sequence that every engine stores alike (a 1-block prompt
of its own), so one query of marker j names every engine that applied its stream up to it
(a stream is applied in order). The last marker closes each stream.

The generator keeps, per engine, the exact set of blocks held at the end: `expected()`
answers any query as a correct index must, so every answer of a target can be checked.
"""

import dataclasses
import json
import random
from array import array

from kvcm._core import BlockHasher
from kvcm.publisher import block_removed, block_stored, encode_batch

VOCAB = 151_936           # Qwen3's vocabulary: token ids need 17-18 bits, as real ones do
EVENT_FORMATS = ("map", "array", "mixed")
MARKERS = 16              # progress markers per stream (plus the closing one)
_TS0 = 1.7e9              # batch timestamps: fixed, so payloads are deterministic


class WorkloadError(ValueError):
    """A workload that cannot be built from the given sizes or trace."""


def parse_lengths(text):
    """`1024,4096,32768` (equally likely) or `1024:5,4096:3,32768:1` (weights) ->
    [(tokens, weight)]."""
    out = []
    for part in text.split(","):
        tokens, _, weight = part.strip().partition(":")
        try:
            n, w = int(tokens), float(weight) if weight else 1.0
        except ValueError:
            raise WorkloadError("prompt lengths: %r is not TOKENS or TOKENS:WEIGHT" % part) from None
        if n <= 0 or w <= 0:
            raise WorkloadError("prompt lengths: %r must be positive" % part)
        out.append((n, w))
    if not out:
        raise WorkloadError("prompt lengths: none given")
    return out


@dataclasses.dataclass
class Spec:
    engines: int = 16
    blocks: int = 262_144                   # blocks stored by all engines in the ingest stream
    prompt_tokens: tuple = ((1024, 1.0), (4096, 1.0), (32768, 1.0))
    system_prompts: int = 4
    system_tokens: int = 128
    unique_fraction: float = 0.1            # conversations that share nothing
    turns: int = 4
    active: int = 4                         # conversations in flight per engine
    engine_capacity: int = 0                # blocks per engine; 0: room for everything
    events_per_batch: int = 4
    event_blocks: int = 16
    block_size: int = 16
    event_format: str = "map"
    model: str = "bench"
    seed: int = 0

    def check(self):
        if self.engines < 1 or self.blocks < self.engines:
            raise WorkloadError("need at least one engine and one block per engine")
        if self.block_size < 1 or self.event_blocks < 1 or self.events_per_batch < 1 or self.turns < 1 \
                or self.active < 1:
            raise WorkloadError("block size, event blocks, events per batch, turns and active must be positive")
        if not 0 <= self.unique_fraction <= 1:
            raise WorkloadError("the unique fraction must be within 0..1")
        if self.event_format not in EVENT_FORMATS:
            raise WorkloadError("event format must be one of %s" % ", ".join(EVENT_FORMATS))


@dataclasses.dataclass
class Conversation:
    tokens: list                 # every token of its final length (a multiple of the block size)
    keys: list                   # vLLM's key of each block
    text: str = None             # text workloads: the prompt text, and each token's end offset
    ends: list = None


@dataclasses.dataclass
class Query:
    tokens: list
    expected: dict               # engine index -> matched tokens (engines matching nothing left out)
    text: str = None


class Stream:
    """One engine's pre-encoded batches and the progress they carry."""

    def __init__(self, engine):
        self.engine = engine
        self.payloads = []
        self.blocks = 0              # blocks stored (markers included)
        self.marker_blocks = []      # blocks stored up to and including marker j


def random_tokens(rng, n):
    """n token ids uniform over VOCAB (fast: one randbytes call)."""
    return [x % VOCAB for x in array("I", rng.randbytes(4 * n))]


class Workload:
    """Builds the streams of `spec` (and, on request, more of them and probes)."""

    def __init__(self, spec, trace=None, tokenizer=None):
        spec.check()
        self.spec = spec
        self.hasher = BlockHasher("sha256", None, spec.block_size)
        self.tokenizer = tokenizer            # kvcm.tokenize.Tokenizer: text workloads
        self._trace = list(trace) if trace is not None else None
        rng = random.Random("kvcm bench %d" % spec.seed)
        self._lengths = [n for n, _ in spec.prompt_tokens]
        self._weights = [w for _, w in spec.prompt_tokens]
        self.systems = [self._conversation(rng, spec.system_tokens, shared_prefix=None)
                        for _ in range(spec.system_prompts)] if spec.system_tokens >= spec.block_size else []
        self.markers = [self._conversation(rng, spec.block_size, None) for _ in range(MARKERS + 3)]
        self.hello = self.markers.pop()       # the marker of "this engine is connected"
        self.swi_marker = self.markers.pop()  # closes the streams of more()
        self.engines = [_Engine(self, e) for e in range(spec.engines)]
        self.streams = []
        self.generate_seconds = None

    # ---- conversations ----------------------------------------------------------------------

    def _conversation(self, rng, n_tokens, shared_prefix):
        bs = self.spec.block_size
        n_tokens = max(bs, n_tokens // bs * bs)
        if self.tokenizer is not None:
            return self._text_conversation(rng, n_tokens, shared_prefix)
        head = list(shared_prefix.tokens) if shared_prefix is not None else []
        tokens = head + random_tokens(rng, max(0, n_tokens - len(head)))
        return Conversation(tokens, list(self.hasher.keys(tokens)))

    def _text_conversation(self, rng, n_tokens, shared_prefix):
        """Text of about n_tokens tokens (words of a seeded vocabulary) after the shared
        prefix's text, cut after whole blocks where the cut text alone tokenizes back to
        exactly those blocks (so a server tokenizing it hashes what the engine published)."""
        words = ["w%x" % rng.getrandbits(20) for _ in range(n_tokens + 8)]
        text = (shared_prefix.text + "\n" if shared_prefix is not None else "") + " ".join(words)
        enc = self.tokenizer.backend.encode(text, add_special_tokens=True)
        bs = self.spec.block_size
        ends = [end for _, end in enc.offsets]
        first = max(bs, min(n_tokens, len(ends)) // bs * bs)
        for n in list(range(first, len(ends) + 1, bs)) + list(range(first - bs, 0, -bs)):
            tokens = list(enc.ids[:n])
            if self.tokenizer.encode(text[:ends[n - 1]]) == tokens:
                return Conversation(tokens, list(self.hasher.keys(tokens)), text=text[:ends[n - 1]], ends=ends[:n])
        raise WorkloadError("no whole block of %r tokenizes back to itself" % text[:40])

    def new_conversation(self, rng, engine):
        """The next conversation of an engine: from the trace, or generated."""
        if self._trace is not None:
            if not self._trace:
                return None
            item = self._trace.pop(0)
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise WorkloadError("a trace of prompts needs --tokenizer")
                tokens = self.tokenizer.encode(item)
            else:
                tokens = item
            tokens = tokens[:len(tokens) // self.spec.block_size * self.spec.block_size]
            if not tokens:
                return self.new_conversation(rng, engine)
            return Conversation(tokens, list(self.hasher.keys(tokens)))
        n = rng.choices(self._lengths, self._weights)[0]
        shared = None
        if self.systems and rng.random() >= self.spec.unique_fraction:
            shared = rng.choice(self.systems)
        return self._conversation(rng, n, shared)

    # ---- streams ----------------------------------------------------------------------------

    def build(self):
        """Generates every engine's ingest stream (self.streams)."""
        spec = self.spec
        share, extra = divmod(spec.blocks, spec.engines)
        self.streams = [engine.generate(share + (e < extra), self.markers[:-1], self.markers[-1])
                        for e, engine in enumerate(self.engines)]
        return self.streams

    def more(self, blocks):
        """Further streams (`blocks` in all, after what build() made): the ingest of the
        score-while-ingesting phase. Their blocks are not in `expected()`'s answers."""
        share = max(1, blocks // self.spec.engines)
        return [engine.generate(share, [], self.swi_marker) for engine in self.engines]

    def probe(self, rng, engine):
        """(payload, query tokens) of one fresh block on its own (a 1-block prompt)."""
        conv = self._conversation(rng, self.spec.block_size, None)
        return self.engines[engine].payload([self._stored(conv, 0, 1, None)]), conv

    def hello_payload(self):
        return encode_batch([self._stored(self.hello, 0, 1, None)], ts=_TS0)

    def _stored(self, conv, start, end, form):
        bs = self.spec.block_size
        return block_stored(conv.keys[start:end], conv.keys[start - 1] if start else None,
                            conv.tokens[start * bs:end * bs], bs, form=form or "map")

    # ---- queries ----------------------------------------------------------------------------

    def queries(self, n_tokens, count, rng=None):
        """Up to `count` queries of n_tokens tokens (prefixes of conversations still held
        whole by their engine, spread over the engines), each with its expected answer;
        [] when no held conversation is that long."""
        rng = rng or random.Random("queries %d %d" % (self.spec.seed, n_tokens))
        bs = self.spec.block_size
        n_blocks = n_tokens // bs
        pools = [[c for c in engine.held_conversations() if len(c.keys) >= n_blocks] for engine in self.engines]
        pools = [p for p in pools if p]
        out = []
        for i in range(count if pools else 0):
            conv = rng.choice(pools[i % len(pools)])
            if conv.text is not None:
                text = conv.text[:conv.ends[n_blocks * bs - 1]]
                tokens = self.tokenizer.encode(text)
            else:
                text, tokens = None, conv.tokens[:n_tokens]
            out.append(Query(tokens, self.expected(tokens), text))
        return out

    def expected(self, tokens):
        """{engine: matched tokens}: for each engine the length of its run of held blocks
        from block 0 of tokens, in tokens, as the index should answer after the ingest."""
        keys = list(self.hasher.keys(tokens))
        out = {}
        for engine in self.engines:
            n = 0
            while n < len(keys) and keys[n] in engine.held:
                n += 1
            if n:
                out[engine.index] = n * self.spec.block_size
        return out

    def marker_query(self, j):
        """The query of marker j (len(self.markers) - 1: the closing one)."""
        conv = self.markers[j]
        return Query(conv.tokens, {}, conv.text)

    def held_entries(self):
        """(block, engine) entries held at the end of the ingest stream."""
        return sum(len(e.held) for e in self.engines)


class _Engine:
    """One simulated engine: its conversations, its cache and its sequence of batches."""

    def __init__(self, workload, index):
        self.w = workload
        self.index = index
        self.rng = random.Random("engine %d %d" % (workload.spec.seed, index))
        self.refs = {}            # held block -> how many held conversations (or pins) hold it
        self.held = self.refs.keys()
        self.active = []          # [conversation, blocks held, blocks per turn]
        self.finished = []        # [conversation, blocks held], least recently finished first
        self.pinned = {k for s in workload.systems for k in s.keys}   # refreshed by every use
        self.events = []
        self.stream = None
        self.batch_no = 0

    def held_conversations(self):
        return [c for c, n, *_ in self.finished + self.active if n == len(c.keys)]

    def form(self):
        fmt = self.w.spec.event_format
        if fmt == "mixed":
            return "map" if self.batch_no % 2 == 0 else "array"
        return fmt

    def payload(self, events):
        self.batch_no += 1
        return encode_batch(events, ts=_TS0 + self.batch_no)

    def _emit(self, event):
        self.events.append(event)
        if len(self.events) >= self.w.spec.events_per_batch:
            self._flush()

    def _flush(self):
        if self.events:
            self.stream.payloads.append(self.payload(self.events))
            self.events = []

    def _evict(self, need):
        """Frees room for `need` more blocks: releases the least recently finished
        conversations from their tails; a block stays while another held conversation
        shares it, and the pinned ones (system prompts, markers) always stay."""
        cap = self.w.spec.engine_capacity
        removed = []
        while cap > 0 and len(self.refs) + need > cap and self.finished:
            entry = self.finished[0]
            conv, n = entry
            while n > 0 and len(self.refs) + need > cap:
                n -= 1
                key = conv.keys[n]
                self.refs[key] -= 1
                if not self.refs[key] and key not in self.pinned:
                    del self.refs[key]
                    removed.append(key)
            if n:
                entry[1] = n
            else:
                self.finished.pop(0)
        step = self.w.spec.event_blocks
        for i in range(0, len(removed), step):
            self._emit(block_removed(removed[i:i + step], form=self.form()))

    def _store(self, conv, start, end):
        """Holds blocks start..end of conv; BlockStored events for the runs not yet held
        (vLLM announces only blocks it computed)."""
        new = [k not in self.refs for k in conv.keys[start:end]]
        if any(new):
            self._evict(sum(new))
        step = self.w.spec.event_blocks
        i = start
        while i < end:
            if not new[i - start]:
                i += 1
                continue
            j = i
            while j < end and new[j - start] and j - i < step:
                j += 1
            self._emit(self.w._stored(conv, i, j, self.form()))
            i = j
        for key in conv.keys[start:end]:
            self.refs[key] = self.refs.get(key, 0) + 1
        self.stream.blocks += sum(new)

    def _marker(self, conv):
        self._flush()
        self.pinned.add(conv.keys[0])
        self._store(conv, 0, 1)
        self._flush()
        self.stream.marker_blocks.append(self.stream.blocks)

    def generate(self, budget, markers, closing):
        """A stream storing about `budget` blocks, with the progress `markers` spread over
        it and the `closing` marker last."""
        self.stream = Stream(self.index)
        todo = list(markers)
        step = budget / (len(todo) + 1)
        while self.stream.blocks < budget:
            if len(self.active) < self.w.spec.active:
                conv = self.w.new_conversation(self.rng, self.index)
                if conv is not None:
                    turns = min(self.w.spec.turns, len(conv.keys))
                    self.active.append([conv, 0, -(-len(conv.keys) // turns)])
                elif not self.active:
                    break
            slot = self.active[self.rng.randrange(len(self.active))]
            conv, done, per_turn = slot
            end = min(len(conv.keys), done + per_turn, done + budget - self.stream.blocks)
            self._store(conv, done, end)
            slot[1] = end
            if end == len(conv.keys) or self.stream.blocks >= budget:
                self.active.remove(slot)
                self.finished.append([conv, end])
            while todo and self.stream.blocks >= step * (len(markers) - len(todo) + 1):
                self._marker(todo.pop(0))
        for conv in todo + [closing]:
            self._marker(conv)
        self._flush()
        return self.stream


def marker_progress(stream, markers_seen):
    """Blocks of `stream` known applied once its first `markers_seen` markers are visible."""
    if not markers_seen:
        return 0
    return stream.marker_blocks[min(markers_seen, len(stream.marker_blocks)) - 1]


def read_trace(path):
    """A JSONL trace: one prompt per line, {"token_ids": [...]} or {"prompt": "..."} (a bare
    JSON list or string also works). Returns [list of ints | str]."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise WorkloadError("%s:%d: not JSON (%s)" % (path, n, exc)) from None
                if isinstance(item, dict):
                    item = item.get("token_ids", item.get("prompt"))
                ok = isinstance(item, str) or (isinstance(item, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2 ** 32 for t in item))
                if not ok:
                    raise WorkloadError("%s:%d: expected token ids or a prompt" % (path, n))
                out.append(item)
    except OSError as exc:
        raise WorkloadError("%s: %s" % (path, exc.strerror)) from None
    if not out:
        raise WorkloadError("%s: no prompts" % path)
    return out


