# vLLM KV-event batches -> C records, decoded once (specs/vllm-kv-events.md).
#
# A Batch reads a payload's header and decodes its events into C records: the tag, block
# hashes and token ids in C arrays, the other fields as values or as spans of the payload
# (which the Batch keeps alive). Everything that consumes a batch (the transport's header
# check, a shared index's prefetch, the sink's apply) reads these records instead of the
# msgpack again. Events are decoded a window of payload bytes at a time, so that the records
# of a 64 MiB message stay bounded; a batch that fits one window (nearly all) is read once.
# Decoding uses neither Python objects nor sink state: it runs without the GIL.


class DecodeError(ValueError):
    """A batch payload that cannot be decoded; `reason` names the counter it lands in."""

    def __init__(self, reason, message=None):
        self.reason = reason
        super().__init__(message or reason)


cdef enum Tag:
    TAG_UNKNOWN = 0
    TAG_STORED
    TAG_REMOVED
    TAG_CLEARED

cdef enum Field:
    F_SKIP = 0
    F_HASHES
    F_PARENT
    F_TOKENS
    F_BLOCK_SIZE
    F_LORA_ID
    F_MEDIUM
    F_LORA_NAME
    F_EXTRA

# Array positions after the tag (vLLM 0.9-0.23); later fields are skipped.
cdef Field STORED_FIELDS[8]
STORED_FIELDS[:] = [F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID, F_MEDIUM, F_LORA_NAME, F_EXTRA]
cdef Field REMOVED_FIELDS[2]
REMOVED_FIELDS[:] = [F_HASHES, F_MEDIUM]

cdef enum:
    # One event's cost is bounded (a batch is applied in slices of whole events): a million
    # tokens in 16-token blocks, more than a scheduler step stores for one request.
    MAX_EVENT_BLOCKS = 1 << 16
    MAX_EVENT_TOKENS = 1 << 20
    # Events are decoded this many payload bytes at a time (the event that crosses it
    # included): at most 8 bytes of hashes and token ids per payload byte, and a record per
    # event, whatever the message.
    DECODE_WINDOW_BYTES = 64 << 10


cdef struct Event:
    Tag tag
    MpError err           # MP_OK, or why the (delimited) event cannot be read
    bint too_large        # more hashes or token ids than one event may carry
    Py_ssize_t nhashes    # -1: absent
    Py_ssize_t hash_off   # where its hashes start in the window's array
    bint has_parent
    uint64_t parent
    Py_ssize_t ntokens    # -1: absent
    Py_ssize_t tok_off
    bint has_block_size
    int64_t block_size
    bint has_lora_id
    int64_t lora_id
    const unsigned char *medium
    Py_ssize_t medium_len
    const unsigned char *lora
    Py_ssize_t lora_len
    Py_ssize_t extra_pos
    Py_ssize_t extra_end  # extra_pos == extra_end: absent or nil
    Py_ssize_t end        # the payload position after the event


cdef struct U64Scratch:
    uint64_t *data
    Py_ssize_t cap


cdef inline int scratch_reserve(U64Scratch *s, Py_ssize_t n) noexcept nogil:
    cdef uint64_t *p
    cdef Py_ssize_t cap
    if n <= s.cap:
        return 0
    cap = s.cap * 2 if s.cap else 256
    while cap < n:
        cap *= 2
    p = <uint64_t *>realloc(s.data, sizeof(uint64_t) * cap)
    if p == NULL:
        return -1
    s.data = p
    s.cap = cap
    return 0


cdef inline bint _is(const unsigned char *p, Py_ssize_t n, const char *name, Py_ssize_t len) noexcept nogil:
    return n == len and memcmp(p, name, len) == 0


cdef Field map_field(const unsigned char *k, Py_ssize_t n) noexcept nogil:
    """The field a map-form event's key names (F_SKIP for keys kvcm does not read)."""
    if _is(k, n, b"block_hashes", 12):
        return F_HASHES
    if _is(k, n, b"token_ids", 9):
        return F_TOKENS
    if _is(k, n, b"parent_block_hash", 17):
        return F_PARENT
    if _is(k, n, b"block_size", 10):
        return F_BLOCK_SIZE
    if _is(k, n, b"medium", 6):
        return F_MEDIUM
    if _is(k, n, b"lora_id", 7):
        return F_LORA_ID
    if _is(k, n, b"lora_name", 9):
        return F_LORA_NAME
    if _is(k, n, b"extra_keys", 10):
        return F_EXTRA
    return F_SKIP


cdef Tag read_tag(MpReader *r) noexcept nogil:
    cdef const unsigned char *p
    cdef Py_ssize_t n
    if mp_read_str(r, &p, &n):
        return TAG_UNKNOWN
    if _is(p, n, b"BlockStored", 11):
        return TAG_STORED
    if _is(p, n, b"BlockRemoved", 12):
        return TAG_REMOVED
    if _is(p, n, b"AllBlocksCleared", 16):
        return TAG_CLEARED
    return TAG_UNKNOWN


cdef inline int read_hash(MpReader *r, uint64_t *v) noexcept nogil:
    """A block hash: any msgpack int (modulo 2**64) or bytes (the last 8, big-endian)."""
    cdef int t = mp_peek(r)
    cdef bint neg
    cdef const unsigned char *p
    cdef Py_ssize_t n
    if t == 0xCF and r.end - r.pos >= 9:   # what vLLM sends: a uint64
        v[0] = mp_be(r.buf + r.pos + 1, 8)
        r.pos += 9
        return 0
    if 0xC4 <= t <= 0xC6:
        if mp_read_bytes(r, False, &p, &n):
            return -1
        if n == 0:
            return mp_fail(r, MP_INVALID)
        v[0] = mp_be(p + n - 8, 8) if n >= 8 else mp_be(p, <int>n)
        return 0
    return mp_read_int(r, v, &neg)


cdef int read_tokens(MpReader *r, uint64_t *out, Py_ssize_t n) noexcept nogil:
    """n token ids (non-negative ints). A vocabulary's ids are uint16 or uint32 in about
    equal shares, which no branch predicts: both widths are read without a branch on the
    width, the reader's position kept in a register."""
    cdef const unsigned char *buf = r.buf
    cdef Py_ssize_t pos = r.pos, end = r.end, i
    cdef unsigned char t
    cdef uint64_t raw
    cdef int narrow
    for i in range(n):
        if end - pos >= 5:
            t = buf[pos]
            if t <= 0x7F:
                out[i] = t
                pos += 1
                continue
            if t == 0xCD or t == 0xCE:
                raw = (<uint64_t>buf[pos + 1] << 24) | (<uint64_t>buf[pos + 2] << 16) \
                    | (<uint64_t>buf[pos + 3] << 8) | buf[pos + 4]
                narrow = t == 0xCD
                out[i] = raw >> (16 * narrow)
                pos += 5 - 2 * narrow
                continue
        r.pos = pos
        if mp_read_uint(r, &out[i]):
            return -1
        pos = r.pos
    r.pos = pos
    return 0


# The arrays of the last Batch freed, for the next one: a batch's records then cost no
# allocation once the first batches have grown them. Touched with the GIL held only.
cdef Event *_spare_events = NULL
cdef Py_ssize_t _spare_cap = 0
cdef U64Scratch _spare_hashes
cdef U64Scratch _spare_tokens


@cython.final
cdef class Batch:
    """A KV-event batch payload `[ts, events, dp_rank?]`: its header, and its events decoded
    into C records a window at a time (`EventSink.decode`, `EventSink.cursor`)."""
    cdef readonly object payload
    cdef Py_buffer view
    cdef bint viewing
    cdef readonly double ts
    cdef readonly Py_ssize_t nevents
    cdef Py_ssize_t nfields
    cdef Py_ssize_t events_pos   # where the first event starts
    cdef Py_ssize_t rest_checked  # events delimited past the window by check()
    # the window: events [first, first + n) of the batch
    cdef Event *events
    cdef Py_ssize_t cap, n, first
    cdef U64Scratch hashes, tokens
    cdef Py_ssize_t nh, nt
    cdef Py_ssize_t pos          # where the event after the window starts
    cdef Py_ssize_t trunc_at     # the event that cannot be delimited (the rest is lost), or -1
    cdef MpError trunc_err

    def __cinit__(self, payload):
        cdef MpReader r
        PyObject_GetBuffer(payload, &self.view, PyBUF_SIMPLE)
        self.viewing = True
        self.payload = payload
        self.trunc_at = -1
        mp_init(&r, <const unsigned char *>self.view.buf, 0, self.view.len)
        if mp_read_array(&r, &self.nfields) or self.nfields < 2 or mp_read_float(&r, &self.ts) \
                or mp_read_array(&r, &self.nevents):
            raise DecodeError(MP_ERROR_NAMES[<int>r.err] if r.err != MP_OK else "wrong_type",
                              "not a KV event batch [ts, events, dp_rank?]")
        self.events_pos = self.pos = r.pos
        self._take_spares()
        with nogil:
            self._decode_window()

    cdef void _take_spares(self) noexcept:
        global _spare_events, _spare_cap, _spare_hashes, _spare_tokens
        self.events, self.cap, self.hashes, self.tokens = _spare_events, _spare_cap, _spare_hashes, _spare_tokens
        _spare_events, _spare_cap = NULL, 0
        _spare_hashes.data = _spare_tokens.data = NULL
        _spare_hashes.cap = _spare_tokens.cap = 0

    def __dealloc__(self):
        global _spare_events, _spare_cap, _spare_hashes, _spare_tokens
        if self.viewing:
            PyBuffer_Release(&self.view)
        if _spare_events == NULL and _spare_hashes.data == NULL and _spare_tokens.data == NULL:
            _spare_events, _spare_cap, _spare_hashes, _spare_tokens = self.events, self.cap, self.hashes, self.tokens
            return
        free(self.events)
        free(self.hashes.data)
        free(self.tokens.data)

    cdef inline const unsigned char *buf(self) noexcept nogil:
        return <const unsigned char *>self.view.buf

    cdef inline bint whole(self) noexcept nogil:
        """Every event (up to a truncation) is in the window."""
        return self.first == 0 and (self.n == self.nevents or self.trunc_at == self.n)

    cdef void _decode_window(self) noexcept nogil:
        """Decodes the events after the current window, up to DECODE_WINDOW_BYTES of payload
        or a truncation, as the new window."""
        cdef Py_ssize_t start = self.pos, i
        cdef Event *grown
        self.first += self.n
        self.n = self.nh = self.nt = 0
        i = self.first
        while i < self.nevents and self.trunc_at < 0 and self.pos - start < DECODE_WINDOW_BYTES:
            if self.n == self.cap:
                grown = <Event *>realloc(self.events, sizeof(Event) * (self.cap * 2 if self.cap else 16))
                if grown == NULL:
                    if self.n == 0:   # not even one record: the rest cannot be read
                        self.trunc_at, self.trunc_err = i, MP_INVALID
                    return
                self.events = grown
                self.cap = self.cap * 2 if self.cap else 16
            if self._decode_next(&self.events[self.n]):
                self.trunc_at = i
                return
            self.n += 1
            i += 1

    cdef int _decode_next(self, Event *ev) noexcept nogil:
        """Decodes the event at self.pos into ev and steps over it; -1 (trunc_err set) when
        it cannot even be delimited."""
        cdef MpReader r
        cdef Py_ssize_t start = self.pos, nh = self.nh, nt = self.nt
        mp_init(&r, self.buf(), start, self.view.len)
        if decode_event(&r, ev, &self.hashes, &self.nh, &self.tokens, &self.nt) == 0:
            ev.end = self.pos = r.pos
            return 0
        # A bad event: delimit it, then read it again within its bytes, so that the error
        # counted is the one of the event alone.
        self.nh, self.nt = nh, nt
        mp_init(&r, self.buf(), start, self.view.len)
        if mp_skip(&r, 1):
            self.trunc_err = r.err
            return -1
        ev.end = self.pos = r.pos
        mp_init(&r, self.buf(), start, ev.end)
        if decode_event(&r, ev, &self.hashes, &self.nh, &self.tokens, &self.nt):
            self.nh, self.nt = nh, nt
            ev.err = r.err
        ev.end = self.pos
        return 0

    cdef void rewind(self) noexcept nogil:
        """Back to the first window (after a walk over a batch larger than one)."""
        if self.first == 0:
            return
        self.first = self.n = 0
        self.pos = self.events_pos
        self.trunc_at = -1
        self._decode_window()

    cdef Event *event(self, Py_ssize_t i) noexcept nogil:
        """Event i of the batch, decoding windows forward as needed; NULL when it lies at or
        after a truncation (or i is before the window)."""
        while i >= self.first + self.n:
            if self.trunc_at >= 0 or self.first + self.n >= self.nevents:
                return NULL
            self._decode_window()
        if i < self.first:
            return NULL
        return &self.events[i - self.first]

    def check(self):
        """(ts, dp_rank, number of events); DecodeError when an event cannot be delimited or
        the dp_rank is not a small non-negative int. Steps over the events past the window."""
        cdef uint64_t rank = 0
        cdef MpError err = MP_OK
        cdef Py_ssize_t bad = 0
        cdef int rc = self._check(&rank, &err, &bad)
        if rc == 1:
            raise DecodeError(MP_ERROR_NAMES[<int>err], "event %d is malformed" % bad)
        if rc == 2:
            raise DecodeError("wrong_type", "data_parallel_rank is not a small non-negative int")
        return self.ts, rank, self.nevents

    cdef int _check(self, uint64_t *rank, MpError *err, Py_ssize_t *bad) noexcept nogil:
        """check() without the GIL: 0 and the dp_rank, 1 (err, bad: the event) when an event
        cannot be delimited, 2 when the dp_rank is not a small non-negative int."""
        cdef MpReader r
        cdef bint neg
        cdef Py_ssize_t i
        rank[0] = 0
        if self.trunc_at >= 0:
            err[0], bad[0] = self.trunc_err, self.trunc_at
            return 1
        mp_init(&r, self.buf(), self.pos, self.view.len)
        i = self.first + self.n
        while i < self.nevents:
            if mp_skip(&r, 1):
                err[0], bad[0] = r.err, i
                return 1
            i += 1
        if self.nfields >= 3 and not mp_next_is_nil(&r):
            if mp_read_int(&r, rank, &neg) or neg or rank[0] > 0xFFFF:
                return 2
        return 0

    cdef int bind_raw(self, const unsigned char *buf, Py_ssize_t n, uint64_t *rank) noexcept nogil:
        """Reads another payload, one that is no Python object (a libzmq message the native
        lane received): its header, its first window, check(). 0 and the dp_rank; -1 when it
        is not a well-formed batch (the Python path then reads it again and counts why).
        Only for a Batch made of EMPTY_BATCH, whose buffer view is a bytes object's and so
        releases nothing but that object."""
        cdef MpReader r
        cdef MpError err
        cdef Py_ssize_t bad
        self.view.buf = <void *>buf
        self.view.len = n
        self.first = self.n = self.nh = self.nt = 0
        self.trunc_at = -1
        mp_init(&r, buf, 0, n)
        if mp_read_array(&r, &self.nfields) or self.nfields < 2 or mp_read_float(&r, &self.ts) \
                or mp_read_array(&r, &self.nevents):
            self.nevents = 0
            return -1
        self.events_pos = self.pos = r.pos
        self._decode_window()
        return -1 if self._check(rank, &err, &bad) else 0


# what a Batch that bind_raw() reads other payloads with is made of: [0.0, []]
EMPTY_BATCH = b"\x92\xcb" + bytes(8) + b"\x90"


cdef int read_field(MpReader *r, Event *ev, Field f, U64Scratch *hashes, Py_ssize_t *nh,
                    U64Scratch *tokens, Py_ssize_t *nt) noexcept nogil:
    cdef Py_ssize_t n, i
    cdef uint64_t v
    cdef bint neg
    cdef Py_ssize_t start
    cdef uint64_t *out
    if f == F_SKIP or f == F_LORA_ID and mp_next_is_nil(r):
        return mp_skip(r, 2)
    if f == F_HASHES or f == F_TOKENS:
        if mp_next_is_nil(r):
            r.pos += 1
            return 0
        start = r.pos
        if mp_read_array(r, &n):
            return -1
        if n > (MAX_EVENT_BLOCKS if f == F_HASHES else MAX_EVENT_TOKENS):
            ev.too_large = True
            r.pos = start
            return mp_skip(r, 2)
        if f == F_HASHES:
            # a repeated field replaces the earlier one
            if scratch_reserve(hashes, nh[0] + n):
                return mp_fail(r, MP_INVALID)
            out = hashes.data + nh[0]
            for i in range(n):
                if read_hash(r, &out[i]):
                    return -1
            ev.hash_off = nh[0]
            ev.nhashes = n
            nh[0] += n
        else:
            if scratch_reserve(tokens, nt[0] + n):
                return mp_fail(r, MP_INVALID)
            out = tokens.data + nt[0]
            if read_tokens(r, out, n):
                return -1
            ev.tok_off = nt[0]
            ev.ntokens = n
            nt[0] += n
        return 0
    if mp_next_is_nil(r):
        r.pos += 1
        return 0
    if f == F_PARENT:
        ev.has_parent = True
        return read_hash(r, &ev.parent)
    if f == F_BLOCK_SIZE or f == F_LORA_ID:
        if mp_read_int(r, &v, &neg):
            return -1
        if not neg and v > 0x7FFFFFFFFFFFFFFFULL:
            return mp_fail(r, MP_WRONG_TYPE)
        if f == F_BLOCK_SIZE:
            ev.has_block_size = True
            ev.block_size = <int64_t>v
        else:
            ev.has_lora_id = True
            ev.lora_id = <int64_t>v
        return 0
    if f == F_MEDIUM:
        return mp_read_str(r, &ev.medium, &ev.medium_len)
    if f == F_LORA_NAME:
        return mp_read_str(r, &ev.lora, &ev.lora_len)
    # F_EXTRA: keep the span; made into Python objects only when the event is applied
    start = r.pos
    if mp_peek(r) < 0 or not (0x90 <= r.buf[r.pos] <= 0x9F or r.buf[r.pos] == 0xDC or r.buf[r.pos] == 0xDD):
        return mp_fail(r, MP_WRONG_TYPE)
    if mp_skip(r, 2):
        return -1
    ev.extra_pos = start
    ev.extra_end = r.pos
    return 0


cdef int decode_event(MpReader *r, Event *ev, U64Scratch *hashes, Py_ssize_t *nh,
                      U64Scratch *tokens, Py_ssize_t *nt) noexcept nogil:
    """One event (array or map form) into ev; its hashes and token ids appended to the
    arrays. -1 with r.err set when it cannot be read."""
    cdef Py_ssize_t n, i
    cdef const unsigned char *key
    cdef Py_ssize_t klen
    cdef Field f
    cdef int t = mp_peek(r)
    memset(ev, 0, sizeof(Event))
    ev.nhashes = -1
    ev.ntokens = -1
    if t < 0:
        return -1
    if 0x90 <= t <= 0x9F or t == 0xDC or t == 0xDD:
        if mp_read_array(r, &n) or n < 1:
            return mp_fail(r, MP_WRONG_TYPE)
        ev.tag = read_tag(r)
        if r.err != MP_OK:
            return -1
        for i in range(n - 1):
            if ev.tag == TAG_STORED and i < 8:
                f = STORED_FIELDS[i]
            elif ev.tag == TAG_REMOVED and i < 2:
                f = REMOVED_FIELDS[i]
            else:
                f = F_SKIP
            if read_field(r, ev, f, hashes, nh, tokens, nt):
                return -1
        return 0
    if mp_read_map(r, &n):
        return -1
    for i in range(n):
        if mp_read_str(r, &key, &klen):
            return -1
        if klen == 4 and memcmp(key, b"type", 4) == 0:
            ev.tag = read_tag(r)
            if r.err != MP_OK:
                return -1
            continue
        if read_field(r, ev, map_field(key, klen), hashes, nh, tokens, nt):
            return -1
    return 0
