/*
 * key_memo.h - the keys of recently hashed blocks, so that a prompt whose prefix kvcm has
 * hashed before costs a table lookup per block instead of a SHA-256 chain.
 *
 * Requests to a router share prefixes - that is why routing by prefix pays - so the same
 * blocks are hashed again and again: every turn of a chat resends the conversation, every
 * request of an agent the same context. A block's key is a pure function of (chain kind,
 * parent digest, token ids): an entry holds all three next to the digest they gave, and is
 * used only when all three are equal, so the memo never changes a key and never needs
 * invalidating (the seed and the namespace are in the chain's root, hence in the parent;
 * blocks with extra keys, a cache salt for one, are hashed without the memo).
 *
 * Entries are found by a fingerprint chained over the token ids alone (fp(b) = mix(fp(b-1),
 * ids of block b), from the first parent's bytes), which needs no digest: the fingerprints
 * of a whole request are computed first, each entry is fetched a few blocks ahead, and the
 * walk then only compares. A block that misses is hashed with the blocks after it up to the
 * next probable hit, as one chain (block_chain.h), and entered - at most KVCM_MEMO_MAX_NEW
 * blocks a call, so that a long new prompt costs little more than hashing it.
 *
 * Entering is staged: a call builds its new entries in a buffer of their own, and they go
 * into the table when the caller says (kvcm_memo_enter_staged: the scoring lane, once its
 * answer is sent, so that no answer waits for it) or else at the start of the next call. A
 * staged block is not found until then; nothing else depends on it.
 *
 * The table is 8-way set-associative: a set holds eight entries, so that the blocks a router
 * asks again and again rarely crowd one set (with two ways, a tenth of a working set half
 * the memo's size met two others in its set and was hashed every time). A new entry takes an
 * empty way, else one not used since its set last filled up (each way's tag carries that
 * bit, set on entering and on every hit; when all eight are set, the others are cleared).
 * The sets' 16-bit tags lie apart from the entries, a set's in 16 bytes that one compare
 * reads, so that a miss reads no entry. Its size is fixed when it is created
 * and its memory allocated on first use (untouched pages cost no memory). Ids of 2**32 and
 * more are not entered (entries keep ids as 32 bits). One caller at a time: a second one, on
 * another thread, hashes without the memo instead of waiting.
 */
#ifndef KVCM_KEY_MEMO_H
#define KVCM_KEY_MEMO_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "block_chain.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define KVCM_MEMO_WAYS 8

/* blocks of more ids than this are hashed without the memo (their entries would be large) */
#define KVCM_MEMO_MAX_TOKENS 64
/* how many blocks ahead of the walk an entry is asked for; its set's tags twice as far */
#define KVCM_MEMO_AHEAD 16
/* misses hashed as one chain at most: their digests are kept on the stack until entered */
#define KVCM_MEMO_RUN 64
/* blocks one call enters at most: entering writes a new entry to memory (about a third of
   the block's hashing), so a long new prompt is entered over its next requests instead, its
   first blocks first, each request's cost bounded */
#define KVCM_MEMO_MAX_NEW 256
/* A tag, 16 bits: 13 bits of the fingerprint (not those that chose the set), the chain kind
   above them, and whether the way was used since its set last filled up; 0 when the way is
   empty. Small tags keep the table's tags in the core's cache (128 KiB for 65,536 blocks): a
   miss then costs no trip to memory, and a hit one, asked for ahead. */
#define KVCM_MEMO_RECENT 0x8000u
#define KVCM_MEMO_KIND_SHIFT 13
#define KVCM_MEMO_FP_BITS 0x1FFFu

/* An entry, whole cache lines: the chain's parent before the block and after it (dl bytes
   of 32 used), then the block's ids as 32 bits. The key is the digest's last 8 bytes. */
#define KVCM_MEMO_PARENT 0
#define KVCM_MEMO_DIGEST 32
#define KVCM_MEMO_IDS 64

struct kvcm_memo {
    size_t sets;                 /* a power of two */
    size_t n;                    /* ids per block */
    size_t entry_size;
    uint16_t *tags;              /* KVCM_MEMO_WAYS per set */
    unsigned char *entries;      /* KVCM_MEMO_WAYS per set; both arrays allocated on first use */
    unsigned char *staged;       /* KVCM_MEMO_MAX_NEW entries built, not yet in the table */
    uint64_t staged_names[KVCM_MEMO_MAX_NEW];
    size_t nstaged;
    int busy;
    uint64_t hits, misses;       /* blocks found, blocks hashed (for the metrics) */
};

/* A memo of at least `blocks` entries (rounded up to a power of two) for blocks of n ids:
   0, or -1 when n is not memoized or blocks is 0 (the memo then stays off). */
static int kvcm_memo_init(struct kvcm_memo *m, size_t blocks, size_t n) {
    size_t sets = 1;
    memset(m, 0, sizeof *m);
    if (blocks == 0 || n == 0 || n > KVCM_MEMO_MAX_TOKENS)
        return -1;
    while (KVCM_MEMO_WAYS * sets < blocks)
        sets <<= 1;
    m->sets = sets;
    m->n = n;
    m->entry_size = (KVCM_MEMO_IDS + 4 * n + 63) & ~(size_t)63;
    return 0;
}

static void kvcm_memo_free(struct kvcm_memo *m) {
    free(m->tags);
    free(m->entries);
    free(m->staged);
    m->tags = NULL;
    m->entries = NULL;
    m->staged = NULL;
    m->nstaged = 0;
}

static inline uint16_t *kvcm_memo_tags(const struct kvcm_memo *m, uint64_t fp) {
    return m->tags + (fp & (m->sets - 1)) * KVCM_MEMO_WAYS;
}

static inline unsigned char *kvcm_memo_entry(const struct kvcm_memo *m, uint64_t fp, int way) {
    return m->entries + ((fp & (m->sets - 1)) * KVCM_MEMO_WAYS + (size_t)way) * m->entry_size;
}

/* Bit w set for each way w of the set whose tag, its recent bit aside, is `tag` (0: the
   empty ways). */
static inline unsigned kvcm_memo_ways(const uint16_t *tags, uint16_t tag) {
#if defined(__SSE2__)
    _Static_assert(KVCM_MEMO_WAYS == 8, "a set's tags are compared as eight 16-bit lanes");
    __m128i t = _mm_and_si128(_mm_load_si128((const __m128i *)tags), _mm_set1_epi16(0x7FFF));
    __m128i eq = _mm_cmpeq_epi16(t, _mm_set1_epi16((short)tag));
    return (unsigned)_mm_movemask_epi8(_mm_packs_epi16(eq, _mm_setzero_si128()));
#else
    unsigned ways = 0;
    int w;
    for (w = 0; w < KVCM_MEMO_WAYS; w++)
        ways |= (unsigned)((tags[w] & ~KVCM_MEMO_RECENT) == tag) << w;
    return ways;
#endif
}

static inline uint64_t kvcm_memo_mix(uint64_t h) {
    h ^= h >> 32;
    h *= 0xd6e8feb86659fd93ULL;
    h ^= h >> 32;
    return h;
}

static inline uint64_t kvcm_memo_pair(const uint64_t *tok) {
    return tok[0] ^ (tok[1] << 32 | tok[1] >> 32);
}

/* fp(b) from fp(b-1) and the block's ids: four independent lanes, so the multiplies
   overlap, each taking two ids a step (ids are mostly below 2**32, and every bit of either
   still changes the word). The chain of fingerprints through a request is serial, so each
   step's multiplies matter. Only a lookup's speed depends on its quality: every hit is
   checked against the ids and the parent. */
static inline uint64_t kvcm_memo_fp(uint64_t prev, const uint64_t *tok, size_t n) {
    const uint64_t k = 0xff51afd7ed558ccdULL;
    uint64_t a = prev, b = prev ^ 0x9e3779b97f4a7c15ULL, c = prev + 0x632be59bd9b4e019ULL, d = ~prev;
    size_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        a = (a ^ kvcm_memo_pair(tok + i)) * k;
        b = (b ^ kvcm_memo_pair(tok + i + 2)) * k;
        c = (c ^ kvcm_memo_pair(tok + i + 4)) * k;
        d = (d ^ kvcm_memo_pair(tok + i + 6)) * k;
    }
    for (; i < n; i++)
        a = (a ^ tok[i]) * k;
    return kvcm_memo_mix(a ^ (b << 1 | b >> 63) ^ (c << 2 | c >> 62) ^ (d << 3 | d >> 61));
}

/* A block's name in the walk: its set in the low bits, its tag in the top 16. */
static inline uint64_t kvcm_memo_name(int kind, uint64_t fp) {
    uint64_t bits = (fp >> 40) & KVCM_MEMO_FP_BITS;
    return (fp & 0x0000FFFFFFFFFFFFULL) | ((uint64_t)kind << KVCM_MEMO_KIND_SHIFT | (bits ? bits : 1)) << 48;
}

static inline uint16_t kvcm_memo_tag(uint64_t name) {
    return (uint16_t)(name >> 48);
}

static inline int kvcm_memo_same_ids(const unsigned char *kept, const uint64_t *tok, size_t n) {
    uint64_t diff = 0;
    uint32_t id;
    size_t i;
    for (i = 0; i < n; i++) {
        memcpy(&id, kept + 4 * i, 4);
        diff |= (uint64_t)id ^ tok[i];
    }
    return diff == 0;
}

/* dl is 8 or 32: compared in words, inline (a call to memcmp per block showed) */
static inline int kvcm_memo_same_parent(const unsigned char *kept, const unsigned char *parent, size_t dl) {
    uint64_t diff = 0, u, v;
    size_t i;
    for (i = 0; i < dl; i += 8) {
        memcpy(&u, kept + i, 8);
        memcpy(&v, parent + i, 8);
        diff |= u ^ v;
    }
    return diff == 0;
}

static inline int kvcm_memo_ids_fit(const uint64_t *tok, size_t n) {
    uint64_t all = 0;
    size_t i;
    for (i = 0; i < n; i++)
        all |= tok[i];
    return all >> 32 == 0;
}

/* The way whose entry is the block's, or -1; parent NULL: by tag alone (a probable hit,
   which reads no entry). */
static inline int kvcm_memo_find(const struct kvcm_memo *m, uint64_t name, const uint64_t *tok,
                                 const unsigned char *parent, size_t dl) {
    unsigned ways = kvcm_memo_ways(kvcm_memo_tags(m, name), kvcm_memo_tag(name));
    for (; ways; ways &= ways - 1) {
        int way = __builtin_ctz(ways);
        const unsigned char *e;
        if (parent == NULL)
            return way;
        e = kvcm_memo_entry(m, name, way);
        if (kvcm_memo_same_ids(e + KVCM_MEMO_IDS, tok, m->n) && kvcm_memo_same_parent(e + KVCM_MEMO_PARENT, parent, dl))
            return way;
    }
    return -1;
}

static inline void kvcm_memo_used(const struct kvcm_memo *m, uint64_t name, int way) {
    uint16_t *tag = kvcm_memo_tags(m, name) + way;
    if (!(*tag & KVCM_MEMO_RECENT))     /* a line written only when it changes */
        *tag |= KVCM_MEMO_RECENT;
}

/* The way a new entry takes: an empty one, else one not used since the set last filled up;
   when every way was, every way's bit is cleared and the name chooses the way. */
static inline int kvcm_memo_victim(uint16_t *tags, uint64_t name) {
    unsigned empty = kvcm_memo_ways(tags, 0), stale = 0;
    int w;
    if (empty)
        return __builtin_ctz(empty);
    for (w = 0; w < KVCM_MEMO_WAYS; w++)
        stale |= (unsigned)!(tags[w] & KVCM_MEMO_RECENT) << w;
    if (stale)
        return __builtin_ctz(stale);
    for (w = 0; w < KVCM_MEMO_WAYS; w++)
        tags[w] &= (uint16_t)~KVCM_MEMO_RECENT;
    return (int)((name >> 32) & (KVCM_MEMO_WAYS - 1));
}

/* Builds a new block's entry among the staged ones (the caller has room for it). */
static void kvcm_memo_stage(struct kvcm_memo *m, uint64_t name, const uint64_t *tok,
                            const unsigned char *parent, const unsigned char *digest, size_t dl) {
    unsigned char *entry = m->staged + m->nstaged * m->entry_size;
    size_t i;
    if (!kvcm_memo_ids_fit(tok, m->n))
        return;
    m->staged_names[m->nstaged++] = name;
    if (dl == 32) {
        memcpy(entry + KVCM_MEMO_PARENT, parent, 32);
        memcpy(entry + KVCM_MEMO_DIGEST, digest, 32);
    } else {
        memset(entry, 0, KVCM_MEMO_IDS);
        memcpy(entry + KVCM_MEMO_PARENT, parent, 8);
        memcpy(entry + KVCM_MEMO_DIGEST, digest, 8);
    }
    for (i = 0; i < m->n; i++) {
        uint32_t id = (uint32_t)tok[i];
        memcpy(entry + KVCM_MEMO_IDS + 4 * i, &id, 4);
    }
}

/* Puts the staged entries into the table, each in the way kvcm_memo_victim chooses, with
   streaming stores, which need not read the lines first: no wait for memory. The caller
   holds the memo. */
static void kvcm_memo_flush(struct kvcm_memo *m) {
    size_t k, i, size = KVCM_MEMO_IDS + 4 * m->n;
    for (k = 0; k < m->nstaged; k++) {
        uint64_t name = m->staged_names[k];
        uint16_t *tags = kvcm_memo_tags(m, name);
        int way = kvcm_memo_victim(tags, name);
        const unsigned char *entry = m->staged + k * m->entry_size;
        unsigned char *e = kvcm_memo_entry(m, name, way);
#if defined(__SSE2__)
        for (i = 0; i < size; i += 16)
            _mm_stream_si128((__m128i *)(e + i), _mm_load_si128((const __m128i *)(entry + i)));
#else
        memcpy(e, entry, size);
        (void)i;
#endif
        tags[way] = (uint16_t)(kvcm_memo_tag(name) | KVCM_MEMO_RECENT);
    }
    m->nstaged = 0;
#if defined(__SSE2__)
    _mm_sfence();   /* the streaming stores are seen before the memo is free again */
#endif
}

/* Enters what the last call staged, unless another thread holds the memo (its next call
   enters them). */
static void kvcm_memo_enter_staged(struct kvcm_memo *m) {
    if (__atomic_exchange_n(&m->busy, 1, __ATOMIC_ACQUIRE))
        return;
    if (m->nstaged)
        kvcm_memo_flush(m);
    __atomic_store_n(&m->busy, 0, __ATOMIC_RELEASE);
}

/* For the walk at block b: the tags of block b + 2 AHEAD are asked for, and the entries
   of block b + AHEAD that its tags name (asked for AHEAD blocks ago). names[b..] are the
   blocks' names. */
static inline void kvcm_memo_ahead(const struct kvcm_memo *m, const uint64_t *names, size_t b, size_t nblocks) {
    size_t next = b + KVCM_MEMO_AHEAD, far = b + 2 * KVCM_MEMO_AHEAD;
    unsigned ways;
    if (far < nblocks)
        __builtin_prefetch(kvcm_memo_tags(m, names[far]));
    if (next < nblocks)
        for (ways = kvcm_memo_ways(kvcm_memo_tags(m, names[next]), kvcm_memo_tag(names[next])); ways;
             ways &= ways - 1) {
            const unsigned char *e = kvcm_memo_entry(m, names[next], __builtin_ctz(ways));
            size_t at;
            for (at = 0; at < m->entry_size; at += 64)
                __builtin_prefetch(e + at);
        }
}

static inline uint64_t kvcm_memo_key(const unsigned char *digest, size_t dl) {
    uint64_t v;
    memcpy(&v, digest + dl - 8, 8);
    return __builtin_bswap64(v);
}

/* Hashes `count` blocks from block `at` as one chain (parent: the digest before them) and
   enters them; keys_out[at .. at+count) hold their names on entry, their keys after. */
static int kvcm_memo_hash_run(struct kvcm_memo *m, int kind, const uint64_t *tok, size_t at, size_t count,
                              unsigned char *parent, size_t dl, uint64_t *keys_out,
                              unsigned char *digests_out, size_t *entered) {
    uint64_t names[KVCM_MEMO_RUN];
    unsigned char digests[KVCM_MEMO_RUN * 32], before[32];
    size_t i, n = m->n;
    memcpy(names, keys_out + at, count * sizeof names[0]);
    memcpy(before, parent, dl);
    if (kvcm_chain(kind, tok + at * n, count, n, parent, keys_out + at, digests))
        return -1;
    for (i = 0; i < count; i++) {
        if (*entered < KVCM_MEMO_MAX_NEW) {
            kvcm_memo_stage(m, names[i], tok + (at + i) * n, i ? digests + (i - 1) * dl : before,
                            digests + i * dl, dl);
            ++*entered;
        }
        if (digests_out != NULL)
            memcpy(digests_out + (at + i) * dl, digests + i * dl, dl);
    }
    m->misses += count;
    return 0;
}

/* kvcm_chain's keys (and digests) through the memo; the same arguments and results. */
static int kvcm_memo_chain(struct kvcm_memo *m, int kind, const uint64_t *tok, size_t nblocks, size_t n,
                           unsigned char *parent, uint64_t *keys_out, unsigned char *digests_out) {
    size_t dl = (kind == KVCM_CHAIN_PICKLE || kind == KVCM_CHAIN_CBOR) ? 32 : 8;
    size_t b, end, next, entered = 0;
    uint64_t fp;
    int rc = 0;

    if (m == NULL || m->sets == 0 || n != m->n || kind == KVCM_CHAIN_FNV_64 || nblocks == 0
        || __atomic_exchange_n(&m->busy, 1, __ATOMIC_ACQUIRE))
        return kvcm_chain(kind, tok, nblocks, n, parent, keys_out, digests_out);
    if (m->tags == NULL) {
        m->tags = (uint16_t *)aligned_alloc(64, (m->sets * KVCM_MEMO_WAYS * sizeof m->tags[0] + 63) & ~(size_t)63);
        m->entries = (unsigned char *)aligned_alloc(64, m->sets * KVCM_MEMO_WAYS * m->entry_size);
        m->staged = (unsigned char *)aligned_alloc(64, KVCM_MEMO_MAX_NEW * m->entry_size);
        if (m->tags != NULL)
            memset(m->tags, 0, m->sets * KVCM_MEMO_WAYS * sizeof m->tags[0]);
        if (m->tags == NULL || m->entries == NULL || m->staged == NULL) {
            kvcm_memo_free(m);
            __atomic_store_n(&m->busy, 0, __ATOMIC_RELEASE);
            return kvcm_chain(kind, tok, nblocks, n, parent, keys_out, digests_out);
        }
    }
    kvcm_memo_flush(m);     /* what an earlier call staged, first: the staged buffer is this call's */
    /* the blocks' names, kept where their keys will go */
    fp = 0;
    memcpy(&fp, parent, 8);
    fp = kvcm_memo_mix(fp ^ n);
    for (b = 0; b < nblocks; b++) {
        fp = kvcm_memo_fp(fp, tok + b * n, n);
        keys_out[b] = kvcm_memo_name(kind, fp);
        if (b < 2 * KVCM_MEMO_AHEAD)
            __builtin_prefetch(kvcm_memo_tags(m, fp));
    }
    for (b = 0; b < nblocks;) {
        uint64_t name = keys_out[b];
        int way;
        kvcm_memo_ahead(m, keys_out, b, nblocks);
        way = kvcm_memo_find(m, name, tok + b * n, parent, dl);
        if (way >= 0) {
            const unsigned char *digest = kvcm_memo_entry(m, name, way) + KVCM_MEMO_DIGEST;
            kvcm_memo_used(m, name, way);
            keys_out[b] = kvcm_memo_key(digest, dl);
            memcpy(parent, digest, dl);
            if (digests_out != NULL)
                memcpy(digests_out + b * dl, digest, dl);
            m->hits++;
            b++;
            continue;
        }
        /* A miss once the call has entered all it may: what follows is mostly what no call
           has entered yet (a long prompt is entered over several), so the rest is hashed as
           one chain, without looking further. */
        if (entered >= KVCM_MEMO_MAX_NEW) {
            rc = kvcm_chain(kind, tok + b * n, nblocks - b, n, parent, keys_out + b,
                            digests_out == NULL ? NULL : digests_out + b * dl);
            m->misses += nblocks - b;
            break;
        }
        /* a miss: it and the blocks after it that the memo does not hold either */
        for (end = b + 1; end < nblocks && end - b < KVCM_MEMO_RUN; end++) {
            kvcm_memo_ahead(m, keys_out, end, nblocks);
            if (kvcm_memo_find(m, keys_out[end], tok + end * n, NULL, dl) >= 0)
                break;
        }
        /* the next run's tags arrive while this one is hashed */
        for (next = end; next < nblocks && next < end + KVCM_MEMO_RUN; next++)
            __builtin_prefetch(kvcm_memo_tags(m, keys_out[next]));
        if ((rc = kvcm_memo_hash_run(m, kind, tok, b, end - b, parent, dl, keys_out, digests_out,
                                     &entered)) != 0)
            break;
        b = end;
    }
    __atomic_store_n(&m->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

#endif /* KVCM_KEY_MEMO_H */
