/* Engine hash -> kvcm key, for decoupled namespaces only.
 *
 * In decoupled mode the engine's block hashes are not kvcm keys; BlockRemoved events and
 * later parents name blocks by engine hash, so this map translates them. An entry must
 * outlive the first BlockRemoved (offload tiers and other pods still name the block), so
 * entries are not removed by events; capacity bounds them instead.
 *
 * Bounded, approximately LRU, O(1) per operation and never a long pause: two generations.
 * Inserts go to the young table; when it holds `gen_cap` entries the old table is dropped
 * whole and the young one becomes old. A hit in the old table is copied into the young one,
 * so entries in use survive the rotation. At most 2 * gen_cap entries are live.
 *
 * Memory (budget: <= 24 B per block): an entry is 16 bytes, the engine hash folded with a
 * per-namespace salt plus the key, and a table grows by doubling only up to the size that
 * holds gen_cap entries at 4/5 load (slot = multiply-shift of the hash, so that size need
 * not be a power of two). Occupancy is a bit per slot. Clearing a namespace changes its
 * salt, which makes its entries unreachable at once; they age out with their generation.
 *
 * One engine hash may map to several kvcm keys (an engine block of k kvcm blocks): those
 * entries share a home slot, so a probe from it finds all of them, in insertion order.
 */
#ifndef KVCM_ENGINE_MAP_H
#define KVCM_ENGINE_MAP_H

#include "index.h"

typedef struct {
    uint64_t tag; /* engine hash ^ namespace salt */
    uint64_t key;
} kve_entry;

typedef struct {
    kve_entry *e;
    uint64_t *used; /* occupancy, a bit per slot */
    uint64_t size, count;
} kve_table;

typedef struct {
    kve_table young, old;
    uint64_t gen_cap;  /* entries per generation */
    uint64_t max_size; /* slots that hold gen_cap entries at 4/5 load */
    uint32_t *epochs;  /* per namespace, bumped by a clear */
    uint32_t nepochs;
    uint64_t layout;   /* bumped whenever an entry moves or a table is replaced: a dump in
                        * slices starts over when it changed between two slices */
} kve_map;

static inline uint64_t kve_salt(const kve_map *m, uint32_t ns) {
    uint32_t epoch = ns < m->nepochs ? m->epochs[ns] : 0;
    return kvi_mix(ns, 0x5851F42D4C957F2Dull ^ epoch) | 1;
}

static inline uint64_t kve_home(const kve_table *t, uint64_t tag) {
    return (uint64_t)(((__uint128_t)kvi_mix(0, tag) * t->size) >> 64);
}

static inline int kve_is_used(const kve_table *t, uint64_t i) { return t->used[i >> 6] >> (i & 63) & 1; }
static inline void kve_mark(kve_table *t, uint64_t i) { t->used[i >> 6] |= 1ull << (i & 63); }
static inline void kve_unmark(kve_table *t, uint64_t i) { t->used[i >> 6] &= ~(1ull << (i & 63)); }
static inline uint64_t kve_next(const kve_table *t, uint64_t i) { return i + 1 == t->size ? 0 : i + 1; }

static int kve_table_init(kve_table *t, uint64_t size) {
    t->e = (kve_entry *)malloc(sizeof(kve_entry) * size);
    t->used = (uint64_t *)calloc((size + 63) / 64, sizeof(uint64_t));
    if (!t->e || !t->used) {
        free(t->e);
        free(t->used);
        t->e = NULL;
        t->used = NULL;
        return -1;
    }
    t->size = size;
    t->count = 0;
    return 0;
}

static void kve_table_free(kve_table *t) {
    free(t->e);
    free(t->used);
    t->e = NULL;
    t->used = NULL;
    t->size = t->count = 0;
}

static inline uint64_t kve_initial_size(const kve_map *m) { return m->max_size < 1024 ? m->max_size : 1024; }

static int kve_init(kve_map *m, uint64_t capacity) {
    m->gen_cap = capacity / 2 > 512 ? capacity / 2 : 512;
    m->max_size = m->gen_cap + m->gen_cap / 4 + 1;
    m->epochs = NULL;
    m->nepochs = 0;
    m->layout = 0;
    m->old.e = NULL;
    m->old.used = NULL;
    m->old.size = m->old.count = 0;
    return kve_table_init(&m->young, kve_initial_size(m));
}

static void kve_release(kve_map *m) {
    kve_table_free(&m->young);
    kve_table_free(&m->old);
    free(m->epochs);
    m->epochs = NULL;
    m->nepochs = 0;
}

static inline void kve_put_raw(kve_table *t, uint64_t tag, uint64_t key) {
    uint64_t i = kve_home(t, tag);
    while (kve_is_used(t, i)) i = kve_next(t, i);
    t->e[i].tag = tag;
    t->e[i].key = key;
    kve_mark(t, i);
    t->count++;
}

/* Copies t's entries into n, starting after an empty slot so that a cluster wrapping past
 * the end is copied in probe order: the keys of one engine hash keep their order. */
static void kve_copy_live(kve_table *n, const kve_table *t) {
    uint64_t start = 0;
    while (kve_is_used(t, start)) start++; /* the table is never full */
    for (uint64_t k = 1; k <= t->size; k++) {
        uint64_t i = (start + k) % t->size;
        if (kve_is_used(t, i)) kve_put_raw(n, t->e[i].tag, t->e[i].key);
    }
}

/* Makes room for one more entry: doubles the young table at 3/4 load, up to max_size. */
static int kve_table_reserve(kve_map *m, kve_table *t) {
    if ((t->count + 1) * 4 <= t->size * 3 || t->size >= m->max_size) return 0;
    uint64_t size = t->size * 2 < m->max_size ? t->size * 2 : m->max_size;
    kve_table n;
    if (kve_table_init(&n, size)) return -1;
    kve_copy_live(&n, t);
    kve_table_free(t);
    *t = n;
    m->layout++;
    return 0;
}

/* Deletes every entry with this tag, with backward shift; returns how many. */
static uint64_t kve_table_delete(kve_table *t, uint64_t tag) {
    if (!t->e) return 0;
    uint64_t removed = 0;
    uint64_t i = kve_home(t, tag);
    while (kve_is_used(t, i)) {
        if (t->e[i].tag != tag) {
            i = kve_next(t, i);
            continue;
        }
        /* Shift later members of the cluster back into the hole at i, then re-check i. */
        uint64_t hole = i, j = i;
        for (;;) {
            j = kve_next(t, j);
            if (!kve_is_used(t, j)) break;
            uint64_t home = kve_home(t, t->e[j].tag);
            int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
            if (!stays) {
                t->e[hole] = t->e[j];
                hole = j;
            }
        }
        kve_unmark(t, hole);
        t->count--;
        removed++;
    }
    return removed;
}

static int kve_rotate_if_full(kve_map *m) {
    if (m->young.count < m->gen_cap) return 0;
    kve_table fresh;
    if (kve_table_init(&fresh, kve_initial_size(m))) return -1;
    kve_table_free(&m->old);
    m->old = m->young;
    m->young = fresh;
    m->layout++;
    return 0;
}

/* Maps ehash to keys[0..k) (replacing what it mapped to before). */
static int kve_set(kve_map *m, uint32_t ns, uint64_t ehash, const uint64_t *keys, size_t k) {
    uint64_t tag = ehash ^ kve_salt(m, ns);
    if (kve_table_delete(&m->young, tag) + kve_table_delete(&m->old, tag)) m->layout++;
    if (kve_rotate_if_full(m)) return -1;
    for (size_t i = 0; i < k; i++) {
        if (kve_table_reserve(m, &m->young)) return -1;
        kve_put_raw(&m->young, tag, keys[i]);
    }
    return 0;
}

static size_t kve_table_get(const kve_table *t, uint64_t tag, uint64_t *out, size_t max) {
    if (!t->e) return 0;
    size_t n = 0;
    uint64_t i = kve_home(t, tag);
    while (kve_is_used(t, i)) {
        if (t->e[i].tag == tag) {
            if (n < max) out[n] = t->e[i].key;
            n++;
        }
        i = kve_next(t, i);
    }
    return n;
}

/* Writes up to max keys that ehash maps to into out; returns how many it maps to (0 when
 * unknown). A hit in the old generation is promoted to the young one. */
static size_t kve_get(kve_map *m, uint32_t ns, uint64_t ehash, uint64_t *out, size_t max) {
    uint64_t tag = ehash ^ kve_salt(m, ns);
    size_t n = kve_table_get(&m->young, tag, out, max);
    if (n) return n;
    n = kve_table_get(&m->old, tag, out, max);
    if (n && n <= max && n <= 64) {
        uint64_t keys[64];
        memcpy(keys, out, sizeof(uint64_t) * n);
        kve_set(m, ns, ehash, keys, n); /* promotion failing on memory only loses recency */
    }
    return n;
}

static uint64_t kve_count(const kve_map *m) { return m->young.count + m->old.count; }

/* Forgets a namespace's entries in O(1): a new salt makes them unreachable, and they leave
 * with their generation. Returns -1 when memory ran out. */
static int kve_clear_namespace(kve_map *m, uint32_t ns) {
    if (ns >= m->nepochs) {
        uint32_t n = ns + 1 > 2 * m->nepochs ? ns + 1 : 2 * m->nepochs;
        uint32_t *e = (uint32_t *)realloc(m->epochs, sizeof(uint32_t) * n);
        if (!e) return -1;
        memset(e + m->nepochs, 0, sizeof(uint32_t) * (n - m->nepochs));
        m->epochs = e;
        m->nepochs = n;
    }
    m->epochs[ns]++;
    return 0;
}

/* ---- dump and load ------------------------------------------------------------------- */

/* A table is dumped as its raw (tag, key) entries in probe order from just after an empty
 * slot (as kve_copy_live copies), so that the keys of one engine hash keep their order when
 * they are put back. The namespace salts go with them (the epochs), and namespace ids are
 * restored as they were. */
static inline uint64_t kve_dump_start(const kve_table *t) {
    uint64_t start = 0;
    if (!t->e) return 0;
    while (kve_is_used(t, start)) start++;
    return start;
}

/* Copies up to max entries of t from position *pos (1..size) on into out; returns how many
 * and advances *pos. Done when *pos > t->size. */
static size_t kve_dump_slice(const kve_table *t, uint64_t start, uint64_t *pos, kve_entry *out, size_t max) {
    size_t n = 0;
    while (n < max && *pos <= t->size) {
        uint64_t i = (start + *pos) % t->size;
        if (kve_is_used(t, i)) out[n++] = t->e[i];
        (*pos)++;
    }
    return n;
}

/* Puts dumped entries back into the young (which == 0) or old table, as far as the map's
 * capacity allows; returns how many were put. */
static int64_t kve_load_slice(kve_map *m, int which, const kve_entry *in, size_t n) {
    kve_table *t = which ? &m->old : &m->young;
    size_t i;
    if (!t->e && kve_table_init(t, kve_initial_size(m))) return -1;
    for (i = 0; i < n; i++) {
        if (t->count >= m->gen_cap) break;
        if (kve_table_reserve(m, t)) return -1;
        if (t->count + 1 >= t->size) break;
        kve_put_raw(t, in[i].tag, in[i].key);
    }
    return (int64_t)i;
}

/* Empties both tables (a dump that started over). */
static int kve_reset(kve_map *m) {
    kve_table_free(&m->young);
    kve_table_free(&m->old);
    m->layout++;
    return kve_table_init(&m->young, kve_initial_size(m));
}

/* Sets the namespace epochs (their salts) as a dump recorded them. */
static int kve_set_epochs(kve_map *m, const uint32_t *epochs, uint32_t n) {
    uint32_t *e = n ? (uint32_t *)malloc(sizeof(uint32_t) * n) : NULL;
    if (n && !e) return -1;
    if (n) memcpy(e, epochs, sizeof(uint32_t) * n);
    free(m->epochs);
    m->epochs = e;
    m->nepochs = n;
    return 0;
}

#endif
