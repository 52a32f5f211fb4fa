# Token ids and keys arrive as lists (orjson, tokenizers), tuples, array.array or any 1-D
# buffer of integers (numpy); the core works on one C array of uint64.

from cpython.buffer cimport PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_FORMAT, PyBUF_STRIDES
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.array cimport array, clone, resize

cdef array _u64_template = array("Q")

cdef extern from "pyint.h":
    int kvcm_uint64(object o, uint64_t *out)


cdef struct U64s:
    uint64_t *data
    Py_ssize_t n
    bint borrowed  # data points into the caller's array('Q'): not ours to free


cdef inline void u64s_free(U64s *a) noexcept:
    if not a.borrowed:
        free(a.data)
    a.data = NULL
    a.n = 0
    a.borrowed = False


cdef int _load_buffer(object obj, U64s *out, str what) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t i, n, stride
    cdef bytes fmt
    cdef bint signed
    cdef int64_t sv
    cdef const char *item
    PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_STRIDES)
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
        for i in range(n):
            item = <const char *>view.buf + i * stride
            # separate branches: a conditional expression would give both sides one type
            if view.itemsize == 8:
                sv = (<const int64_t *>item)[0]
            elif signed:
                if view.itemsize == 4:
                    sv = (<const int *>item)[0]
                elif view.itemsize == 2:
                    sv = (<const short *>item)[0]
                else:
                    sv = (<const signed char *>item)[0]
                if sv < 0:
                    raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, sv, i))
            elif view.itemsize == 4:
                sv = (<const uint32_t *>item)[0]
            elif view.itemsize == 2:
                sv = (<const unsigned short *>item)[0]
            else:
                sv = (<const unsigned char *>item)[0]
            if signed and view.itemsize == 8 and sv < 0:
                raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, sv, i))
            out.data[i] = <uint64_t>sv
    except BaseException:
        u64s_free(out)
        raise
    finally:
        PyBuffer_Release(&view)
    return 0


cdef int load_u64s(object obj, U64s *out, str what, bint may_borrow=True) except -1:
    """Fills out with the integers of obj (caller frees). Raises ValueError for values outside
    [0, 2**64) and TypeError for non-integers. may_borrow: an array('Q') may be read in place;
    callers that drop the GIL while using the data pass False (another thread could resize
    the array)."""
    cdef Py_ssize_t i, n
    cdef object item
    out.data = NULL
    out.n = 0
    out.borrowed = False
    if may_borrow and type(obj) is array and (<array>obj).ob_descr.typecode in (b"Q", b"L") and (<array>obj).ob_descr.itemsize == 8:
        # the hasher's own output type: read it in place (the caller holds it meanwhile)
        out.data = <uint64_t *>(<array>obj).data.as_voidptr
        out.n = len(<array>obj)
        out.borrowed = True
        return 0
    if type(obj) is not list and type(obj) is not tuple:
        if PyObject_CheckBuffer(obj) and not isinstance(obj, (bytes, bytearray, str)):
            return _load_buffer(obj, out, what)
        obj = list(obj)
    n = len(obj)
    out.data = <uint64_t *>malloc(sizeof(uint64_t) * (n if n else 1))
    if out.data == NULL:
        raise MemoryError()
    out.n = n
    try:
        if type(obj) is list:
            for i in range(n):
                item = <object>PyList_GET_ITEM(obj, i)
                if not kvcm_uint64(item, &out.data[i]):
                    out.data[i] = _as_u64(item, what, i)
        else:
            for i in range(n):
                item = <object>PyTuple_GET_ITEM(obj, i)
                if not kvcm_uint64(item, &out.data[i]):
                    out.data[i] = _as_u64(item, what, i)
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
