# A growable output buffer for the encoders: a small inline array that moves to the heap
# only for large outputs, so hashing a block (about 100 bytes) never allocates.

cdef enum:
    WBUF_INLINE = 512

cdef struct WBuf:
    unsigned char *data
    Py_ssize_t len
    Py_ssize_t cap
    unsigned char inline_[WBUF_INLINE]


cdef inline void wb_init(WBuf *b) noexcept nogil:
    b.data = b.inline_
    b.len = 0
    b.cap = WBUF_INLINE


cdef inline void wb_free(WBuf *b) noexcept nogil:
    if b.data != b.inline_:
        free(b.data)
    b.data = b.inline_
    b.cap = WBUF_INLINE
    b.len = 0


cdef int wb_grow(WBuf *b, Py_ssize_t extra) noexcept nogil:
    """Makes room for `extra` more bytes; -1 when memory ran out."""
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap = b.cap * 2
    cdef unsigned char *p
    while cap < need:
        cap *= 2
    if b.data == b.inline_:
        p = <unsigned char *>malloc(cap)
        if p != NULL:
            memcpy(p, b.data, b.len)
    else:
        p = <unsigned char *>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef inline int wb_reserve(WBuf *b, Py_ssize_t extra) noexcept nogil:
    if b.len + extra <= b.cap:
        return 0
    return wb_grow(b, extra)


cdef inline void wb_put1(WBuf *b, unsigned char c) noexcept nogil:
    # callers reserve first
    b.data[b.len] = c
    b.len += 1


cdef inline void wb_put(WBuf *b, const void *src, Py_ssize_t n) noexcept nogil:
    memcpy(b.data + b.len, src, n)
    b.len += n


cdef inline void wb_put_be(WBuf *b, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n - 1, -1, -1):
        b.data[b.len + i] = <unsigned char>(v & 0xFF)
        v >>= 8
    b.len += n


cdef inline void wb_put_le(WBuf *b, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        b.data[b.len + i] = <unsigned char>(v & 0xFF)
        v >>= 8
    b.len += n


cdef inline object wb_bytes(WBuf *b):
    return PyBytes_FromStringAndSize(<char *>b.data, b.len)
