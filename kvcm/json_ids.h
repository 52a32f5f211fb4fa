/* The token ids of a JSON request body, read straight from its bytes (kvcm/_json_ids.pxi).

   Scoring by token ids is the call schedulers make on every request; parsing its body with a
   general JSON parser turns each id into a Python int only for the core to turn it back into
   a uint64. These functions find the top-level "token_ids" array of a JSON object and parse
   it into uint64s. They accept only what is certainly valid and certainly means the same to
   the general path: anything else (a sign, a fraction, an exponent, a leading zero, a value
   of 2**64 or more, an escaped or repeated key, a body that is not an object) makes them
   answer 0, and the caller parses the body the general way, which also words every error.
   Values other than token_ids are only skipped here, not checked: the caller parses the
   rest of the body with the general parser. */

#ifndef KVCM_JSON_IDS_H
#define KVCM_JSON_IDS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline size_t kj_space(const char *p, size_t i, size_t n)
{
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
        i++;
    return i;
}

/* p[i] is '"': the index after the closing quote, or 0 when the string does not end.
   *escaped is set when it holds a backslash. */
static inline size_t kj_string(const char *p, size_t i, size_t n, int *escaped)
{
    for (i++; i < n; i++) {
        if (p[i] == '"')
            return i + 1;
        if (p[i] == '\\') {
            *escaped = 1;
            i++;
        }
    }
    return 0;
}

static inline int kj_ends_scalar(char c)
{
    return c == ',' || c == '}' || c == ']' || c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The index after the value starting at p[i] (strings and brackets matched, scalars up to
   the next delimiter), or 0. Brackets are counted, not paired: the general parser of the
   rest of the body rejects what is malformed. */
static size_t kj_skip_value(const char *p, size_t i, size_t n)
{
    size_t depth = 0, start = i;
    int escaped = 0;
    if (i >= n)
        return 0;
    if (p[i] != '"' && p[i] != '[' && p[i] != '{') {
        while (i < n && !kj_ends_scalar(p[i]))
            i++;
        return i > start ? i : 0;
    }
    while (i < n) {
        char c = p[i];
        if (c == '"') {
            i = kj_string(p, i, n, &escaped);
            if (i == 0)
                return 0;
            if (depth == 0)
                return i;
            continue;
        }
        if (c == '[' || c == '{') {
            depth++;
        } else if (c == ']' || c == '}') {
            if (--depth == 0)
                return i + 1;
        }
        i++;
    }
    return 0;
}

/* Reads a top-level key and its ':' at p[*i]; 1 with *i at the value (and *is_ids set
   when the key is "token_ids"), 0 when what is there is not a key spelled without escapes
   (an escaped key could spell token_ids). */
static int kj_key(const char *p, size_t n, size_t *i, int *is_ids)
{
    static const char key[] = "\"token_ids\"";
    size_t k = *i, j;
    int escaped = 0;
    if (k >= n || p[k] != '"')
        return 0;
    j = kj_string(p, k, n, &escaped);
    if (j == 0 || escaped)
        return 0;
    *is_ids = j - k == sizeof key - 1 && memcmp(p + k, key, sizeof key - 1) == 0;
    j = kj_space(p, j, n);
    if (j >= n || p[j] != ':')
        return 0;
    *i = kj_space(p, j + 1, n);
    return 1;
}

/* After a top-level value ending at p[i]: 1 with *i at the next key, 2 at the end of a
   well-formed body, 0 otherwise. */
static int kj_next(const char *p, size_t n, size_t *i)
{
    size_t j = kj_space(p, *i, n);
    if (j < n && p[j] == ',') {
        *i = kj_space(p, j + 1, n);
        return 1;
    }
    if (j < n && p[j] == '}')
        return kj_space(p, j + 1, n) == n ? 2 : 0;
    return 0;
}

/* The index of the value of the first top-level "token_ids" key when p[0:n] starts as a JSON
   object whose keys up to it are spelled without escapes and that value starts with '[';
   0 otherwise (0 is never a value's index). The values before it are skipped, not checked. */
static size_t kj_find_token_ids(const char *p, size_t n)
{
    size_t i = kj_space(p, 0, n);
    int is_ids = 0;
    if (i >= n || p[i] != '{')
        return 0;
    i = kj_space(p, i + 1, n);
    for (;;) {
        if (!kj_key(p, n, &i, &is_ids))
            return 0;
        if (is_ids)
            return i < n && p[i] == '[' ? i : 0;
        i = kj_skip_value(p, i, n);
        if (i == 0 || kj_next(p, n, &i) != 1)
            return 0;
    }
}

/* The plain decimal integer at p[*at] (at most 20 digits, no leading zero, below 2**64):
   1 with *at after it, else 0. */
static int kj_u64_slow(const char *p, size_t n, size_t *at, uint64_t *out)
{
    size_t i = *at, first = i;
    uint64_t v = 0;
    unsigned d;
    /* 19 digits never overflow (10**19 - 1 < 2**64); only a 20th is checked */
    while (i < n && (d = (unsigned)(unsigned char)p[i] - '0') <= 9 && i - first < 19) {
        v = v * 10 + d;
        i++;
    }
    if (i == first || (p[first] == '0' && i - first > 1))
        return 0;                             /* no digit, or a leading zero: not JSON */
    if (i < n && (d = (unsigned)(unsigned char)p[i] - '0') <= 9) {
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
        i++;
        if (i < n && (unsigned)(unsigned char)p[i] - '0' <= 9)
            return 0;                         /* 21 digits and more */
    }
    *out = v;
    *at = i;
    return 1;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define KJ_SWAR 1
/* The digits at the start of the 8 bytes at p, read as one word: how many there are (8 when
   all are) and, when fewer than 8, their value. A token id is a few digits of varying
   length: this takes it without a branch per digit. */
static inline int kj_digits8(const char *p, uint64_t *v)
{
    const uint64_t high = 0xF0F0F0F0F0F0F0F0ULL, zeros = 0x3030303030303030ULL;
    uint64_t word, other;
    int len;
    memcpy(&word, p, 8);
    /* a byte is a digit when it is 0x3_ and stays 0x3_ with 6 added; a carry out of a
       non-digit byte only reaches bytes after the first non-digit, which are not read */
    other = ((word & high) ^ zeros) | (((word + 0x0606060606060606ULL) & high) ^ zeros);
    if (other == 0)
        return 8;
    len = __builtin_ctzll(other) >> 3;
    if (len == 0)
        return 0;
    /* the digits' values, moved up so that zero bytes stand before them as leading zeros */
    word = (word - zeros) << (8 * (8 - len));
    /* pairs, then fours, then eight digits (each step multiplies and adds neighbours) */
    word = (word * 10 + (word >> 8)) & 0x00FF00FF00FF00FFULL;
    word = (word * 100 + (word >> 16)) & 0x0000FFFF0000FFFFULL;
    *v = (word * 10000 + (word >> 32)) & 0xFFFFFFFFULL;
    return len;
}
#endif

#if defined(KJ_SWAR) && defined(__SSE2__)
#define KJ_SSE2 1
#include <emmintrin.h>

/* Bit k set where p[k] == c, for the 64 bytes at p. */
static inline uint64_t kj_mask64(const char *p, char c)
{
    const __m128i cv = _mm_set1_epi8(c);
    uint64_t m = 0;
    int k;
    for (k = 0; k < 4; k++)
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(
                 _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * k)), cv)) << (16 * k);
    return m;
}

/* Bit k set where p[k] is a digit, for the 64 bytes at p. */
static inline uint64_t kj_digits64(const char *p)
{
    const __m128i below = _mm_set1_epi8('0' - 1), above = _mm_set1_epi8('9' + 1);
    uint64_t m = 0;
    int k;
    for (k = 0; k < 4; k++) {
        __m128i v = _mm_loadu_si128((const __m128i *)(p + 16 * k));
        __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(v, below), _mm_cmplt_epi8(v, above));
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(digit) << (16 * k);
    }
    return m;
}

/* The value of the len (1..8) digits at p (8 bytes readable). */
static inline uint64_t kj_value8(const char *p, int len)
{
    uint64_t word;
    memcpy(&word, p, 8);
    word = (word - 0x3030303030303030ULL) << (8 * (8 - len));
    word = (word * 10 + (word >> 8)) & 0x00FF00FF00FF00FFULL;
    word = (word * 100 + (word >> 16)) & 0x0000FFFF0000FFFFULL;
    return (word * 10000 + (word >> 32)) & 0xFFFFFFFFULL;
}

/* Compact runs of ids ("12,345,6789,...", what JSON encoders write), 64 bytes at a time from
   p[*at] (an id's first byte): where the commas are is known for the whole window at once,
   so the ids are read independently of each other instead of each waiting for the previous
   one's length. Returns how many ids it wrote to out (-1: not JSON), with *at at the first
   id it left (a window holding anything but digits and commas, or the array's end, is left
   to the caller). */
static ptrdiff_t kj_u64_runs(const char *p, size_t n, size_t *at, uint64_t *out)
{
    size_t i = *at;
    ptrdiff_t count = 0;
    while (i + 64 + 8 <= n) {
        uint64_t commas = kj_mask64(p + i, ','), start = 0;
        if ((commas | kj_digits64(p + i)) != ~0ULL || commas == 0)
            break;
        while (commas) {
            uint64_t c = (uint64_t)__builtin_ctzll(commas);
            int len = (int)(c - start);
            commas &= commas - 1;
            if (len == 0 || (p[i + start] == '0' && len > 1))
                return -1;                    /* no digit, or a leading zero: not JSON */
            if (len <= 8) {
                out[count] = kj_value8(p + i + start, len);
            } else {
                size_t j = i + start;
                if (!kj_u64_slow(p, n, &j, &out[count]) || j != i + c)
                    return -1;
            }
            count++;
            start = c + 1;
        }
        i += start;
    }
    *at = i;
    return count;
}
#endif

#if defined(KJ_SSE2) && defined(__x86_64__) && defined(__GNUC__)
#define KJ_VBMI 1
#include <immintrin.h>

/* Whether compact runs are read with AVX-512 VBMI2: -1 until chosen. */
static int kj_vbmi = -1;

/* Chooses how compact runs are read: a window's ids all at once with AVX-512 (BW, VBMI,
   VBMI2) where the CPU has it, unless force_scalar (so that tests cover both on one
   machine). Returns 1 for AVX-512. */
static int kj_select(int force_scalar)
{
    __builtin_cpu_init();
    kj_vbmi = !force_scalar && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi")
              && __builtin_cpu_supports("avx512vbmi2");
    return kj_vbmi;
}

#define KJ_VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vbmi2")))

/* kj_u64_runs reading a window's ids together: the commas' places are packed into one
   register (each id ends before one), every id is moved into a 64-bit lane of its own with
   its digits at the lane's top (the bytes before them zero: leading zeros), and eight lanes
   at a time turn into values by multiplying and adding neighbours. A window holding an id of
   more than 8 digits is left to the caller. */
KJ_VBMI_TARGET
static ptrdiff_t kj_u64_runs_vbmi(const char *p, size_t n, size_t *at, uint64_t *out)
{
    static const signed char lane_of[64] = {
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
    static const signed char back[64] = {
        -8, -7, -6, -5, -4, -3, -2, -1, -8, -7, -6, -5, -4, -3, -2, -1, -8, -7, -6, -5, -4, -3, -2, -1,
        -8, -7, -6, -5, -4, -3, -2, -1, -8, -7, -6, -5, -4, -3, -2, -1, -8, -7, -6, -5, -4, -3, -2, -1,
        -8, -7, -6, -5, -4, -3, -2, -1, -8, -7, -6, -5, -4, -3, -2, -1};
    static const signed char places[64] = {
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
        28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52,
        53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};
    const __m512i lanes = _mm512_loadu_si512(lane_of), offsets = _mm512_loadu_si512(back);
    const __m512i iota = _mm512_loadu_si512(places);
    /* byte j: j - 1, the id before (for byte 0 any: masked) */
    const __m512i previous = _mm512_sub_epi8(iota, _mm512_set1_epi8(1));
    const __m512i ones = _mm512_set1_epi8(1), eight = _mm512_set1_epi8(8), zero_ch = _mm512_set1_epi8('0');
    size_t i = *at;
    ptrdiff_t count = 0;
    while (i + 64 + 8 <= n) {
        __m512i v = _mm512_loadu_si512(p + i), d = _mm512_sub_epi8(v, zero_ch);
        uint64_t commas = _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(','));
        uint64_t digits = _mm512_cmple_epu8_mask(d, _mm512_set1_epi8(9));
        uint64_t firsts = commas << 1 | 1, ids;
        __m512i ends, starts;
        int k, g;
        if ((commas | digits) != ~0ULL || commas == 0)
            break;
        /* an id starts the window and follows each comma: none may be empty, or a 0 followed
           by a digit (a leading zero), which is not JSON */
        if ((firsts & commas) || (firsts & _mm512_cmpeq_epi8_mask(d, _mm512_setzero_si512()) & digits >> 1))
            return -1;
        k = __builtin_popcountll(commas);
        ids = k == 64 ? ~0ULL : (1ULL << k) - 1;
        ends = _mm512_maskz_compress_epi8(commas, iota);
        starts = _mm512_maskz_add_epi8(~1ULL, _mm512_permutexvar_epi8(previous, ends), ones);
        if (_mm512_mask_cmpgt_epu8_mask(ids, _mm512_sub_epi8(ends, starts), eight))
            break;                             /* an id of more than 8 digits */
        for (g = 0; g < k; g += 8) {
            __m512i pick = _mm512_add_epi8(lanes, _mm512_set1_epi8((char)g));
            __m512i end = _mm512_permutexvar_epi8(pick, ends), start = _mm512_permutexvar_epi8(pick, starts);
            __m512i from = _mm512_add_epi8(end, offsets);
            __m512i w = _mm512_maskz_permutexvar_epi8(_mm512_cmpge_epi8_mask(from, start), from, d);
            w = _mm512_maddubs_epi16(w, _mm512_set1_epi16(0x010A));     /* 10 * first + second */
            w = _mm512_madd_epi16(w, _mm512_set1_epi32(0x00010064));     /* 100 * first pair + second */
            w = _mm512_add_epi64(_mm512_mul_epu32(w, _mm512_set1_epi64(10000)), _mm512_srli_epi64(w, 32));
            _mm512_mask_storeu_epi64(out + count + g, (__mmask8)(k - g >= 8 ? 0xFF : (1u << (k - g)) - 1), w);
        }
        count += k;
        i += (size_t)(64 - __builtin_clzll(commas));    /* after the window's last comma */
    }
    *at = i;
    return count;
}
#else
static int kj_select(int force_scalar)
{
    (void)force_scalar;
    return 0;
}
#endif

/* The commas in p[0:n): an array starting there holds at most one value more (a value is
   followed by a comma or by the array's end), so its buffer is sized by this instead of by
   the body's length, which would be about three times too large for token ids. */
static size_t kj_commas(const char *p, size_t n)
{
    size_t i = 0, count = 0;
#ifdef KJ_SSE2
    const __m128i comma = _mm_set1_epi8(','), zero = _mm_setzero_si128();
    while (i + 16 <= n) {
        /* up to 255 blocks of 16 bytes counted per byte lane, then summed */
        __m128i lanes = zero;
        int k;
        for (k = 0; k < 255 && i + 16 <= n; k++, i += 16)
            lanes = _mm_sub_epi8(lanes, _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i)), comma));
        lanes = _mm_sad_epu8(lanes, zero);
        count += (size_t)_mm_cvtsi128_si32(lanes) + (size_t)_mm_cvtsi128_si32(_mm_srli_si128(lanes, 8));
    }
#endif
    for (; i < n; i++)
        count += p[i] == ',';
    return count;
}

/* Parses the array at p[*at] (a '[') into out, which has room for kj_commas(p + *at, n - *at)
   + 1 values, and leaves *at after it; the number of
   values, or -1 unless every item is a plain decimal integer from 0 to 2**64 - 1. */
static ptrdiff_t kj_u64_array(const char *p, size_t n, size_t *at, uint64_t *out)
{
    size_t i = kj_space(p, *at + 1, n);
    ptrdiff_t count = 0;
#ifdef KJ_SSE2
    size_t runs_from = i;                     /* where compact runs are looked for next */
#endif
    if (i < n && p[i] == ']') {
        *at = i + 1;
        return 0;
    }
    for (;;) {
#ifdef KJ_SWAR
        int len;
#ifdef KJ_SSE2
        if (i >= runs_from) {
#ifdef KJ_VBMI
            ptrdiff_t got = (kj_vbmi < 0 ? kj_select(0) : kj_vbmi) ? kj_u64_runs_vbmi(p, n, &i, out + count)
                                                                 : kj_u64_runs(p, n, &i, out + count);
#else
            ptrdiff_t got = kj_u64_runs(p, n, &i, out + count);
#endif
            if (got < 0)
                return -1;
            count += got;
            if (got == 0)
                runs_from = i + 64;           /* spaced out or short: one id at a time */
        }
#endif
        if (i + 8 <= n && (len = kj_digits8(p + i, &out[count])) < 8) {
            if (len == 0 || (p[i] == '0' && len > 1))
                return -1;                    /* no digit, or a leading zero: not JSON */
            i += (size_t)len;
        } else if (!kj_u64_slow(p, n, &i, &out[count])) {
            return -1;
        }
#else
        if (!kj_u64_slow(p, n, &i, &out[count]))
            return -1;
#endif
        count++;
        if (i < n && p[i] == ',') {
            i++;
        } else {
            i = kj_space(p, i, n);
            if (i < n && p[i] == ']') {
                *at = i + 1;
                return count;
            }
            if (i >= n || p[i] != ',')
                return -1;
            i++;
        }
        if (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
            i = kj_space(p, i, n);
    }
}

/* After the token_ids array, ending at p[i]: 1 when the rest of the top level is well formed
   as far as it shows and repeats no "token_ids" key (a parser keeps the last one: the
   general path takes such bodies), else 0. */
static int kj_rest(const char *p, size_t n, size_t i)
{
    int is_ids = 0;
    for (;;) {
        int next = kj_next(p, n, &i);
        if (next != 1)
            return next == 2;
        if (!kj_key(p, n, &i, &is_ids) || is_ids)
            return 0;
        i = kj_skip_value(p, i, n);
        if (i == 0)
            return 0;
    }
}

#endif
