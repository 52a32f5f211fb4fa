/* The request heads of the scoring lane (kvcm/_score_lane.pxi, kvcm/http.py).

   Schedulers send the same plain request on every call: `POST /v1/score HTTP/1.1`, a Host,
   a Content-Length, perhaps a JSON Content-Type, a body. Reading such a head here costs a
   fraction of a microsecond, where the general parser in Python costs several. kl_request
   accepts only a head that is certainly valid and certainly means the same to the general
   parser: anything else (another method, path or version, a query, a percent sign, a
   control or non-ASCII byte, obs-fold, a bare LF, a header that changes how the body or the
   connection is read, any header given twice, a head or body over its limit, a body not yet
   all there) answers 0, and the general parser reads the request, which also words every
   error. */

#ifndef KVCM_HTTP_LANE_H
#define KVCM_HTTP_LANE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KL_MAX_HEADERS 32     /* more than clients send; a head with more takes the general way */

typedef struct {
    int route;                /* index into the lane's paths */
    size_t body;              /* offset of the body */
    size_t end;               /* offset after the body */
} kl_hit;

static inline int kl_token_char(unsigned char c)
{
    /* RFC 9110 §5.6.2 tchar */
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* p[0:n] equals the lower-case ASCII word w[0:n], ignoring case. */
static inline int kl_is(const char *p, size_t n, const char *w)
{
    size_t i;
    if (strlen(w) != n)
        return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != (unsigned char)w[i])
            return 0;
    }
    return 1;
}

/* a[0:n] and b[0:n] spell the same header name (ASCII case ignored) */
static inline int kl_same(const char *a, const char *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x >= 'A' && x <= 'Z')
            x += 'a' - 'A';
        if (y >= 'A' && y <= 'Z')
            y += 'a' - 'A';
        if (x != y)
            return 0;
    }
    return 1;
}

enum { KL_HOST = 1, KL_LENGTH = 2, KL_TYPE = 4, KL_CONNECTION = 8 };

/* One header line at p[i]; 1 with *i after its CRLF and *seen updated, 0 for anything the
   lane leaves to the general parser. */
static int kl_header(const char *p, size_t n, size_t *i, unsigned *seen, uint64_t *length,
                     const char **names, size_t *name_lens, int *count)
{
    size_t k = *i, name, name_len, value, value_end;
    unsigned flag = 0;
    int j;
    name = k;
    while (k < n && kl_token_char((unsigned char)p[k]))
        k++;
    name_len = k - name;
    if (name_len == 0 || k >= n || p[k] != ':')
        return 0;
    k++;
    while (k < n && (p[k] == ' ' || p[k] == '\t'))
        k++;
    value = k;
    while (k < n && (((unsigned char)p[k] >= 0x20 && (unsigned char)p[k] < 0x7F) || p[k] == '\t'))
        k++;
    if (k + 1 >= n || p[k] != '\r' || p[k + 1] != '\n')
        return 0;
    value_end = k;
    while (value_end > value && (p[value_end - 1] == ' ' || p[value_end - 1] == '\t'))
        value_end--;
    *i = k + 2;

    /* a repeated header arrives joined in the general parser: leave every repeat to it */
    if (*count >= KL_MAX_HEADERS)
        return 0;
    for (j = 0; j < *count; j++)
        if (name_lens[j] == name_len && kl_same(p + name, names[j], name_len))
            return 0;

    if (kl_is(p + name, name_len, "host")) {
        if (memchr(p + value, ',', value_end - value) != NULL)
            return 0;
        flag = KL_HOST;
    } else if (kl_is(p + name, name_len, "content-length")) {
        uint64_t v = 0;
        size_t d;
        if (value_end == value || value_end - value > 15)
            return 0;
        for (d = value; d < value_end; d++) {
            if (p[d] < '0' || p[d] > '9')
                return 0;
            v = v * 10 + (uint64_t)(p[d] - '0');
        }
        *length = v;
        flag = KL_LENGTH;
    } else if (kl_is(p + name, name_len, "content-type")) {
        if (!kl_is(p + value, value_end - value, "application/json"))
            return 0;
        flag = KL_TYPE;
    } else if (kl_is(p + name, name_len, "connection")) {
        if (!kl_is(p + value, value_end - value, "keep-alive"))
            return 0;
        flag = KL_CONNECTION;
    } else if (kl_is(p + name, name_len, "transfer-encoding") || kl_is(p + name, name_len, "expect")) {
        return 0;
    }
    *seen |= flag;
    names[*count] = p + name;
    name_lens[*count] = name_len;
    (*count)++;
    return 1;
}

/* 1 with *hit filled when p[at:n] starts with a whole plain POST to paths[route] (lens[route]
   bytes), head at most max_header bytes (the request line and headers, as the general parser
   counts them) and a body of 1 to max_body bytes, all of it in p; 0 otherwise. */
static int kl_request(const char *p, size_t n, size_t at, const char *const *paths,
                      const size_t *lens, int npaths, size_t max_header, size_t max_body,
                      kl_hit *hit)
{
    static const char version[] = " HTTP/1.1\r\n";
    const char *names[KL_MAX_HEADERS];
    size_t name_lens[KL_MAX_HEADERS];
    size_t i = at, limit;
    unsigned seen = 0;
    uint64_t length = 0;
    int route, count = 0;
    if (at > n || n - at < 5 || memcmp(p + at, "POST ", 5) != 0)
        return 0;
    i += 5;
    for (route = 0; route < npaths; route++) {
        size_t len = lens[route];
        if (n - i >= len + sizeof version - 1 && memcmp(p + i, paths[route], len) == 0 &&
            memcmp(p + i + len, version, sizeof version - 1) == 0)
            break;
    }
    if (route == npaths)
        return 0;
    i += lens[route] + sizeof version - 1;
    /* the general parser refuses a head whose text up to its blank line exceeds max_header */
    limit = max_header + 2 < n - at ? at + max_header + 2 : n;
    for (;;) {
        if (i + 1 < n && p[i] == '\r' && p[i + 1] == '\n') {
            if (i > limit)
                return 0;
            i += 2;
            break;
        }
        if (i >= limit || !kl_header(p, limit, &i, &seen, &length, names, name_lens, &count))
            return 0;
    }
    if (!(seen & KL_HOST) || !(seen & KL_LENGTH) || length == 0 || length > max_body ||
        n - i < length)
        return 0;
    hit->route = route;
    hit->body = i;
    hit->end = i + (size_t)length;
    return 1;
}

#endif
