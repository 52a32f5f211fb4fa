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
 * One engine hash may map to several kvcm keys (an engine block of k kvcm blocks): those
 * entries share a home slot, so a probe from it finds all of them, in insertion order.
 */
#ifndef KVCM_ENGINE_MAP_H
#define KVCM_ENGINE_MAP_H

#include "index.h"

typedef struct {
    uint64_t ehash;
    uint64_t key;
    uint32_t ns; /* KVI_NIL = empty slot */
    uint32_t _pad;
} kve_entry;

typedef struct {
    kve_entry *e;
    uint64_t mask, count;
} kve_table;

typedef struct {
    kve_table young, old;
    uint64_t gen_cap;
} kve_map;

static int kve_table_init(kve_table *t, uint64_t size) {
    t->e = (kve_entry *)malloc(sizeof(kve_entry) * size);
    if (!t->e) return -1;
    for (uint64_t i = 0; i < size; i++) t->e[i].ns = KVI_NIL;
    t->mask = size - 1;
    t->count = 0;
    return 0;
}

static int kve_init(kve_map *m, uint64_t capacity) {
    m->gen_cap = capacity / 2 > 512 ? capacity / 2 : 512;
    m->old.e = NULL;
    m->old.mask = m->old.count = 0;
    return kve_table_init(&m->young, 1024);
}

static void kve_release(kve_map *m) {
    free(m->young.e);
    free(m->old.e);
    m->young.e = m->old.e = NULL;
}

static inline void kve_put_raw(kve_table *t, const kve_entry *x) {
    uint64_t i = kvi_mix(x->ns, x->ehash) & t->mask;
    while (t->e[i].ns != KVI_NIL) i = (i + 1) & t->mask;
    t->e[i] = *x;
    t->count++;
}

/* Copies t's entries (except namespace skip_ns) into n. Starts after an empty slot so that
 * a cluster wrapping past the end is copied in probe order: the keys of one engine hash
 * keep their insertion order. */
static void kve_copy_live(kve_table *n, const kve_table *t, uint32_t skip_ns) {
    uint64_t size = t->mask + 1, start = 0;
    while (t->e[start].ns != KVI_NIL) start++; /* the table is never full */
    for (uint64_t k = 1; k <= size; k++) {
        const kve_entry *x = &t->e[(start + k) & t->mask];
        if (x->ns != KVI_NIL && x->ns != skip_ns) kve_put_raw(n, x);
    }
}

static int kve_table_reserve(kve_table *t) {
    uint64_t size = t->mask + 1;
    if ((t->count + 1) * 4 <= size * 3) return 0;
    kve_table n;
    if (kve_table_init(&n, size * 2)) return -1;
    kve_copy_live(&n, t, KVI_NIL);
    free(t->e);
    *t = n;
    return 0;
}

/* Deletes every entry for (ns, ehash) with backward shift; returns how many. */
static uint64_t kve_table_delete(kve_table *t, uint32_t ns, uint64_t ehash) {
    if (!t->e) return 0;
    uint64_t removed = 0, mask = t->mask;
    uint64_t i = kvi_mix(ns, ehash) & mask;
    while (t->e[i].ns != KVI_NIL) {
        if (!(t->e[i].ns == ns && t->e[i].ehash == ehash)) {
            i = (i + 1) & mask;
            continue;
        }
        /* Shift later members of the cluster back into the hole at i, then re-check i. */
        uint64_t hole = i, j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (t->e[j].ns == KVI_NIL) break;
            uint64_t home = kvi_mix(t->e[j].ns, t->e[j].ehash) & mask;
            int stays = (hole <= j) ? (home > hole && home <= j) : (home > hole || home <= j);
            if (!stays) {
                t->e[hole] = t->e[j];
                hole = j;
            }
        }
        t->e[hole].ns = KVI_NIL;
        t->count--;
        removed++;
    }
    return removed;
}

static int kve_rotate_if_full(kve_map *m) {
    if (m->young.count < m->gen_cap) return 0;
    kve_table fresh;
    if (kve_table_init(&fresh, 1024)) return -1;
    free(m->old.e);
    m->old = m->young;
    m->young = fresh;
    return 0;
}

/* Maps ehash to keys[0..k) (replacing what it mapped to before). */
static int kve_set(kve_map *m, uint32_t ns, uint64_t ehash, const uint64_t *keys, size_t k) {
    kve_table_delete(&m->young, ns, ehash);
    kve_table_delete(&m->old, ns, ehash);
    if (kve_rotate_if_full(m)) return -1;
    for (size_t i = 0; i < k; i++) {
        if (kve_table_reserve(&m->young)) return -1;
        kve_entry x = {ehash, keys[i], ns, 0};
        kve_put_raw(&m->young, &x);
    }
    return 0;
}

static size_t kve_table_get(const kve_table *t, uint32_t ns, uint64_t ehash, uint64_t *out, size_t max) {
    if (!t->e) return 0;
    size_t n = 0;
    uint64_t i = kvi_mix(ns, ehash) & t->mask;
    while (t->e[i].ns != KVI_NIL) {
        if (t->e[i].ns == ns && t->e[i].ehash == ehash) {
            if (n < max) out[n] = t->e[i].key;
            n++;
        }
        i = (i + 1) & t->mask;
    }
    return n;
}

/* Writes up to max keys that ehash maps to into out; returns how many it maps to (0 when
 * unknown). A hit in the old generation is promoted to the young one. */
static size_t kve_get(kve_map *m, uint32_t ns, uint64_t ehash, uint64_t *out, size_t max) {
    size_t n = kve_table_get(&m->young, ns, ehash, out, max);
    if (n) return n;
    n = kve_table_get(&m->old, ns, ehash, out, max);
    if (n && n <= max) {
        uint64_t keys[64];
        if (n <= 64) {
            memcpy(keys, out, sizeof(uint64_t) * n);
            kve_set(m, ns, ehash, keys, n); /* promotion failing on memory only loses recency */
        }
    }
    return n;
}

static uint64_t kve_count(const kve_map *m) { return m->young.count + m->old.count; }

/* Drops every entry of a namespace (its hash mode changed): O(map). */
static void kve_clear_namespace(kve_map *m, uint32_t ns) {
    kve_table *ts[2] = {&m->young, &m->old};
    for (int t = 0; t < 2; t++) {
        kve_table *x = ts[t];
        if (!x->e) continue;
        kve_table n;
        if (kve_table_init(&n, x->mask + 1)) continue;
        kve_copy_live(&n, x, ns);
        free(x->e);
        *x = n;
    }
}

#endif
