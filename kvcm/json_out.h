/* A growable output buffer that JSON is written into byte for byte as orjson.dumps writes
 * the same values (compact, strings as UTF-8 with only '"', '\\' and control characters
 * escaped), so an answer the scoring lane writes in C equals the one its Python half
 * would serialize. Floats are left to the caller (kvcm/_score_lane.pxi): their shortest
 * form comes from CPython. */

#ifndef KVCM_JSON_OUT_H
#define KVCM_JSON_OUT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    size_t n, cap;
} jo_buf;

/* Room for `more` bytes after the first n; -1 when memory runs out. */
static int jo_reserve(jo_buf *o, size_t more) {
    if (o->cap - o->n >= more) return 0;
    size_t cap = o->cap ? o->cap : 1024;
    while (cap - o->n < more) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *p = (char *)realloc(o->p, cap);
    if (!p) return -1;
    o->p = p;
    o->cap = cap;
    return 0;
}

static int jo_put(jo_buf *o, const char *s, size_t n) {
    if (jo_reserve(o, n)) return -1;
    memcpy(o->p + o->n, s, n);
    o->n += n;
    return 0;
}

#define JO_LIT(o, s) jo_put((o), (s), sizeof(s) - 1)

static int jo_u64(jo_buf *o, uint64_t v) {
    char tmp[20];
    int i = 20;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return jo_put(o, tmp + i, (size_t)(20 - i));
}

/* A JSON string of the UTF-8 bytes s[0:n], quoted. */
static int jo_str(jo_buf *o, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    /* the worst case: every byte a \u00XX escape */
    if (n > (SIZE_MAX - 2) / 6 || jo_reserve(o, 6 * n + 2)) return -1;
    char *w = o->p + o->n;
    *w++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *w++ = (char)c;
            continue;
        }
        *w++ = '\\';
        switch (c) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '\b': *w++ = 'b'; break;
        case '\f': *w++ = 'f'; break;
        case '\n': *w++ = 'n'; break;
        case '\r': *w++ = 'r'; break;
        case '\t': *w++ = 't'; break;
        default:
            *w++ = 'u'; *w++ = '0'; *w++ = '0';
            *w++ = hex[c >> 4]; *w++ = hex[c & 15];
        }
    }
    *w++ = '"';
    o->n = (size_t)(w - o->p);
    return 0;
}

#endif
