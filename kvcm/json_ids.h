/* The token ids of a JSON request body, read straight from its bytes (kvcm/_json_ids.pxi).

   Scoring by token ids is the call schedulers make on every request; parsing its body with a
   general JSON parser turns each id into a Python int only for the core to turn it back into
   a uint64. These functions find the top-level "token_ids" array of a JSON object and parse
   it into uint64s. They accept only what is certainly valid and certainly means the same to
   the general path: anything else (a sign, a fraction, an exponent, a leading zero, a value
   of 2**64 or more, an escaped key, a body that is not an object) makes them
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

/* 1 when p[0:n] is one JSON object (as far as its top level shows) with a "token_ids" key
   whose value starts with '[', and no key spelled with escapes (one could spell token_ids);
   its value is then p[*start:*end], the last one when the key repeats (JSON parsers keep the
   last). 0 otherwise. */
static int kj_find_token_ids(const char *p, size_t n, size_t *start, size_t *end)
{
    static const char key[] = "\"token_ids\"";
    size_t i = kj_space(p, 0, n);
    int found = 0;
    if (i >= n || p[i] != '{')
        return 0;
    i = kj_space(p, i + 1, n);
    if (i < n && p[i] == '}')
        return 0;
    for (;;) {
        size_t k = i, value;
        int escaped = 0, is_ids;
        if (i >= n || p[i] != '"')
            return 0;
        i = kj_string(p, i, n, &escaped);
        if (i == 0 || escaped)
            return 0;
        is_ids = i - k == sizeof key - 1 && memcmp(p + k, key, sizeof key - 1) == 0;
        i = kj_space(p, i, n);
        if (i >= n || p[i] != ':')
            return 0;
        value = kj_space(p, i + 1, n);
        i = kj_skip_value(p, value, n);
        if (i == 0)
            return 0;
        if (is_ids) {
            if (p[value] != '[')
                return 0;
            found = 1;
            *start = value;
            *end = i;
        }
        i = kj_space(p, i, n);
        if (i < n && p[i] == ',') {
            i = kj_space(p, i + 1, n);
            continue;
        }
        if (i < n && p[i] == '}')
            return found && kj_space(p, i + 1, n) == n;
        return 0;
    }
}

/* Parses p[s:e], a JSON array, into out (room for (e - s + 1) / 2 values: every value takes
   a digit and a separator); its number of values, or -1 unless every item is a plain
   decimal integer from 0 to 2**64 - 1. */
static ptrdiff_t kj_u64_array(const char *p, size_t s, size_t e, uint64_t *out)
{
    size_t i = kj_space(p, s + 1, e);
    ptrdiff_t count = 0;
    if (i < e && p[i] == ']')
        return i + 1 == e ? 0 : -1;
    for (;;) {
        uint64_t v;
        if (i >= e || p[i] < '0' || p[i] > '9')
            return -1;
        v = (uint64_t)(p[i++] - '0');
        if (v == 0 && i < e && p[i] >= '0' && p[i] <= '9')
            return -1;                        /* a leading zero: not JSON */
        while (i < e && p[i] >= '0' && p[i] <= '9') {
            unsigned d = (unsigned)(p[i++] - '0');
            if (v > (UINT64_MAX - d) / 10)
                return -1;
            v = v * 10 + d;
        }
        out[count++] = v;
        i = kj_space(p, i, e);
        if (i < e && p[i] == ',') {
            i = kj_space(p, i + 1, e);
            continue;
        }
        return i < e && p[i] == ']' && i + 1 == e ? count : -1;
    }
}

#endif
