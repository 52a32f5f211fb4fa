# A zero-copy msgpack reader over an event payload: the event decoder reads hashes and
# token ids straight into C arrays and builds Python objects only for the rare fields that
# need them (extra keys). Every read is bounds-checked; a declared length larger than the
# bytes left is "truncated" at once, so a hostile length never makes it loop or allocate.

cdef enum MpError:
    MP_OK = 0
    MP_TRUNCATED
    MP_WRONG_TYPE
    MP_TOO_DEEP
    MP_BAD_UTF8
    MP_INVALID

MP_ERROR_NAMES = ("ok", "truncated", "wrong_type", "too_deep", "bad_utf8", "invalid")

cdef enum:
    MP_MAX_DEPTH = 32  # events nest 4 deep; anything deeper is not an event


cdef struct MpReader:
    const unsigned char *buf
    Py_ssize_t pos
    Py_ssize_t end
    MpError err


cdef inline void mp_init(MpReader *r, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    r.buf = buf
    r.pos = pos
    r.end = end
    r.err = MP_OK


cdef inline int mp_fail(MpReader *r, MpError e) noexcept nogil:
    if r.err == MP_OK:
        r.err = e
    return -1


cdef inline int mp_need(MpReader *r, Py_ssize_t n) noexcept nogil:
    if n < 0 or r.end - r.pos < n:
        return mp_fail(r, MP_TRUNCATED)
    return 0


cdef inline uint64_t mp_be(const unsigned char *p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef inline int mp_peek(MpReader *r) noexcept nogil:
    """The next type byte, or -1 at the end."""
    if r.pos >= r.end:
        mp_fail(r, MP_TRUNCATED)
        return -1
    return r.buf[r.pos]


cdef inline bint mp_next_is_nil(MpReader *r) noexcept nogil:
    return r.pos < r.end and r.buf[r.pos] == 0xC0


cdef inline int mp_read_len(MpReader *r, int width, Py_ssize_t *n) noexcept nogil:
    if mp_need(r, width):
        return -1
    n[0] = <Py_ssize_t>mp_be(r.buf + r.pos, width)
    r.pos += width
    return 0


cdef int mp_read_container(MpReader *r, bint want_map, Py_ssize_t *n) noexcept nogil:
    """Reads an array (or map) header; n is its element (pair) count."""
    cdef int t = mp_peek(r)
    if t < 0:
        return -1
    r.pos += 1
    if not want_map and 0x90 <= t <= 0x9F:
        n[0] = t & 0x0F
    elif want_map and 0x80 <= t <= 0x8F:
        n[0] = t & 0x0F
    elif t == (0xDE if want_map else 0xDC):
        if mp_read_len(r, 2, n):
            return -1
    elif t == (0xDF if want_map else 0xDD):
        if mp_read_len(r, 4, n):
            return -1
    else:
        r.pos -= 1
        return mp_fail(r, MP_WRONG_TYPE)
    # every element takes at least one byte
    if n[0] > (r.end - r.pos) // (2 if want_map else 1):
        return mp_fail(r, MP_TRUNCATED)
    return 0


cdef inline int mp_read_array(MpReader *r, Py_ssize_t *n) noexcept nogil:
    return mp_read_container(r, False, n)


cdef inline int mp_read_map(MpReader *r, Py_ssize_t *n) noexcept nogil:
    return mp_read_container(r, True, n)


cdef int mp_read_int(MpReader *r, uint64_t *v, bint *negative) noexcept nogil:
    """Any msgpack integer: its value modulo 2**64 and whether it was negative."""
    cdef int t = mp_peek(r)
    cdef int w = 0
    cdef int64_t s
    if t < 0:
        return -1
    negative[0] = False
    if t <= 0x7F:
        v[0] = t
        r.pos += 1
        return 0
    if t >= 0xE0:
        v[0] = <uint64_t>(<int64_t>t - 256)
        negative[0] = True
        r.pos += 1
        return 0
    if 0xCC <= t <= 0xCF:
        w = 1 << (t - 0xCC)
    elif 0xD0 <= t <= 0xD3:
        w = 1 << (t - 0xD0)
    else:
        return mp_fail(r, MP_WRONG_TYPE)
    if mp_need(r, 1 + w):
        return -1
    v[0] = mp_be(r.buf + r.pos + 1, w)
    r.pos += 1 + w
    if t >= 0xD0 and w < 8:  # sign-extend int8/16/32
        if v[0] >> (8 * w - 1):
            v[0] |= ~((1ULL << (8 * w)) - 1)
    if t >= 0xD0:
        negative[0] = (v[0] >> 63) != 0
    return 0


cdef int mp_read_uint(MpReader *r, uint64_t *v) noexcept nogil:
    """A non-negative integer."""
    cdef bint neg
    cdef Py_ssize_t start = r.pos
    if mp_read_int(r, v, &neg):
        return -1
    if neg:
        r.pos = start
        return mp_fail(r, MP_WRONG_TYPE)
    return 0


cdef int mp_read_bytes(MpReader *r, bint want_str, const unsigned char **p, Py_ssize_t *n) noexcept nogil:
    """A str (or bin) payload, without copying."""
    cdef int t = mp_peek(r)
    if t < 0:
        return -1
    r.pos += 1
    if want_str and 0xA0 <= t <= 0xBF:
        n[0] = t & 0x1F
    elif t == (0xD9 if want_str else 0xC4):
        if mp_read_len(r, 1, n):
            return -1
    elif t == (0xDA if want_str else 0xC5):
        if mp_read_len(r, 2, n):
            return -1
    elif t == (0xDB if want_str else 0xC6):
        if mp_read_len(r, 4, n):
            return -1
    else:
        r.pos -= 1
        return mp_fail(r, MP_WRONG_TYPE)
    if mp_need(r, n[0]):
        return -1
    p[0] = r.buf + r.pos
    r.pos += n[0]
    return 0


cdef inline int mp_read_str(MpReader *r, const unsigned char **p, Py_ssize_t *n) noexcept nogil:
    return mp_read_bytes(r, True, p, n)


cdef int mp_read_float(MpReader *r, double *d) noexcept nogil:
    """float32/float64, or an integer (other publishers send integer timestamps)."""
    cdef int t = mp_peek(r)
    cdef uint64_t bits
    cdef uint32_t bits32
    cdef float f
    cdef bint neg
    if t < 0:
        return -1
    if t == 0xCB:
        if mp_need(r, 9):
            return -1
        bits = mp_be(r.buf + r.pos + 1, 8)
        memcpy(d, &bits, 8)
        r.pos += 9
        return 0
    if t == 0xCA:
        if mp_need(r, 5):
            return -1
        bits32 = <uint32_t>mp_be(r.buf + r.pos + 1, 4)
        memcpy(&f, &bits32, 4)
        d[0] = f
        r.pos += 5
        return 0
    if mp_read_int(r, &bits, &neg):
        return -1
    d[0] = <double><int64_t>bits if neg else <double>bits
    return 0


cdef int mp_skip(MpReader *r, int depth) noexcept nogil:
    """Steps over one complete object, checking its structure."""
    cdef int t = mp_peek(r)
    cdef Py_ssize_t n, i
    cdef const unsigned char *p
    if t < 0:
        return -1
    if depth > MP_MAX_DEPTH:
        return mp_fail(r, MP_TOO_DEEP)
    if t <= 0x7F or t >= 0xE0 or t == 0xC0 or t == 0xC2 or t == 0xC3:
        r.pos += 1
        return 0
    if (0x80 <= t <= 0x8F) or t == 0xDE or t == 0xDF:
        if mp_read_map(r, &n):
            return -1
        n *= 2
    elif (0x90 <= t <= 0x9F) or t == 0xDC or t == 0xDD:
        if mp_read_array(r, &n):
            return -1
    elif (0xA0 <= t <= 0xBF) or 0xD9 <= t <= 0xDB:
        return mp_read_bytes(r, True, &p, &n)
    elif 0xC4 <= t <= 0xC6:
        return mp_read_bytes(r, False, &p, &n)
    elif 0xCC <= t <= 0xD3 or t == 0xCA or t == 0xCB:
        if t == 0xCA:
            n = 4
        elif t == 0xCB:
            n = 8
        else:
            n = 1 << ((t - 0xCC) & 3)
        if mp_need(r, 1 + n):
            return -1
        r.pos += 1 + n
        return 0
    elif 0xD4 <= t <= 0xD8:  # fixext 1/2/4/8/16: type byte + data
        n = 1 << (t - 0xD4)
        if mp_need(r, 2 + n):
            return -1
        r.pos += 2 + n
        return 0
    elif 0xC7 <= t <= 0xC9:  # ext 8/16/32: length, type byte, data
        r.pos += 1
        if mp_read_len(r, 1 << (t - 0xC7), &n) or mp_need(r, 1 + n):
            return -1
        r.pos += 1 + n
        return 0
    else:  # 0xC1 is never used
        return mp_fail(r, MP_INVALID)
    for i in range(n):
        # Most elements are token ids and hashes: step over ints without a call.
        if r.pos < r.end:
            t = r.buf[r.pos]
            if t <= 0x7F or t >= 0xE0:
                r.pos += 1
                continue
            if 0xCC <= t <= 0xD3 and r.end - r.pos > (1 << ((t - 0xCC) & 3)):
                r.pos += 1 + (1 << ((t - 0xCC) & 3))
                continue
        if mp_skip(r, depth + 1):
            return -1
    return 0


cdef object mp_read_object(MpReader *r, int depth):
    """A Python object for the few fields that need one (extra keys): nil, bool, ints,
    floats, str, bin, arrays (as lists). Raises _MpFailure, with r.err set, on bad input."""
    cdef int t = mp_peek(r)
    cdef Py_ssize_t n, i
    cdef const unsigned char *p
    cdef uint64_t v
    cdef bint neg
    cdef double d
    if t < 0:
        raise _MpFailure()
    if depth > MP_MAX_DEPTH:
        mp_fail(r, MP_TOO_DEEP)
        raise _MpFailure()
    if t == 0xC0:
        r.pos += 1
        return None
    if t == 0xC2 or t == 0xC3:
        r.pos += 1
        return t == 0xC3
    if t <= 0x7F or t >= 0xE0 or 0xCC <= t <= 0xD3:
        if mp_read_int(r, &v, &neg):
            raise _MpFailure()
        return <int64_t>v if neg else v
    if t == 0xCA or t == 0xCB:
        if mp_read_float(r, &d):
            raise _MpFailure()
        return d
    if (0xA0 <= t <= 0xBF) or 0xD9 <= t <= 0xDB:
        if mp_read_str(r, &p, &n):
            raise _MpFailure()
        try:
            return (<bytes>PyBytes_FromStringAndSize(<const char *>p, n)).decode("utf-8")
        except UnicodeDecodeError:
            mp_fail(r, MP_BAD_UTF8)
            raise _MpFailure()
    if 0xC4 <= t <= 0xC6:
        if mp_read_bytes(r, False, &p, &n):
            raise _MpFailure()
        return PyBytes_FromStringAndSize(<const char *>p, n)
    if (0x90 <= t <= 0x9F) or t == 0xDC or t == 0xDD:
        if mp_read_array(r, &n):
            raise _MpFailure()
        return [mp_read_object(r, depth + 1) for i in range(n)]
    mp_fail(r, MP_WRONG_TYPE)
    raise _MpFailure()


class _MpFailure(Exception):
    """Internal: mp_read_object failed; the reader's err says why."""
