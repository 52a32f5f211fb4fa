# vLLM KV events -> index effects (DESIGN.md §2 and §4, specs/vllm-kv-events.md).
#
# The transport (kvcm/ingest.py) owns sockets, topics and sequence numbers; it hands each
# batch payload to EventSink.apply with the stream's StreamContext. Here: decoding both event
# encodings (arrays before vLLM 0.24, maps after), the hash-mode contract (parity vs
# decoupled, per model namespace), LoRA namespaces, block-size re-chunking, offload tiers,
# and counting every drop by reason. One bad event never drops the rest of its batch.
#
# With a journal (a shared index, kvcm/shared_index.py) the sink does not write block entries
# into its Index: it reports each effect to the journal, in order, and keeps in the Index only
# what it needs to resolve later events locally (names and the engine-hash map, as a cache).

import logging

from kvcm.ratelog import RateLimitedLog

_log = logging.getLogger("kvcm.events")

HASH_MODES = ("auto", "vllm", "kvcm")
# What engines hash with: every chain of the hasher's ALGORITHMS but kvcm's own, that is
# vLLM's algorithms and llm-d's request keys (llm-d-inference-sim >= 0.8 publishes those;
# specs/llmd-request-keys.md).
ENGINE_ALGORITHMS = tuple(algo for algo in ALGORITHMS if algo != "kvcm")
# The media vLLM (GPU, CPU, Disk; FS and OBJ before STORAGE) and LMCache (cpu) publish, as
# tier names. Other media are dropped and counted unless the operator names them in the
# scorer's tier weights: a publisher must not be able to fill the 16-tier table with junk.
KNOWN_TIERS = ("gpu", "cpu", "disk", "storage", "fs", "obj")
_LIKELY_SEEDS = (None, "0", "42", "")  # besides the configured one; None = unset
# the engine algorithms a parity mismatch is checked against (sha256_cbor_64bit is not)
_DIAGNOSE_ALGOS = tuple(algo for algo in ENGINE_ALGORITHMS if algo != "sha256_cbor_64bit")


cdef enum Mode:
    MODE_PARITY = 0
    MODE_DECOUPLED

cdef enum Style:   # how a namespace's engines hash extra keys (vLLM >= 0.31 tags them)
    STYLE_UNKNOWN = 0
    STYLE_TAGGED
    STYLE_UNTAGGED

# Counters. The drop_* entries after drop_truncated follow MpError's order.
COUNTER_NAMES = (
    "batches", "events_stored", "events_removed", "events_cleared", "events_unknown_tag",
    "blocks_stored", "blocks_removed", "parity_verified", "parity_mismatch",
    "block_size_decoupled", "offload_unresolved", "drop_unknown_parent", "remove_unresolved",
    "drop_truncated", "drop_wrong_type", "drop_too_deep", "drop_bad_utf8", "drop_invalid",
    "drop_missing_hashes", "drop_bad_block_size", "drop_token_count",
    "drop_block_size_unsupported", "drop_bad_hash", "drop_batch",
    "drop_no_model", "drop_out_of_memory", "drop_unknown_tier", "drop_event_too_large",
    "namespaces_evicted",
)

cdef enum Counter:
    C_BATCHES = 0
    C_EVENTS_STORED
    C_EVENTS_REMOVED
    C_EVENTS_CLEARED
    C_EVENTS_UNKNOWN_TAG
    C_BLOCKS_STORED
    C_BLOCKS_REMOVED
    C_PARITY_VERIFIED
    C_PARITY_MISMATCH
    C_BLOCK_SIZE_DECOUPLED
    C_OFFLOAD_UNRESOLVED
    C_DROP_UNKNOWN_PARENT
    C_REMOVE_UNRESOLVED
    C_DROP_TRUNCATED        # + (MpError - MP_TRUNCATED) for the reader's errors
    C_DROP_WRONG_TYPE
    C_DROP_TOO_DEEP
    C_DROP_BAD_UTF8
    C_DROP_INVALID
    C_DROP_MISSING_HASHES
    C_DROP_BAD_BLOCK_SIZE
    C_DROP_TOKEN_COUNT
    C_DROP_BLOCK_SIZE_UNSUPPORTED
    C_DROP_BAD_HASH
    C_DROP_BATCH
    C_DROP_NO_MODEL
    C_DROP_OUT_OF_MEMORY
    C_DROP_UNKNOWN_TIER
    C_DROP_EVENT_TOO_LARGE
    C_NAMESPACES_EVICTED
    N_COUNTERS

cdef enum:
    MAX_PARTIAL_CHAINS = 4096  # per stream, for engines whose blocks are smaller than kvcm's
    MAX_NAME_CACHE = 256
    MAX_FED = 64               # namespaces a stream resolves removals through
    # A run from block 0 is verified on its first two blocks only: the algorithm, the seed
    # and a cache salt show in block 0's hash, how a parent is chained in block 1's, and
    # every later hash chains the same way; so they tell whether the engines hash as
    # configured, and a 16-block event costs an eighth of rehashing it whole to check.
    VERIFY_BLOCKS = 2


cdef bytes u64_csv(const uint64_t *values, Py_ssize_t n):
    """values as comma-separated decimal ASCII: how a shared index's journal carries keys
    (one store argument per list, split by the store's script)."""
    cdef bytes out
    cdef char *p
    cdef char digits[20]
    cdef Py_ssize_t i, d
    cdef uint64_t v
    if n <= 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, n * 21)
    p = PyBytes_AS_STRING(out)
    for i in range(n):
        v = values[i]
        d = 0
        while True:
            digits[d] = <char>(48 + v % 10)
            d += 1
            v //= 10
            if v == 0:
                break
        while d:
            d -= 1
            p[0] = digits[d]
            p += 1
        p[0] = 44   # ','
        p += 1
    return out[:p - PyBytes_AS_STRING(out) - 1]


cdef class _Namespace:
    """One model (or LoRA) namespace's hash contract."""
    cdef readonly str name
    cdef readonly bint lora
    cdef uint32_t id
    cdef Mode mode
    cdef Style style
    cdef bint warned  # a forced-parity mismatch was reported
    cdef bint evicted  # forgotten to make room: streams that fed it skip it
    cdef uint64_t active  # the sink's use count when it was last used (least recent is evicted first)
    cdef readonly object diagnosis  # why the engines' hashes are not kvcm's, once known (str)
    cdef BlockHasher parity     # the engines' chain; its root depends on the name for llmd_fnv64a
    cdef BlockHasher decoupled  # kvcm's own chain, rooted at (seed, name)
    cdef readonly object base   # a LoRA's base model: the model of the streams that fed it

    @property
    def mode_name(self):
        return "parity" if self.mode == MODE_PARITY else "decoupled"

    @property
    def style_name(self):
        return ("unknown", "tagged", "untagged")[<int>self.style]


@cython.no_gc_clear   # __dealloc__ unbinds the pod from _index
cdef class StreamContext:
    """Per-stream state the sink keeps between batches: which namespaces the stream has fed
    (BlockRemoved and token-less stores resolve through them), whether a replay would help,
    and partial chains for engines whose blocks are smaller than kvcm's."""
    cdef readonly str pod
    cdef readonly object model
    cdef public bint needs_replay
    cdef readonly double ts    # the timestamp of the last batch applied
    cdef bint warned_parent    # an unknown parent was logged (once per stream)
    cdef object _index  # the Index pod_id belongs to
    cdef uint32_t pod_id
    cdef dict _fed    # _Namespace -> None, least recently fed first, at most MAX_FED
    cdef _Namespace _last_fed
    cdef object _partial  # (ns, engine hash) -> (parent key, pending tokens, their engine hashes, extra)

    def __init__(self, str pod, model=None):
        self.pod = pod
        self.model = model
        self.needs_replay = False
        self._index = None
        self.pod_id = KVI_NIL
        self._fed = {}
        self._last_fed = None
        self._partial = None

    def __dealloc__(self):
        if self._index is not None:
            (<Index>self._index)._unbind_pod(self.pod_id)

    @property
    def fed(self):
        """Names of the namespaces this stream has stored into, least recently fed first."""
        return tuple(n.name for n in self._fed if not (<_Namespace>n).evicted)

    cdef inline void feed(self, _Namespace ns):
        if ns is self._last_fed:
            return
        self._last_fed = ns
        if self._fed.pop(ns, False) is False and len(self._fed) >= MAX_FED:
            del self._fed[next(iter(self._fed))]
        self._fed[ns] = None


cdef class EventSink


# the keys scoring remembers unless told otherwise (--key-memo-blocks)
DEFAULT_KEY_MEMO_BLOCKS = 65536

cdef enum:
    MAX_FAST_MEDIA = 8
    # Events a run applies without the GIL before the stream's Python state is touched again
    # (each event takes the index lock for its own change of the index only).
    FAST_RUN_EVENTS = 32
    MAX_MEDIUM_NAME = 16

cdef struct Medium:
    unsigned char name[MAX_MEDIUM_NAME]
    Py_ssize_t len
    uint32_t tier

cdef struct FastPath:
    # what a run of common events may do, read from Python state before the run (_fast_setup)
    kvi_index *index
    uint32_t pod
    bint any       # no journal: some events can be applied in C
    bint stores    # the stream's model namespace is in parity mode: BlockStored of it
    bint removes   # and no decoupled namespace the stream fed could resolve a hash: BlockRemoved
    uint32_t ns    # that namespace's id
    # its parity chain, which runs from block 0 are verified against
    const unsigned char *root
    Py_ssize_t digest_len
    Py_ssize_t hash_block
    int chain_kind
    # out: the run stored into or removed from it
    bint stored
    bint removed


cdef class BatchCursor:
    """One batch being applied for a stream (EventSink.cursor), a slice at a time. Events
    apply whole and in order; the effects on a shared index's journal stay with the batch."""
    cdef EventSink sink
    cdef StreamContext ctx
    cdef Batch batch
    cdef Py_ssize_t next    # the next event to apply
    cdef Py_ssize_t pos     # where it starts
    cdef Py_ssize_t left    # events not applied yet
    cdef object journal_state

    def apply(self, Py_ssize_t max_bytes=0):
        """Applies events, in order, until they took at least max_bytes of the payload (the
        event that crosses it included; 0: until the end). True once the batch is done."""
        return self.sink._apply_events(self, max_bytes)

    @property
    def done(self):
        return self.left == 0


cdef class EventSink:
    """Applies vLLM KV-event batches to an Index under kvcm's key contract."""
    cdef Index _index
    cdef readonly Py_ssize_t block_size
    cdef readonly str hash_algo
    cdef readonly object hash_seed
    cdef readonly str hash_mode
    cdef BlockHasher _parity   # the engines' chain, for algorithms whose root ignores the model
    cdef readonly KeyMemo key_memo   # scoring's keys of recent prefixes (not the ingest's)
    cdef bint _llmd            # llm-d's request keys: salted with the model or LoRA name alone
    cdef object _warn
    cdef dict _namespaces
    cdef list _switched
    cdef dict _tier_cache   # medium bytes -> tier id, or -1 for a medium that is dropped
    cdef frozenset _tiers   # the tier names accepted
    cdef dict _lora_cache   # lora name bytes -> str
    cdef uint32_t _gpu_tier
    cdef uint64_t _uses     # namespace uses so far: their clock for eviction
    cdef object _rlog
    cdef uint64_t _c[<int>N_COUNTERS]
    cdef const uint64_t *_h   # the hashes of the event being applied (in its Batch)
    cdef const uint64_t *_t   # and its token ids
    cdef U64Scratch _keys
    cdef Medium _media[MAX_FAST_MEDIA]   # media resolved to a tier, for _fast_tier
    cdef int _nmedia
    cdef uint64_t _fast_gen   # bumped whenever what _fast_setup reads may have changed
    cdef bint _fast_path                 # False: every event takes the general path (tests compare)
    cdef object _journal    # None: effects go to the Index
    cdef list _changed      # namespaces whose contract changed since take_changed_namespaces()

    def __init__(self, Index index, Py_ssize_t block_size=16, str hash_algo="sha256",
                 hash_seed=None, str hash_mode="auto", warn=None, journal=None, tiers=(), bint fast_path=True,
                 size_t key_memo_blocks=DEFAULT_KEY_MEMO_BLOCKS):
        if hash_mode not in HASH_MODES:
            raise ValueError("unknown hash mode %r (expected one of %s)" % (hash_mode, ", ".join(HASH_MODES)))
        if hash_algo not in ENGINE_ALGORITHMS:
            raise ValueError("hash algorithm %r cannot be an engine's (expected one of %s)"
                             % (hash_algo, ", ".join(ENGINE_ALGORITHMS)))
        self._parity = BlockHasher(hash_algo, hash_seed, block_size)
        self.key_memo = KeyMemo(key_memo_blocks, block_size)
        self._llmd = hash_algo.startswith("llmd_")
        self._index = index
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.hash_seed = hash_seed
        self.hash_mode = hash_mode
        self._warn = warn
        self._namespaces = {}
        self._switched = []
        self._tier_cache = {}
        self._tiers = frozenset(KNOWN_TIERS) | frozenset(t.lower() for t in tiers)
        if len(self._tiers) > KVI_MAX_TIERS:
            raise ValueError("at most %d tiers, counting the known media %s, got %d"
                             % (KVI_MAX_TIERS, ", ".join(KNOWN_TIERS), len(self._tiers)))
        self._lora_cache = {}
        self._gpu_tier = index._tiers.intern("gpu")
        self._rlog = RateLimitedLog(_log)
        self._journal = journal
        self._fast_path = fast_path
        self._changed = []
        memset(self._c, 0, sizeof(self._c))

    def __dealloc__(self):
        free(self._keys.data)

    @property
    def index(self):
        return self._index

    @property
    def counters(self):
        return {name: self._c[i] for i, name in enumerate(COUNTER_NAMES)}

    def namespaces(self):
        """{name: {"mode", "extra_style", "lora", "diagnosis"}} for every namespace seen;
        diagnosis is None, or the sentence that reported why the engines' hashes are not
        kvcm's (kept for operators: the status page, `kvcm doctor`)."""
        return {name: {"mode": ns.mode_name, "extra_style": ns.style_name, "lora": ns.lora,
                       "diagnosis": ns.diagnosis}
                for name, ns in list(self._namespaces.items())}   # a copy: the ingest thread may add one

    def take_switched(self):
        """Namespaces switched to decoupled mode since the last call; their entries were
        cleared, so the transport should ask their streams for a replay where it can."""
        out, self._switched = self._switched, []
        return out

    def take_changed_namespaces(self):
        """[(name, mode, extra style, lora, base model or None)] of namespaces created,
        switched, or whose extra-key style or LoRA base was learnt since the last call, for a
        shared index to record."""
        out, self._changed = self._changed, []
        return [(ns.name, ns.mode_name, ns.style_name, ns.lora, ns.base) for ns in dict.fromkeys(out)]

    def adopt_namespace(self, str name, str mode, str style="unknown", bint lora=False, base=None):
        """Takes on a namespace contract another replica recorded: a switch to decoupled mode,
        a learnt extra-key style (both one-way) and a LoRA's base model. Local entries are
        not cleared: the replica that switched cleared the shared index."""
        cdef _Namespace ns = self._namespace(name, lora, False)
        self._fast_gen += 1
        if mode == "decoupled":
            ns.mode = MODE_DECOUPLED
        if ns.style == STYLE_UNKNOWN and style in ("tagged", "untagged"):
            ns.style = STYLE_TAGGED if style == "tagged" else STYLE_UNTAGGED
        if ns.base is None and base:
            ns.base = base

    def restore_fed(self, StreamContext ctx, names):
        """Tells a stream restored from a snapshot which namespaces it fed, least recently
        first (its BlockRemoved events resolve through them); unknown names are skipped."""
        cdef _Namespace ns
        self._fast_gen += 1
        for name in names:
            ns = self._namespaces.get(name)
            if ns is not None:
                ctx.feed(ns)

    def clear_pod(self, pod):
        """An engine restarted: its cache is gone in every namespace."""
        if self._journal is not None:
            self._journal.clear_pod(pod, None)
            return 0
        return self._index.clear_pod(pod)

    # ---- namespaces and the read path -------------------------------------------------

    cdef _Namespace _namespace(self, str name, bint lora, bint record=True, bint named=True):
        """The namespace called name, created at first sight. A LoRA namespace is `named`
        when events carry the adapter's name (not only its integer id)."""
        cdef _Namespace ns = self._namespaces.get(name)
        if ns is not None:
            return ns
        self._fast_gen += 1
        if self._index._ns.full():
            self._evict_namespaces()
        ns = _Namespace.__new__(_Namespace)
        ns.name = name
        ns.lora = lora
        ns.id = self._index._ns.intern(name)
        # LoRA events publish the adapter's name, but vLLM hashes its path too, so its LoRA
        # blocks can never be verified: decoupled. llm-d's keys are salted with the name
        # alone, so under them a named LoRA is verified and kept in parity like a base model.
        ns.mode = MODE_DECOUPLED if (self.hash_mode == "kvcm" or lora and not (self._llmd and named)) \
            else MODE_PARITY
        ns.style = STYLE_UNKNOWN
        ns.parity = self._parity_hasher(name)
        ns.decoupled = BlockHasher("kvcm", self.hash_seed, self.block_size, namespace=name)
        self._namespaces[name] = ns
        self._touch(ns)
        if record:
            self._changed.append(ns)
        return ns

    cdef BlockHasher _parity_hasher(self, str name):
        if self.hash_algo == "llmd_fnv64a":
            return BlockHasher(self.hash_algo, self.hash_seed, self.block_size, namespace=name)
        return self._parity

    def base_model(self, str name):
        """The base model of LoRA adapter `name`, learnt from the streams whose events
        carried it; None when name is not a LoRA seen in events."""
        cdef _Namespace ns = self._namespaces.get(name)
        return None if ns is None else ns.base

    cdef inline void _touch(self, _Namespace ns) noexcept nogil:
        self._uses += 1
        ns.active = self._uses

    cdef void _evict_namespaces(self) except *:
        """The namespace table is full: forgets the least recently used sixteenth of the
        namespaces (at least one) in one walk of the index, so that a stream of new names
        costs one walk per thousands of them. Their entries and engine-map entries go."""
        cdef _Namespace ns
        cdef Py_ssize_t limit = self._index._ns.limit
        by_age = sorted([(ns.active, ns.name) for ns in self._namespaces.values()])
        victims = [name for _, name in by_age[:max(1, limit // 16)]]
        for name in victims:
            ns = self._namespaces.pop(name)
            ns.evicted = True
        removed = self._index.forget_namespaces(victims)
        self._c[<int>C_NAMESPACES_EVICTED] += len(victims)
        self._rlog.warning("table_full:namespaces",
                           "the namespace table is full (%d models and LoRA adapters): forgot the %d least "
                           "recently used and their %d entries", limit, len(victims), removed)

    def mode_of(self, str model):
        """"parity" or "decoupled": how keys are computed for requests naming model."""
        cdef _Namespace ns = self._namespaces.get(model)
        if ns is not None:
            return ns.mode_name
        return "decoupled" if self.hash_mode == "kvcm" else "parity"

    def keys_for(self, str model, tokens, cache_salt=None):
        """The kvcm keys of a request's tokens for model (a base model or LoRA name), as the
        write path stores them."""
        cdef _Namespace ns = self._namespaces.get(model)
        extra = None
        if ns is None or ns.mode == MODE_PARITY:
            if ns is None and self.hash_mode == "kvcm":
                return BlockHasher("kvcm", self.hash_seed, self.block_size, namespace=model).keys(
                    tokens, None if cache_salt is None else [[cache_salt]], memo=self.key_memo)
            # llm-d's keys leave a cache salt out: its engines share those blocks
            if cache_salt is not None and not self._llmd:
                untagged = ns is not None and ns.style == STYLE_UNTAGGED
                extra = [(cache_salt,) if untagged else (("cache_salt", cache_salt),)]
            return (self._parity_hasher(model) if ns is None else ns.parity).keys(tokens, extra,
                                                                                    memo=self.key_memo)
        return ns.decoupled.keys(tokens, None if cache_salt is None else [[cache_salt]], memo=self.key_memo)

    # ---- batches ------------------------------------------------------------------------

    def decode(self, payload):
        """The batch decoded (a Batch, for cursor() and missing_engine_hashes()); DecodeError
        when it is not a well-formed batch: its header, the structure of every event and
        its dp_rank are checked. `batch.check()` gives (ts, dp_rank, number of events)."""
        cdef Batch batch = Batch(payload)
        batch.check()
        return batch

    def batch_header(self, payload):
        """(ts, dp_rank, number of events) of a batch payload; DecodeError when it is not a
        well-formed batch. Checks the structure of every event on the way."""
        return Batch(payload).check()

    def apply(self, StreamContext ctx not None, payload):
        """Applies every event of a batch (a payload or a Batch) for the stream; returns the
        number of (block, pod) entries stored plus removed. Bad events are dropped and
        counted; DecodeError only when the batch itself cannot be read."""
        cdef int64_t before = self._c[<int>C_BLOCKS_STORED] + self._c[<int>C_BLOCKS_REMOVED]
        self.cursor(ctx, payload).apply()
        return self._c[<int>C_BLOCKS_STORED] + self._c[<int>C_BLOCKS_REMOVED] - before

    def cursor(self, StreamContext ctx not None, payload):
        """A BatchCursor that applies a batch (a payload or a Batch from decode()) for the
        stream a slice at a time, so that a huge batch need not hold the caller for long.
        Reads the batch header (DecodeError when it cannot be read); no event is applied yet."""
        cdef Batch batch
        cdef BatchCursor cursor
        cdef _Namespace model
        if ctx._index is None:
            ctx.pod_id = self._index._bind_pod(ctx.pod)
            ctx._index = self._index
        elif ctx._index is not self._index:
            raise ValueError("StreamContext belongs to another index")
        if isinstance(payload, Batch):
            batch = payload
            batch.rewind()
        else:
            try:
                batch = Batch(payload)
            except DecodeError:
                self._c[<int>C_DROP_BATCH] += 1
                raise
        self._c[<int>C_BATCHES] += 1
        ctx.ts = batch.ts
        # a model whose engines publish is in use, even while they only remove blocks
        model = self._namespaces.get(ctx.model) if ctx.model is not None else None
        if model is not None:
            self._touch(model)
        cursor = BatchCursor.__new__(BatchCursor)
        cursor.sink = self
        cursor.ctx = ctx
        cursor.batch = batch
        cursor.pos = batch.events_pos
        cursor.left = batch.nevents
        return cursor

    cdef bint _apply_events(self, BatchCursor cursor, Py_ssize_t max_bytes) except -1:
        cdef Batch b = cursor.batch
        cdef Event *ev
        cdef Py_ssize_t done, end, stop = cursor.pos + max_bytes if max_bytes > 0 else -1
        cdef FastPath f
        if self._journal is not None and cursor.journal_state is not None:
            self._journal.resume(cursor.journal_state)
            cursor.journal_state = None
        self._fast_setup(cursor.ctx, &f)
        while cursor.left > 0:
            ev = b.event(cursor.next)
            if ev == NULL:
                # the rest of the batch cannot be delimited
                self._count_reader_error(b.trunc_err)
                cursor.left = 0
                break
            done = 0
            if f.any:
                # without the GIL (the scoring thread goes on), a bounded run of events,
                # each taking the index lock for its change of the index alone
                with nogil:
                    done = self._fast_run(b, cursor.next, min(cursor.left, <Py_ssize_t>FAST_RUN_EVENTS),
                                          stop, &f, &end)
            if done:
                self._fast_done(cursor.ctx, &f)
            else:
                ilock_acquire_gil(&self._index._lock)
                try:
                    self._apply_event(cursor.ctx, b, ev)
                finally:
                    ilock_release(&self._index._lock)
                self._fast_setup(cursor.ctx, &f)   # the event may have changed what is common
                done = 1
                end = ev.end
            cursor.next += done
            cursor.left -= done
            cursor.pos = end
            if stop >= 0 and cursor.pos >= stop:
                break
        if cursor.left > 0 and self._journal is not None:
            # another stream's batches apply before the next slice: they must not take these effects
            cursor.journal_state = self._journal.suspend()
        return cursor.left == 0

    cdef inline void _count_reader_error(self, MpError err) noexcept nogil:
        self._c[<int>C_DROP_TRUNCATED + <int>err - <int>MP_TRUNCATED] += 1

    # ---- the common events, in C ------------------------------------------------------------
    #
    # Most events are BlockStored/BlockRemoved events of a stream's model in parity mode, of
    # kvcm's block size, without LoRA or extra keys, in a medium seen before: their effects
    # need no Python object, so runs of them are applied by _fast_run. Anything else goes to
    # the general path (_apply_event), after which the state the run reads is taken again.

    cdef void _fast_setup(self, StreamContext ctx, FastPath *f) except *:
        """What a run of common events may do for ctx's stream, read from the Python state."""
        cdef _Namespace model, ns
        memset(f, 0, sizeof(FastPath))
        f.index = &self._index.ix
        f.pod = ctx.pod_id
        f.any = self._journal is None and self._fast_path   # a journal takes every effect in Python
        if not f.any or ctx.model is None:
            return
        model = self._namespaces.get(ctx.model)
        if model is None or model.mode != MODE_PARITY or model.parity.block_size > KVCM_CHAIN_MAX_TOKENS:
            return
        f.root = model.parity._root
        f.digest_len = model.parity._digest_len
        f.hash_block = model.parity.block_size
        f.chain_kind = model.parity._chain_kind()
        f.ns = model.id
        f.stores = True
        f.removes = True   # unless a decoupled namespace the stream fed could resolve a hash
        for ns in ctx._fed:
            if ns.mode == MODE_DECOUPLED and not ns.evicted:
                f.removes = False

    cdef void _fast_done(self, StreamContext ctx, FastPath *f) except *:
        """The Python side of a run's effects: the model's namespace was used (and fed)."""
        cdef _Namespace model
        if not (f.stored or f.removed):
            return
        model = self._namespaces[ctx.model]
        self._touch(model)
        if f.stored:
            ctx.feed(model)
        f.stored = f.removed = False

    cdef Py_ssize_t _fast_run(self, Batch b, Py_ssize_t i, Py_ssize_t left, Py_ssize_t stop,
                              FastPath *f, Py_ssize_t *end) noexcept nogil:
        """Applies events i, i + 1, ... of b while they are common ones, at most `left`, and
        stops after the one that ends at or past payload position stop (-1: no limit).
        Returns how many it applied; *end is where the last of them ends. (Event records
        move when a window is decoded: none is held across b.event().)"""
        cdef Py_ssize_t done = 0
        cdef Event *ev
        while done < left:
            ev = b.event(i + done)
            if ev == NULL or not self._fast_event(b, ev, f):
                break
            done += 1
            end[0] = ev.end
            if stop >= 0 and ev.end >= stop:
                break
        return done

    cdef bint _fast_tier(self, Event *ev, uint32_t *tier) noexcept nogil:
        cdef int i
        if ev.medium == NULL:
            tier[0] = self._gpu_tier
            return True
        for i in range(self._nmedia):
            if self._media[i].len == ev.medium_len and memcmp(self._media[i].name, ev.medium, ev.medium_len) == 0:
                tier[0] = self._media[i].tier
                return True
        return False

    cdef bint _fast_event(self, Batch b, Event *ev, FastPath *f) noexcept nogil:
        """Applies ev when it is a common event (see above); False (nothing done) when not."""
        cdef uint32_t tier
        cdef Py_ssize_t n = ev.nhashes, nv
        cdef int64_t added
        cdef const uint64_t *hashes
        cdef unsigned char parent[32]
        if ev.err != MP_OK:
            self._count_reader_error(ev.err)
            return True
        if ev.too_large:
            self._c[<int>C_DROP_EVENT_TOO_LARGE] += 1
            return True
        if ev.tag == TAG_CLEARED:
            self._c[<int>C_EVENTS_CLEARED] += 1
            ilock_acquire(&self._index._lock)
            kvi_clear_pod(f.index, f.pod, <int>self._gpu_tier, KVI_NIL)
            ilock_release(&self._index._lock)
            return True
        if ev.tag == TAG_UNKNOWN:
            self._c[<int>C_EVENTS_UNKNOWN_TAG] += 1
            return True
        if n < 0:
            self._c[<int>C_DROP_MISSING_HASHES] += 1
            return True
        if not self._fast_tier(ev, &tier):
            return False
        hashes = b.hashes.data + ev.hash_off
        if ev.tag == TAG_REMOVED:
            if not f.removes:
                return False
            self._c[<int>C_EVENTS_REMOVED] += 1
            ilock_acquire(&self._index._lock)
            self._c[<int>C_BLOCKS_REMOVED] += kvi_remove(f.index, f.ns, f.pod, tier, hashes, n)
            ilock_release(&self._index._lock)
            f.removed = True
            return True
        if not f.stores:
            return False
        if n and (ev.ntokens <= 0 or ev.lora != NULL or ev.has_lora_id or ev.extra_pos != ev.extra_end
                  or ev.has_parent and ev.parent == 0 or ev.ntokens != n * self.block_size
                  or ev.has_block_size and ev.block_size != self.block_size):
            return False
        if n and not ev.has_parent:
            # a run from block 0: verified on its first blocks, as _verify does
            nv = min(n, <Py_ssize_t>VERIFY_BLOCKS)
            if scratch_reserve(&self._keys, nv):
                return False
            memcpy(parent, f.root, f.digest_len)
            if kvcm_chain(f.chain_kind, b.tokens.data + ev.tok_off, nv,
                          f.hash_block, parent, self._keys.data, NULL) \
                    or memcmp(self._keys.data, hashes, nv * sizeof(uint64_t)):
                return False   # a mismatch: the general path reports and handles it
            self._c[<int>C_PARITY_VERIFIED] += 1
        self._c[<int>C_EVENTS_STORED] += 1
        if n == 0:
            return True
        ilock_acquire(&self._index._lock)
        added = kvi_store(f.index, f.ns, f.pod, tier, hashes, n)
        ilock_release(&self._index._lock)
        if added < 0:
            self._c[<int>C_DROP_OUT_OF_MEMORY] += 1
            return True
        self._c[<int>C_BLOCKS_STORED] += added
        f.stored = True
        return True

    # ---- one event, in general --------------------------------------------------------------

    cdef void _apply_event(self, StreamContext ctx, Batch b, Event *ev) except *:
        cdef const unsigned char *buf = b.buf()
        self._fast_gen += 1   # the general path may change what _fast_setup reads
        if ev.err != MP_OK:
            self._count_reader_error(ev.err)
            return
        self._h = b.hashes.data + ev.hash_off
        self._t = b.tokens.data + ev.tok_off
        if ev.too_large:
            self._c[<int>C_DROP_EVENT_TOO_LARGE] += 1
            return
        if ev.tag == TAG_CLEARED:
            self._c[<int>C_EVENTS_CLEARED] += 1
            if self._journal is not None:
                self._journal.clear_pod(ctx.pod, "gpu")
            else:
                kvi_clear_pod(&self._index.ix, ctx.pod_id, <int>self._gpu_tier, KVI_NIL)
            return
        if ev.tag == TAG_UNKNOWN:
            self._c[<int>C_EVENTS_UNKNOWN_TAG] += 1
            return
        if ev.nhashes < 0:
            self._c[<int>C_DROP_MISSING_HASHES] += 1
            return
        tier = self._tier(ev)
        if tier < 0:
            return
        if ev.tag == TAG_REMOVED:
            self._c[<int>C_EVENTS_REMOVED] += 1
            self._removed(ctx, ev.nhashes, <uint32_t>tier)
        else:
            self._stored(ctx, buf, ev, <uint32_t>tier)

    cdef int64_t _tier(self, Event *ev) except? -2:
        """The tier id of the event's medium (lower-cased; missing -> gpu), or -1 (counted)
        for a medium that is not a known one."""
        if ev.medium == NULL:
            return self._gpu_tier
        key = PyBytes_FromStringAndSize(<const char *>ev.medium, ev.medium_len)
        tier = self._tier_cache.get(key)
        if tier is None:
            try:
                name = key.decode("utf-8").lower()
            except UnicodeDecodeError:
                self._c[<int>C_DROP_BAD_UTF8] += 1
                return -1
            if name not in self._tiers:
                tier = -1
            else:
                try:
                    tier = self._index._tiers.intern(name)
                except ValueError:   # the index's tiers were also named through Index.store
                    tier = -1
            if len(self._tier_cache) < MAX_NAME_CACHE:
                self._tier_cache[key] = tier
            if tier >= 0 and self._nmedia < MAX_FAST_MEDIA and ev.medium_len <= MAX_MEDIUM_NAME:
                memcpy(self._media[self._nmedia].name, ev.medium, ev.medium_len)
                self._media[self._nmedia].len = ev.medium_len
                self._media[self._nmedia].tier = <uint32_t>tier
                self._nmedia += 1
        if tier < 0:
            self._c[<int>C_DROP_UNKNOWN_TIER] += 1
            self._rlog.warning("unknown_tier", "dropping events whose medium %.40r is not a known tier (%s); "
                               "name it in --tier-weights to keep it", key, ", ".join(sorted(self._tiers)))
        return tier

    cdef object _lora_namespace(self, Event *ev):
        """The LoRA name an event belongs to, None for the base model, or False (counted)."""
        if ev.lora != NULL:
            key = PyBytes_FromStringAndSize(<const char *>ev.lora, ev.lora_len)
            name = self._lora_cache.get(key)
            if name is None:
                try:
                    name = key.decode("utf-8")
                except UnicodeDecodeError:
                    self._c[<int>C_DROP_BAD_UTF8] += 1
                    return False
                if len(self._lora_cache) < MAX_NAME_CACHE:
                    self._lora_cache[key] = name
            return name
        if ev.has_lora_id:
            # vLLM before 0.14 published only the adapter's integer id
            return "lora-id-%d" % ev.lora_id
        return None

    cdef object _extras(self, const unsigned char *buf, Event *ev):
        """The event's untagged per-block extra keys as lists, None when absent, or False
        (counted) when they are not a list of nil-or-list."""
        cdef MpReader r
        if ev.extra_pos == ev.extra_end:
            return None
        mp_init(&r, buf, ev.extra_pos, ev.extra_end)
        try:
            extras = mp_read_object(&r, 2)
        except _MpFailure:
            self._count_reader_error(r.err)
            return False
        for e in extras:
            if e is not None and type(e) is not list:
                self._c[<int>C_DROP_WRONG_TYPE] += 1
                return False
        return extras

    # ---- BlockStored ------------------------------------------------------------------------

    cdef void _stored(self, StreamContext ctx, const unsigned char *buf, Event *ev, uint32_t tier) except *:
        cdef Py_ssize_t n = ev.nhashes, bs
        cdef _Namespace ns
        self._c[<int>C_EVENTS_STORED] += 1
        if n == 0:
            return
        if ev.ntokens <= 0:
            # offload connectors announce tiers of blocks they do not describe
            self._stored_tokenless(ctx, n, tier)
            return
        if ev.has_block_size:
            bs = ev.block_size
        elif ev.ntokens % n == 0:
            bs = ev.ntokens // n  # other publishers may leave the size out
        else:
            bs = 0
        if bs <= 0:
            self._c[<int>C_DROP_BAD_BLOCK_SIZE] += 1
            return
        if ev.ntokens % n or ev.ntokens // n != bs:  # not n * bs: that can overflow
            self._c[<int>C_DROP_TOKEN_COUNT] += 1
            return
        if (bs != self.block_size and bs % self.block_size and self.block_size % bs) \
                or bs // self.block_size > MAX_KEYS_PER_ENGINE_HASH:
            self._c[<int>C_DROP_BLOCK_SIZE_UNSUPPORTED] += 1
            return
        lora = self._lora_namespace(ev)
        if lora is False:
            return
        extras = self._extras(buf, ev)
        if extras is False:
            return
        if lora is None:
            if ctx.model is None:
                self._c[<int>C_DROP_NO_MODEL] += 1
                return
            ns = self._namespace(ctx.model, False)
        else:
            ns = self._namespace(lora, True, True, ev.lora != NULL)
            if ns.base is None and ctx.model is not None:
                ns.base = ctx.model
                self._changed.append(ns)
        if ev.has_parent and ev.parent == 0 and not self._knows(ns, 0):
            # llm-d-inference-sim's array events write 0 for "no parent"
            ev.has_parent = False
        if ns.mode == MODE_PARITY and bs != self.block_size:
            self._c[<int>C_BLOCK_SIZE_DECOUPLED] += 1
            ns.diagnosis = "model %r: engines publish %d-token blocks but --block-size is %d" % (
                ns.name, bs, self.block_size)
            self._switch(ctx, ns, ns.diagnosis + "; kvcm keys this model with its own hashes (decoupled mode)")
        if ns.mode == MODE_PARITY:
            if ev.has_parent or self._verify(ctx, ns, ev, extras):
                self._store(ctx, ns, self._h, n, tier)
                return
            if self.hash_mode == "vllm":
                # parity is forced: keep the engine's keys, but never fail silently
                if not ns.warned:
                    ns.warned = True
                    self._report(self._mismatch(ns, ev, extras) + " --hash-mode vllm keeps parity, so "
                                 "scoring by tokens will not find this model's blocks.")
                self._store(ctx, ns, self._h, n, tier)
                return
            self._switch(ctx, ns, self._mismatch(ns, ev, extras) +
                         " Keying it with kvcm's own hashes (decoupled mode).")
        self._stored_decoupled(ctx, ns, ev, extras, bs, lora, tier)

    cdef bint _knows(self, _Namespace ns, uint64_t h):
        """Whether h names a block of ns: an engine hash kvcm mapped (decoupled) or a key of
        the local index (parity)."""
        cdef uint64_t key
        if ns.mode == MODE_DECOUPLED:
            return kve_get(&self._index.emap, ns.id, h, &key, 1) > 0
        return kvi_find(&self._index.ix, ns.id, h) != KVI_NIL

    cdef int _store(self, StreamContext ctx, _Namespace ns, const uint64_t *keys, Py_ssize_t n, uint32_t tier) except -1:
        """Adds (pod, tier) to keys. With a journal, blocks_stored counts the entries sent
        (the shared index knows which were new)."""
        cdef int64_t added
        cdef Py_ssize_t i
        if self._journal is not None:
            self._journal.store(ns.name, ctx.pod, self._index._tiers.names[tier], u64_csv(keys, n), n)
            added = n
        else:
            added = kvi_store(&self._index.ix, ns.id, ctx.pod_id, tier, keys, n)
            if added < 0:
                self._c[<int>C_DROP_OUT_OF_MEMORY] += 1
                return 0
        self._c[<int>C_BLOCKS_STORED] += added
        self._touch(ns)
        ctx.feed(ns)
        return 0

    cdef void _remove(self, StreamContext ctx, _Namespace ns, const uint64_t *keys, Py_ssize_t n, uint32_t tier) except *:
        cdef Py_ssize_t i
        self._touch(ns)
        if self._journal is not None:
            self._journal.remove(ns.name, ctx.pod, self._index._tiers.names[tier], u64_csv(keys, n), n)
            self._c[<int>C_BLOCKS_REMOVED] += n
        else:
            self._c[<int>C_BLOCKS_REMOVED] += kvi_remove(&self._index.ix, ns.id, ctx.pod_id, tier, keys, n)

    cdef void _map_engine(self, _Namespace ns, uint64_t ehash, const uint64_t *keys, Py_ssize_t k) except *:
        """Engine hash -> its k kvcm keys, kept locally (to resolve later events without a
        round trip) and, with a journal, recorded for the other replicas."""
        cdef Py_ssize_t i
        if kve_set(&self._index.emap, ns.id, ehash, keys, k):
            self._c[<int>C_DROP_OUT_OF_MEMORY] += 1
        if self._journal is not None:
            self._journal.map_engine(ns.name, u64_csv(&ehash, 1), u64_csv(keys, k), k)

    cdef _Namespace _resolve(self, StreamContext ctx, _Namespace model, uint64_t h, uint64_t *keys, size_t *got):
        """The decoupled namespace whose engine map knows engine hash h (its kvcm keys then
        in keys[:got]): those the stream fed first, then the stream's model, which a stream
        new to this kvcm (a replica taking it over) has not fed yet. None when none does."""
        cdef _Namespace ns
        for ns in ctx._fed:
            if ns.mode == MODE_DECOUPLED and not ns.evicted:
                got[0] = min(kve_get(&self._index.emap, ns.id, h, keys, 64), <size_t>64)
                if got[0]:
                    return ns
        if model is not None and model.mode == MODE_DECOUPLED and model not in ctx._fed:
            got[0] = min(kve_get(&self._index.emap, model.id, h, keys, 64), <size_t>64)
            if got[0]:
                return model
        return None

    def missing_engine_hashes(self, StreamContext ctx not None, payload):
        """{namespace: [engine hash]}: what the batch (a payload or a Batch) would resolve
        through the engine map (decoupled parents, removals, token-less stores) and this kvcm
        has not learnt. A kvcm sharing its index fetches them from the store before applying
        the batch, so a replica taking over a stream goes on without a replay. Changes
        nothing."""
        cdef Batch b
        cdef Event *ev
        cdef const uint64_t *hashes
        cdef Py_ssize_t i, j
        cdef uint64_t keys[64]
        cdef size_t got
        cdef _Namespace ns, model = None
        out = {}
        if ctx.model is not None:
            model = self._namespaces.get(ctx.model)
        if isinstance(payload, Batch):
            b = payload
            b.rewind()
        else:
            try:
                b = Batch(payload)
            except DecodeError:
                return out
        for i in range(b.nevents):
            ev = b.event(i)
            if ev == NULL:
                break
            if ev.err != MP_OK or ev.nhashes <= 0:
                continue
            hashes = b.hashes.data + ev.hash_off
            if ev.tag == TAG_STORED and ev.ntokens > 0:
                if not ev.has_parent or ev.parent == 0 or \
                        (ev.has_block_size and ev.block_size < self.block_size):
                    continue   # a chain's first event, or blocks gathered per stream
                name = self._event_namespace_name(ctx, ev)
                ns = self._namespaces.get(name) if name is not None else None
                if ns is not None and ns.mode == MODE_DECOUPLED and \
                        not kve_get(&self._index.emap, ns.id, ev.parent, keys, 64):
                    out.setdefault(ns.name, []).append(ev.parent)
            elif ev.tag == TAG_STORED or ev.tag == TAG_REMOVED:
                for j in range(ev.nhashes):
                    if self._resolve(ctx, model, hashes[j], keys, &got) is not None:
                        continue
                    for ns in list(ctx._fed) + ([model] if model is not None else []):
                        if ns.mode == MODE_DECOUPLED and not ns.evicted:
                            out.setdefault(ns.name, []).append(hashes[j])
        b.rewind()
        return out

    cdef object _event_namespace_name(self, StreamContext ctx, Event *ev):
        """The namespace a BlockStored belongs to (as _lora_namespace, counting nothing)."""
        if ev.lora != NULL:
            try:
                return PyBytes_FromStringAndSize(<const char *>ev.lora, ev.lora_len).decode("utf-8")
            except UnicodeDecodeError:
                return None
        if ev.has_lora_id:
            return "lora-id-%d" % ev.lora_id
        return ctx.model

    cdef void _stored_tokenless(self, StreamContext ctx, Py_ssize_t n, uint32_t tier) except *:
        cdef Py_ssize_t i
        cdef uint64_t keys[64]
        cdef size_t got
        cdef _Namespace ns, model
        model = self._namespace(ctx.model, False) if ctx.model is not None else None
        for i in range(n):
            ns = self._resolve(ctx, model, self._h[i], keys, &got)
            if ns is not None:
                self._store(ctx, ns, keys, got, tier)
                continue
            if model is not None and model.mode == MODE_PARITY:
                self._store(ctx, model, &self._h[i], 1, tier)
            else:
                self._c[<int>C_OFFLOAD_UNRESOLVED] += 1

    cdef list _verifiable_extras(self, extras, Style style):
        """Extra keys for re-hashing a block-0 run in parity, in one style, or None when
        the blocks carry none. Only a cache salt (a lone string on block 0) is verifiable."""
        if extras is None or all(e is None or not e for e in extras):
            return None
        salt = extras[0][0]
        return [((salt,) if style == STYLE_UNTAGGED else (("cache_salt", salt),))]

    cdef bint _is_verifiable(self, extras):
        if extras is None:
            return True
        for i, e in enumerate(extras):
            if e is None or not e:
                continue
            if i != 0 or len(e) != 1 or type(e[0]) is not str:
                return False  # multimodal or prompt-embeds keys: cannot be recomputed here
        return True

    cdef bint _matches(self, BlockHasher hasher, Event *ev, extras) except -1:
        cdef Py_ssize_t n = min(ev.nhashes, <Py_ssize_t>VERIFY_BLOCKS)
        cdef unsigned char parent[32]
        if scratch_reserve(&self._keys, n):
            raise MemoryError()
        hasher.root_into(parent)
        hasher.chain(self._t, n, extras, parent, self._keys.data, NULL)
        return memcmp(self._keys.data, self._h, n * sizeof(uint64_t)) == 0

    cdef bint _verify(self, StreamContext ctx, _Namespace ns, Event *ev, extras) except -1:
        """Re-hashes a run that starts at block 0 with kvcm's configuration; True when the
        engine's hashes agree (or cannot be checked). Learns the namespace's extra-key style."""
        cdef Style style
        if not self._is_verifiable(extras):
            return True
        if self._verifiable_extras(extras, STYLE_TAGGED) is None:
            styles = (STYLE_TAGGED,)  # no extra keys: the style does not matter
        elif ns.style != STYLE_UNKNOWN:
            styles = (ns.style,)
        else:
            styles = (STYLE_TAGGED, STYLE_UNTAGGED)
        for style in styles:
            if self._matches(ns.parity, ev, self._verifiable_extras(extras, style)):
                if len(styles) > 1 or ns.style == STYLE_UNKNOWN and self._verifiable_extras(extras, style) is not None:
                    ns.style = style
                    self._changed.append(ns)
                self._c[<int>C_PARITY_VERIFIED] += 1
                return True
        self._c[<int>C_PARITY_MISMATCH] += 1
        return False

    cdef str _mismatch(self, _Namespace ns, Event *ev, extras):
        """The diagnosis of a parity mismatch, kept on the namespace for display."""
        ns.diagnosis = self._diagnose(ns, ev, extras)
        return ns.diagnosis

    cdef str _diagnose(self, _Namespace ns, Event *ev, extras):
        """What a parity mismatch means: the likely engine setting, when one matches."""
        seeds = [self.hash_seed] + [s for s in _LIKELY_SEEDS if s != self.hash_seed]
        mine = (self.hash_algo, _effective_seed(self.hash_algo, self.hash_seed))
        for algo in _DIAGNOSE_ALGOS:
            tried = {mine}
            for seed in seeds:
                if (algo, _effective_seed(algo, seed)) in tried:
                    continue
                tried.add((algo, _effective_seed(algo, seed)))
                hasher = BlockHasher(algo, seed, self.block_size, namespace=ns.name)
                for style in (STYLE_TAGGED, STYLE_UNTAGGED):
                    if not self._matches(hasher, ev, self._verifiable_extras(extras, style)):
                        continue
                    setting = "--hash-algo %s --hash-seed %s" % (algo, _seed_flag(seed))
                    if algo.startswith("llmd_"):
                        found = "the engines use llm-d keys: %s" % setting
                    else:
                        found = "the engines' block hashes match %s" % setting
                    return ("model %r: %s, not kvcm's --hash-algo %s --hash-seed %s. Set --hash-algo/--hash-seed "
                            "to the engines' --prefix-caching-hash-algo/PYTHONHASHSEED for parity."
                            % (ns.name, found, self.hash_algo, _seed_flag(self.hash_seed)))
        alias = ""
        if self.hash_algo == "llmd_fnv64a":
            alias = (" llm-d keys are salted with the name the engine serves the model as: when that is an alias "
                     "(--served-model-name) rather than the topic's model, parity cannot hold; score requests "
                     "naming the topic's model.")
        return ("model %r: the engines' block hashes match neither kvcm's --hash-algo %s --hash-seed %s nor "
                "any likely setting (sha256, sha256_cbor or llm-d's llmd_fnv64a/llmd_fnv64a_nomodel keys with "
                "the seed unset, 0, 42 or empty); the engines may use a random PYTHONHASHSEED or xxhash.%s"
                % (ns.name, self.hash_algo, _seed_flag(self.hash_seed), alias))

    cdef void _switch(self, StreamContext ctx, _Namespace ns, str message) except *:
        """One-way switch of a namespace to decoupled mode. Entries stored under parity keys
        cannot be re-keyed, so the namespace is cleared on all pods and replays requested."""
        self._fast_gen += 1
        ns.mode = MODE_DECOUPLED
        self._index.clear_namespace(ns.name)
        if self._journal is not None:
            self._journal.switch_namespace(ns.name)
        self._changed.append(ns)
        self._switched.append(ns.name)
        ctx.needs_replay = True
        self._report(message)

    cdef void _report(self, str message) except *:
        # new model names come from topics: one line per interval, whatever a publisher sends
        self._rlog.warning("hash_contract", "%s", message)
        if self._warn is not None:
            self._warn(message)

    cdef object _decoupled_extras(self, extras, lora, Py_ssize_t nblocks):
        """Per-block extras of kvcm's chain: the untagged keys without the LoRA name (the
        namespace root holds it), None when empty."""
        if extras is None:
            return None
        out = []
        for e in extras[:nblocks]:
            if e and lora is not None and e[0] == lora:
                e = e[1:]
            out.append(e if e else None)
        return out if any(e is not None for e in out) else None

    cdef bint _parent_key(self, StreamContext ctx, _Namespace ns, Event *ev, unsigned char *parent) except -1:
        """The kvcm key to chain from (8 bytes big-endian); False when the parent is unknown."""
        cdef uint64_t keys[64]
        cdef size_t got
        cdef int i
        if not ev.has_parent:
            ns.decoupled.root_into(parent)
            return True
        got = kve_get(&self._index.emap, ns.id, ev.parent, keys, 64)
        if not got:
            # never restart the chain at the root: that would index wrong keys
            self._unknown_parent(ctx, ns, ev.parent)
            return False
        for i in range(8):
            parent[i] = (keys[min(got, <size_t>64) - 1] >> (8 * (7 - i))) & 0xFF
        return True

    cdef void _unknown_parent(self, StreamContext ctx, _Namespace ns, uint64_t parent) except *:
        """A BlockStored that cannot be chained is dropped, counted, and a replay asked for;
        the first of each stream is logged with what to check."""
        self._c[<int>C_DROP_UNKNOWN_PARENT] += 1
        ctx.needs_replay = True
        if ctx.warned_parent:
            return
        ctx.warned_parent = True
        _log.warning(
            "stream %s/%s: dropped a BlockStored whose parent block %d is unknown in namespace %r "
            "(decoupled mode), so its chain cannot go on. Check that kvcm has received the engine's "
            "events since the engine started (with --replay-endpoint kvcm replays what it missed) "
            "and that --max-blocks (%d) holds what the engines cache. Further drops of this "
            "stream are only counted: kvcm_ingest_event_drops_total{reason=\"unknown_parent\"}.",
            ctx.pod, ctx.model, parent, ns.name, self._index.ix.max_blocks)

    cdef void _stored_decoupled(self, StreamContext ctx, _Namespace ns, Event *ev, extras,
                                Py_ssize_t bs, lora, uint32_t tier) except *:
        cdef Py_ssize_t n = ev.nhashes, k, nkv, i
        cdef unsigned char parent[32]
        if bs < self.block_size:
            self._stored_small_blocks(ctx, ns, ev, extras, bs, lora, tier)
            return
        if not self._parent_key(ctx, ns, ev, parent):
            return
        k = bs // self.block_size
        nkv = n * k
        if scratch_reserve(&self._keys, nkv):
            raise MemoryError()
        block_extras = self._decoupled_extras(extras, lora, n)
        if block_extras is not None and k > 1:
            # an engine block's keys go on its first kvcm block
            block_extras = [block_extras[j // k] if j % k == 0 else None for j in range(nkv)]
        ns.decoupled.chain(self._t, nkv, block_extras, parent, self._keys.data, NULL)
        self._store(ctx, ns, self._keys.data, nkv, tier)
        for i in range(n):
            self._map_engine(ns, self._h[i], self._keys.data + i * k, k)

    cdef void _stored_small_blocks(self, StreamContext ctx, _Namespace ns, Event *ev, extras,
                                   Py_ssize_t bs, lora, uint32_t tier) except *:
        """Engine blocks smaller than kvcm's (kvcm = k x engine): tokens are gathered per
        stream until a kvcm block is complete; every engine block in it then maps to its key.
        The state after each engine block is remembered (bounded) so later events can chain
        from any of them."""
        cdef Py_ssize_t n = ev.nhashes, i, j
        cdef unsigned char root[32]
        cdef uint64_t key
        if ctx._partial is None:
            ctx._partial = OrderedDict()
        if not ev.has_parent:
            ns.decoupled.root_into(root)
            state = (int.from_bytes(root[:8], "big"), (), (), None)
        else:
            state = ctx._partial.get((ns, ev.parent))
            if state is None:
                self._unknown_parent(ctx, ns, ev.parent)
                return
        block_extras = self._decoupled_extras(extras, lora, n)
        # the kvcm block's extra keys are those of its first engine block
        parent_key, pending, pending_hashes, first_extra = state
        for i in range(n):
            h = self._h[i]
            tokens = tuple([self._t[j] for j in range(i * bs, (i + 1) * bs)])
            if not pending:
                first_extra = block_extras[i] if block_extras is not None else None
            pending = pending + tokens
            pending_hashes = pending_hashes + (h,)
            if len(pending) == self.block_size:
                key = ns.decoupled.keys(pending, None if first_extra is None else [first_extra], parent=parent_key)[0]
                self._store(ctx, ns, &key, 1, tier)
                for eh in pending_hashes:
                    self._map_engine(ns, eh, &key, 1)
                parent_key, pending, pending_hashes, first_extra = key, (), (), None
            ctx._partial[(ns, h)] = (parent_key, pending, pending_hashes, first_extra)
            ctx._partial.move_to_end((ns, h))
            if len(ctx._partial) > MAX_PARTIAL_CHAINS:
                ctx._partial.popitem(last=False)

    # ---- BlockRemoved -----------------------------------------------------------------------

    cdef void _removed(self, StreamContext ctx, Py_ssize_t n, uint32_t tier) except *:
        cdef Py_ssize_t i
        cdef uint64_t h
        cdef uint64_t keys[64]
        cdef size_t got
        cdef _Namespace ns, model = None
        if ctx.model is not None:
            model = self._namespaces.get(ctx.model)
        for i in range(n):
            h = self._h[i]
            ns = self._resolve(ctx, model, h, keys, &got)
            if ns is not None:
                self._remove(ctx, ns, keys, got, tier)
                continue
            if model is not None and model.mode == MODE_PARITY:
                self._remove(ctx, model, &h, 1, tier)
            else:
                self._c[<int>C_REMOVE_UNRESOLVED] += 1


def _seed_flag(seed):
    return "(unset)" if seed is None else repr(seed)


def _effective_seed(algo, seed):
    """The seed an algorithm hashes with: llm-d's keys take an unset seed as ""."""
    return ("" if seed is None else seed) if algo.startswith("llmd_") else seed
