# The C declarations of kvcm's core headers: the block index (index.h), the engine map
# (engine_map.h) and SHA-256 (sha256.h), with the constants the .pxi files size their arrays
# by. Their functions need no GIL; the index's callers hold its lock (kvcm/_index.pxi).

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "index.h" nogil:
    uint32_t KVI_NIL
    enum: KVI_MAX_TIERS
    uint32_t KVI_MAX_PODS
    uint32_t KVI_MAX_NS
    ctypedef struct kvi_match:
        uint32_t pod
        uint32_t blocks
        double score
        uint32_t tiers[KVI_MAX_TIERS]
    ctypedef struct kvi_pod:
        uint64_t total
        uint64_t per_tier[KVI_MAX_TIERS]
    ctypedef struct kvi_index:
        kvi_pod *pods
        uint32_t pods_cap
        uint64_t nblocks, nentries, max_blocks, evictions
        kvi_match *matches
        int dumping
    int kvi_init(kvi_index *ix, uint64_t max_blocks)
    void kvi_release(kvi_index *ix)
    int kvi_ensure_pods(kvi_index *ix, uint32_t npods)
    int64_t kvi_store(kvi_index *ix, uint32_t ns, uint32_t pod, uint32_t tier, const uint64_t *keys, size_t n)
    uint64_t kvi_remove(kvi_index *ix, uint32_t ns, uint32_t pod, uint32_t tier, const uint64_t *keys, size_t n)
    uint64_t kvi_clear_pod(kvi_index *ix, uint32_t pod, int tier, uint32_t ns)
    uint64_t kvi_clear_namespace(kvi_index *ix, uint32_t ns)
    uint32_t kvi_find(const kvi_index *ix, uint32_t ns, uint64_t key)
    uint64_t kvi_clear_namespaces(kvi_index *ix, const uint8_t *dead)
    int64_t kvi_lookup(kvi_index *ix, uint32_t ns, const uint64_t *keys, size_t n,
                       const uint8_t *filter, uint32_t filter_bits, const double *weights)
    # dump and load (kvcm/_dump.pxi)
    void kvi_dump_begin(kvi_index *ix)
    void kvi_dump_end(kvi_index *ix)
    int kvi_dump_done(const kvi_index *ix)
    size_t kvi_dump_slice(kvi_index *ix, uint8_t *out, size_t cap, uint32_t max_blocks, size_t *need)
    int kvi_reserve(kvi_index *ix, uint64_t blocks, uint64_t entries)
    int64_t kvi_load_slice(kvi_index *ix, const uint8_t *data, size_t len, const uint32_t *pod_map,
                           uint32_t npods, const uint32_t *tier_map, uint32_t ntiers)

cdef extern from "engine_map.h" nogil:
    ctypedef struct kve_entry:
        uint64_t tag, key
    ctypedef struct kve_table:
        kve_entry *e
        uint64_t size, count
    ctypedef struct kve_map:
        kve_table young, old
        uint64_t layout
        uint32_t *epochs
        uint32_t nepochs
    int kve_init(kve_map *m, uint64_t capacity)
    void kve_release(kve_map *m)
    int kve_set(kve_map *m, uint32_t ns, uint64_t ehash, const uint64_t *keys, size_t k)
    size_t kve_get(kve_map *m, uint32_t ns, uint64_t ehash, uint64_t *out, size_t max)
    uint64_t kve_count(const kve_map *m)
    int kve_clear_namespace(kve_map *m, uint32_t ns)
    # dump and load (kvcm/_dump.pxi)
    uint64_t kve_dump_start(const kve_table *t)
    size_t kve_dump_slice(const kve_table *t, uint64_t start, uint64_t *pos, kve_entry *out, size_t max)
    int64_t kve_load_slice(kve_map *m, int which, const kve_entry *entries, size_t n)
    int kve_reset(kve_map *m)
    int kve_set_epochs(kve_map *m, const uint32_t *epochs, uint32_t n)

cdef extern from "sha256.h":
    int KVCM_SHA256_SHANI
    void kvcm_sha256_select(int force_portable)
    int kvcm_sha256_backend()
    void kvcm_sha256(const unsigned char *data, size_t length, unsigned char *out) nogil
