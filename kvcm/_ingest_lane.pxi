# The ingest's native lane (DESIGN.md §4): the common case of kvcm.ingest.Ingest — a batch
# that continues a known, healthy stream (seq == last + 1, no replay or slice in progress)
# and fits in one slice — received, checked, decoded and applied in C, many messages per
# call, without the GIL. Everything else is handed back, in order, to Ingest's Python logic,
# which also decides which streams the lane may take (LaneSource.admit) and takes them back
# (FastStream.open = False) whenever it changes their state.

from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

cdef extern from "zmq_lane.h" nogil:
    ctypedef struct kvz_msg:
        pass
    ctypedef struct kvz_api:
        int (*msg_init)(kvz_msg *) noexcept nogil
        int (*msg_recv)(kvz_msg *, void *, int) noexcept nogil
        int (*msg_close)(kvz_msg *) noexcept nogil
        void *(*msg_data)(kvz_msg *) noexcept nogil
        size_t (*msg_size)(const kvz_msg *) noexcept nogil
        int (*msg_more)(const kvz_msg *) noexcept nogil
        int (*errno_)() noexcept nogil
    int kvz_load(kvz_api *api)
    int KVZ_DONTWAIT

cdef kvz_api _zmq
cdef int _zmq_state = 0   # 0: not looked for yet, 1: loaded, -1: no libzmq found

cdef enum:
    EAGAIN_ = 11
    LANE_EMPTY = 0     # no message waiting
    LANE_BUDGET = 1    # budget spent, messages may be waiting
    LANE_SLOW = 2      # a message for the Python logic: nothing of it applied
    LANE_REST = 3      # a batch the lane began: its uncommon events are the general path's
    LANE_ERROR = 4     # libzmq failed (errno)
    MAX_LANE_KEYS = 1 << 15


def native_lane():
    """Whether the native lane can run: the libzmq pyzmq loaded was found (import zmq first)."""
    global _zmq_state
    if _zmq_state == 0:
        _zmq_state = 1 if kvz_load(&_zmq) == 0 else -1
    return _zmq_state == 1


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)   # time.monotonic()'s clock
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef struct LaneState:
    bint open
    bint moved              # the lane applied batches Ingest has not synced
    uint64_t seq            # the last seq the lane applied, while moved
    uint64_t batches        # batches the lane applied, over the stream's life
    double last_time        # when it applied the last one (time.monotonic())
    uint64_t stamp          # recency: the lane clock when the stream was last active
    unsigned char *kept     # the last payload it applied
    Py_ssize_t kept_len, kept_cap
    FastPath f              # what the fast path may do for the stream (EventSink._fast_setup)
    uint64_t gen            # the sink's _fast_gen f was read at
    double *ts              # the stream context's ts
    uint64_t *active        # its model namespace's use stamp (EventSink._touch)
    bint fed                # the model is the namespace the context fed last
    PyObject *stream        # the FastStream (borrowed)


cdef class FastStream:
    """The lane's state of one stream of Ingest (owner). While `open`, the lane applies its
    next batches and keeps its seq, its last payload, its batch count and its time; Ingest
    reads them (moved: something to read) and closes the stream before it changes
    anything itself."""
    cdef readonly object owner
    cdef LaneState st
    cdef StreamContext ctx
    cdef _Namespace model

    def __cinit__(self, owner):
        self.owner = owner
        self.st.stream = <PyObject *>self

    def __dealloc__(self):
        free(self.st.kept)

    @property
    def open(self):
        return self.st.open

    @open.setter
    def open(self, bint value):
        self.st.open = value

    @property
    def moved(self):
        return self.st.moved

    @moved.setter
    def moved(self, bint value):
        self.st.moved = value

    @property
    def seq(self):
        return self.st.seq

    @property
    def batches(self):
        return self.st.batches

    @property
    def last_time(self):
        return self.st.last_time

    @property
    def stamp(self):
        return self.st.stamp

    @stamp.setter
    def stamp(self, uint64_t value):
        self.st.stamp = value

    def payload(self):
        """The last payload the lane applied."""
        return PyBytes_FromStringAndSize(<const char *>self.st.kept, self.st.kept_len)


cdef int _keep(LaneState *s, const unsigned char *data, Py_ssize_t n) noexcept nogil:
    cdef unsigned char *p
    if n > s.kept_cap:
        p = <unsigned char *>realloc(s.kept, n if n else 1)
        if p == NULL:
            return -1
        s.kept, s.kept_cap = p, n
    memcpy(s.kept, data, n)
    s.kept_len = n
    return 0


cdef struct LaneKey:
    uint64_t h
    uint64_t rank
    unsigned char *topic
    Py_ssize_t topic_len
    PyObject *stream      # a FastStream, owned; NULL: a free slot
    LaneState *st         # its state


cdef uint64_t _key_hash(const unsigned char *topic, Py_ssize_t n, uint64_t rank) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL ^ rank
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ topic[i]) * 1099511628211ULL
    return h | 1   # 0 never: it marks a free slot


cdef class LaneSource:
    """One SUB socket the lane reads (pyzmq's socket: its handle, `underlying`) and which of
    its (topic, dp_rank) the lane may apply for which stream."""
    cdef void *sock
    cdef object keep_sock       # the pyzmq socket, kept alive as long as this
    cdef LaneKey *keys
    cdef Py_ssize_t cap, used

    def __cinit__(self, sock):
        self.keep_sock = sock
        self.sock = <void *><size_t>sock.underlying

    def __dealloc__(self):
        self._clear()
        free(self.keys)

    cdef void _clear(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.keys[i].stream != NULL:
                Py_DECREF(<object>self.keys[i].stream)
                free(self.keys[i].topic)
                self.keys[i].stream = NULL
        self.used = 0

    cdef LaneKey *_find(self, const unsigned char *topic, Py_ssize_t n, uint64_t rank) noexcept nogil:
        """The key's slot: its entry, or the free slot where it would go (NULL: no table)."""
        cdef uint64_t h = _key_hash(topic, n, rank)
        cdef Py_ssize_t i
        cdef LaneKey *k
        if self.cap == 0:
            return NULL
        i = <Py_ssize_t>(h & <uint64_t>(self.cap - 1))
        while True:
            k = &self.keys[i]
            if k.stream == NULL or (k.h == h and k.rank == rank and k.topic_len == n
                                    and memcmp(k.topic, topic, n) == 0):
                k.h = h
                return k
            i = (i + 1) & (self.cap - 1)

    def admit(self, bytes topic, uint64_t rank, FastStream stream not None):
        """Lets the lane apply the stream's batches that come with this topic and dp_rank.
        The table is bounded: when full it starts over (streams are admitted again by their
        next batch through Ingest)."""
        cdef Py_ssize_t n = len(topic), i, old_cap
        cdef LaneKey *old
        cdef LaneKey *k
        if (self.used + 1) * 2 > self.cap:
            if self.cap >= MAX_LANE_KEYS:
                self._clear()
            else:
                old, old_cap = self.keys, self.cap
                self.cap = self.cap * 2 if self.cap else 16
                self.keys = <LaneKey *>calloc(self.cap, sizeof(LaneKey))
                if self.keys == NULL:
                    self.keys, self.cap = old, old_cap
                    raise MemoryError()
                for i in range(old_cap):
                    if old[i].stream != NULL:
                        k = self._find(old[i].topic, old[i].topic_len, old[i].rank)
                        k[0] = old[i]
                free(old)
        k = self._find(<const unsigned char *>PyBytes_AS_STRING(topic), n, rank)
        if k.stream != NULL:
            Py_DECREF(<object>k.stream)
        else:
            k.topic = <unsigned char *>malloc(n if n else 1)
            if k.topic == NULL:
                raise MemoryError()
            memcpy(k.topic, PyBytes_AS_STRING(topic), n)
            k.topic_len = n
            k.rank = rank
            self.used += 1
        Py_INCREF(stream)
        k.stream = <PyObject *>stream
        k.st = &stream.st


cdef class Lane:
    """Drains LaneSources for one EventSink (see the top of this file)."""
    cdef EventSink sink
    cdef Batch batch            # reads every payload the lane receives (Batch.bind_raw)
    cdef kvz_msg parts[3]
    cdef int nparts             # parts held since the last drain (a batch begun, a slow message)
    cdef Py_ssize_t max_payload
    cdef readonly uint64_t messages, batches    # counted for Ingest's counters
    cdef readonly uint64_t clock                # recency of streams (FastStream.stamp)
    cdef LaneState *current     # the stream of a LANE_REST batch
    cdef Py_ssize_t rest_next, rest_pos
    cdef int err

    def __init__(self, EventSink sink not None, Py_ssize_t max_payload):
        if not native_lane():
            raise RuntimeError("the libzmq pyzmq uses was not found")
        self.sink = sink
        self.batch = Batch(EMPTY_BATCH)
        self.max_payload = max_payload

    def __dealloc__(self):
        self._release()

    def tick(self):
        """The next recency stamp (Ingest's own touches of a stream)."""
        self.clock += 1
        return self.clock

    def open(self, FastStream stream not None, StreamContext ctx not None, uint64_t seq):
        """Opens the stream to the lane from seq on, when the core's fast path can apply its
        model's events (else leaves it closed); whether it opened."""
        stream.st.open = False
        if ctx._index is not self.sink._index:
            return False
        stream.ctx = ctx
        stream.st.ts = &ctx.ts
        if not self._setup(stream):
            return False
        stream.st.seq, stream.st.moved, stream.st.open = seq, False, True
        return True

    cdef bint _setup(self, FastStream stream) except -1:
        """Reads what the fast path may do for the stream now; whether it may store."""
        cdef _Namespace model
        self.sink._fast_setup(stream.ctx, &stream.st.f)
        model = self.sink._namespaces.get(stream.ctx.model) if stream.ctx.model is not None else None
        stream.model = model
        stream.st.active = &model.active if model is not None else NULL
        stream.st.fed = model is not None and stream.ctx._last_fed is model
        stream.st.gen = self.sink._fast_gen
        return stream.st.f.any and stream.st.f.stores and model is not None

    cdef void _release(self) noexcept nogil:
        cdef int i
        for i in range(self.nparts):
            _zmq.msg_close(&self.parts[i])
        self.nparts = 0

    def drain(self, LaneSource source not None, Py_ssize_t budget, double seconds):
        """Receives up to `budget` messages for at most `seconds`, applying those the lane
        may. Returns (taken, item): how many messages it took, and None (no message
        waiting), False (budget spent), [frames] (the last message taken, for Ingest's
        Python logic: nothing of it applied) or (stream, seq, cursor) (a batch the lane
        began whose remaining events the cursor applies on the general path)."""
        cdef int rc
        cdef Py_ssize_t taken = 0
        cdef double deadline = _monotonic() + seconds
        cdef EventSink sink = self.sink
        cdef Batch b = self.batch
        self._release()
        with nogil:
            while True:
                if taken >= budget or _monotonic() > deadline:
                    rc = LANE_BUDGET
                    break
                rc = self._next(source, sink, b)
                if rc != LANE_BUDGET:
                    if rc != LANE_EMPTY:
                        taken += 1
                    break
                taken += 1
        if rc == LANE_EMPTY:
            return taken, None
        if rc == LANE_BUDGET:
            return taken, False
        if rc == LANE_ERROR:
            raise OSError(self.err, os.strerror(self.err))
        if rc == LANE_SLOW:
            return taken, self._frames(source)
        stream = <FastStream>self.current.stream
        self.current = NULL
        return taken, (stream.owner, stream.st.seq, self._rest(stream))

    cdef int _next(self, LaneSource source, EventSink sink, Batch b) noexcept nogil:
        """Takes one message: LANE_BUDGET when the lane applied it (go on), else what
        drain() is to do with it."""
        cdef int rc = self._recv(source)
        cdef LaneKey *k
        cdef LaneState *s
        cdef uint64_t rank, seq
        cdef const unsigned char *p
        cdef Py_ssize_t n
        cdef bint ok
        if rc != LANE_BUDGET:
            return rc
        n = <Py_ssize_t>_zmq.msg_size(&self.parts[2])
        if _zmq.msg_size(&self.parts[1]) != 8 or n > self.max_payload:
            return LANE_SLOW
        p = <const unsigned char *>_zmq.msg_data(&self.parts[2])
        if b.bind_raw(p, n, &rank):
            return LANE_SLOW
        k = source._find(<const unsigned char *>_zmq.msg_data(&self.parts[0]),
                         <Py_ssize_t>_zmq.msg_size(&self.parts[0]), rank)
        if k == NULL or k.stream == NULL:
            return LANE_SLOW
        s = k.st
        seq = _be64(<const unsigned char *>_zmq.msg_data(&self.parts[1]))
        if not s.open or s.seq == 0xFFFFFFFFFFFFFFFFULL or seq != s.seq + 1:
            return LANE_SLOW
        if s.gen != sink._fast_gen:
            with gil:
                ok = self._setup(<FastStream>s.stream)
            if not ok:
                s.open = False
                return LANE_SLOW
        if _keep(s, p, n):
            return LANE_SLOW
        # the batch is the stream's now, as Ingest's _on_live/_advance/_apply_now make it
        self.messages += 1
        self.batches += 1
        s.batches += 1
        s.seq, s.moved = seq, True
        s.last_time = _monotonic()
        self.clock += 1
        s.stamp = self.clock
        if self._apply(s, sink, b):
            return LANE_BUDGET
        self.current = s
        return LANE_REST

    cdef int _recv(self, LaneSource source) noexcept nogil:
        """Receives one message's parts (at most three; more stay for _frames):
        LANE_BUDGET for three, LANE_SLOW for another shape, LANE_EMPTY, LANE_ERROR. The
        parts of the message before are closed first."""
        cdef int n = 0
        self._release()
        while True:
            _zmq.msg_init(&self.parts[n])
            if _zmq.msg_recv(&self.parts[n], source.sock, KVZ_DONTWAIT) < 0:
                self.err = _zmq.errno_()
                _zmq.msg_close(&self.parts[n])
                self.nparts = n
                return LANE_EMPTY if n == 0 and self.err == EAGAIN_ else LANE_ERROR
            n += 1
            self.nparts = n
            if not _zmq.msg_more(&self.parts[n - 1]):
                return LANE_BUDGET if n == 3 else LANE_SLOW
            if n == 3:
                return LANE_SLOW

    cdef list _frames(self, LaneSource source):
        """The parts taken as bytes, and the rest of a message of more than three."""
        cdef int i
        cdef bint more = _zmq.msg_more(&self.parts[self.nparts - 1])
        frames = [PyBytes_FromStringAndSize(<const char *>_zmq.msg_data(&self.parts[i]),
                                            <Py_ssize_t>_zmq.msg_size(&self.parts[i])) for i in range(self.nparts)]
        self._release()
        while more:   # a message's parts arrive together: the rest is there
            _zmq.msg_init(&self.parts[0])
            if _zmq.msg_recv(&self.parts[0], source.sock, KVZ_DONTWAIT) < 0:
                self.err = _zmq.errno_()
                _zmq.msg_close(&self.parts[0])
                raise OSError(self.err, os.strerror(self.err))
            frames.append(PyBytes_FromStringAndSize(<const char *>_zmq.msg_data(&self.parts[0]),
                                                    <Py_ssize_t>_zmq.msg_size(&self.parts[0])))
            more = _zmq.msg_more(&self.parts[0])
            _zmq.msg_close(&self.parts[0])
        return frames

    cdef bint _apply(self, LaneState *s, EventSink sink, Batch b) noexcept nogil:
        """Applies the bound batch for the stream as EventSink.cursor() and _apply_events()
        do, its events in runs on the fast path; False (rest_next, rest_pos set) at the
        first event the fast path does not take."""
        cdef Py_ssize_t i = 0, left = b.nevents, done, end = b.events_pos
        sink._c[<int>C_BATCHES] += 1
        s.ts[0] = b.ts
        sink._uses += 1   # EventSink._touch of the model, which is in use
        s.active[0] = sink._uses
        while left > 0:
            if b.event(i) == NULL:
                sink._count_reader_error(b.trunc_err)
                break
            done = sink._fast_run(b, i, min(left, <Py_ssize_t>FAST_RUN_EVENTS), -1, &s.f, &end)
            if s.f.stored or s.f.removed:   # EventSink._fast_done
                sink._uses += 1
                s.active[0] = sink._uses
                if s.f.stored and not s.fed:
                    with gil:
                        (<FastStream>s.stream).ctx.feed((<FastStream>s.stream).model)
                    s.fed = True
                s.f.stored = s.f.removed = False
            if done == 0:
                self.rest_next, self.rest_pos = i, end
                return False
            i += done
            left -= done
        return True

    cdef BatchCursor _rest(self, FastStream stream):
        cdef BatchCursor cursor = BatchCursor.__new__(BatchCursor)
        cursor.sink = self.sink
        cursor.ctx = stream.ctx
        cursor.batch = self.batch
        cursor.next = self.rest_next
        cursor.pos = self.rest_pos
        cursor.left = self.batch.nevents - self.rest_next
        return cursor


cdef inline uint64_t _be64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v
