/*
 * sha256.h - header-only SHA-256 (FIPS 180-4) for kvcm.
 *
 * Two compression kernels behind one function pointer:
 *   - portable C (any architecture),
 *   - Intel SHA extensions (SHA-NI), x86/x86_64 with GCC or Clang only.
 * The SHA-NI kernel is compiled with a per-function target attribute, so the
 * including file needs no -m flags; it is only ever called after CPUID says
 * the CPU supports it.
 *
 * Kernel selection is lazy: the pointer starts NULL and the first
 * kvcm_sha256() or kvcm_sha256_backend() call runs kvcm_sha256_select(0),
 * so no explicit select is needed (SHA-NI is used when the CPU has it).  Call
 * kvcm_sha256_select(1) to force the portable kernel.
 *
 * Thread safety: kvcm_sha256() keeps all state on the stack; the only global
 * is the kernel pointer, read/written with relaxed atomics (every value it
 * can hold is a valid kernel), so concurrent calls are safe.  Everything is
 * static, so each translation unit that includes this has its own pointer.
 *
 * Usage from Cython:
 *   cdef extern from "sha256.h":
 *       int KVCM_SHA256_PORTABLE
 *       int KVCM_SHA256_SHANI
 *       void kvcm_sha256_select(int force_portable)
 *       int kvcm_sha256_backend()
 *       void kvcm_sha256(const unsigned char *data, size_t length,
 *                        unsigned char *out) nogil
 */
#ifndef KVCM_SHA256_H
#define KVCM_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KVCM_SHA256_PORTABLE 0
#define KVCM_SHA256_SHANI 1

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define KVCM_SHA256_HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define KVCM_SHA256_HAVE_SHANI 0
#endif

#if defined(__GNUC__)
/* A file that includes this but skips part of the API should not warn. */
#define KVCM_SHA256_UNUSED __attribute__((unused))
#define KVCM_SHA256_LOAD_PTR(p) __atomic_load_n(&(p), __ATOMIC_RELAXED)
#define KVCM_SHA256_STORE_PTR(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELAXED)
#else
#define KVCM_SHA256_UNUSED
#define KVCM_SHA256_LOAD_PTR(p) (p)
#define KVCM_SHA256_STORE_PTR(p, v) ((p) = (v))
#endif

/* Round constants (read-only). 16-byte aligned so SHA-NI can load 4 at once. */
#if defined(__GNUC__)
__attribute__((aligned(16)))
#endif
static const uint32_t kvcm_sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

/* Compress nblocks consecutive 64-byte blocks into state (H0..H7). */
typedef void (*kvcm_sha256_compress_fn)(uint32_t state[8],
                                        const unsigned char *blocks,
                                        size_t nblocks);

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
/* memcpy + bswap: one unaligned load/store each.  The byte-wise fallback
 * below is also correct, but GCC may vectorise the 8-word digest store into
 * a long SSE2 shuffle sequence instead of 8 bswaps. */
static inline uint32_t kvcm_sha256_load_be32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return __builtin_bswap32(v);
}
static inline void kvcm_sha256_store_be32(unsigned char *p, uint32_t v) {
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}
static inline void kvcm_sha256_store_be64(unsigned char *p, uint64_t v) {
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}
#else
/* Byte-wise: alignment- and endian-independent. */
static inline uint32_t kvcm_sha256_load_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline void kvcm_sha256_store_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static inline void kvcm_sha256_store_be64(unsigned char *p, uint64_t v) {
    kvcm_sha256_store_be32(p, (uint32_t)(v >> 32));
    kvcm_sha256_store_be32(p + 4, (uint32_t)v);
}
#endif

/* ------------------------------------------------------------------------ */
/* Portable kernel                                                          */
/* ------------------------------------------------------------------------ */

#define KVCM_ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define KVCM_BSIG0(x) (KVCM_ROR(x, 2) ^ KVCM_ROR(x, 13) ^ KVCM_ROR(x, 22))
#define KVCM_BSIG1(x) (KVCM_ROR(x, 6) ^ KVCM_ROR(x, 11) ^ KVCM_ROR(x, 25))
#define KVCM_SSIG0(x) (KVCM_ROR(x, 7) ^ KVCM_ROR(x, 18) ^ ((x) >> 3))
#define KVCM_SSIG1(x) (KVCM_ROR(x, 17) ^ KVCM_ROR(x, 19) ^ ((x) >> 10))
/* Ch/Maj in forms with one fewer operation than the textbook definitions. */
#define KVCM_CH(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define KVCM_MAJ(x, y, z) (((x) & (y)) | ((z) & ((x) | (y))))

/* One round.  Instead of shifting a..h every round, callers rotate the
 * argument order, so only d and h are written. */
#define KVCM_ROUND(a, b, c, d, e, f, g, h, i)                                 \
    do {                                                                      \
        uint32_t t1_ = (h) + KVCM_BSIG1(e) + KVCM_CH(e, f, g) +               \
                       kvcm_sha256_k[i] + w[i];                               \
        (d) += t1_;                                                           \
        (h) = t1_ + KVCM_BSIG0(a) + KVCM_MAJ(a, b, c);                        \
    } while (0)

static void kvcm_sha256_compress_portable(uint32_t state[8],
                                          const unsigned char *blocks,
                                          size_t nblocks) {
    uint32_t w[64];
    uint32_t a, b, c, d, e, f, g, h;
    int i;

    while (nblocks--) {
        for (i = 0; i < 16; i++)
            w[i] = kvcm_sha256_load_be32(blocks + 4 * i);
        for (i = 16; i < 64; i++)
            w[i] = KVCM_SSIG1(w[i - 2]) + w[i - 7] + KVCM_SSIG0(w[i - 15]) +
                   w[i - 16];

        a = state[0]; b = state[1]; c = state[2]; d = state[3];
        e = state[4]; f = state[5]; g = state[6]; h = state[7];

        /* 8 rounds per iteration: after 8 rotations the roles line up again. */
        for (i = 0; i < 64; i += 8) {
            KVCM_ROUND(a, b, c, d, e, f, g, h, i + 0);
            KVCM_ROUND(h, a, b, c, d, e, f, g, i + 1);
            KVCM_ROUND(g, h, a, b, c, d, e, f, i + 2);
            KVCM_ROUND(f, g, h, a, b, c, d, e, i + 3);
            KVCM_ROUND(e, f, g, h, a, b, c, d, i + 4);
            KVCM_ROUND(d, e, f, g, h, a, b, c, i + 5);
            KVCM_ROUND(c, d, e, f, g, h, a, b, i + 6);
            KVCM_ROUND(b, c, d, e, f, g, h, a, i + 7);
        }

        state[0] += a; state[1] += b; state[2] += c; state[3] += d;
        state[4] += e; state[5] += f; state[6] += g; state[7] += h;
        blocks += 64;
    }
}

#undef KVCM_ROUND
#undef KVCM_MAJ
#undef KVCM_CH
#undef KVCM_SSIG1
#undef KVCM_SSIG0
#undef KVCM_BSIG1
#undef KVCM_BSIG0
#undef KVCM_ROR

/* ------------------------------------------------------------------------ */
/* SHA-NI kernel                                                            */
/* ------------------------------------------------------------------------ */

#if KVCM_SHA256_HAVE_SHANI

#define KVCM_SHANI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* Four rounds on message vector m (W[i..i+3]).  sha256rnds2 does two rounds
 * using the low two dwords of its third operand, so the W+K sum is shuffled
 * down for the second pair.  The first call writes the new ABEF into s1 (old
 * ABEF becomes CDGH two rounds later), the second swaps them back. */
#define KVCM_SHANI_RNDS4(m, i)                                                \
    do {                                                                      \
        __m128i wk_ = _mm_add_epi32(                                          \
            (m), _mm_load_si128((const __m128i *)(kvcm_sha256_k + (i))));    \
        s1 = _mm_sha256rnds2_epu32(s1, s0, wk_);                              \
        wk_ = _mm_shuffle_epi32(wk_, 0x0E);                                   \
        s0 = _mm_sha256rnds2_epu32(s0, s1, wk_);                              \
    } while (0)

/* Next message vector: W[t..t+3] = msg2(msg1(W[t-16..]) + W[t-7..t-4],
 * W[t-4..t-1]).  m0 already holds msg1(W[t-16..t-13], W[t-12..t-9]); the
 * palignr extracts W[t-7..t-4] from the two most recent vectors. */
#define KVCM_SHANI_NEXT(m0, m2, m3)                                           \
    do {                                                                      \
        (m0) = _mm_add_epi32((m0), _mm_alignr_epi8((m3), (m2), 4));           \
        (m0) = _mm_sha256msg2_epu32((m0), (m3));                              \
    } while (0)

/* sha256rnds2 wants the state as two vectors {A,B,E,F} and {C,D,G,H} (high dword to low),
 * because each round reads a,b,e,f and the instruction pair alternates the two halves.
 * Converted once per run of blocks, not per block.  (Vectors are written high..low.) */
#define KVCM_SHANI_STATE_IN(state)                                            \
    do {                                                                      \
        t = _mm_loadu_si128((const __m128i *)&(state)[0]);  /* D C B A */     \
        s1 = _mm_loadu_si128((const __m128i *)&(state)[4]); /* H G F E */     \
        t = _mm_shuffle_epi32(t, 0xB1);                     /* C D A B */     \
        s1 = _mm_shuffle_epi32(s1, 0x1B);                   /* E F G H */     \
        s0 = _mm_alignr_epi8(t, s1, 8);                     /* A B E F */     \
        s1 = _mm_blend_epi16(s1, t, 0xF0);                  /* C D G H */     \
    } while (0)

/* Back to H0..H7 order. */
#define KVCM_SHANI_STATE_OUT(state)                                           \
    do {                                                                      \
        t = _mm_shuffle_epi32(s0, 0x1B);                    /* F E B A */     \
        s1 = _mm_shuffle_epi32(s1, 0xB1);                   /* D C H G */     \
        s0 = _mm_blend_epi16(t, s1, 0xF0);                  /* D C B A */     \
        s1 = _mm_alignr_epi8(s1, t, 8);                     /* H G F E */     \
        _mm_storeu_si128((__m128i *)&(state)[0], s0);                         \
        _mm_storeu_si128((__m128i *)&(state)[4], s1);                         \
    } while (0)

/* One 64-byte block into s0/s1 (needs bswap, t, save0, save1, m0..m3 declared).  HOOK runs
 * between groups of four rounds: the rounds form one long dependency chain that leaves the
 * other execution ports idle, so independent work placed there (block_chain.h encodes the
 * next block's message) costs almost nothing. */
#define KVCM_SHANI_BLOCK(blk, HOOK)                                           \
    do {                                                                      \
        save0 = s0;                                                           \
        save1 = s1;                                                           \
        m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((blk) + 0)), bswap);  \
        m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((blk) + 16)), bswap); \
        m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((blk) + 32)), bswap); \
        m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((blk) + 48)), bswap); \
        /* Rounds 0-15 use the raw message; meanwhile start the schedule. */  \
        KVCM_SHANI_RNDS4(m0, 0);                                              \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m1, 4);                                              \
        m0 = _mm_sha256msg1_epu32(m0, m1);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m2, 8);                                              \
        m1 = _mm_sha256msg1_epu32(m1, m2);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m3, 12);                                             \
        KVCM_SHANI_NEXT(m0, m2, m3);            /* W16..19 */                 \
        m2 = _mm_sha256msg1_epu32(m2, m3);                                    \
        HOOK;                                                                 \
        /* Rounds 16-51: four vectors rotate; each step consumes the newest,  \
         * finishes the next one and starts msg1 for the one after. */        \
        KVCM_SHANI_RNDS4(m0, 16);                                             \
        KVCM_SHANI_NEXT(m1, m3, m0);            /* W20..23 */                 \
        m3 = _mm_sha256msg1_epu32(m3, m0);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m1, 20);                                             \
        KVCM_SHANI_NEXT(m2, m0, m1);            /* W24..27 */                 \
        m0 = _mm_sha256msg1_epu32(m0, m1);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m2, 24);                                             \
        KVCM_SHANI_NEXT(m3, m1, m2);            /* W28..31 */                 \
        m1 = _mm_sha256msg1_epu32(m1, m2);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m3, 28);                                             \
        KVCM_SHANI_NEXT(m0, m2, m3);            /* W32..35 */                 \
        m2 = _mm_sha256msg1_epu32(m2, m3);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m0, 32);                                             \
        KVCM_SHANI_NEXT(m1, m3, m0);            /* W36..39 */                 \
        m3 = _mm_sha256msg1_epu32(m3, m0);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m1, 36);                                             \
        KVCM_SHANI_NEXT(m2, m0, m1);            /* W40..43 */                 \
        m0 = _mm_sha256msg1_epu32(m0, m1);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m2, 40);                                             \
        KVCM_SHANI_NEXT(m3, m1, m2);            /* W44..47 */                 \
        m1 = _mm_sha256msg1_epu32(m1, m2);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m3, 44);                                             \
        KVCM_SHANI_NEXT(m0, m2, m3);            /* W48..51 */                 \
        m2 = _mm_sha256msg1_epu32(m2, m3);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m0, 48);                                             \
        KVCM_SHANI_NEXT(m1, m3, m0);            /* W52..55 */                 \
        m3 = _mm_sha256msg1_epu32(m3, m0);                                    \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m1, 52);                                             \
        KVCM_SHANI_NEXT(m2, m0, m1);            /* W56..59 */                 \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m2, 56);                                             \
        KVCM_SHANI_NEXT(m3, m1, m2);            /* W60..63 */                 \
        HOOK;                                                                 \
        KVCM_SHANI_RNDS4(m3, 60);                                             \
        s0 = _mm_add_epi32(s0, save0);                                        \
        s1 = _mm_add_epi32(s1, save1);                                        \
    } while (0)

/* pshufb mask: big-endian message words -> little-endian dwords. */
#define KVCM_SHANI_BSWAP_MASK _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL)

KVCM_SHANI_TARGET
static void kvcm_sha256_compress_shani(uint32_t state[8],
                                       const unsigned char *blocks,
                                       size_t nblocks) {
    const __m128i bswap = KVCM_SHANI_BSWAP_MASK;
    __m128i s0, s1, t, save0, save1, m0, m1, m2, m3;

    if (nblocks == 0)
        return;
    KVCM_SHANI_STATE_IN(state);
    do {
        KVCM_SHANI_BLOCK(blocks, (void)0);
        blocks += 64;
    } while (--nblocks);
    KVCM_SHANI_STATE_OUT(state);
}

/* KVCM_SHANI_* stay defined: block_chain.h builds its fused kernel from them. */

static int kvcm_sha256_cpu_has_shani(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    if (!(ecx & (1u << 9)) || !(ecx & (1u << 19))) /* SSSE3, SSE4.1 */
        return 0;
    /* __get_cpuid_count checks the max leaf, so old CPUs return 0 here. */
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
        return 0;
    return (ebx >> 29) & 1u;                           /* SHA */
}

#endif /* KVCM_SHA256_HAVE_SHANI */

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                 */
/* ------------------------------------------------------------------------ */

/* The only mutable global.  NULL means "not chosen yet" (lazy selection). */
static kvcm_sha256_compress_fn kvcm_sha256_compress = NULL;

static KVCM_SHA256_UNUSED void kvcm_sha256_select(int force_portable) {
    kvcm_sha256_compress_fn fn = kvcm_sha256_compress_portable;
#if KVCM_SHA256_HAVE_SHANI
    if (!force_portable && kvcm_sha256_cpu_has_shani())
        fn = kvcm_sha256_compress_shani;
#else
    (void)force_portable;
#endif
    KVCM_SHA256_STORE_PTR(kvcm_sha256_compress, fn);
}

/* Active kernel, choosing it on first use.  Threads racing on the first call
 * all compute and store the same value, so no lock is needed; afterwards the
 * cost is one load and a well-predicted branch. */
static inline kvcm_sha256_compress_fn kvcm_sha256_kernel(void) {
    kvcm_sha256_compress_fn fn = KVCM_SHA256_LOAD_PTR(kvcm_sha256_compress);
    if (fn == NULL) {
        kvcm_sha256_select(0);
        fn = KVCM_SHA256_LOAD_PTR(kvcm_sha256_compress);
    }
    return fn;
}

/* Resolves the lazy choice too, so the answer matches what kvcm_sha256
 * will use. */
static KVCM_SHA256_UNUSED int kvcm_sha256_backend(void) {
#if KVCM_SHA256_HAVE_SHANI
    if (kvcm_sha256_kernel() == kvcm_sha256_compress_shani)
        return KVCM_SHA256_SHANI;
#endif
    return KVCM_SHA256_PORTABLE;
}

/* ------------------------------------------------------------------------ */
/* One-shot digest                                                          */
/* ------------------------------------------------------------------------ */

static KVCM_SHA256_UNUSED void kvcm_sha256(const unsigned char *data,
                                           size_t len, unsigned char out[32]) {
    uint32_t state[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                         0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    /* Fetch the kernel once per message rather than per compress call. */
    kvcm_sha256_compress_fn compress = kvcm_sha256_kernel();
    unsigned char tail[128];
    size_t full = len >> 6, rem = len & 63, tail_len;
    int i;

    /* Full blocks straight from the caller's buffer: no copy. */
    if (full) {
        compress(state, data, full);
        data += full << 6;
    }

    /* Remainder + 0x80 + zeros + 64-bit big-endian bit length: one block if
     * the remainder leaves room for 9 bytes, else two. */
    tail_len = rem < 56 ? 64 : 128;
    if (rem)
        memcpy(tail, data, rem);
    tail[rem] = 0x80;
    memset(tail + rem + 1, 0, tail_len - 8 - rem - 1);
    kvcm_sha256_store_be64(tail + tail_len - 8, (uint64_t)len << 3);
    compress(state, tail, tail_len >> 6);

    for (i = 0; i < 8; i++)
        kvcm_sha256_store_be32(out + 4 * i, state[i]);
}

#undef KVCM_SHA256_LOAD_PTR
#undef KVCM_SHA256_STORE_PTR
#undef KVCM_SHA256_UNUSED

#endif /* KVCM_SHA256_H */
