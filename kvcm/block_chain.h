/*
 * block_chain.h - vLLM's block hash chains for blocks without extra keys, with each block's
 * message encoded straight into the SHA-256 input.
 *
 * A block's message is pickle-5 of (parent, tuple(tokens), None) or canonical CBOR of
 * [parent, [tokens], None] (specs/block-hashing.md). Everything in it but the parent depends
 * on the block's own tokens, so the chain encodes block i+1 - tokens, trailer and SHA-256
 * padding - while block i is being compressed (the encoder does not wait for the digest, so
 * an out-of-order core runs both at once), and then only stores the parent's bytes into
 * their slot and compresses the padded message in place: no per-block allocation, no copy
 * into a padding buffer, no per-byte bounds checks.
 *
 * Token ids are written branch-free: all encodings of one id are formed and the right one
 * chosen by comparisons, then stored as one 8-byte word and the write pointer advanced by its
 * length (ids of random vocabularies mix 1-, 2- and 4-byte forms, which a branch per id
 * would mispredict). Buffers therefore carry KVCM_CHAIN_SLACK spare bytes.
 *
 * The layouts match kvcm's Cython encoders byte for byte (_encode.pxi), which the tests
 * compare against pickle, cbor2 and hashlib. Blocks are at most KVCM_CHAIN_MAX_TOKENS ids,
 * so a pickle message is always one frame (CPython splits frames only at 64 KiB).
 */
#ifndef KVCM_BLOCK_CHAIN_H
#define KVCM_BLOCK_CHAIN_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sha256.h"

#define KVCM_CHAIN_MAX_TOKENS 4096
/* room past a message: SHA padding (<= 72 bytes) rounded up, and word stores that overrun */
#define KVCM_CHAIN_SLACK 96
/* messages of blocks up to this many ids live on the stack */
#define KVCM_CHAIN_STACK_TOKENS 64

enum kvcm_chain_kind {
    KVCM_CHAIN_PICKLE = 0,   /* sha256: pickle-5, 32-byte parent */
    KVCM_CHAIN_CBOR = 1,     /* sha256_cbor: CBOR, 32-byte parent as a byte string */
    KVCM_CHAIN_CBOR_64 = 2,  /* sha256_cbor_64bit, kvcm: CBOR, parent as a uint64 */
    KVCM_CHAIN_FNV_64 = 3    /* llm-d: CBOR as CBOR_64, FNV-1a-64 instead of SHA-256 */
};

/* Offsets in a message. Pickle: PROTO 5, FRAME + 8-byte length, SHORT_BINBYTES 32 +
 * parent, MEMOIZE, then MARK (tuples of more than 3) and the ids. CBOR: array(3), the
 * parent (bytes(32) + 32 bytes, or a uint head of 1..9 bytes, laid out as 9), the ids'
 * array head. */
#define KVCM_PK_PARENT 13
#define KVCM_PK_BODY 46
#define KVCM_CB_PARENT 1

static const uint32_t kvcm_sha256_iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                           0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static inline void kvcm_store_le64(unsigned char *p, uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline int kvcm_bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* One id as pickle writes it: BININT1 / BININT2 / BININT below 2**31, else LONG1. */
static inline unsigned char *kvcm_pk_uint(unsigned char *w, uint64_t v) {
    if (v < 0x80000000ULL) {
        uint64_t op = v > 0xFFFF ? 0x4A : v > 0xFF ? 0x4D : 0x4B;
        kvcm_store_le64(w, op | v << 8);
        return w + 2 + (v > 0xFF) + 2 * (v > 0xFFFF);
    }
    /* LONG1: little-endian two's complement, so a set top bit needs a 0 byte */
    int n = (kvcm_bit_length(v) >> 3) + 1;
    w[0] = 0x8A;
    w[1] = (unsigned char)n;
    kvcm_store_le64(w + 2, v);
    w[10] = 0;
    return w + 2 + n;
}

/* A CBOR head (major type in the top 3 bits of `major`) in shortest form. */
static inline unsigned char *kvcm_cb_head(unsigned char *w, unsigned char major, uint64_t v) {
    if (v < 24) {
        w[0] = major | (unsigned char)v;
        return w + 1;
    }
    if (v <= 0xFFFFFFFFULL) {
        uint64_t word = v <= 0xFF     ? (uint64_t)(major | 24) | v << 8
                        : v <= 0xFFFF ? (uint64_t)(major | 25) | (uint64_t)__builtin_bswap16((uint16_t)v) << 8
                                      : (uint64_t)(major | 26) | (uint64_t)__builtin_bswap32((uint32_t)v) << 8;
        kvcm_store_le64(w, word);
        return w + 2 + (v > 0xFF) + 2 * (v > 0xFFFF);
    }
    w[0] = major | 27;
    kvcm_sha256_store_be64(w + 1, v);
    return w + 9;
}

/* One id as CBOR: the 1-byte form too, without a branch (a head is at most 9 bytes). */
static inline unsigned char *kvcm_cb_uint(unsigned char *w, uint64_t v) {
    if (v <= 0xFFFFFFFFULL) {
        uint64_t word = v < 24        ? v
                        : v <= 0xFF   ? 0x18 | v << 8
                        : v <= 0xFFFF ? 0x19 | (uint64_t)__builtin_bswap16((uint16_t)v) << 8
                                      : 0x1A | (uint64_t)__builtin_bswap32((uint32_t)v) << 8;
        kvcm_store_le64(w, word);
        return w + 1 + (v >= 24) + (v > 0xFF) + 2 * (v > 0xFFFF);
    }
    return kvcm_cb_head(w, 0, v);
}

/* SHA-256 padding after a message of len bytes (the buffer has the slack); returns the
 * padded length, a multiple of 64. */
static inline size_t kvcm_sha256_pad(unsigned char *msg, size_t len) {
    size_t total = (len + 9 + 63) & ~(size_t)63;
    memset(msg + len, 0, total - 8 - len);
    msg[len] = 0x80;
    kvcm_sha256_store_be64(msg + total - 8, (uint64_t)len << 3);
    return total;
}

/* A block's message being written: the header and the ids written so far. */
struct kvcm_enc {
    const uint64_t *tok, *end; /* the ids still to write */
    unsigned char *buf, *w;
};

/* Starts a block's message: everything before the ids, with the parent slot left unfilled
 * (for CBOR_64 laid out as a 9-byte head, the common case). */
static inline void kvcm_enc_begin(struct kvcm_enc *e, int kind, const uint64_t *tok, size_t n,
                                  unsigned char *buf) {
    unsigned char *w;
    if (kind == KVCM_CHAIN_PICKLE) {
        buf[0] = 0x80;
        buf[1] = 5;
        buf[2] = 0x95;
        buf[11] = 0x43; /* SHORT_BINBYTES 32 */
        buf[12] = 32;
        buf[45] = 0x94;
        w = buf + KVCM_PK_BODY;
        if (n > 3)
            *w++ = 0x28; /* MARK */
    } else {
        buf[0] = 0x83;
        if (kind == KVCM_CHAIN_CBOR) {
            buf[1] = 0x58; /* bytes(32) */
            buf[2] = 32;
            w = buf + 35;
        } else {
            buf[1] = 0x1B; /* uint64 */
            w = buf + 10;
        }
        w = kvcm_cb_head(w, 0x80, n);
    }
    e->tok = tok;
    e->end = tok + n;
    e->buf = buf;
    e->w = w;
}

/* Writes the next id, if any is left. */
static inline void kvcm_enc_step(struct kvcm_enc *e, int kind) {
    if (e->tok < e->end)
        e->w = kind == KVCM_CHAIN_PICKLE ? kvcm_pk_uint(e->w, *e->tok++) : kvcm_cb_uint(e->w, *e->tok++);
}

/* Writes the ids left and what follows them, then the SHA-256 padding (not for FNV);
 * returns the message length. */
static inline size_t kvcm_enc_finish(struct kvcm_enc *e, int kind, size_t n) {
    unsigned char *w;
    size_t len;
    while (e->tok < e->end)
        kvcm_enc_step(e, kind);
    w = e->w;
    if (kind == KVCM_CHAIN_PICKLE) {
        /* TUPLE (or TUPLE1..3) MEMOIZE, None, TUPLE3 MEMOIZE, STOP */
        w[0] = n > 3 ? 0x74 : (unsigned char)(0x84 + n);
        w[1] = 0x94;
        w[2] = 0x4E;
        w[3] = 0x87;
        w[4] = 0x94;
        w[5] = 0x2E;
        len = (size_t)(w + 6 - e->buf);
        kvcm_store_le64(e->buf + 3, (uint64_t)(len - 11)); /* the frame: all after its header */
    } else {
        *w = 0xF6; /* None */
        len = (size_t)(w + 1 - e->buf);
    }
    if (kind != KVCM_CHAIN_FNV_64)
        kvcm_sha256_pad(e->buf, len);
    return len;
}

static inline size_t kvcm_chain_encode(int kind, const uint64_t *tok, size_t n, unsigned char *buf) {
    struct kvcm_enc e;
    kvcm_enc_begin(&e, kind, tok, n, buf);
    return kvcm_enc_finish(&e, kind, n);
}

/* Stores the parent into an encoded message; returns its (possibly changed) length. A
 * uint64 parent below 2**32 has a shorter head than the 9 bytes laid out (a chance of 2**-32
 * per block): the rest moves down and is padded again. */
static inline size_t kvcm_chain_set_parent(int kind, unsigned char *buf, size_t len,
                                           const unsigned char *parent) {
    uint64_t key;
    unsigned char head[9];
    size_t hl;
    if (kind == KVCM_CHAIN_PICKLE) {
        memcpy(buf + KVCM_PK_PARENT, parent, 32);
        return len;
    }
    if (kind == KVCM_CHAIN_CBOR) {
        memcpy(buf + 3, parent, 32);
        return len;
    }
    memcpy(&key, parent, 8);
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_BIG_ENDIAN__
    key = __builtin_bswap64(key);
#endif
    if (key > 0xFFFFFFFFULL) {
        memcpy(buf + 2, parent, 8);
        return len;
    }
    hl = (size_t)(kvcm_cb_head(head, 0, key) - head);
    memmove(buf + 1 + hl, buf + 10, len - 10);
    memcpy(buf + 1, head, hl);
    len -= 9 - hl;
    if (kind != KVCM_CHAIN_FNV_64)
        kvcm_sha256_pad(buf, len);
    return len;
}

static inline uint64_t kvcm_fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

/* A block's digest is the next parent: 32 bytes, or the key's 8 for the uint64 chains. */
static inline uint64_t kvcm_chain_digest(int kind, const uint32_t st[8], unsigned char *parent) {
    uint64_t key = (uint64_t)st[6] << 32 | st[7];
    int i;
    if (kind == KVCM_CHAIN_PICKLE || kind == KVCM_CHAIN_CBOR) {
        for (i = 0; i < 8; i++)
            kvcm_sha256_store_be32(parent + 4 * i, st[i]);
    } else {
        kvcm_sha256_store_be64(parent, key);
    }
    return key;
}

#if KVCM_SHA256_HAVE_SHANI
/* Stores the digest (bytes d0 = 0..15, d1 = 16..31) into the next message, len bytes, as
 * whole 16-byte pieces composed in registers: the kernel's 16-byte loads then take them
 * straight from the store buffer, where loads spanning several smaller stores would wait for
 * them to reach the cache - on the chain's critical path. Returns the message's length. */
KVCM_SHANI_TARGET __attribute__((always_inline))
static inline size_t kvcm_chain_parent_vec(const int kind, unsigned char *buf, size_t len,
                                           __m128i d0, __m128i d1) {
    __m128i c0, c2;
    unsigned char key[8];
    if (kind == KVCM_CHAIN_PICKLE) {
        /* 80 05 95 <frame length: 8 bytes LE> 43 20 | parent at 13..44 | 94 ... */
        c0 = _mm_set_epi64x((long long)(0x43ULL << 24 | 0x20ULL << 32),
                            (long long)(0x950580ULL | (uint64_t)(len - 11) << 24));
        c0 = _mm_or_si128(c0, _mm_slli_si128(d0, 13));
        c2 = _mm_and_si128(_mm_loadu_si128((const __m128i *)(buf + 32)),
                           _mm_set_epi64x((long long)0xFFFFFF0000000000ULL, 0));
        _mm_storeu_si128((__m128i *)buf, c0);
        _mm_storeu_si128((__m128i *)(buf + 16), _mm_alignr_epi8(d1, d0, 3));
        _mm_storeu_si128((__m128i *)(buf + 32), _mm_or_si128(c2, _mm_srli_si128(d1, 3)));
        return len;
    }
    if (kind == KVCM_CHAIN_CBOR) {
        /* 83 58 20 | parent at 3..34 | array head, ids... */
        c0 = _mm_or_si128(_mm_cvtsi32_si128(0x205883), _mm_slli_si128(d0, 3));
        c2 = _mm_and_si128(_mm_loadu_si128((const __m128i *)(buf + 32)),
                           _mm_set_epi64x(-1LL, (long long)0xFFFFFFFFFF000000ULL));
        _mm_storeu_si128((__m128i *)buf, c0);
        _mm_storeu_si128((__m128i *)(buf + 16), _mm_alignr_epi8(d1, d0, 13));
        _mm_storeu_si128((__m128i *)(buf + 32), _mm_or_si128(c2, _mm_srli_si128(d1, 13)));
        return len;
    }
    /* 83 1B | key (the digest's last 8 bytes) at 2..9 | array head, ids... */
    if (_mm_extract_epi32(d1, 2) != 0) { /* the key's high half: >= 2**32, a 9-byte head */
        c0 = _mm_and_si128(_mm_loadu_si128((const __m128i *)buf),
                           _mm_set_epi64x((long long)0xFFFFFFFFFFFF0000ULL, 0xFFFF));
        _mm_storeu_si128((__m128i *)buf, _mm_or_si128(c0, _mm_slli_si128(_mm_srli_si128(d1, 8), 2)));
        return len;
    }
    _mm_storel_epi64((__m128i *)key, _mm_srli_si128(d1, 8));
    return kvcm_chain_set_parent(kind, buf, len, key);
}

/* The chain with SHA-NI, the next block's ids written between the current block's rounds.
 * Always inlined with a constant kind, so each kind gets its own loop without branches on it. */
KVCM_SHANI_TARGET __attribute__((always_inline))
static inline void kvcm_chain_shani_kind(const int kind, const uint64_t *tok, size_t nblocks, size_t n,
                                         unsigned char *bufs[2], unsigned char *parent,
                                         uint64_t *keys_out, unsigned char *digests_out, size_t dl) {
    const __m128i bswap = KVCM_SHANI_BSWAP_MASK;
    __m128i s0, s1, t, save0, save1, m0, m1, m2, m3, d0, d1;
    struct kvcm_enc e;
    size_t len, b, c, nc;

    len = kvcm_chain_set_parent(kind, bufs[0], kvcm_chain_encode(kind, tok, n, bufs[0]), parent);
    for (b = 0; b < nblocks; b++) {
        unsigned char *cur = bufs[b & 1];
        if (b + 1 < nblocks)
            kvcm_enc_begin(&e, kind, tok + (b + 1) * n, n, bufs[(b + 1) & 1]);
        else
            kvcm_enc_begin(&e, kind, tok, 0, bufs[(b + 1) & 1]); /* nothing to write meanwhile */
        nc = (len + 9 + 63) >> 6;
        KVCM_SHANI_STATE_IN(kvcm_sha256_iv);
        for (c = 0; c < nc; c++)
            KVCM_SHANI_BLOCK(cur + 64 * c, kvcm_enc_step(&e, kind));
        /* the digest's bytes, big-endian words: as KVCM_SHANI_STATE_OUT, then byte-swapped */
        t = _mm_shuffle_epi32(s0, 0x1B);
        s1 = _mm_shuffle_epi32(s1, 0xB1);
        d0 = _mm_shuffle_epi8(_mm_blend_epi16(t, s1, 0xF0), bswap);
        d1 = _mm_shuffle_epi8(_mm_alignr_epi8(s1, t, 8), bswap);
        if (b + 1 < nblocks)
            len = kvcm_chain_parent_vec(kind, bufs[(b + 1) & 1], kvcm_enc_finish(&e, kind, n), d0, d1);
        if (dl == 32) {
            _mm_storeu_si128((__m128i *)parent, d0);
            _mm_storeu_si128((__m128i *)(parent + 16), d1);
        } else {
            _mm_storel_epi64((__m128i *)parent, _mm_srli_si128(d1, 8));
        }
        keys_out[b] = (uint64_t)__builtin_bswap64((uint64_t)_mm_extract_epi64(d1, 1));
        if (digests_out != NULL)
            memcpy(digests_out + b * dl, parent, dl);
    }
}

KVCM_SHANI_TARGET
static void kvcm_chain_shani(int kind, const uint64_t *tok, size_t nblocks, size_t n,
                             unsigned char *bufs[2], unsigned char *parent,
                             uint64_t *keys_out, unsigned char *digests_out, size_t dl) {
    if (kind == KVCM_CHAIN_PICKLE)
        kvcm_chain_shani_kind(KVCM_CHAIN_PICKLE, tok, nblocks, n, bufs, parent, keys_out, digests_out, dl);
    else if (kind == KVCM_CHAIN_CBOR)
        kvcm_chain_shani_kind(KVCM_CHAIN_CBOR, tok, nblocks, n, bufs, parent, keys_out, digests_out, dl);
    else
        kvcm_chain_shani_kind(KVCM_CHAIN_CBOR_64, tok, nblocks, n, bufs, parent, keys_out, digests_out, dl);
}
#endif

/* The chain over nblocks blocks of n ids each (n <= KVCM_CHAIN_MAX_TOKENS). `parent` holds
 * the starting parent (dl bytes: 32, or 8 for the uint64 chains) and ends as the last
 * block's. keys_out gets each block's key (the digest's last 8 bytes, big-endian), and
 * digests_out, unless NULL, each parent in turn. Returns -1 when memory ran out. */
static int kvcm_chain(int kind, const uint64_t *tok, size_t nblocks, size_t n,
                      unsigned char *parent, uint64_t *keys_out, unsigned char *digests_out) {
    unsigned char stack[2][KVCM_PK_BODY + 11 * KVCM_CHAIN_STACK_TOKENS + 8 + KVCM_CHAIN_SLACK];
    size_t cap = KVCM_PK_BODY + 11 * n + 8 + KVCM_CHAIN_SLACK;
    size_t dl = (kind == KVCM_CHAIN_PICKLE || kind == KVCM_CHAIN_CBOR) ? 32 : 8;
    unsigned char *bufs[2], *heap = NULL;
    size_t lens[2], len, b;
    kvcm_sha256_compress_fn compress = kvcm_sha256_kernel();
    uint32_t st[8];
    uint64_t key;

    if (nblocks == 0)
        return 0;
    if (n <= KVCM_CHAIN_STACK_TOKENS) {
        bufs[0] = stack[0];
        bufs[1] = stack[1];
    } else {
        heap = (unsigned char *)malloc(2 * cap);
        if (heap == NULL)
            return -1;
        bufs[0] = heap;
        bufs[1] = heap + cap;
    }
#if KVCM_SHA256_HAVE_SHANI
    if (compress == kvcm_sha256_compress_shani && kind != KVCM_CHAIN_FNV_64) {
        kvcm_chain_shani(kind, tok, nblocks, n, bufs, parent, keys_out, digests_out, dl);
        free(heap);
        return 0;
    }
#endif
    lens[0] = kvcm_chain_encode(kind, tok, n, bufs[0]);
    for (b = 0; b < nblocks; b++) {
        unsigned char *cur = bufs[b & 1];
        len = kvcm_chain_set_parent(kind, cur, lens[b & 1], parent);
        if (kind == KVCM_CHAIN_FNV_64) {
            key = kvcm_fnv1a64(cur, len);
            kvcm_sha256_store_be64(parent, key);
        } else {
            memcpy(st, kvcm_sha256_iv, sizeof st);
            compress(st, cur, (len + 9 + 63) >> 6);
            key = kvcm_chain_digest(kind, st, parent);
        }
        /* the next block's message does not depend on this digest: encode it meanwhile */
        if (b + 1 < nblocks)
            lens[(b + 1) & 1] = kvcm_chain_encode(kind, tok + (b + 1) * n, n, bufs[(b + 1) & 1]);
        keys_out[b] = key;
        if (digests_out != NULL)
            memcpy(digests_out + b * dl, parent, dl);
    }
    free(heap);
    return 0;
}

#endif /* KVCM_BLOCK_CHAIN_H */
