# Dump and load of the in-memory index (index.h) and its engine map (engine_map.h): what a
# snapshot (kvcm/snapshot.py) holds between its header and its checksum.
#
# A dump is a consistent cut without a long pause: it runs in slices, each a few
# milliseconds, while ingest goes on between them (under a later lock, between two
# holds of it). Entries changed between slices are whatever they were when their slice
# passed; the streams' positions are recorded before the first slice, so replaying every
# batch after them (stores and removals are idempotent and apply in order) brings the
# loaded index to the truth. Blocks are walked from the LRU tail with a cursor that index.h
# keeps valid across changes, so loading them in order rebuilds the LRU order too.

cdef extern from "index.h":
    void kvi_dump_begin(kvi_index *ix)
    void kvi_dump_end(kvi_index *ix)
    int kvi_dump_done(const kvi_index *ix)
    size_t kvi_dump_slice(kvi_index *ix, uint8_t *out, size_t cap, uint32_t max_blocks, size_t *need)
    int kvi_reserve(kvi_index *ix, uint64_t blocks, uint64_t entries)
    int64_t kvi_load_slice(kvi_index *ix, const uint8_t *data, size_t len, const uint32_t *pod_map,
                           uint32_t npods, const uint32_t *tier_map, uint32_t ntiers)

cdef extern from "engine_map.h":
    uint64_t kve_dump_start(const kve_table *t)
    size_t kve_dump_slice(const kve_table *t, uint64_t start, uint64_t *pos, kve_entry *out, size_t max)
    int64_t kve_load_slice(kve_map *m, int which, const kve_entry *entries, size_t n)
    int kve_reset(kve_map *m)
    int kve_set_epochs(kve_map *m, const uint32_t *epochs, uint32_t n)

# Chunk kinds of a dump.
DUMP_BLOCKS = 1       # block records (index.h, "dump and load")
DUMP_EMAP_YOUNG = 2   # raw (tag u64, key u64) entries of the engine map's young table
DUMP_EMAP_OLD = 3     # ... of its old table
DUMP_EMAP_RESET = 4   # the engine map changed shape mid-dump: forget its entries so far
DUMP_KINDS = frozenset((DUMP_BLOCKS, DUMP_EMAP_YOUNG, DUMP_EMAP_OLD, DUMP_EMAP_RESET))

cdef enum:
    EMAP_RESTARTS = 3          # engine-map passes started over before the rest goes in one slice
    DUMP_BYTES_PER_BLOCK = 20  # a block record with two holders: the first guess of a buffer


class DumpAborted(Exception):
    """A dump cannot go on: a namespace or pod id was freed (and could be handed to another
    name) while it ran, or another dump of the index is running."""


cdef class IndexDump:
    """One dump of an Index: call next() until it returns None, then tables(). Holds the
    index's dump cursor until done or closed (one dump at a time)."""
    cdef Index index
    cdef int phase           # 0: blocks, 1: young table, 2: old table, 3: done
    cdef uint64_t layout, start, pos
    cdef int restarts
    cdef uint64_t ns_releases, pod_releases
    cdef bint owns
    cdef uint8_t *buf
    cdef size_t cap
    cdef readonly uint64_t blocks_at_start, entries_at_start

    def __cinit__(self, Index index):
        if index.ix.dumping:
            raise DumpAborted("another dump of this index is running")
        self.index = index
        self.ns_releases = index._ns.releases
        self.pod_releases = index._pods.releases
        self.blocks_at_start = index.ix.nblocks
        self.entries_at_start = index.ix.nentries
        kvi_dump_begin(&index.ix)
        self.owns = True

    def __dealloc__(self):
        self.close()
        free(self.buf)

    cpdef close(self):
        """Lets the index go (idempotent)."""
        if self.owns:
            kvi_dump_end(&self.index.ix)
            self.owns = False

    cdef int _room(self, size_t need) except -1:
        cdef uint8_t *p
        if need <= self.cap:
            return 0
        p = <uint8_t *>realloc(self.buf, need)
        if p == NULL:
            raise MemoryError()
        self.buf, self.cap = p, need
        return 0

    def next(self, uint32_t max_items=65536):
        """The next chunk, (kind, bytes), of at most about max_items blocks or engine-map
        entries; None once the dump is complete. DumpAborted when it cannot be."""
        cdef size_t used, need
        cdef Index index = self.index
        if not self.owns:
            if self.phase == 3:
                return None
            raise DumpAborted("the dump was closed")
        if index._ns.releases != self.ns_releases or index._pods.releases != self.pod_releases:
            self.close()
            raise DumpAborted("names were released while the index was dumped")
        if max_items < 1:
            max_items = 1
        if self.phase == 0:
            if not kvi_dump_done(&index.ix):
                self._room(<size_t>max_items * DUMP_BYTES_PER_BLOCK)
                used = kvi_dump_slice(&index.ix, self.buf, self.cap, max_items, &need)
                if used == 0 and need:
                    self._room(need)
                    used = kvi_dump_slice(&index.ix, self.buf, self.cap, 1, &need)
                return DUMP_BLOCKS, PyBytes_FromStringAndSize(<char *>self.buf, used)
            self._table(1)
        while self.phase < 3:
            if index.emap.layout != self.layout:
                self.restarts += 1
                self._table(1)
                return DUMP_EMAP_RESET, b""
            chunk = self._emap_slice(max_items)
            if chunk is not None:
                return chunk
            self._table(self.phase + 1)
        self.close()
        return None

    cdef void _table(self, int phase):
        self.phase = phase
        self.pos = 1
        self.layout = self.index.emap.layout
        if phase == 1:
            self.start = kve_dump_start(&self.index.emap.young)
        elif phase == 2:
            self.start = kve_dump_start(&self.index.emap.old)

    cdef object _emap_slice(self, uint32_t max_items):
        cdef kve_table *t = &self.index.emap.young if self.phase == 1 else &self.index.emap.old
        cdef size_t n, limit = max_items
        if t.e == NULL or self.pos > t.size:
            return None
        if self.restarts >= EMAP_RESTARTS:
            limit = t.size   # it keeps changing shape under the dump: take the rest at once
        self._room(limit * sizeof(kve_entry))
        n = kve_dump_slice(t, self.start, &self.pos, <kve_entry *>self.buf, limit)
        if n == 0:   # it fills up to limit unless the table ended
            return None
        return (DUMP_EMAP_YOUNG if self.phase == 1 else DUMP_EMAP_OLD,
                PyBytes_FromStringAndSize(<char *>self.buf, n * sizeof(kve_entry)))

    def tables(self):
        """The names the chunks' ids stand for and the engine map's namespace epochs, as
        they are now (after the last chunk), with the size of the index for a loader to
        reserve room."""
        cdef Index index = self.index
        cdef uint32_t i
        return {
            "namespaces": list(index._ns.names),
            "pods": list(index._pods.names),
            "tiers": list(index._tiers.names),
            "emap_epochs": [index.emap.epochs[i] for i in range(index.emap.nepochs)],
            "blocks": index.ix.nblocks,
            "entries": index.ix.nentries,
        }


def _check_names(names, what, limit):
    if not isinstance(names, list) or len(names) > limit:
        raise ValueError("%s: expected a list of at most %d names" % (what, limit))
    seen = set()
    for name in names:
        if name is None:
            continue
        if not isinstance(name, str) or name in seen:
            raise ValueError("%s: %r is not a name or is repeated" % (what, name))
        seen.add(name)


cdef void _reset_index(Index index) except *:
    """Back to empty (a failed load): nothing may be bound to it yet."""
    cdef uint64_t capacity = index.ix.max_blocks
    kvi_release(&index.ix)
    kve_release(&index.emap)
    if kvi_init(&index.ix, capacity) or kve_init(&index.emap, capacity):
        raise MemoryError()
    index._ns = _Names("namespace", index._ns.limit)
    index._pods = _Names("pod", KVI_MAX_PODS)
    index._pod_sweep_at = MIN_POD_SWEEP
    if index._pod_refs != NULL:
        memset(index._pod_refs, 0, index._pod_refs_cap * sizeof(uint32_t))


def _load_index(Index index, dict tables, chunks):
    cdef uint32_t *pod_map = NULL
    cdef uint32_t *tier_map = NULL
    cdef uint32_t *epochs = NULL
    cdef uint32_t npods, ntiers, nepochs, i
    cdef const uint8_t[:] view
    cdef int64_t rc
    if index.ix.nblocks or kve_count(&index.emap) or index._ns.ids or index._pods.ids:
        raise ValueError("a dump loads into an empty index only")
    namespaces, pods, tiers = tables.get("namespaces"), tables.get("pods"), tables.get("tiers")
    _check_names(namespaces, "namespaces", index._ns.limit)
    _check_names(pods, "pods", KVI_MAX_PODS)
    _check_names(tiers, "tiers", KVI_MAX_TIERS)
    epoch_list = tables.get("emap_epochs", [])
    if not isinstance(epoch_list, list) or len(epoch_list) > MAX_NAMESPACES or \
            not all(isinstance(e, int) and 0 <= e <= 0xFFFFFFFF for e in epoch_list):
        raise ValueError("emap_epochs: expected a list of u32")
    npods, ntiers, nepochs = len(pods), len(tiers), len(epoch_list)
    try:
        pod_map = <uint32_t *>malloc((npods + 1) * sizeof(uint32_t))
        tier_map = <uint32_t *>malloc((ntiers + 1) * sizeof(uint32_t))
        epochs = <uint32_t *>malloc((nepochs + 1) * sizeof(uint32_t))
        if pod_map == NULL or tier_map == NULL or epochs == NULL:
            raise MemoryError()
        # Namespace ids are kept as they were: the engine map's entries are salted by them.
        index._ns.names = list(namespaces)
        index._ns.ids = {name: n for n, name in enumerate(namespaces) if name is not None}
        index._ns.free = [n for n, name in enumerate(namespaces) if name is None]
        for i in range(npods):
            pod_map[i] = KVI_NIL if pods[i] is None else index._pod_id(pods[i])
        for i in range(ntiers):
            tier_map[i] = KVI_NIL if tiers[i] is None else index._tiers.intern(tiers[i])
        for i in range(nepochs):
            epochs[i] = epoch_list[i]
        if kve_set_epochs(&index.emap, epochs, nepochs):
            raise MemoryError()
        blocks, entries = tables.get("blocks", 0), tables.get("entries", 0)
        if isinstance(blocks, int) and isinstance(entries, int) and 0 <= blocks and 0 <= entries:
            if kvi_reserve(&index.ix, blocks, entries):
                raise MemoryError()
        for kind, data in chunks:
            view = data
            if kind == DUMP_BLOCKS:
                rc = kvi_load_slice(&index.ix, &view[0] if len(view) else NULL, len(view),
                                    pod_map, npods, tier_map, ntiers)
                if rc == -2:
                    raise MemoryError()
                if rc < 0:
                    raise ValueError("a malformed block record")
            elif kind == DUMP_EMAP_YOUNG or kind == DUMP_EMAP_OLD:
                if len(view) % sizeof(kve_entry):
                    raise ValueError("a malformed engine-map chunk")
                if len(view) and kve_load_slice(&index.emap, kind == DUMP_EMAP_OLD, <const kve_entry *>&view[0],
                                                len(view) // sizeof(kve_entry)) < 0:
                    raise MemoryError()
            elif kind == DUMP_EMAP_RESET:
                if kve_reset(&index.emap):
                    raise MemoryError()
            else:
                raise ValueError("unknown chunk kind %r" % (kind,))
    except BaseException:
        _reset_index(index)
        raise
    finally:
        free(pod_map)
        free(tier_map)
        free(epochs)
