# The two serialisations vLLM hashes: canonical CBOR (RFC 8949 deterministic encoding) and
# CPython's pickle protocol 5, byte for byte, for the types block hashing uses.
#
# Each has C-level writers for the hot path (a digest, a run of token ids) and one generic
# writer for Python objects (extra keys, seeds, tests). The hasher and the public
# cbor_encode / pickle5_encode share them, so there is one implementation of each format.

from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef enum:
    MAX_DEPTH = 500          # nesting deeper than this is refused, not a C stack overflow
    FRAME_SIZE_TARGET = 65536  # pickle: a frame closes once it reaches this size
    FRAME_SIZE_MIN = 4         # pickle: shorter frames are written without a FRAME header
    FRAME_HEADER = 9


cdef inline int uint_width_bytes(uint64_t v) noexcept nogil:
    """Bytes in CPython's pickle LONG1 encoding of a non-negative v: bit_length // 8 + 1."""
    cdef int bits = 0
    while v:
        bits += 1
        v >>= 1
    return (bits >> 3) + 1


# ---- CBOR ----------------------------------------------------------------------------------

cdef inline unsigned char *cbor_head_at(unsigned char *w, unsigned char major, uint64_t v) noexcept nogil:
    """Writes the shortest-form head for major type `major` at w; returns the end.

    Works on a local pointer rather than through WBuf: stores through a char pointer may
    alias anything, so writing via b.data[b.len] would reload b after every byte."""
    cdef unsigned char m = major << 5
    cdef int n, i
    if v < 24:
        w[0] = m | <unsigned char>v
        return w + 1
    if v <= 0xFF:
        w[0] = m | 24
        n = 1
    elif v <= 0xFFFF:
        w[0] = m | 25
        n = 2
    elif v <= 0xFFFFFFFFULL:
        w[0] = m | 26
        n = 4
    else:
        w[0] = m | 27
        n = 8
    for i in range(n, 0, -1):
        w[i] = <unsigned char>(v & 0xFF)
        v >>= 8
    return w + 1 + n


cdef inline void cbor_head(WBuf *b, unsigned char major, uint64_t v) noexcept nogil:
    """cbor_head_at into b (room for 9 bytes reserved by the caller)."""
    b.len = cbor_head_at(b.data + b.len, major, v) - b.data


cdef inline int cbor_put_uints(WBuf *b, const uint64_t *v, Py_ssize_t n) noexcept nogil:
    """An array of unsigned ints."""
    cdef Py_ssize_t i
    if wb_reserve(b, 9 + 9 * n):
        return -1
    cdef unsigned char *w = cbor_head_at(b.data + b.len, 4, n)
    for i in range(n):
        w = cbor_head_at(w, 0, v[i])
    b.len = w - b.data
    return 0


cdef inline int cbor_put_bytes(WBuf *b, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    if wb_reserve(b, 9 + n):
        return -1
    cbor_head(b, 2, n)
    wb_put(b, p, n)
    return 0


cdef int cbor_put_obj(WBuf *b, object obj, int depth) except -1:
    cdef const char *s
    cdef Py_ssize_t n
    cdef object item
    if depth > MAX_DEPTH:
        raise RecursionError("cbor_encode: nesting deeper than %d" % MAX_DEPTH)
    if wb_reserve(b, 9):
        raise MemoryError()
    if obj is None:
        wb_put1(b, 0xF6)
    elif obj is True:
        wb_put1(b, 0xF5)
    elif obj is False:
        wb_put1(b, 0xF4)
    elif type(obj) is int:
        if obj >= 0:
            cbor_head(b, 0, <uint64_t>obj)  # OverflowError beyond 2**64 - 1
        else:
            cbor_head(b, 1, <uint64_t>(-1 - obj))
    elif type(obj) is bytes:
        if cbor_put_bytes(b, <const unsigned char *>PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj)):
            raise MemoryError()
    elif type(obj) is str:
        s = PyUnicode_AsUTF8AndSize(obj, &n)  # UnicodeEncodeError for lone surrogates
        if wb_reserve(b, 9 + n):
            raise MemoryError()
        cbor_head(b, 3, n)
        wb_put(b, s, n)
    elif type(obj) is tuple or type(obj) is list:
        cbor_head(b, 4, len(obj))
        for item in obj:
            cbor_put_obj(b, item, depth + 1)
    else:
        raise TypeError("cbor_encode: unsupported type %s" % type(obj).__name__)
    return 0


def cbor_encode(obj):
    """Canonical CBOR of None, bool, int in [-2**64, 2**64), bytes, str, tuple and list;
    identical to cbor2.dumps(obj, canonical=True) for those types."""
    cdef WBuf b
    wb_init(&b)
    try:
        cbor_put_obj(&b, obj, 0)
        return wb_bytes(&b)
    finally:
        wb_free(&b)


# ---- pickle protocol 5 ---------------------------------------------------------------------
#
# CPython frames protocol-5 output: everything after PROTO goes into frames, each preceded by
# FRAME + 8-byte length when it holds at least 4 bytes. A frame is closed when a save() starts
# while it holds >= 64 KiB, and around bytes/str payloads >= 64 KiB, which are written
# outside any frame. The memo numbers bytes, str and non-empty tuples in order; a second
# occurrence of the same object (identity) is written as a memo reference.

cdef struct Pickler:
    WBuf *out
    Py_ssize_t frame_start  # offset of the open frame's reserved header, -1 when none
    Py_ssize_t memo_next


cdef inline void pk_begin(Pickler *p, WBuf *out) noexcept nogil:
    p.out = out
    p.frame_start = -1
    p.memo_next = 0
    out.len = 0
    # PROTO 5 precedes framing; the caller reserved room
    wb_put1(out, 0x80)
    wb_put1(out, 5)


cdef inline void pk_commit_frame(Pickler *p) noexcept nogil:
    cdef WBuf *b = p.out
    cdef Py_ssize_t start = p.frame_start
    cdef Py_ssize_t flen
    if start < 0:
        return
    flen = b.len - start - FRAME_HEADER
    if flen >= FRAME_SIZE_MIN:
        b.data[start] = 0x95
        b.len = start + 1
        wb_put_le(b, flen, 8)
        b.len = start + FRAME_HEADER + flen
    else:
        memmove(b.data + start, b.data + start + FRAME_HEADER, flen)
        b.len = start + flen
    p.frame_start = -1


cdef inline int pk_room(Pickler *p, Py_ssize_t n) noexcept nogil:
    """Reserves n bytes inside a frame, opening one if none is open."""
    if p.frame_start < 0:
        if wb_reserve(p.out, FRAME_HEADER + n):
            return -1
        p.frame_start = p.out.len
        p.out.len += FRAME_HEADER
        return 0
    return wb_reserve(p.out, n)


cdef inline void pk_boundary(Pickler *p) noexcept nogil:
    """What every save() does first: close a frame that has reached the target size."""
    if p.frame_start >= 0 and p.out.len - p.frame_start - FRAME_HEADER >= FRAME_SIZE_TARGET:
        pk_commit_frame(p)


cdef inline void pk_memoize(Pickler *p) noexcept nogil:
    # room for the opcode was reserved with the item it follows
    wb_put1(p.out, 0x94)  # MEMOIZE
    p.memo_next += 1


cdef inline unsigned char *pk_int_at(unsigned char *w, int64_t v) noexcept nogil:
    """BININT1 / BININT2 / BININT for v in [-2**31, 2**31) at w; returns the end."""
    cdef uint64_t u = <uint64_t>v
    if 0 <= v <= 0xFF:
        w[0] = 0x4B
        w[1] = <unsigned char>u
        return w + 2
    if 0 <= v <= 0xFFFF:
        w[0] = 0x4D
        w[1] = <unsigned char>(u & 0xFF)
        w[2] = <unsigned char>(u >> 8)
        return w + 3
    w[0] = 0x4A
    w[1] = <unsigned char>(u & 0xFF)
    w[2] = <unsigned char>((u >> 8) & 0xFF)
    w[3] = <unsigned char>((u >> 16) & 0xFF)
    w[4] = <unsigned char>((u >> 24) & 0xFF)
    return w + 5


cdef inline unsigned char *pk_uint_at(unsigned char *w, uint64_t v) noexcept nogil:
    """An unsigned int as pickle writes it (at most 11 bytes) at w; returns the end."""
    cdef int n, i
    if v < 0x80000000ULL:
        return pk_int_at(w, <int64_t>v)
    n = uint_width_bytes(v)
    w[0] = 0x8A  # LONG1: little-endian two's complement, so a set top bit needs a 0 byte
    w[1] = <unsigned char>n
    for i in range(8 if n > 8 else n):
        w[2 + i] = <unsigned char>(v & 0xFF)
        v >>= 8
    if n > 8:
        w[10] = 0
    return w + 2 + n


cdef inline void pk_put_small_int(WBuf *b, int64_t v) noexcept nogil:
    b.len = pk_int_at(b.data + b.len, v) - b.data


cdef inline void pk_put_uint(WBuf *b, uint64_t v) noexcept nogil:
    b.len = pk_uint_at(b.data + b.len, v) - b.data


cdef inline int pk_save_bytes_data(Pickler *p, unsigned char op_short, unsigned char op_4,
                                   unsigned char op_8, const unsigned char *data, Py_ssize_t n) noexcept nogil:
    """SHORT_BIN*/BIN*/BIN*8 + payload, then MEMOIZE; large payloads go outside frames."""
    pk_boundary(p)
    if n <= 0xFF:
        if pk_room(p, 2 + n + 1):
            return -1
        wb_put1(p.out, op_short)
        wb_put1(p.out, <unsigned char>n)
    elif n >= FRAME_SIZE_TARGET:
        pk_commit_frame(p)
        if wb_reserve(p.out, 9 + n):
            return -1
        if <uint64_t>n > 0xFFFFFFFFULL:
            wb_put1(p.out, op_8)
            wb_put_le(p.out, n, 8)
        else:
            wb_put1(p.out, op_4)
            wb_put_le(p.out, n, 4)
        wb_put(p.out, data, n)
        if pk_room(p, 1):
            return -1
        pk_memoize(p)
        return 0
    else:
        if pk_room(p, 5 + n + 1):
            return -1
        wb_put1(p.out, op_4)
        wb_put_le(p.out, n, 4)
    wb_put(p.out, data, n)
    pk_memoize(p)
    return 0


cdef inline int pk_save_bytes(Pickler *p, const unsigned char *data, Py_ssize_t n) noexcept nogil:
    return pk_save_bytes_data(p, 0x43, 0x42, 0x8E, data, n)


cdef int pk_save_uint_tuple(Pickler *p, const uint64_t *v, Py_ssize_t n) noexcept nogil:
    """A tuple of unsigned ints (a block's token ids)."""
    cdef Py_ssize_t i
    cdef bint fits
    cdef unsigned char *w
    pk_boundary(p)
    if n == 0:
        if pk_room(p, 1):
            return -1
        wb_put1(p.out, 0x29)  # EMPTY_TUPLE, never memoized
        return 0
    if n > 3:
        if pk_room(p, 1):
            return -1
        wb_put1(p.out, 0x28)  # MARK
    # Every element is a save() that may close the frame; when the whole tuple cannot reach
    # the target size, reserve once and skip the per-element checks.
    fits = p.frame_start >= 0 and (p.out.len - p.frame_start - FRAME_HEADER) + 11 * n < FRAME_SIZE_TARGET
    if fits:
        if wb_reserve(p.out, 11 * n + 2):
            return -1
        w = p.out.data + p.out.len
        for i in range(n):
            w = pk_uint_at(w, v[i])
        p.out.len = w - p.out.data
    else:
        for i in range(n):
            pk_boundary(p)
            if pk_room(p, 11):
                return -1
            pk_put_uint(p.out, v[i])
    if pk_room(p, 2):
        return -1
    wb_put1(p.out, 0x74 if n > 3 else 0x84 + n)  # TUPLE or TUPLE1..3
    pk_memoize(p)
    return 0


cdef inline int pk_put_op(Pickler *p, unsigned char op) noexcept nogil:
    if pk_room(p, 1):
        return -1
    wb_put1(p.out, op)
    return 0


cdef inline int pk_end(Pickler *p) noexcept nogil:
    if pk_put_op(p, 0x2E):  # STOP
        return -1
    pk_commit_frame(p)
    return 0


cdef int pk_save_long(Pickler *p, object obj) except -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(obj, &overflow)
    cdef bytes raw
    cdef Py_ssize_t n
    if not overflow and -2147483648LL <= v <= 2147483647LL:
        if pk_room(p, 5):
            raise MemoryError()
        pk_put_small_int(p.out, v)
        return 0
    # LONG1 / LONG4: minimal little-endian two's complement, as CPython's encode_long
    n = (obj.bit_length() >> 3) + 1
    raw = obj.to_bytes(n, "little", signed=True)
    if obj < 0 and n > 1 and raw[n - 1] == 0xFF and (raw[n - 2] & 0x80):
        raw = raw[:n - 1]
        n -= 1
    if pk_room(p, 5 + n):
        raise MemoryError()
    if n < 256:
        wb_put1(p.out, 0x8A)
        wb_put1(p.out, <unsigned char>n)
    else:
        wb_put1(p.out, 0x8B)
        wb_put_le(p.out, n, 4)
    wb_put(p.out, PyBytes_AS_STRING(raw), n)
    return 0


cdef int pk_memo_get(Pickler *p, Py_ssize_t idx) except -1:
    if pk_room(p, 5):
        raise MemoryError()
    if idx < 256:
        wb_put1(p.out, 0x68)  # BINGET
        wb_put1(p.out, <unsigned char>idx)
    else:
        wb_put1(p.out, 0x6A)  # LONG_BINGET
        wb_put_le(p.out, idx, 4)
    return 0


cdef int pk_save_obj(Pickler *p, object obj, dict memo, int depth) except -1:
    """save() for None, bool, int, bytes, str and tuple; `memo` maps id(obj) to its index."""
    cdef const char *s
    cdef Py_ssize_t n
    cdef object item, known, encoded
    if depth > MAX_DEPTH:
        raise RecursionError("pickle5_encode: nesting deeper than %d" % MAX_DEPTH)
    pk_boundary(p)
    if obj is None:
        if pk_put_op(p, 0x4E):
            raise MemoryError()
        return 0
    if obj is True or obj is False:
        if pk_put_op(p, 0x88 if obj is True else 0x89):
            raise MemoryError()
        return 0
    if type(obj) is int:
        return pk_save_long(p, obj)
    known = memo.get(id(obj)) if memo else None
    if known is not None:
        return pk_memo_get(p, known)
    if type(obj) is bytes:
        memo[id(obj)] = p.memo_next  # pk_save_bytes_data writes the MEMOIZE
        if pk_save_bytes(p, <const unsigned char *>PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj)):
            raise MemoryError()
        return 0
    if type(obj) is str:
        s = PyUnicode_AsUTF8AndSize(obj, &n) if (<str>obj).isascii() else NULL
        if s == NULL:
            # pickle writes lone surrogates too
            encoded = (<str>obj).encode("utf-8", "surrogatepass")
            s = PyBytes_AS_STRING(encoded)
            n = PyBytes_GET_SIZE(encoded)
        memo[id(obj)] = p.memo_next
        if pk_save_bytes_data(p, 0x8C, 0x58, 0x8D, <const unsigned char *>s, n):
            raise MemoryError()
        return 0
    if type(obj) is tuple:
        n = len(<tuple>obj)
        if n == 0:
            if pk_put_op(p, 0x29):
                raise MemoryError()
            return 0
        if n > 3 and pk_put_op(p, 0x28):
            raise MemoryError()
        for item in <tuple>obj:
            pk_save_obj(p, item, memo, depth + 1)
        if pk_room(p, 2):
            raise MemoryError()
        wb_put1(p.out, 0x74 if n > 3 else 0x84 + n)
    else:
        raise TypeError("pickle5_encode: unsupported type %s" % type(obj).__name__)
    memo[id(obj)] = p.memo_next
    pk_memoize(p)
    return 0


def pickle5_encode(obj):
    """pickle.dumps(obj, protocol=5), byte for byte, for None, bool, int, bytes, str and tuple."""
    cdef WBuf b
    cdef Pickler p
    wb_init(&b)
    try:
        pk_begin(&p, &b)
        pk_save_obj(&p, obj, {}, 0)
        if pk_end(&p):
            raise MemoryError()
        return wb_bytes(&b)
    finally:
        wb_free(&b)
