# The scoring lane (DESIGN.md §5): a scheduler's plain POST of token ids, answered in one call
# from the moment its bytes arrive. kvcm/http.py hands each read to ScoreLane.serve before its
# general parser, and the busy poll's reads to ScoreLane.spin; the lane reads the head
# (http_lane.h) and the ids (json_ids.h) in C, hashes, walks the index under its lock, and
# writes the answer, with no Request, no router and no interpreted parsing on the way. The
# API layer supplies each route's two halves as Python callables, the same ones its general
# handlers use, so both ways answer alike: prepare(body) reads the other fields (anything it
# raises sends the request the general way, which words the error), finish(...) shapes the
# answer; /v1/score's answer is written here in C instead (json_out.h), byte for byte as
# orjson serializes finish's. Whatever the lane does not take (another path, an unusual head,
# a body it cannot read plainly, a request split over reads or pipelined behind another), it
# leaves untouched for the general parser.

from libc.stdio cimport snprintf
from libc.string cimport strlen
from libc.math cimport fabs, isfinite
from cpython.mem cimport PyMem_Free

import orjson

cdef extern from "http_lane.h":
    ctypedef struct kl_hit:
        int route
        size_t body
        size_t end
    int kl_request(const char *p, size_t n, size_t at, const char *const *paths,
                   const size_t *lens, int npaths, size_t max_header, size_t max_body,
                   kl_hit *hit) nogil

cdef extern from "json_out.h":
    ctypedef struct jo_buf:
        char *p
        size_t n
        size_t cap
    int jo_put(jo_buf *o, const char *s, size_t n)
    int jo_u64(jo_buf *o, uint64_t v)
    int jo_str(jo_buf *o, const char *s, size_t n)

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef enum:
    _LANE_ROUTES = 8
    # the answer buffer is kept between requests up to this size
    _SCRATCH_KEPT = 1 << 20
    # answers one spin() may make
    _LANE_SPUN = 64

cdef object _json_loads = orjson.loads
cdef object _json_dumps = orjson.dumps
cdef bytes _LANE_STATUS = b"HTTP/1.1 200 OK\r\n"
cdef bytes _LANE_TYPE = b"Content-Type: application/json\r\nContent-Length: "


cdef class ScoreLane:
    """Answers plain token-id requests to up to 8 paths from one in-process index."""
    cdef EventSink _sink
    cdef Index _index
    cdef Scorer _scorer
    cdef list _paths            # bytes, kept alive for _ptrs
    cdef list _halves           # (prepare, finish) by route
    cdef list _score_counts     # by route: the counts of a /v1/score-shaped route, else None
    cdef size_t _block_size
    cdef jo_buf _out            # where answers written in C are assembled
    cdef char *_spin_buf        # what spin() reads into
    cdef int _spun              # the answers of the last spin(): how many, their paths, times
    cdef int _spun_routes[_LANE_SPUN]
    cdef double _spun_seconds[_LANE_SPUN]
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
        self._score_counts = []
        self._block_size = 0
        self._max_header = self._max_body = 0     # takes nothing until limit() is called

    def __dealloc__(self):
        free(self._out.p)
        free(self._spin_buf)

    def limit(self, size_t max_header, size_t max_body):
        """The HTTP server's limits: a larger head or body takes the general way (which
        refuses it)."""
        self._max_header = max_header
        self._max_body = max_body

    def add(self, str path, prepare, finish, dict score_counts=None, size_t block_size=0):
        """Serves POST `path`: prepare(body) -> (namespace, pods, cache salt, context) for a
        body (a dict whose token_ids is an array('Q')), raising for anything its general
        handler would refuse; finish(context, ids, keys, {pod: (score, blocks, {tier:
        blocks})}) -> the answer, JSON-serializable.

        With score_counts, finish is Indexer.score_result (its counts, blocks of
        block_size tokens) and context the model: the lane writes that answer itself and
        counts it as finish would, calling finish only for a score it cannot write as orjson
        does (below 1e-4, which orjson writes in its own exponent form, or not finite)."""
        if score_counts is not None and not block_size:
            raise ValueError("a /v1/score-shaped lane path needs the block size")
        cdef bytes raw = path.encode("ascii")
        cdef Py_ssize_t i = len(self._paths)
        if i == _LANE_ROUTES:
            raise ValueError("the scoring lane serves at most %d paths" % _LANE_ROUTES)
        if not raw.startswith(b"/") or any(c in raw for c in b" ?%#"):
            raise ValueError("lane path %r must be a plain absolute path" % path)
        self._paths.append(raw)
        self._halves.append((prepare, finish))
        self._score_counts.append(score_counts)
        if score_counts is not None:
            self._block_size = block_size
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
        cdef timespec t0
        cdef int route = -1
        cdef object out
        clock_gettime(CLOCK_MONOTONIC, &t0)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            out = self._take(<const char *>view.buf, <size_t>view.len, common, &route)
        finally:
            PyBuffer_Release(&view)
        if out is None:
            return 0
        transport.write(out)
        self.seconds = _seconds_since(&t0)
        self._enter_staged()
        return route + 1

    def spin(self, int loop_fd, double seconds, int conn_fd, transport, bytes common not None,
             int max_answers):
        """busy_poll(loop_fd, seconds, conn_fd) that answers the connection's next bytes
        itself when they are one whole request the lane takes, sending the response straight
        to conn_fd (a plain socket whose transport has nothing left to write), and spins on;
        after max_answers (>= 1) answers, on loop_fd alone. What the socket does not take at once goes to
        transport.write, which ends the spin. Returns as busy_poll does, the bytes being
        those of a request the lane left; answered() tells what it answered."""
        cdef pollfd fds[2]
        cdef int nfds, ready, route
        cdef ssize_t got, sent
        cdef Py_ssize_t size
        cdef timespec t0
        cdef object out
        cdef const char *text
        if self._spin_buf == NULL:
            self._spin_buf = <char *>malloc(SPIN_READ_MAX)
            if self._spin_buf == NULL:
                raise MemoryError()
        max_answers = min(max_answers, _LANE_SPUN)
        self._spun = 0
        while True:
            # once it has answered max_answers, the spin leaves the connection to the loop
            nfds = _spin_fds(fds, loop_fd, conn_fd if self._spun < max_answers else -1)
            got = -1
            with nogil:
                ready = _spin(fds, nfds, seconds)
                if ready > 0 and nfds == 2 and fds[0].revents & POLLIN:
                    got = recv(conn_fd, self._spin_buf, SPIN_READ_MAX, MSG_DONTWAIT)
            if got <= 0:
                return ready > 0
            clock_gettime(CLOCK_MONOTONIC, &t0)
            out = self._take(self._spin_buf, <size_t>got, common, &route)
            if out is None:
                return PyBytes_FromStringAndSize(self._spin_buf, got)
            size = PyBytes_GET_SIZE(out)
            text = PyBytes_AS_STRING(out)
            with nogil:
                sent = send(conn_fd, text, <size_t>size, MSG_DONTWAIT | MSG_NOSIGNAL)
            self._spun_routes[self._spun] = route + 1
            self._spun_seconds[self._spun] = _seconds_since(&t0)
            self._spun += 1
            self._enter_staged()
            if sent != size:
                # the transport writes the rest when the socket can take it, or meets its error
                transport.write(out[sent if sent > 0 else 0:])
                return True

    def answered(self):
        """[(path number from 1, seconds)] of the requests the last spin() answered."""
        cdef int i
        return [(self._spun_routes[i], self._spun_seconds[i]) for i in range(self._spun)]

    cdef inline void _enter_staged(self):
        """The key memo's new entries of the request just answered go in now, its answer
        sent: no answer waits for them."""
        kvcm_memo_enter_staged(&self._sink.key_memo._m)

    cdef object _take(self, const char *p, size_t n, bytes common, int *route):
        """The response when p[0:n] is exactly one whole request the lane takes (its path's
        number in *route), else None."""
        cdef kl_hit hit
        hit.route, hit.body, hit.end = 0, 0, 0
        if not (kl_request(p, n, 0, self._ptrs, self._lens, <int>len(self._paths), self._max_header,
                           self._max_body, &hit) and hit.end == n):
            return None
        route[0] = hit.route
        return self._answer(hit.route, p + hit.body, hit.end - hit.body, common)

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
        cdef object split, body, keys, answer = None
        cdef dict counts = self._score_counts[route]
        cdef int64_t found
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
            found = self._index._walk(namespace, keys, pods, self._scorer._weights_for(self._index))
            if counts is not None and self._write_scores(context, len(keys), len(ids), found):
                counts["requests"] += 1
                if found:
                    counts["warm"] += 1
            else:
                answer = self._scorer._matches(self._index, found)
        finally:
            ilock_release(&self._index._lock)
        if answer is not None:
            answer = _json_dumps(finish(context, ids, keys, answer))
            out = self._respond(common, PyBytes_AS_STRING(answer), <size_t>PyBytes_GET_SIZE(answer))
        else:
            out = self._respond(common, self._out.p, self._out.n)
        if self._out.cap > _SCRATCH_KEPT:
            free(self._out.p)
            self._out.p, self._out.n, self._out.cap = NULL, 0, 0
        self.served += 1
        return out

    cdef bint _write_scores(self, str model, size_t nkeys, size_t nids, int64_t found) except -1:
        """score_result's answer for the walk's `found` matches, into self._out as orjson
        writes it; False when a score would not be written so (then nothing is counted)."""
        cdef Index index = self._index
        cdef list pods = index._pods.names, tiers = index._tiers.names
        cdef const kvi_match *m
        cdef jo_buf *o = &self._out
        cdef int64_t i
        cdef int t, first
        cdef char *text
        o.n = 0
        for i in range(found):
            m = &index.ix.matches[i]
            # orjson writes these as repr() does, which PyOS_double_to_string gives
            if not (isfinite(m.score) and (m.score == 0.0 or fabs(m.score) >= 1e-4)):
                return False
        _put(o, b'{"model":')
        _put_str(o, model)
        _put(o, b',"scores":{')
        for i in range(found):
            m = &index.ix.matches[i]
            if i:
                _put(o, b',')
            _put_str(o, pods[m.pod])
            _put(o, b':')
            _put_score(o, m.score)
        _put(o, b'},"blocks":')
        _check(jo_u64(o, nkeys))
        _put(o, b',"tokens":')
        _check(jo_u64(o, nids))
        _put(o, b',"matched":{')
        for i in range(found):
            m = &index.ix.matches[i]
            if i:
                _put(o, b',')
            _put_str(o, pods[m.pod])
            _put(o, b':{"blocks":')
            _check(jo_u64(o, m.blocks))
            _put(o, b',"tokens":')
            _check(jo_u64(o, <uint64_t>m.blocks * self._block_size))
            _put(o, b',"tiers":{')
            first = 1
            for t in range(len(tiers)):
                if m.tiers[t]:
                    if not first:
                        _put(o, b',')
                    first = 0
                    _put_str(o, tiers[t])
                    _put(o, b':')
                    _check(jo_u64(o, m.tiers[t]))
            _put(o, b'}}')
        _put(o, b'}}')
        return True

    cdef bytes _respond(self, bytes common, const char *answer, size_t n):
        """The 200 response with `common` (the Date and Server lines) and the JSON answer."""
        cdef bytes out
        cdef char length[24]
        cdef int length_len
        cdef char *w
        length_len = snprintf(length, sizeof(length), "%zu\r\n\r\n", n)
        out = PyBytes_FromStringAndSize(NULL, len(_LANE_STATUS) + len(common) + len(_LANE_TYPE) + length_len + n)
        w = PyBytes_AS_STRING(out)
        for piece in (_LANE_STATUS, common, _LANE_TYPE):
            memcpy(w, PyBytes_AS_STRING(piece), PyBytes_GET_SIZE(piece))
            w += PyBytes_GET_SIZE(piece)
        memcpy(w, length, length_len)
        memcpy(w + length_len, answer, n)
        return out


cdef inline int _check(int failed) except -1:
    if failed:
        raise MemoryError()
    return 0


cdef inline int _put(jo_buf *o, bytes literal) except -1:
    return _check(jo_put(o, PyBytes_AS_STRING(literal), <size_t>PyBytes_GET_SIZE(literal)))


cdef int _put_score(jo_buf *o, double score) except -1:
    """A score as repr() writes it: most are whole numbers of blocks, written as such."""
    cdef char *text
    if 0.0 <= score < 1e16 and score == <double><uint64_t>score:
        _check(jo_u64(o, <uint64_t>score))
        return _put(o, b".0")
    text = PyOS_double_to_string(score, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        return _check(jo_put(o, text, strlen(text)))
    finally:
        PyMem_Free(text)


cdef inline int _put_str(jo_buf *o, str s) except -1:
    cdef Py_ssize_t n
    cdef const char *utf8 = PyUnicode_AsUTF8AndSize(s, &n)
    return _check(jo_str(o, utf8, <size_t>n))
