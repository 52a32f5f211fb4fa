/* The block index: (namespace, kvcm key) -> set of (pod, tier), with LRU capacity.
 *
 * Memory is the design constraint (<= 64 B of RSS per (block, pod) entry at 10 M entries),
 * so nothing here is a Python object and every link is a 32-bit index into a slab:
 *
 *   slots[]    open-addressing table (linear probing) of block indices       ~4-8 B/block;
 *              the bits an index does not need (max_blocks sets how many) hold a tag
 *              from the key's hash, so a probe passes other blocks' slots without reading
 *              their 32 B entries, which would each be a cache miss in a large index
 *   blocks[]   32 B: key, namespace, first holder, LRU prev/next, and a summary of its
 *              holders when they use at most two tiers and pod ids < 32 (a pod bit mask
 *              per tier), which lets a lookup decide a block without walking its holders
 *   holders[]  20 B: one (block, pod, tier) entry, linked twice: into its block's holder
 *              list (scoring walks it) and into its pod's list (clearing a pod walks it,
 *              so clear_pod costs O(that pod's entries), not O(index)).
 *
 * A block exists only while it has holders. Capacity counts distinct blocks; storing a new
 * block at capacity evicts the least recently stored-or-hit block with all its holders.
 * Recency is an exact LRU list: a lookup touches at most the blocks it walked, which are
 * already in cache, so keeping it exact costs little and makes eviction predictable.
 *
 * One thread at a time: the Cython wrapper (kvcm/_index.pxi) calls it holding the index lock.
 */
#ifndef KVCM_INDEX_H
#define KVCM_INDEX_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KVI_NIL 0xFFFFFFFFu
#define KVI_MAX_TIERS 16
#define KVI_TIER_BITS 4
#define KVI_MAX_PODS (1u << (32 - KVI_TIER_BITS)) /* pod ids share a u32 with the tier */
#define KVI_MAX_ITEMS 0xFFFFFFF0u                 /* slab indices stay below KVI_NIL */
#define KVI_MAX_NS 0xFFFEu                        /* namespaces are stored in 16 bits */
#define KVI_FREE_NS 0xFFFFu
#define KVI_MASK_PODS 32                          /* pods that have a bit in the block masks */
#define KVI_TIER_NONE 0xFEu                       /* tier_b when one tier holds every entry */
#define KVI_TIER_COMPLEX 0xFFu                    /* tier_b when the masks cannot describe it */

typedef struct {
    uint64_t key;
    uint32_t mask_a, mask_b; /* bit p: pod p holds the block in tier_a / tier_b */
    uint32_t holders;        /* first holder, or KVI_NIL */
    uint32_t lru_prev, lru_next; /* free entries chain through lru_next */
    uint16_t ns;             /* KVI_FREE_NS marks a free slab entry */
    uint8_t tier_a, tier_b;  /* tier_b may be KVI_TIER_NONE or KVI_TIER_COMPLEX */
} kvi_block;

typedef struct {
    uint32_t block;
    uint32_t pod_tier; /* pod << KVI_TIER_BITS | tier */
    uint32_t block_next;
    uint32_t pod_prev, pod_next; /* free entries chain through block_next */
} kvi_holder;

typedef struct {
    uint32_t head; /* first holder of this pod, or KVI_NIL */
    uint64_t total;
    uint64_t per_tier[KVI_MAX_TIERS];
} kvi_pod;

/* One pod's result of a prefix walk. */
typedef struct {
    uint32_t pod;
    uint32_t blocks; /* length of its run of consecutive blocks from block 0 */
    double score;    /* sum over the run of the best tier weight it holds per block */
    uint32_t tiers[KVI_MAX_TIERS]; /* blocks of the run held in each tier */
    uint32_t cur;  /* walk state: the last block it was seen on */
    double best;   /* walk state: best weight on the current block */
} kvi_match;

typedef struct {
    uint32_t *slots;  /* entries: tag bits | block index (see kvi_entry), or KVI_NIL */
    uint64_t slot_mask;
    uint32_t index_mask; /* the bits of an entry that hold the block index */
    /* The doubled table while it is being filled (see kvi_grow_step), else NULL: its first
     * next_cleared slots are initialized, and every block at a position of `slots` below
     * next_at is in it too. */
    uint32_t *next_slots;
    uint64_t next_mask, next_cleared, next_at;
    kvi_block *blocks;
    uint32_t blocks_cap, blocks_used, free_block;
    kvi_holder *holders;
    uint32_t holders_cap, holders_used, free_holder;
    kvi_pod *pods;
    uint32_t pods_cap;
    uint32_t lru_head, lru_tail; /* head = most recent */
    uint64_t nblocks, nentries, max_blocks, evictions;
    uint64_t wide_entries; /* entries of pods >= 32: while there are any, lookups walk holders */
    uint32_t *ns_blocks;   /* blocks per namespace: clearing one stops once it found them all */
    /* scratch for lookups, sized to pods_cap */
    uint32_t *scr_gen, *scr_slot, gen;
    kvi_match *matches;
    uint32_t matches_cap;
    uint32_t *active;
    /* An incremental dump walks the LRU list from the tail (oldest) in bounded slices; the
     * index changes between slices, so the block it resumes at is kept valid here: when
     * that block leaves its place (touched or deleted), the cursor moves to the next newer
     * one. A touched block reappears at the head and is dumped again there; loading keeps
     * the later copy's place. */
    uint32_t dump_cursor;
    int dumping;
} kvi_index;

static inline uint64_t kvi_mix(uint32_t ns, uint64_t key) {
    /* Keys are usually SHA-derived and uniform, but tests and other engines may use small
     * sequential values: a cheap finalizer spreads them over the table. */
    uint64_t x = key ^ ((uint64_t)ns * 0x9E3779B97F4A7C15ull);
    x ^= x >> 32;
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 32;
    return x;
}

/* A slot's entry for block b whose key hashes to h: the hash's high bits above the block
 * index. A block index never has all its bits set (see kvi_init), so no entry is KVI_NIL. */
static inline uint32_t kvi_entry(const kvi_index *ix, uint64_t h, uint32_t b) {
    return ((uint32_t)(h >> 32) & ~ix->index_mask) | b;
}

static inline uint64_t kvi_hash_of(const kvi_index *ix, uint32_t b) {
    return kvi_mix(ix->blocks[b].ns, ix->blocks[b].key);
}

static int kvi_grow(void **arr, uint32_t *cap, size_t item, uint32_t need) {
    if (need <= *cap) return 0;
    uint64_t ncap = *cap ? (uint64_t)*cap * 2 : 1024;
    while (ncap < need) ncap *= 2;
    if (ncap > KVI_MAX_ITEMS) ncap = KVI_MAX_ITEMS;
    if (ncap < need) return -1;
    void *p = realloc(*arr, (size_t)ncap * item);
    if (!p) return -1;
    *arr = p;
    *cap = (uint32_t)ncap;
    return 0;
}

static int kvi_init(kvi_index *ix, uint64_t max_blocks) {
    memset(ix, 0, sizeof(*ix));
    ix->max_blocks = max_blocks;
    /* block indices stay below max_blocks (and KVI_MAX_ITEMS): the fewest bits that hold
     * max_blocks itself leave the all-ones index unused */
    uint64_t blocks = max_blocks < KVI_MAX_ITEMS ? max_blocks : KVI_MAX_ITEMS;
    uint32_t bits = 1;
    while (bits < 32 && (1ull << bits) <= blocks) bits++;
    ix->index_mask = (uint32_t)((1ull << bits) - 1);
    ix->free_block = ix->free_holder = KVI_NIL;
    ix->lru_head = ix->lru_tail = KVI_NIL;
    ix->dump_cursor = KVI_NIL;
    ix->slot_mask = 1023;
    ix->slots = (uint32_t *)malloc(sizeof(uint32_t) * (ix->slot_mask + 1));
    ix->ns_blocks = (uint32_t *)calloc(KVI_MAX_NS + 1, sizeof(uint32_t));
    if (!ix->slots || !ix->ns_blocks) return -1;
    memset(ix->slots, 0xFF, sizeof(uint32_t) * (ix->slot_mask + 1));
    return 0;
}

static void kvi_release(kvi_index *ix) {
    free(ix->slots); free(ix->next_slots); free(ix->blocks); free(ix->holders); free(ix->pods);
    free(ix->scr_gen); free(ix->scr_slot); free(ix->matches); free(ix->active);
    free(ix->ns_blocks);
    memset(ix, 0, sizeof(*ix));
}

/* Makes pod ids < npods valid (zeroed accounting). */
static int kvi_ensure_pods(kvi_index *ix, uint32_t npods) {
    if (npods <= ix->pods_cap) return 0;
    if (npods > KVI_MAX_PODS) return -1;
    uint32_t old = ix->pods_cap, cap = old;
    uint32_t ncap = cap ? cap : 16;
    while (ncap < npods) ncap *= 2;
    kvi_pod *p = (kvi_pod *)realloc(ix->pods, sizeof(kvi_pod) * ncap);
    if (!p) return -1;
    ix->pods = p;
    for (uint32_t i = old; i < ncap; i++) {
        memset(&p[i], 0, sizeof(kvi_pod));
        p[i].head = KVI_NIL;
    }
    uint32_t *g = (uint32_t *)realloc(ix->scr_gen, sizeof(uint32_t) * ncap);
    if (!g) return -1;
    ix->scr_gen = g;
    memset(g + old, 0, sizeof(uint32_t) * (ncap - old));
    uint32_t *s = (uint32_t *)realloc(ix->scr_slot, sizeof(uint32_t) * ncap);
    if (!s) return -1;
    ix->scr_slot = s;
    ix->pods_cap = ncap;
    return 0;
}

/* ---- hash table ---------------------------------------------------------------------- */

static inline uint32_t kvi_find(const kvi_index *ix, uint32_t ns, uint64_t key) {
    uint64_t h = kvi_mix(ns, key), i = h & ix->slot_mask;
    uint32_t tag = kvi_entry(ix, h, 0);
    for (;;) {
        uint32_t e = ix->slots[i];
        if (e == KVI_NIL) return KVI_NIL;
        if ((e & ~ix->index_mask) == tag) {
            uint32_t b = e & ix->index_mask;
            if (ix->blocks[b].key == key && ix->blocks[b].ns == ns) return b;
        }
        i = (i + 1) & ix->slot_mask;
    }
}

/* Starts loading the slot a lookup of key will read first; a run of keys is looked up with
 * the slots of the next KVI_PREFETCH keys on their way. */
#define KVI_PREFETCH 4
static inline void kvi_prefetch_slot(const kvi_index *ix, uint32_t ns, uint64_t key) {
    __builtin_prefetch(&ix->slots[kvi_mix(ns, key) & ix->slot_mask]);
}

/* Puts entry e, whose block hashes to h, into a table that does not hold it. */
static inline void kvi_slot_put(uint32_t *slots, uint64_t mask, uint64_t h, uint32_t e) {
    uint64_t i = h & mask;
    while (slots[i] != KVI_NIL) i = (i + 1) & mask;
    slots[i] = e;
}

/* Backward-shift deletion at position i of a table (no tombstones: probe chains stay intact).
 * With `moved` set (the current table while the next one is filled), a block shifted from a
 * position at or past next_at to one below it is put into the next table, which the filling
 * would otherwise never do. */
static void kvi_slots_delete_at(kvi_index *ix, uint32_t *slots, uint64_t mask, uint64_t i, int moved);

static inline void kvi_next_put(kvi_index *ix, uint64_t h, uint32_t e) {
    /* put entry e (hash h) into the next table unless it is there */
    uint64_t i = h & ix->next_mask;
    for (;;) {
        uint32_t c = ix->next_slots[i];
        if (c == e) return;
        if (c == KVI_NIL) break;
        i = (i + 1) & ix->next_mask;
    }
    ix->next_slots[i] = e;
}

static void kvi_slots_delete_at(kvi_index *ix, uint32_t *slots, uint64_t mask, uint64_t i, int moved) {
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t c = slots[j];
        if (c == KVI_NIL) break;
        uint64_t h = kvi_hash_of(ix, c & ix->index_mask), home = h & mask;
        /* c may move into the hole at i unless its home lies cyclically in (i, j]. */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            slots[i] = c;
            if (moved && i < ix->next_at && j >= ix->next_at) kvi_next_put(ix, h, c);
            i = j;
        }
    }
    slots[i] = KVI_NIL;
}

static void kvi_slot_delete(kvi_index *ix, uint32_t b) {
    uint64_t h = kvi_hash_of(ix, b), i = h & ix->slot_mask;
    uint32_t e = kvi_entry(ix, h, b);
    while (ix->slots[i] != e) i = (i + 1) & ix->slot_mask;
    kvi_slots_delete_at(ix, ix->slots, ix->slot_mask, i, ix->next_slots != NULL);
    if (ix->next_slots && ix->next_at) {
        i = h & ix->next_mask;
        for (uint32_t c; (c = ix->next_slots[i]) != KVI_NIL; i = (i + 1) & ix->next_mask)
            if (c == e) {
                kvi_slots_delete_at(ix, ix->next_slots, ix->next_mask, i, 0);
                break;
            }
    }
}

/* Puts a new block into the table (and into the next one where the filling has passed). */
static void kvi_slot_insert(kvi_index *ix, uint32_t b) {
    uint64_t h = kvi_hash_of(ix, b), i = h & ix->slot_mask;
    uint32_t e = kvi_entry(ix, h, b);
    while (ix->slots[i] != KVI_NIL) i = (i + 1) & ix->slot_mask;
    ix->slots[i] = e;
    if (ix->next_slots && i < ix->next_at) kvi_next_put(ix, h, e);
}

/* Growing the table. Rehashing it whole would hold the index, and every lookup waiting for
 * its lock, for as long as moving every block takes (0.3 s at 6 M blocks); instead the
 * doubled table is cleared, then filled from the current one, a few slots for each new
 * block. From 5/8 load: clearing 2S slots at 2 * KVI_GROW_STEP and moving S slots at
 * KVI_GROW_STEP per new block take S / 8 new blocks, so the current table, which every
 * lookup reads until the next one is complete, never passes 3/4 load. */
#define KVI_GROW_STEP 16

static void kvi_grow_step(kvi_index *ix, uint64_t slots) {
    uint64_t nsize = ix->next_mask + 1, size = ix->slot_mask + 1;
    if (ix->next_cleared < nsize) {
        uint64_t n = 2 * slots;
        if (n > nsize - ix->next_cleared) n = nsize - ix->next_cleared;
        memset(ix->next_slots + ix->next_cleared, 0xFF, sizeof(uint32_t) * n);
        ix->next_cleared += n;
        return;
    }
    /* A step's blocks and their places in the next table are scattered: each is loaded
     * ahead (prefetched) before it is used, so the cache misses overlap. */
    uint64_t h[KVI_GROW_STEP];
    for (uint64_t at = ix->next_at, end; at < size && at < ix->next_at + slots; at = end) {
        end = at + KVI_GROW_STEP < size ? at + KVI_GROW_STEP : size;
        const uint32_t *from = ix->slots + at;
        uint32_t n = (uint32_t)(end - at);
        for (uint32_t k = 0; k < n; k++)
            if (from[k] != KVI_NIL) __builtin_prefetch(&ix->blocks[from[k] & ix->index_mask]);
        for (uint32_t k = 0; k < n; k++)
            if (from[k] != KVI_NIL) {
                h[k] = kvi_hash_of(ix, from[k] & ix->index_mask);
                __builtin_prefetch(&ix->next_slots[h[k] & ix->next_mask], 1);
            }
        for (uint32_t k = 0; k < n; k++)
            if (from[k] != KVI_NIL) kvi_next_put(ix, h[k], from[k]);
    }
    uint64_t end = ix->next_at + slots < size ? ix->next_at + slots : size;
    ix->next_at = end;
    if (end == size) {
        free(ix->slots);
        ix->slots = ix->next_slots;
        ix->slot_mask = ix->next_mask;
        ix->next_slots = NULL;
        ix->next_mask = ix->next_cleared = ix->next_at = 0;
    }
}

/* Before a new block: starts growing the table past 5/8 load, or takes the next step. */
static int kvi_maybe_rehash(kvi_index *ix) {
    if (ix->next_slots) {
        kvi_grow_step(ix, KVI_GROW_STEP);
        return 0;
    }
    uint64_t size = ix->slot_mask + 1;
    if ((ix->nblocks + 1) * 8 <= size * 5) return 0;
    ix->next_slots = (uint32_t *)malloc(sizeof(uint32_t) * size * 2);
    if (!ix->next_slots) return (ix->nblocks + 1) * 4 <= size * 3 ? 0 : -1;   /* retried at the next block */
    ix->next_mask = size * 2 - 1;
    ix->next_cleared = ix->next_at = 0;
    kvi_grow_step(ix, KVI_GROW_STEP);
    return 0;
}

/* Completes a growth in progress (before the table is resized whole). */
static void kvi_grow_finish(kvi_index *ix) {
    while (ix->next_slots) kvi_grow_step(ix, ix->slot_mask + 1);
}

/* ---- LRU ----------------------------------------------------------------------------- */

static inline void kvi_lru_unlink(kvi_index *ix, uint32_t b) {
    kvi_block *x = &ix->blocks[b];
    if (b == ix->dump_cursor) ix->dump_cursor = x->lru_prev;
    if (x->lru_prev != KVI_NIL) ix->blocks[x->lru_prev].lru_next = x->lru_next;
    else ix->lru_head = x->lru_next;
    if (x->lru_next != KVI_NIL) ix->blocks[x->lru_next].lru_prev = x->lru_prev;
    else ix->lru_tail = x->lru_prev;
}

static inline void kvi_lru_push_front(kvi_index *ix, uint32_t b) {
    kvi_block *x = &ix->blocks[b];
    x->lru_prev = KVI_NIL;
    x->lru_next = ix->lru_head;
    if (ix->lru_head != KVI_NIL) ix->blocks[ix->lru_head].lru_prev = b;
    else ix->lru_tail = b;
    ix->lru_head = b;
}

static inline void kvi_touch(kvi_index *ix, uint32_t b) {
    if (ix->lru_head == b) return;
    kvi_lru_unlink(ix, b);
    kvi_lru_push_front(ix, b);
}

/* ---- holders ------------------------------------------------------------------------- */

static inline uint32_t kvi_pod_of(uint32_t pod_tier) { return pod_tier >> KVI_TIER_BITS; }
static inline uint32_t kvi_tier_of(uint32_t pod_tier) { return pod_tier & (KVI_MAX_TIERS - 1); }

/* Folds one more holder into a block's summary. */
static inline void kvi_summary_add(kvi_block *x, uint32_t pod, uint32_t tier, int first) {
    if (first) {
        x->mask_a = x->mask_b = 0;
        x->tier_a = (uint8_t)tier;
        x->tier_b = KVI_TIER_NONE;
    }
    if (x->tier_b == KVI_TIER_COMPLEX) return;
    if (pod >= KVI_MASK_PODS) {
        x->tier_b = KVI_TIER_COMPLEX;
    } else if (tier == x->tier_a) {
        x->mask_a |= 1u << pod;
    } else if (x->tier_b == KVI_TIER_NONE || tier == x->tier_b) {
        x->tier_b = (uint8_t)tier;
        x->mask_b |= 1u << pod;
    } else {
        x->tier_b = KVI_TIER_COMPLEX;
    }
}

/* Recomputes a block's summary from its remaining holders (after a removal). */
static void kvi_summarize(kvi_index *ix, uint32_t b) {
    kvi_block *x = &ix->blocks[b];
    int first = 1;
    for (uint32_t h = x->holders; h != KVI_NIL; h = ix->holders[h].block_next) {
        uint32_t pt = ix->holders[h].pod_tier;
        kvi_summary_add(x, kvi_pod_of(pt), kvi_tier_of(pt), first);
        first = 0;
    }
}

static void kvi_delete_block(kvi_index *ix, uint32_t b) {
    kvi_slot_delete(ix, b);
    kvi_lru_unlink(ix, b);
    ix->ns_blocks[ix->blocks[b].ns]--;
    ix->blocks[b].ns = KVI_FREE_NS;
    ix->blocks[b].lru_next = ix->free_block;
    ix->free_block = b;
    ix->nblocks--;
}

/* Unlinks holder h (whose predecessor in its block's list is prev, or KVI_NIL) from both
 * lists and frees it; deletes the block when it was its last holder. */
static void kvi_drop_holder(kvi_index *ix, uint32_t h, uint32_t prev) {
    kvi_holder *x = &ix->holders[h];
    uint32_t b = x->block;
    if (prev == KVI_NIL) ix->blocks[b].holders = x->block_next;
    else ix->holders[prev].block_next = x->block_next;

    uint32_t pod = kvi_pod_of(x->pod_tier);
    kvi_pod *p = &ix->pods[pod];
    if (x->pod_prev != KVI_NIL) ix->holders[x->pod_prev].pod_next = x->pod_next;
    else p->head = x->pod_next;
    if (x->pod_next != KVI_NIL) ix->holders[x->pod_next].pod_prev = x->pod_prev;
    p->total--;
    p->per_tier[kvi_tier_of(x->pod_tier)]--;
    ix->nentries--;
    if (pod >= KVI_MASK_PODS) ix->wide_entries--;

    x->block_next = ix->free_holder;
    x->block = KVI_NIL;
    ix->free_holder = h;
    if (ix->blocks[b].holders == KVI_NIL) kvi_delete_block(ix, b);
    else kvi_summarize(ix, b);
}

static void kvi_evict_block(kvi_index *ix, uint32_t b) {
    while (ix->blocks[b].holders != KVI_NIL) {
        uint32_t h = ix->blocks[b].holders;
        int last = ix->holders[h].block_next == KVI_NIL;
        kvi_drop_holder(ix, h, KVI_NIL); /* deletes b with its last holder */
        if (last) break;
    }
    ix->evictions++;
}

static uint32_t kvi_alloc_block(kvi_index *ix, uint16_t ns, uint64_t key) {
    uint32_t b;
    if (ix->free_block != KVI_NIL) {
        b = ix->free_block;
        ix->free_block = ix->blocks[b].lru_next;
    } else {
        if (ix->blocks_used >= ix->index_mask ||
            kvi_grow((void **)&ix->blocks, &ix->blocks_cap, sizeof(kvi_block), ix->blocks_used + 1)) return KVI_NIL;
        b = ix->blocks_used++;
    }
    kvi_block *x = &ix->blocks[b];
    x->key = key;
    x->ns = ns;
    x->holders = KVI_NIL;
    kvi_slot_insert(ix, b);
    kvi_lru_push_front(ix, b);
    ix->nblocks++;
    ix->ns_blocks[ns]++;
    return b;
}

static uint32_t kvi_alloc_holder(kvi_index *ix) {
    uint32_t h;
    if (ix->free_holder != KVI_NIL) {
        h = ix->free_holder;
        ix->free_holder = ix->holders[h].block_next;
        return h;
    }
    if (kvi_grow((void **)&ix->holders, &ix->holders_cap, sizeof(kvi_holder), ix->holders_used + 1)) return KVI_NIL;
    return ix->holders_used++;
}

/* ---- operations ---------------------------------------------------------------------- */

/* Adds (pod, tier) to each block. Returns the number of new entries, or -1 when memory ran
 * out (the entries stored before that point stay; the index stays consistent). */
static int64_t kvi_store(kvi_index *ix, uint32_t ns, uint32_t pod, uint32_t tier,
                         const uint64_t *keys, size_t n) {
    if (pod >= ix->pods_cap || tier >= KVI_MAX_TIERS || ns > KVI_MAX_NS || ix->max_blocks == 0) return -1;
    uint32_t pod_tier = (pod << KVI_TIER_BITS) | tier;
    int64_t added = 0;
    for (size_t i = 0; i < n && i < KVI_PREFETCH; i++) kvi_prefetch_slot(ix, ns, keys[i]);
    for (size_t i = 0; i < n; i++) {
        if (i + KVI_PREFETCH < n) kvi_prefetch_slot(ix, ns, keys[i + KVI_PREFETCH]);
        uint32_t b = kvi_find(ix, ns, keys[i]);
        if (b == KVI_NIL) {
            if (ix->nblocks >= ix->max_blocks) kvi_evict_block(ix, ix->lru_tail);
            if (kvi_maybe_rehash(ix)) return -1;
            b = kvi_alloc_block(ix, (uint16_t)ns, keys[i]);
            if (b == KVI_NIL) return -1;
        } else {
            kvi_touch(ix, b);
            uint32_t h = ix->blocks[b].holders;
            while (h != KVI_NIL && ix->holders[h].pod_tier != pod_tier) h = ix->holders[h].block_next;
            if (h != KVI_NIL) continue; /* set semantics: already held */
        }
        uint32_t h = kvi_alloc_holder(ix);
        if (h == KVI_NIL) {
            if (ix->blocks[b].holders == KVI_NIL) kvi_delete_block(ix, b);
            return -1;
        }
        kvi_holder *x = &ix->holders[h];
        kvi_pod *p = &ix->pods[pod];
        x->block = b;
        x->pod_tier = pod_tier;
        x->block_next = ix->blocks[b].holders;
        kvi_summary_add(&ix->blocks[b], pod, tier, ix->blocks[b].holders == KVI_NIL);
        ix->blocks[b].holders = h;
        if (pod >= KVI_MASK_PODS) ix->wide_entries++;
        x->pod_prev = KVI_NIL;
        x->pod_next = p->head;
        if (p->head != KVI_NIL) ix->holders[p->head].pod_prev = h;
        p->head = h;
        p->total++;
        p->per_tier[tier]++;
        ix->nentries++;
        added++;
    }
    return added;
}

/* Removes (pod, tier) from each block; unknown blocks and absent entries are no-ops.
 * Returns the number of entries removed. */
static uint64_t kvi_remove(kvi_index *ix, uint32_t ns, uint32_t pod, uint32_t tier,
                           const uint64_t *keys, size_t n) {
    if (pod >= ix->pods_cap || tier >= KVI_MAX_TIERS) return 0;
    uint32_t pod_tier = (pod << KVI_TIER_BITS) | tier;
    uint64_t removed = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = kvi_find(ix, ns, keys[i]);
        if (b == KVI_NIL) continue;
        uint32_t prev = KVI_NIL, h = ix->blocks[b].holders;
        while (h != KVI_NIL && ix->holders[h].pod_tier != pod_tier) {
            prev = h;
            h = ix->holders[h].block_next;
        }
        if (h == KVI_NIL) continue;
        kvi_drop_holder(ix, h, prev);
        removed++;
    }
    return removed;
}

/* Drops holder h, finding its predecessor in its block's (short) holder list. */
static void kvi_drop_holder_anywhere(kvi_index *ix, uint32_t h) {
    uint32_t prev = KVI_NIL, c = ix->blocks[ix->holders[h].block].holders;
    while (c != h) {
        prev = c;
        c = ix->holders[c].block_next;
    }
    kvi_drop_holder(ix, h, prev);
}

/* Removes the pod's entries in one tier (tier < 0: all tiers), in every namespace
 * (ns == KVI_NIL) or in one. Costs O(the pod's entries). */
static uint64_t kvi_clear_pod(kvi_index *ix, uint32_t pod, int tier, uint32_t ns) {
    if (pod >= ix->pods_cap) return 0;
    uint64_t removed = 0;
    uint32_t h = ix->pods[pod].head;
    while (h != KVI_NIL) {
        uint32_t next = ix->holders[h].pod_next;
        kvi_holder *x = &ix->holders[h];
        if ((tier < 0 || kvi_tier_of(x->pod_tier) == (uint32_t)tier) &&
            (ns == KVI_NIL || ix->blocks[x->block].ns == ns)) {
            kvi_drop_holder_anywhere(ix, h);
            removed++;
        }
        h = next;
    }
    return removed;
}

/* Drops every holder of block b, which deletes it; returns how many entries went. */
static uint64_t kvi_drop_block(kvi_index *ix, uint32_t b) {
    uint64_t removed = 0;
    uint16_t ns = ix->blocks[b].ns;
    while (ix->blocks[b].ns == ns && ix->blocks[b].holders != KVI_NIL) {
        kvi_drop_holder(ix, ix->blocks[b].holders, KVI_NIL);
        removed++;
    }
    return removed;
}

static inline int kvi_marked(const uint8_t *bits, uint32_t i) { return bits[i >> 3] >> (i & 7) & 1; }

/* Removes every block of the namespaces marked in `dead` (a bitmap over namespace ids) on all
 * pods: O(index) at worst, for the rare one-way switch of a namespace's hash mode and for
 * evicting namespaces. The walk stops once it has found as many blocks as they held.
 * Returns the number of entries removed. */
static uint64_t kvi_clear_namespaces(kvi_index *ix, const uint8_t *dead) {
    uint64_t left = 0, removed = 0;
    for (uint32_t ns = 0; ns <= KVI_MAX_NS; ns++)
        if (kvi_marked(dead, ns)) left += ix->ns_blocks[ns];
    for (uint32_t b = 0; left && b < ix->blocks_used; b++) {
        uint16_t ns = ix->blocks[b].ns;
        if (ns == KVI_FREE_NS || !kvi_marked(dead, ns)) continue;
        removed += kvi_drop_block(ix, b);
        left--;
    }
    return removed;
}

/* kvi_clear_namespaces for one namespace. */
static uint64_t kvi_clear_namespace(kvi_index *ix, uint32_t ns) {
    uint64_t left, removed = 0;
    if (ns > KVI_MAX_NS) return 0;
    left = ix->ns_blocks[ns];
    for (uint32_t b = 0; left && b < ix->blocks_used; b++) {
        if (ix->blocks[b].ns != ns) continue;
        removed += kvi_drop_block(ix, b);
        left--;
    }
    return removed;
}

/* ---- dump and load ------------------------------------------------------------------- */

/* A dumped block: key u64, namespace u16, holder count u16, then that many u32 pod_tier
 * values, oldest holder first; little-endian, as the host (the snapshot header says so). */
#define KVI_DUMP_HEAD 12u
#define KVI_DUMP_MAX_HOLDERS 0xFFFFu

static void kvi_dump_begin(kvi_index *ix) {
    ix->dumping = 1;
    ix->dump_cursor = ix->lru_tail;
}

static void kvi_dump_end(kvi_index *ix) {
    ix->dumping = 0;
    ix->dump_cursor = KVI_NIL;
}

static inline int kvi_dump_done(const kvi_index *ix) { return !ix->dumping || ix->dump_cursor == KVI_NIL; }

static inline uint32_t kvi_holder_count(const kvi_index *ix, uint32_t b) {
    uint32_t n = 0;
    for (uint32_t h = ix->blocks[b].holders; h != KVI_NIL && n < KVI_DUMP_MAX_HOLDERS; h = ix->holders[h].block_next) n++;
    return n;
}

/* Writes whole block records from the cursor toward the head, at most max_blocks of them and
 * as many as fit in cap bytes. Returns the bytes written; *need gets the size of the next
 * record when not even one fits (0 otherwise). */
static size_t kvi_dump_slice(kvi_index *ix, uint8_t *out, size_t cap, uint32_t max_blocks, size_t *need) {
    size_t used = 0;
    *need = 0;
    while (max_blocks-- && ix->dumping && ix->dump_cursor != KVI_NIL) {
        uint32_t b = ix->dump_cursor;
        const kvi_block *x = &ix->blocks[b];
        uint32_t n = kvi_holder_count(ix, b);
        size_t size = KVI_DUMP_HEAD + 4u * n;
        if (used + size > cap) {
            if (!used) *need = size;
            break;
        }
        uint8_t *p = out + used;
        uint16_t ns = x->ns, nh = (uint16_t)n;
        memcpy(p, &x->key, 8);
        memcpy(p + 8, &ns, 2);
        memcpy(p + 10, &nh, 2);
        /* the holder list is newest first: write it backwards */
        uint32_t i = n, h = x->holders;
        while (i) {
            memcpy(p + KVI_DUMP_HEAD + 4u * --i, &ix->holders[h].pod_tier, 4);
            h = ix->holders[h].block_next;
        }
        used += size;
        ix->dump_cursor = x->lru_prev;
    }
    return used;
}

/* Grows the tables ahead of a load of about `blocks` blocks and `entries` entries, so that a
 * load does not rehash or move its slabs on the way. */
static int kvi_reserve(kvi_index *ix, uint64_t blocks, uint64_t entries) {
    if (blocks > ix->max_blocks) blocks = ix->max_blocks;
    if (blocks > KVI_MAX_ITEMS) blocks = KVI_MAX_ITEMS;
    if (entries > KVI_MAX_ITEMS) entries = KVI_MAX_ITEMS;
    kvi_grow_finish(ix);
    uint64_t size = ix->slot_mask + 1;
    while ((blocks + 1) * 8 > size * 5) size *= 2;
    if (size != ix->slot_mask + 1) {
        uint32_t *ns = (uint32_t *)malloc(sizeof(uint32_t) * size);
        if (!ns) return -1;
        memset(ns, 0xFF, sizeof(uint32_t) * size);
        for (uint64_t i = 0; i <= ix->slot_mask; i++)
            if (ix->slots[i] != KVI_NIL)
                kvi_slot_put(ns, size - 1, kvi_hash_of(ix, ix->slots[i] & ix->index_mask), ix->slots[i]);
        free(ix->slots);
        ix->slots = ns;
        ix->slot_mask = size - 1;
    }
    if (kvi_grow((void **)&ix->blocks, &ix->blocks_cap, sizeof(kvi_block), (uint32_t)blocks)) return -1;
    if (kvi_grow((void **)&ix->holders, &ix->holders_cap, sizeof(kvi_holder), (uint32_t)entries)) return -1;
    return 0;
}

/* Stores dumped block records; pod and tier ids of the dump are translated through pod_map
 * and tier_map (a value of KVI_NIL there: an id the dump never named). Returns the entries
 * stored, -1 for a malformed record (what was stored before it stays) or -2 when memory ran
 * out. */
static int64_t kvi_load_slice(kvi_index *ix, const uint8_t *data, size_t len, const uint32_t *pod_map,
                              uint32_t npods, const uint32_t *tier_map, uint32_t ntiers) {
    size_t at = 0;
    int64_t stored = 0;
    while (at < len) {
        uint64_t key;
        uint16_t ns, n;
        if (len - at < KVI_DUMP_HEAD) return -1;
        memcpy(&key, data + at, 8);
        memcpy(&ns, data + at + 8, 2);
        memcpy(&n, data + at + 10, 2);
        at += KVI_DUMP_HEAD;
        if (ns > KVI_MAX_NS || len - at < 4u * n) return -1;
        for (uint32_t i = 0; i < n; i++, at += 4) {
            uint32_t pt;
            memcpy(&pt, data + at, 4);
            uint32_t pod = kvi_pod_of(pt), tier = kvi_tier_of(pt);
            if (pod >= npods || tier >= ntiers || pod_map[pod] == KVI_NIL || tier_map[tier] == KVI_NIL) return -1;
            int64_t added = kvi_store(ix, ns, pod_map[pod], tier_map[tier], &key, 1);
            if (added < 0) return -2;
            stored += added;
        }
    }
    return stored;
}

/* Reserves room for `n` matches in the lookup scratch. */
static int kvi_reserve_matches(kvi_index *ix, uint32_t n) {
    if (n <= ix->matches_cap) return 0;
    if (kvi_grow((void **)&ix->matches, &ix->matches_cap, sizeof(kvi_match), n)) return -1;
    uint32_t *a = (uint32_t *)realloc(ix->active, sizeof(uint32_t) * ix->matches_cap);
    if (!a) return -1;
    ix->active = a;
    return 0;
}

static inline int kvi_filtered_out(const uint8_t *filter, uint32_t filter_bits, uint32_t pod) {
    return filter && (pod >= filter_bits || !(filter[pod >> 3] & (1u << (pod & 7))));
}

/* The general walk: follows every holder of every block. Used while some pod id is >= 32. */
static int64_t kvi_lookup_walk(kvi_index *ix, uint32_t ns, const uint64_t *keys, size_t n,
                               const uint8_t *filter, uint32_t filter_bits, const double *weights) {
    if (++ix->gen == 0) { /* generation wrapped: forget every stale stamp once */
        memset(ix->scr_gen, 0, sizeof(uint32_t) * ix->pods_cap);
        ix->gen = 1;
    }
    uint32_t nm = 0, nactive = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t b = kvi_find(ix, ns, keys[i]);
        if (b == KVI_NIL) break;
        int seen = 0;
        for (uint32_t h = ix->blocks[b].holders; h != KVI_NIL; h = ix->holders[h].block_next) {
            uint32_t pt = ix->holders[h].pod_tier, pod = kvi_pod_of(pt), tier = kvi_tier_of(pt);
            kvi_match *m;
            if (ix->scr_gen[pod] != ix->gen) {
                if (i != 0 || kvi_filtered_out(filter, filter_bits, pod)) continue;
                if (kvi_reserve_matches(ix, nm + 1)) return -1;
                ix->scr_gen[pod] = ix->gen;
                ix->scr_slot[pod] = nm;
                m = &ix->matches[nm];
                memset(m, 0, sizeof(*m));
                m->pod = pod;
                m->cur = KVI_NIL;
                ix->active[nactive++] = nm++;
            } else {
                m = &ix->matches[ix->scr_slot[pod]];
                if (m->blocks != i) continue; /* its run ended earlier */
            }
            double w = weights[tier];
            if (m->cur != (uint32_t)i) {
                m->cur = (uint32_t)i;
                m->best = w;
            } else if (w > m->best) {
                m->best = w;
            }
            m->tiers[tier]++;
            seen = 1;
        }
        if (!seen) break;
        kvi_touch(ix, b);
        uint32_t keep = 0;
        for (uint32_t a = 0; a < nactive; a++) {
            kvi_match *m = &ix->matches[ix->active[a]];
            if (m->cur == (uint32_t)i) {
                m->blocks++;
                m->score += m->best;
                ix->active[keep++] = ix->active[a];
            }
        }
        nactive = keep;
        if (!nactive) break;
    }
    return nm;
}

/* Per-pod totals of the masked walk, indexed by pod id (< 32). */
typedef struct {
    double score[KVI_MASK_PODS];
    uint32_t blocks[KVI_MASK_PODS];
    uint32_t tiers[KVI_MASK_PODS][KVI_MAX_TIERS];
} kvi_masked_totals;

/* Adds `run` consecutive blocks with the same holders (masks within the candidates) to the
 * pods holding them. */
static inline void kvi_masked_flush(kvi_masked_totals *T, uint32_t ma, uint32_t mb, uint32_t ta,
                                    uint32_t tb, uint32_t run, const double *weights) {
    if (!run) return;
    double wa = weights[ta], wb = mb ? weights[tb] : 0.0;
    for (uint32_t m = ma | mb; m; m &= m - 1) {
        uint32_t p = (uint32_t)__builtin_ctz(m);
        int in_a = ma >> p & 1, in_b = mb >> p & 1;
        double w = in_a && in_b ? (wa > wb ? wa : wb) : in_a ? wa : wb;
        T->score[p] += w * run;
        if (in_a) T->tiers[p][ta] += run;
        if (in_b) T->tiers[p][tb] += run;
    }
}

/* The walk while every pod id is < 32, on block summaries. Consecutive blocks usually have
 * the same holders (pods cache prefixes), so the walk counts runs of identical summaries and
 * credits each pod once per run instead of once per block; only blocks with more than two
 * tiers fall back to their holder lists. */
static int64_t kvi_lookup_masked(kvi_index *ix, uint32_t ns, const uint64_t *keys, size_t n,
                                 const uint8_t *filter, uint32_t filter_bits, const double *weights) {
    kvi_masked_totals T;
    uint32_t alive = 0, allowed = ~0u, candidates = 0;
    uint32_t ra = 0, rb = 0, rta = 0, rtb = 0, run = 0; /* the current run */
    size_t i;
    if (filter) {
        allowed = 0;
        for (uint32_t p = 0; p < KVI_MASK_PODS && p < filter_bits; p++)
            if (filter[p >> 3] & (1u << (p & 7))) allowed |= 1u << p;
    }
    for (i = 0; i < n; i++) {
        uint32_t b = kvi_find(ix, ns, keys[i]);
        if (b == KVI_NIL) break;
        const kvi_block *x = &ix->blocks[b];
        uint32_t within = i == 0 ? allowed : alive, held, a = 0, m2 = 0;
        if (x->tier_b == KVI_TIER_COMPLEX) {
            held = 0;
            for (uint32_t h = x->holders; h != KVI_NIL; h = ix->holders[h].block_next)
                held |= (1u << kvi_pod_of(ix->holders[h].pod_tier)) & within;
        } else {
            a = x->mask_a & within;
            m2 = x->tier_b == KVI_TIER_NONE ? 0 : x->mask_b & within;
            held = a | m2;
        }
        if (!held) break;
        if (i == 0) {
            candidates = held;
            for (uint32_t m = held; m; m &= m - 1) {
                uint32_t p = (uint32_t)__builtin_ctz(m);
                T.score[p] = 0.0;
                memset(T.tiers[p], 0, sizeof(T.tiers[p]));
            }
        }
        for (uint32_t m = alive & ~held; m; m &= m - 1) T.blocks[__builtin_ctz(m)] = (uint32_t)i;
        alive = held;
        if (x->tier_b != KVI_TIER_COMPLEX) {
            if (run && a == ra && m2 == rb && x->tier_a == rta && (!m2 || x->tier_b == rtb)) {
                run++;
            } else {
                kvi_masked_flush(&T, ra, rb, rta, rtb, run, weights);
                ra = a, rb = m2, rta = x->tier_a, rtb = x->tier_b, run = 1;
            }
        } else {
            double best[KVI_MASK_PODS];
            uint32_t seen = 0;
            kvi_masked_flush(&T, ra, rb, rta, rtb, run, weights);
            run = 0;
            for (uint32_t h = x->holders; h != KVI_NIL; h = ix->holders[h].block_next) {
                uint32_t pt = ix->holders[h].pod_tier, p = kvi_pod_of(pt), t = kvi_tier_of(pt);
                if (!(alive >> p & 1)) continue;
                if (!(seen >> p & 1) || weights[t] > best[p]) best[p] = weights[t];
                seen |= 1u << p;
                T.tiers[p][t]++;
            }
            for (uint32_t m = seen; m; m &= m - 1) T.score[__builtin_ctz(m)] += best[__builtin_ctz(m)];
        }
        kvi_touch(ix, b);
    }
    kvi_masked_flush(&T, ra, rb, rta, rtb, run, weights);
    for (uint32_t m = alive; m; m &= m - 1) T.blocks[__builtin_ctz(m)] = (uint32_t)i;
    uint32_t nm = 0;
    if (kvi_reserve_matches(ix, (uint32_t)__builtin_popcount(candidates))) return -1;
    for (uint32_t m = candidates; m; m &= m - 1) {
        uint32_t p = (uint32_t)__builtin_ctz(m);
        kvi_match *r = &ix->matches[nm++];
        r->pod = p;
        r->blocks = T.blocks[p];
        r->score = T.score[p];
        memcpy(r->tiers, T.tiers[p], sizeof(r->tiers));
    }
    return nm;
}

/* Walks keys from block 0 and stops at the first block no candidate pod holds. A candidate
 * is a pod that holds block 0 (and passes the filter, a bitmap over pod ids, when given) and
 * has held every block since. Results land in ix->matches; returns their count, or -1 when
 * memory ran out. Touches the blocks it matched (a lookup hit refreshes recency). */
static int64_t kvi_lookup(kvi_index *ix, uint32_t ns, const uint64_t *keys, size_t n,
                          const uint8_t *filter, uint32_t filter_bits, const double *weights) {
    if (ix->wide_entries) return kvi_lookup_walk(ix, ns, keys, n, filter, filter_bits, weights);
    return kvi_lookup_masked(ix, ns, keys, n, filter, filter_bits, weights);
}

#endif
