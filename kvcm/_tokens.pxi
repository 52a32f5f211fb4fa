# Token ids and keys arrive as lists (orjson, tokenizers), tuples, array.array or any 1-D
# buffer of integers (numpy); the core works on one C array of uint64.

from cpython.buffer cimport PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_FORMAT, PyBUF_STRIDES
from cpython.object cimport PyObject
from cpython.sequence cimport PySequence_Fast_ITEMS
from cpython.array cimport array, clone, resize

cdef array _u64_template = array("Q")

cdef extern from "pyint.h":
    int kvcm_uint64(object o, uint64_t *out)
    Py_ssize_t kvcm_fast_uints(PyObject **items, Py_ssize_t n, uint64_t *out)


cdef struct U64s:
    uint64_t *data
    Py_ssize_t n
    bint borrowed  # data points into the caller's buffer, held through `view`: not ours to free
    Py_buffer view


cdef inline void u64s_free(U64s *a) noexcept:
    if a.borrowed:
        PyBuffer_Release(&a.view)
    else:
        free(a.data)
    a.data = NULL
    a.n = 0
    a.borrowed = False


cdef inline bint _is_u64_format(const char *fmt) noexcept:
    """Unsigned 64-bit items in native order: array('Q'), numpy uint64."""
    if fmt[0] == b"@" or fmt[0] == b"=" or fmt[0] == b"<":
        fmt += 1
    return (fmt[0] == b"Q" or fmt[0] == b"L" or fmt[0] == b"N") and fmt[1] == 0


cdef int _load_buffer(object obj, U64s *out, str what) except -1:
    """A 1-D buffer of integers. Contiguous unsigned 64-bit ones are read in place: holding
    the buffer keeps its memory (an array cannot be resized while exported), so the hasher
    may read it without the GIL."""
    cdef Py_buffer view
    cdef Py_ssize_t i, n, stride
    cdef bytes fmt
    cdef bint signed
    cdef int64_t sv
    cdef const char *item
    cdef const char *base
    PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_STRIDES)
    if (view.ndim == 1 and view.itemsize == 8 and view.format != NULL and _is_u64_format(view.format)
            and (view.strides == NULL or view.strides[0] == 8)):
        out.data = <uint64_t *>view.buf
        out.n = view.shape[0]
        out.borrowed = True
        out.view = view
        return 0
    try:
        if view.ndim != 1:
            raise ValueError("%s: expected a 1-D buffer of integers" % what)
        fmt = view.format if view.format != NULL else b"B"
        if len(fmt) == 2 and fmt[0:1] in (b"@", b"=", b"<"):
            fmt = fmt[1:]
        if len(fmt) != 1 or fmt not in b"BHILQbhilqN" or view.itemsize not in (1, 2, 4, 8):
            raise ValueError("%s: buffer format %r is not an integer type" % (what, fmt))
        signed = fmt in b"bhilq"
        n = view.shape[0]
        stride = view.strides[0] if view.strides != NULL else view.itemsize
        out.data = <uint64_t *>malloc(sizeof(uint64_t) * (n if n else 1))
        if out.data == NULL:
            raise MemoryError()
        out.n = n
        base = <const char *>view.buf
        # one loop per item type, so the type is not tested per item
        if view.itemsize == 8:
            for i in range(n):
                out.data[i] = (<const uint64_t *>(base + i * stride))[0]
            if signed:
                for i in range(n):
                    if <int64_t>out.data[i] < 0:
                        raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, <int64_t>out.data[i], i))
        elif view.itemsize == 4 and not signed:
            for i in range(n):
                out.data[i] = (<const uint32_t *>(base + i * stride))[0]
        elif view.itemsize == 2 and not signed:
            for i in range(n):
                out.data[i] = (<const unsigned short *>(base + i * stride))[0]
        elif not signed:
            for i in range(n):
                out.data[i] = (<const unsigned char *>(base + i * stride))[0]
        else:
            for i in range(n):
                item = base + i * stride
                # separate branches: a conditional expression would give both sides one type
                if view.itemsize == 4:
                    sv = (<const int *>item)[0]
                elif view.itemsize == 2:
                    sv = (<const short *>item)[0]
                else:
                    sv = (<const signed char *>item)[0]
                if sv < 0:
                    raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, sv, i))
                out.data[i] = <uint64_t>sv
    except BaseException:
        u64s_free(out)
        raise
    finally:
        PyBuffer_Release(&view)
    return 0


cdef int load_u64s(object obj, U64s *out, str what) except -1:
    """Fills out with the integers of obj (caller frees with u64s_free, also after an error).
    Raises ValueError for values outside [0, 2**64) and TypeError for non-integers. The data
    stays valid without the GIL until freed."""
    cdef Py_ssize_t i, n, done
    cdef PyObject **items
    out.data = NULL
    out.n = 0
    out.borrowed = False
    if type(obj) is not list and type(obj) is not tuple:
        if PyObject_CheckBuffer(obj) and not isinstance(obj, (bytes, bytearray, str)):
            return _load_buffer(obj, out, what)
        obj = list(obj)
    n = len(obj)
    out.data = <uint64_t *>malloc(sizeof(uint64_t) * (n if n else 1))
    if out.data == NULL:
        raise MemoryError()
    out.n = n
    items = PySequence_Fast_ITEMS(obj)
    done = kvcm_fast_uints(items, n, out.data)
    try:
        for i in range(done, n):
            if not kvcm_uint64(<object>items[i], &out.data[i]):
                out.data[i] = _as_u64(<object>items[i], what, i)
    except BaseException:
        u64s_free(out)
        raise
    return 0


cdef uint64_t _as_u64(object item, str what, Py_ssize_t i) except? 0xFFFFFFFFFFFFFFFF:
    if type(item) is not int:
        if isinstance(item, int) and not isinstance(item, bool):
            item = int(item)
        else:
            raise TypeError("%s: position %d is %s, not an int" % (what, i, type(item).__name__))
    try:
        return <uint64_t>item
    except OverflowError:
        raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, item, i)) from None


cdef inline array new_u64_array(Py_ssize_t n):
    return clone(_u64_template, n, False)
