# The token ids of a request body, parsed by the core from the body's bytes (json_ids.h):
# the fast path of scoring by token ids. The HTTP layer hands the body over as it arrived;
# the ids become one array('Q') that the hasher reads in place, never a list of Python ints.

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release

cdef extern from "json_ids.h":
    size_t kj_find_token_ids(const char *p, size_t n) nogil
    Py_ssize_t kj_u64_array(const char *p, size_t n, size_t *at, uint64_t *out) nogil
    int kj_rest(const char *p, size_t n, size_t i) nogil
    size_t kj_commas(const char *p, size_t n) nogil
    int kj_select(int force_scalar) nogil

# Bodies at least this long (~1 µs a KiB; a fifth of that with AVX-512) are scanned without the GIL, so that other threads
# (tokenizer encodes, the ingest's turns) run meanwhile; shorter ones are done before taking
# the GIL back from such a thread would be (kvcm/_hasher.pxi, NOGIL_MIN_BLOCKS).
cdef Py_ssize_t _NOGIL_BODY = 131072


def _select_json_ids_kernel():
    """Chooses how compact runs of ids are read: a window of 64 bytes at once with AVX-512
    where the CPU has it, unless KVCM_JSON_IDS=scalar (so that tests cover both); returns
    its name."""
    return "avx512" if kj_select(os.environ.get("KVCM_JSON_IDS", "").lower() == "scalar") else "scalar"


_select_json_ids_kernel()


def json_token_ids(body):
    """(ids, rest) when body (bytes-like) is a JSON object whose "token_ids" is an array of
    plain integers below 2**64: ids an array('Q'), rest the body with that array replaced by
    `[]` (for the general parser, which reads the other fields). None when the body is
    anything else: then the general path parses it and words any error."""
    cdef Py_buffer view
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        return _split_token_ids(<const char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


cdef object _split_token_ids(const char *p, size_t n):
    """json_token_ids for the body p[0:n]."""
    cdef size_t start, end
    cdef Py_ssize_t count = -1
    cdef array ids
    cdef uint64_t *out
    cdef bytes rest
    start = kj_find_token_ids(p, n)
    if start == 0:
        return None
    # room for the most values the rest of the body could hold; shrunk once parsed
    ids = new_u64_array(<Py_ssize_t>kj_commas(p + start, n - start) + 1)
    out = <uint64_t *>ids.data.as_voidptr
    end = start
    if n >= <size_t>_NOGIL_BODY:
        with nogil:
            count = kj_u64_array(p, n, &end, out)
            if count >= 0 and not kj_rest(p, n, end):
                count = -1
    else:
        count = kj_u64_array(p, n, &end, out)
        if count >= 0 and not kj_rest(p, n, end):
            count = -1
    if count < 0:
        return None
    resize(ids, count)
    rest = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(n - (end - start) + 2))
    memcpy(PyBytes_AS_STRING(rest), p, start)
    memcpy(PyBytes_AS_STRING(rest) + start, b"[]", 2)
    memcpy(PyBytes_AS_STRING(rest) + start + 2, p + end, n - end)
    return ids, rest
