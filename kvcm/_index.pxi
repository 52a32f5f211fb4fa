# The Python face of the block index (index.h) and the engine map (engine_map.h), and the
# scorer. Names (namespaces, pods, tiers) are interned here to small integers; the C side
# sees only integers. The C declarations of index.h and engine_map.h are in _core.pxd.

cdef extern from "pythread.h" nogil:
    ctypedef void *PyThread_type_lock
    PyThread_type_lock PyThread_allocate_lock()
    void PyThread_free_lock(PyThread_type_lock)
    int PyThread_acquire_lock(PyThread_type_lock, int waitflag)
    void PyThread_release_lock(PyThread_type_lock)
    unsigned long PyThread_get_thread_ident()
    int WAIT_LOCK
    int NOWAIT_LOCK


from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from *:
    """
    static inline void kvcm_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    void kvcm_cpu_relax() noexcept nogil

cdef extern from "cpu_lend.h" nogil:
    ctypedef struct kvl_loan:
        pass
    void kvl_held(kvl_loan *)
    void kvl_unheld(kvl_loan *)
    void kvl_return(kvl_loan *)
    int kvl_lend(kvl_loan *)
    unsigned long long kvl_loans(kvl_loan *)
    void kvl_init()
    long kvl_lender_delay_ns
    void kvl_sleep_without_lending()

kvl_init()


# The index is shared by the thread that scores (the event loop's) and the ingest thread,
# which applies events without the GIL (EventSink._fast_event). Everything that reads or
# writes the C structures holds this lock: the public methods here, and the sink for each
# event's change of the index (its decoding and hash checks happen outside). It is recursive
# (a method may call another), and a thread holding the GIL never sleeps on it without
# releasing the GIL first, so the two locks cannot deadlock.
#
# A waiter tries the lock for up to ILOCK_SPIN_NS before it sleeps: the holder is most often
# one event's store on the other core, done within a microsecond or two, while a sleeping
# waiter is woken by the other core through an interrupt, which costs tens of microseconds on
# a virtual machine. A holder that lost its CPU mid-change to a short-lived thread (libzmq's
# I/O thread, a publisher on the same host) mostly has it back within some 50 µs, where a
# loan (below) costs two such wake-ups and a migration, some 150 µs: so the spin lasts
# 100 µs. The spin keeps the GIL, which the holder's change does not need: released, it would
# let the ingest thread's Python in, and the scorer would wait for that turn to end as well.
# With one CPU to run on, the holder cannot finish while the waiter spins, so the spin is off
# there (ilock_configure_spin). A waiter whose spin runs out lends its CPU to the holder
# before it sleeps (cpu_lend.h says why).
cdef struct IndexLock:
    PyThread_type_lock lock
    unsigned long owner
    int depth
    kvl_loan loan

ILOCK_SPIN_DEFAULT_NS = 100_000
cdef double ILOCK_SPIN_NS = ILOCK_SPIN_DEFAULT_NS
cdef bint ILOCK_LEND = True


def ilock_configure_spin(cpus):
    """Sets the spin and the lending for threads that run on `cpus` (a set of CPU numbers)
    between them: on one CPU, waiters sleep at once and have no other CPU to lend."""
    global ILOCK_SPIN_NS, ILOCK_LEND
    ILOCK_SPIN_NS = ILOCK_SPIN_DEFAULT_NS if len(cpus) > 1 else 0
    ILOCK_LEND = len(cpus) > 1


ilock_configure_spin(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1))


def ilock_never_lend_from_this_thread():
    """The calling thread, when it waits for the index lock, sleeps without lending its CPU:
    for a thread whose waits delay no request (the ingest thread), which would otherwise move
    the scoring thread, holding the lock for a lookup, onto its own busy CPU."""
    kvl_sleep_without_lending()


def ilock_delay_lenders(seconds):
    """Tests only: a lender pauses this long after moving the holder, as one that does not
    get its CPU back at once would."""
    global kvl_lender_delay_ns
    kvl_lender_delay_ns = <long>(seconds * 1e9)


cdef inline bint ilock_reenter(IndexLock *l) noexcept nogil:
    if l.depth and l.owner == PyThread_get_thread_ident():
        l.depth += 1
        return True
    return False


cdef bint ilock_spin(IndexLock *l) noexcept nogil:
    """Tries the lock until it is taken (True) or ILOCK_SPIN_NS have passed (False)."""
    cdef timespec ts
    cdef double start, now
    cdef int i
    if ILOCK_SPIN_NS <= 0:
        return False
    clock_gettime(CLOCK_MONOTONIC, &ts)
    start = ts.tv_sec * 1e9 + ts.tv_nsec
    while True:
        for i in range(16):
            kvcm_cpu_relax()
        if PyThread_acquire_lock(l.lock, NOWAIT_LOCK):
            return True
        clock_gettime(CLOCK_MONOTONIC, &ts)
        now = ts.tv_sec * 1e9 + ts.tv_nsec
        if now - start > ILOCK_SPIN_NS:
            return False


cdef inline void ilock_acquire(IndexLock *l) noexcept nogil:
    """Without the GIL."""
    if ilock_reenter(l):
        return
    if not PyThread_acquire_lock(l.lock, NOWAIT_LOCK) and not ilock_spin(l):
        ilock_wait(l)
    ilock_taken(l)


cdef inline void ilock_acquire_gil(IndexLock *l) noexcept:
    """With the GIL, which is kept while spinning and released while waiting."""
    if ilock_reenter(l):
        return
    if not PyThread_acquire_lock(l.lock, NOWAIT_LOCK) and not ilock_spin(l):
        with nogil:
            ilock_wait(l)
    ilock_taken(l)


cdef void ilock_wait(IndexLock *l) noexcept nogil:
    if ILOCK_LEND:
        kvl_lend(&l.loan)
    PyThread_acquire_lock(l.lock, WAIT_LOCK)


cdef inline void ilock_taken(IndexLock *l) noexcept nogil:
    l.owner = PyThread_get_thread_ident()
    l.depth = 1
    kvl_held(&l.loan)


cdef inline void ilock_release(IndexLock *l) noexcept nogil:
    l.depth -= 1
    if l.depth == 0:
        l.owner = 0
        kvl_unheld(&l.loan)
        PyThread_release_lock(l.lock)
        kvl_return(&l.loan)


DEFAULT_MAX_BLOCKS = 10_000_000
MAX_NAMESPACES = KVI_MAX_NS + 1   # namespace ids are 16 bits, and one value marks a free block
MAX_TIERS = KVI_MAX_TIERS
MAX_PODS = KVI_MAX_PODS
DEFAULT_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}

cdef enum:
    MAX_KEYS_PER_ENGINE_HASH = 64  # engine block / kvcm block ratios above this are refused
    NS_BITMAP_BYTES = 1 << 13      # a bit per 16-bit namespace id
    MIN_POD_SWEEP = 1024           # pod names interned before idle ones are first looked for


cdef class _Names:
    """Interns strings to dense integer ids, up to a limit. Released ids are handed out again."""
    cdef dict ids
    cdef list names   # by id; None for a released id
    cdef list free
    cdef uint32_t limit
    cdef str kind
    cdef uint64_t releases  # ids released so far: a dump in progress must see none

    def __init__(self, str kind, uint32_t limit):
        self.ids = {}
        self.names = []
        self.free = []
        self.limit = limit
        self.kind = kind

    cdef uint32_t get(self, name) except? 0xFFFFFFFF:
        """The id of an interned name, or KVI_NIL."""
        cdef object i = self.ids.get(name)
        return KVI_NIL if i is None else <uint32_t>i

    cdef inline bint full(self):
        return len(self.ids) >= self.limit

    cdef uint32_t intern(self, name) except? 0xFFFFFFFF:
        cdef object i = self.ids.get(name)
        cdef uint32_t n
        if i is not None:
            return <uint32_t>i
        if not isinstance(name, str):
            raise TypeError("%s name must be a str, got %s" % (self.kind, type(name).__name__))
        if self.full():
            raise ValueError("too many distinct %s names (limit %d)" % (self.kind, self.limit))
        if self.free:
            n = self.free.pop()
            self.names[n] = name
        else:
            n = len(self.names)
            self.names.append(name)
        self.ids[name] = n
        return n

    cdef void release(self, name) except *:
        cdef uint32_t n = self.ids.pop(name)
        self.releases += 1
        self.names[n] = None
        self.free.append(n)


cdef class Index:
    """(namespace, kvcm key) -> set of (pod, tier), with LRU capacity in distinct blocks,
    per-pod accounting, and an engine-hash map for decoupled namespaces."""
    cdef kvi_index ix
    cdef kve_map emap
    cdef _Names _ns
    cdef _Names _pods
    # by pod id, the StreamContexts bound to it; C memory, so that a context's __dealloc__
    # can use it even after a garbage collection cleared the Python attributes here
    cdef uint32_t *_pod_refs
    cdef uint32_t _pod_refs_cap
    cdef Py_ssize_t _pod_sweep_at
    cdef _Names _tiers
    cdef uint8_t *_filter
    cdef uint32_t _filter_cap
    cdef double _unit_weights[KVI_MAX_TIERS]
    cdef IndexLock _lock

    def __cinit__(self, max_blocks=DEFAULT_MAX_BLOCKS, max_namespaces=MAX_NAMESPACES):
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1, got %r" % (max_blocks,))
        if not 2 <= max_namespaces <= MAX_NAMESPACES:
            raise ValueError("max_namespaces must be between 2 and %d, got %r" % (MAX_NAMESPACES, max_namespaces))
        self._lock.lock = PyThread_allocate_lock()
        if self._lock.lock == NULL or kvi_init(&self.ix, max_blocks) or kve_init(&self.emap, max_blocks):
            raise MemoryError()
        self._ns = _Names("namespace", max_namespaces)
        self._pods = _Names("pod", KVI_MAX_PODS)
        self._pod_sweep_at = MIN_POD_SWEEP
        self._tiers = _Names("tier", KVI_MAX_TIERS)
        for i in range(KVI_MAX_TIERS):
            self._unit_weights[i] = 1.0

    def __dealloc__(self):
        kvi_release(&self.ix)
        kve_release(&self.emap)
        free(self._filter)
        free(self._pod_refs)
        if self._lock.lock != NULL:
            PyThread_free_lock(self._lock.lock)

    cdef uint32_t _pod_id(self, pod) except? 0xFFFFFFFF:
        cdef uint32_t p = self._pods.get(pod)
        if p != KVI_NIL:
            return p
        ilock_acquire_gil(&self._lock)
        try:
            if len(self._pods.ids) >= self._pod_sweep_at:
                self._forget_idle_pods()
            p = self._pods.intern(pod)
            if kvi_ensure_pods(&self.ix, p + 1) or self._reserve_pod_refs(p + 1):
                raise MemoryError()
        finally:
            ilock_release(&self._lock)
        return p

    cdef int _reserve_pod_refs(self, uint32_t n) noexcept:
        cdef uint32_t cap = self._pod_refs_cap
        cdef uint32_t *refs
        if n <= cap:
            return 0
        cap = max(cap * 2, n, 64)
        refs = <uint32_t *>realloc(self._pod_refs, cap * sizeof(uint32_t))
        if refs == NULL:
            return -1
        memset(refs + self._pod_refs_cap, 0, (cap - self._pod_refs_cap) * sizeof(uint32_t))
        self._pod_refs = refs
        self._pod_refs_cap = cap
        return 0

    cdef void _forget_idle_pods(self) except *:
        """Frees the ids of pods that hold no entry and that no StreamContext is bound to:
        a flood of pod names that store nothing leaves nothing behind. Runs when the table
        has doubled since the last time, so it costs O(1) per new name."""
        cdef uint32_t p
        for name, p in list(self._pods.ids.items()):
            if self._pod_refs[p] == 0 and self.ix.pods[p].total == 0:
                self._pods.release(name)
        self._pod_sweep_at = max(<Py_ssize_t>MIN_POD_SWEEP, 2 * len(self._pods.ids))

    cdef uint32_t _bind_pod(self, pod) except? 0xFFFFFFFF:
        cdef uint32_t p = self._pod_id(pod)
        self._pod_refs[p] += 1
        return p

    cdef void _unbind_pod(self, uint32_t p) noexcept:
        self._pod_refs[p] -= 1

    @property
    def pods(self):
        """How many pod names are interned (those that hold entries, are bound to a stream,
        or have not been found idle yet)."""
        return len(self._pods.ids)

    @property
    def capacity(self):
        return self.ix.max_blocks

    @property
    def tiers(self):
        """Tier names in id order."""
        return tuple(self._tiers.names)

    @property
    def namespaces(self):
        """How many namespace names are interned, and how many can be."""
        return len(self._ns.ids), self._ns.limit

    def __len__(self):
        return self.ix.nblocks

    @property
    def lock_loans(self):
        """How many times a waiter for the index lock lent its CPU to the holder."""
        return kvl_loans(&self._lock.loan)

    def while_locked(self, fn):
        """fn() with the index lock held: nothing changes or reads the index meanwhile
        (fn must not wait for another thread that uses it)."""
        ilock_acquire_gil(&self._lock)
        try:
            return fn()
        finally:
            ilock_release(&self._lock)

    def dump(self):
        """An IndexDump: the index's entries in LRU order (oldest first), then its engine
        map, in chunks of bounded size, taken between changes (see IndexDump)."""
        ilock_acquire_gil(&self._lock)
        try:
            return IndexDump(self)
        finally:
            ilock_release(&self._lock)

    def load(self, dict tables, chunks):
        """Fills this empty index from a dump: the tables of IndexDump.tables() and its
        chunks in order. ValueError for anything malformed, and then the index is empty
        again: a load is whole or nothing."""
        ilock_acquire_gil(&self._lock)
        try:
            _load_index(self, tables, chunks)
        finally:
            ilock_release(&self._lock)

    def store(self, str ns, pod, str tier, keys):
        """Adds (pod, tier) to every block of keys; returns how many entries were new."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._store(ns, pod, tier, keys)
        finally:
            ilock_release(&self._lock)

    cdef _store(self, str ns, pod, str tier, keys):
        cdef uint32_t n = self._ns.intern(ns), p = self._pod_id(pod), t = self._tiers.intern(tier)
        cdef U64s k
        cdef int64_t added
        load_u64s(keys, &k, "keys")
        added = kvi_store(&self.ix, n, p, t, k.data, k.n)
        u64s_free(&k)
        if added < 0:
            raise MemoryError()
        return added

    def remove(self, str ns, pod, str tier, keys):
        """Removes (pod, tier) from every block of keys; unknown ones are skipped. Returns
        how many entries were removed."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._remove(ns, pod, tier, keys)
        finally:
            ilock_release(&self._lock)

    cdef _remove(self, str ns, pod, str tier, keys):
        cdef uint32_t n = self._ns.get(ns), p = self._pods.get(pod), t = self._tiers.get(tier)
        cdef U64s k
        cdef uint64_t removed
        if n == KVI_NIL or p == KVI_NIL or t == KVI_NIL:
            return 0
        load_u64s(keys, &k, "keys")
        removed = kvi_remove(&self.ix, n, p, t, k.data, k.n)
        u64s_free(&k)
        return removed

    def clear_pod(self, pod, tier=None, ns=None):
        """Removes the pod's entries (in one tier and/or one namespace when given); costs
        O(the pod's entries). Returns how many were removed."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._clear_pod(pod, tier, ns)
        finally:
            ilock_release(&self._lock)

    cdef _clear_pod(self, pod, tier=None, ns=None):
        cdef uint32_t p = self._pods.get(pod)
        cdef uint32_t n = KVI_NIL
        cdef int t = -1
        if p == KVI_NIL:
            return 0
        if tier is not None:
            t = <int>self._tiers.get(tier)
            if <uint32_t>t == KVI_NIL:
                return 0
        if ns is not None:
            n = self._ns.get(ns)
            if n == KVI_NIL:
                return 0
        return kvi_clear_pod(&self.ix, p, t, n)

    def clear_namespace(self, str ns):
        """Removes every block of a namespace on all pods, O(index), and forgets its engine
        map entries (they stop resolving at once and leave the count with their generation)."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._clear_namespace(ns)
        finally:
            ilock_release(&self._lock)

    cdef _clear_namespace(self, str ns):
        cdef uint32_t n = self._ns.get(ns)
        if n == KVI_NIL:
            return 0
        if kve_clear_namespace(&self.emap, n):
            raise MemoryError()
        return kvi_clear_namespace(&self.ix, n)

    def forget_namespaces(self, names):
        """Forgets namespaces as if they had never been seen: their blocks on every pod and
        their engine-map entries go, and their ids serve new names. One walk of the index at
        most, however many they are. Returns how many entries were removed."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._forget_namespaces(names)
        finally:
            ilock_release(&self._lock)

    cdef _forget_namespaces(self, names):
        cdef uint8_t dead[NS_BITMAP_BYTES]
        cdef uint32_t n
        cdef list known = []
        memset(dead, 0, sizeof(dead))
        for name in names:
            n = self._ns.get(name)
            if n == KVI_NIL or dead[n >> 3] & (1 << (n & 7)):
                continue
            if kve_clear_namespace(&self.emap, n):
                raise MemoryError()
            dead[n >> 3] |= 1 << (n & 7)
            known.append(name)
        removed = kvi_clear_namespaces(&self.ix, dead) if known else 0
        for name in known:
            self._ns.release(name)
        return removed

    cdef int64_t _walk(self, str ns, keys, pods, const double *weights) except -1:
        """Runs the prefix walk; results stay in self.ix.matches."""
        cdef uint32_t n = self._ns.get(ns), p, nbytes = 0
        cdef U64s k
        cdef int64_t found
        cdef const uint8_t *filt = NULL
        if n == KVI_NIL:
            return 0
        if pods is not None:
            nbytes = (len(self._pods.names) + 7) >> 3
            if nbytes > self._filter_cap:
                free(self._filter)
                self._filter = <uint8_t *>malloc(nbytes)
                if self._filter == NULL:
                    self._filter_cap = 0
                    raise MemoryError()
                self._filter_cap = nbytes
            memset(self._filter, 0, nbytes)
            for pod in pods:
                p = self._pods.get(pod)
                if p != KVI_NIL:
                    self._filter[p >> 3] |= 1 << (p & 7)
            filt = self._filter
        load_u64s(keys, &k, "keys")
        found = kvi_lookup(&self.ix, n, k.data, k.n, filt, (nbytes << 3) if filt != NULL else 0, weights)
        u64s_free(&k)
        if found < 0:
            raise MemoryError()
        return found

    cdef dict _tier_counts(self, const kvi_match *m):
        cdef dict tiers = {}
        cdef int t
        for t in range(len(self._tiers.names)):
            if m.tiers[t]:
                tiers[self._tiers.names[t]] = m.tiers[t]
        return tiers

    def lookup_prefix(self, str ns, keys, pods=None):
        """Walks keys from block 0 until no candidate pod holds the block. Returns
        {pod: (blocks, {tier: blocks})}: the length of each pod's consecutive run from
        block 0 and how many blocks of it the pod holds in each tier. Pods absent from
        block 0 (or outside `pods`, when given) are not returned."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._lookup_prefix(ns, keys, pods)
        finally:
            ilock_release(&self._lock)

    cdef _lookup_prefix(self, str ns, keys, pods=None):
        cdef int64_t i, found = self._walk(ns, keys, pods, self._unit_weights)
        cdef const kvi_match *m
        cdef dict out = {}
        for i in range(found):
            m = &self.ix.matches[i]
            out[self._pods.names[m.pod]] = (m.blocks, self._tier_counts(m))
        return out

    def pod_blocks(self, pod):
        """{tier: entries} held by pod, over every namespace."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._pod_blocks(pod)
        finally:
            ilock_release(&self._lock)

    cdef _pod_blocks(self, pod):
        cdef uint32_t p = self._pods.get(pod)
        if p == KVI_NIL or p >= self.ix.pods_cap:
            return {}
        return {self._tiers.names[t]: self.ix.pods[p].per_tier[t]
                for t in range(len(self._tiers.names)) if self.ix.pods[p].per_tier[t]}

    def stats(self):
        ilock_acquire_gil(&self._lock)
        try:
            return self._stats()
        finally:
            ilock_release(&self._lock)

    cdef _stats(self):
        pods = {}
        for p, name in enumerate(self._pods.names):
            if self.ix.pods[p].total:
                pods[name] = self.pod_blocks(name)
        return {
            "blocks": self.ix.nblocks,
            "entries": self.ix.nentries,
            "capacity": self.ix.max_blocks,
            "evictions": self.ix.evictions,
            "engine_map_entries": kve_count(&self.emap),
            "pods": pods,
        }

    def map_engine(self, str ns, engine_hashes, keys):
        """Records engine hash -> kvcm key(s) for a decoupled namespace. keys holds k keys per
        engine hash (an engine block of k kvcm blocks), in order."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._map_engine(ns, engine_hashes, keys)
        finally:
            ilock_release(&self._lock)

    cdef _map_engine(self, str ns, engine_hashes, keys):
        cdef uint32_t n = self._ns.intern(ns)
        cdef U64s e, k
        cdef Py_ssize_t i, per
        load_u64s(engine_hashes, &e, "engine_hashes")
        try:
            load_u64s(keys, &k, "keys")
            try:
                if e.n == 0:
                    if k.n:
                        raise ValueError("keys given without engine hashes")
                    return
                if k.n == 0 or k.n % e.n:
                    raise ValueError("len(keys) (%d) must be a positive multiple of len(engine_hashes) (%d)" % (k.n, e.n))
                per = k.n // e.n
                if per > MAX_KEYS_PER_ENGINE_HASH:
                    raise ValueError("more than %d keys per engine hash" % MAX_KEYS_PER_ENGINE_HASH)
                for i in range(e.n):
                    if kve_set(&self.emap, n, e.data[i], k.data + i * per, per):
                        raise MemoryError()
            finally:
                u64s_free(&k)
        finally:
            u64s_free(&e)

    def resolve(self, str ns, engine_hashes):
        """For each engine hash, the tuple of kvcm keys it maps to (empty when unknown)."""
        ilock_acquire_gil(&self._lock)
        try:
            return self._resolve(ns, engine_hashes)
        finally:
            ilock_release(&self._lock)

    cdef _resolve(self, str ns, engine_hashes):
        cdef uint32_t n = self._ns.get(ns)
        cdef U64s e
        cdef uint64_t out[64]
        cdef size_t got, j
        cdef Py_ssize_t i
        load_u64s(engine_hashes, &e, "engine_hashes")
        try:
            if n == KVI_NIL:
                return [() for i in range(e.n)]
            res = []
            for i in range(e.n):
                got = kve_get(&self.emap, n, e.data[i], out, MAX_KEYS_PER_ENGINE_HASH)
                res.append(tuple([out[j] for j in range(min(got, <size_t>MAX_KEYS_PER_ENGINE_HASH))]))
            return res
        finally:
            u64s_free(&e)


cdef class Scorer:
    """llm-d's LongestPrefix scorer with tier weights: a pod's score is the sum, over its
    consecutive run of blocks from block 0, of the best tier weight it holds on each block.
    Tiers without a configured weight weigh `default_weight`."""
    cdef dict _weights
    cdef readonly double default_weight
    cdef double _w[KVI_MAX_TIERS]
    cdef object _for_tiers  # the index's tier-name list _w was computed for
    cdef Py_ssize_t _nt     # and its length then (the list only grows)

    def __init__(self, weights=None, double default_weight=1.0):
        self._weights = {name: float(w) for name, w in (DEFAULT_TIER_WEIGHTS if weights is None else weights).items()}
        for name, w in list(self._weights.items()) + [("default", default_weight)]:
            if not isinstance(name, str) or not (w >= 0.0):
                raise ValueError("tier weight %r=%r must be a non-negative number" % (name, w))
        self.default_weight = default_weight
        self._for_tiers = None

    @property
    def weights(self):
        """A copy: the weights are fixed at construction."""
        return dict(self._weights)

    cdef const double *_weights_for(self, Index index):
        cdef int t
        if self._for_tiers is not index._tiers.names or len(index._tiers.names) != self._nt:
            for t in range(KVI_MAX_TIERS):
                self._w[t] = self.default_weight
            for t, name in enumerate(index._tiers.names):
                self._w[t] = self._weights.get(name, self.default_weight)
            self._for_tiers = index._tiers.names
            self._nt = len(index._tiers.names)
        return self._w

    def score(self, Index index, str ns, keys, pods=None):
        """{pod: score} for the pods that hold block 0."""
        ilock_acquire_gil(&index._lock)
        try:
            return self._score(index, ns, keys, pods)
        finally:
            ilock_release(&index._lock)

    cdef _score(self, Index index, str ns, keys, pods=None):
        cdef int64_t i, found = index._walk(ns, keys, pods, self._weights_for(index))
        cdef const kvi_match *m
        cdef dict out = {}
        cdef list names = index._pods.names
        for i in range(found):
            m = &index.ix.matches[i]
            out[names[m.pod]] = m.score
        return out

    def score_detailed(self, Index index, str ns, keys, pods=None):
        """{pod: (score, blocks, {tier: blocks})}."""
        ilock_acquire_gil(&index._lock)
        try:
            return self._score_detailed(index, ns, keys, pods)
        finally:
            ilock_release(&index._lock)

    cdef _score_detailed(self, Index index, str ns, keys, pods=None):
        return self._matches(index, index._walk(ns, keys, pods, self._weights_for(index)))

    cdef dict _matches(self, Index index, int64_t found):
        """{pod: (score, blocks, {tier: blocks})} of the last walk's `found` matches."""
        cdef int64_t i
        cdef const kvi_match *m
        cdef dict out = {}
        for i in range(found):
            m = &index.ix.matches[i]
            out[index._pods.names[m.pod]] = (m.score, m.blocks, index._tier_counts(m))
        return out
