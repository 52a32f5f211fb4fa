# The scoring lane (DESIGN.md §5): a scheduler's plain POST of token ids, answered in one call
# from the moment its bytes arrive. kvcm/http.py hands each read to ScoreLane.serve before its
# general parser; the lane reads the head (http_lane.h) and the ids (json_ids.h) in C, hashes,
# walks the index under its lock, and writes the answer, with no Request, no router and no
# interpreted parsing on the way. The API layer supplies each route's two halves as Python
# callables, the same ones its general handlers use, so both ways answer alike: prepare(body)
# reads the other fields (anything it raises sends the request the general way, which words
# the error), finish(...) shapes the answer. Whatever the lane does not take (another path,
# an unusual head, a body it cannot read plainly, a request split over reads or pipelined
# behind another), it leaves untouched for the general parser.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from libc.stdio cimport snprintf

import orjson

cdef extern from "http_lane.h":
    ctypedef struct kl_hit:
        int route
        size_t body
        size_t end
    int kl_request(const char *p, size_t n, size_t at, const char *const *paths,
                   const size_t *lens, int npaths, size_t max_header, size_t max_body,
                   kl_hit *hit) nogil

cdef enum:
    _LANE_ROUTES = 8

cdef object _json_loads = orjson.loads
cdef object _json_dumps = orjson.dumps
cdef bytes _LANE_STATUS = b"HTTP/1.1 200 OK\r\n"
cdef bytes _LANE_TYPE = b"Content-Type: application/json\r\nContent-Length: "


cdef inline double _seconds_since(const timespec *t0) noexcept nogil:
    cdef timespec t1
    clock_gettime(CLOCK_MONOTONIC, &t1)
    return <double>(t1.tv_sec - t0.tv_sec) + <double>(t1.tv_nsec - t0.tv_nsec) * 1e-9


cdef class ScoreLane:
    """Answers plain token-id requests to up to 8 paths from one in-process index."""
    cdef EventSink _sink
    cdef Index _index
    cdef Scorer _scorer
    cdef list _paths            # bytes, kept alive for _ptrs
    cdef list _halves           # (prepare, finish) by route
    cdef const char *_ptrs[_LANE_ROUTES]
    cdef size_t _lens[_LANE_ROUTES]
    cdef size_t _max_header
    cdef size_t _max_body
    cdef readonly double seconds   # how long the last answered request took
    cdef readonly uint64_t served  # requests answered

    def __init__(self, EventSink sink not None, Index index not None, Scorer scorer not None):
        self._sink = sink
        self._index = index
        self._scorer = scorer
        self._paths = []
        self._halves = []
        self._max_header = self._max_body = 0     # takes nothing until limit() is called

    def limit(self, size_t max_header, size_t max_body):
        """The HTTP server's limits: a larger head or body takes the general way (which
        refuses it)."""
        self._max_header = max_header
        self._max_body = max_body

    def add(self, str path, prepare, finish):
        """Serves POST `path`: prepare(body) -> (namespace, pods, cache salt, context) for a
        body (a dict whose token_ids is an array('Q')), raising for anything its general
        handler would refuse; finish(context, ids, keys, {pod: (score, blocks, {tier:
        blocks})}) -> the answer, JSON-serializable."""
        cdef bytes raw = path.encode("ascii")
        cdef Py_ssize_t i = len(self._paths)
        if i == _LANE_ROUTES:
            raise ValueError("the scoring lane serves at most %d paths" % _LANE_ROUTES)
        if not raw.startswith(b"/") or any(c in raw for c in b" ?%#"):
            raise ValueError("lane path %r must be a plain absolute path" % path)
        self._paths.append(raw)
        self._halves.append((prepare, finish))
        self._ptrs[i] = raw
        self._lens[i] = len(raw)

    @property
    def paths(self):
        return [p.decode() for p in self._paths]

    def serve(self, data, transport, bytes common not None):
        """When data (bytes-like) is exactly one whole request the lane takes: answers it,
        writes `HTTP/1.1 200`, `common` (the Date and Server lines) and the JSON answer to
        transport, and returns the path's number from 1 (self.seconds tells how long it
        took). Otherwise returns 0, having done nothing."""
        cdef Py_buffer view
        cdef kl_hit hit
        cdef timespec t0
        cdef object out = None
        hit.route, hit.body, hit.end = 0, 0, 0
        clock_gettime(CLOCK_MONOTONIC, &t0)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if (kl_request(<const char *>view.buf, <size_t>view.len, 0, self._ptrs, self._lens,
                           <int>len(self._paths), self._max_header, self._max_body, &hit)
                    and hit.end == <size_t>view.len):
                out = self._answer(hit.route, <const char *>view.buf + hit.body, hit.end - hit.body, common)
        finally:
            PyBuffer_Release(&view)
        if out is None:
            return 0
        transport.write(out)
        self.seconds = _seconds_since(&t0)
        return hit.route + 1

    def serve_body(self, int route, body, bytes common not None):
        """The whole response (bytes, as serve() writes it) to a keep-alive HTTP/1.1 POST to
        path number `route` whose head the general parser read and found plain, with this
        body (bytes-like; a request that came in several reads); None when the lane does
        not take the body, having done nothing."""
        cdef Py_buffer view
        cdef timespec t0
        if not 1 <= route <= len(self._paths):
            raise ValueError("no lane path number %d" % route)
        clock_gettime(CLOCK_MONOTONIC, &t0)
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        try:
            out = self._answer(route - 1, <const char *>view.buf, <size_t>view.len, common)
        finally:
            PyBuffer_Release(&view)
        if out is not None:
            self.seconds = _seconds_since(&t0)
        return out

    cdef object _answer(self, int route, const char *p, size_t n, bytes common):
        """The response to the body p[0:n] of a request to path `route` (from 0), or None."""
        cdef object split, body, keys, detailed, answer
        cdef bytes out
        cdef char length[24]
        cdef int length_len
        cdef char *w
        split = _split_token_ids(p, n)
        if split is None:
            return None
        ids, rest = split
        try:
            body = _json_loads(rest)
        except orjson.JSONDecodeError:
            return None
        if type(body) is not dict:
            return None
        body["token_ids"] = ids
        prepare, finish = self._halves[route]
        try:
            namespace, pods, salt, context = prepare(body)
            keys = self._sink.keys_for(namespace, ids, salt)
        except Exception:
            return None
        ilock_acquire_gil(&self._index._lock)
        try:
            detailed = self._scorer._score_detailed(self._index, namespace, keys, pods)
        finally:
            ilock_release(&self._index._lock)
        answer = _json_dumps(finish(context, ids, keys, detailed))
        length_len = snprintf(length, sizeof(length), "%zd\r\n\r\n", PyBytes_GET_SIZE(answer))
        out = PyBytes_FromStringAndSize(NULL, len(_LANE_STATUS) + len(common) + len(_LANE_TYPE) + length_len
                                        + PyBytes_GET_SIZE(answer))
        w = PyBytes_AS_STRING(out)
        for piece in (_LANE_STATUS, common, _LANE_TYPE):
            memcpy(w, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))
            w += PyBytes_GET_SIZE(piece)
        memcpy(w, length, length_len)
        memcpy(w + length_len, PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer))
        self.served += 1
        return out
