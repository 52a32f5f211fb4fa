# The block hasher: token ids -> chained block keys, exactly as vLLM names KV blocks
# (specs/block-hashing.md), plus kvcm's own decoupled 64-bit chain (DESIGN.md §2).
#
#   sha256             H = SHA-256(pickle5((parent_digest, tuple(tokens), extra)))
#   sha256_cbor        H = SHA-256(cbor([parent_digest, [tokens], extra]))
#   sha256_cbor_64bit  key = u64(SHA-256(cbor([parent_key, [tokens], extra])))   (vLLM 0.10.0-1)
#   kvcm               key = u64(SHA-256(cbor([parent_key, [tokens], extra]))), root from
#                      cbor([seed, None, namespace])
#   llmd_fnv64a        key = FNV-1a-64(cbor([parent_key, [tokens], extra])), root
#                      FNV-1a-64(cbor([FNV-1a-64(seed), None, namespace]))   (llm-d's keys)
#   llmd_fnv64a_nomodel  the same chain, root FNV-1a-64(seed)   (older llm-d)
#
# u64(d) = last 8 bytes of d, big-endian: what KV events carry. The llm-d algorithms take an
# unset seed as "" (llm-d's default), not vLLM's "vllm-none-hash"
# (specs/llmd-request-keys.md).

cdef enum Algo:
    ALGO_PICKLE = 0
    ALGO_CBOR = 1
    ALGO_CBOR_64 = 2
    ALGO_KVCM = 3
    ALGO_LLMD = 4
    ALGO_LLMD_NOMODEL = 5

ALGORITHMS = ("sha256", "sha256_cbor", "sha256_cbor_64bit", "kvcm", "llmd_fnv64a", "llmd_fnv64a_nomodel")
UNSET_SEED = "vllm-none-hash"  # vLLM >= 0.29's seed when PYTHONHASHSEED is unset

cdef enum:
    # Shorter chains (~120 µs at 0.12 µs a block) keep the GIL: a thread that drops it while
    # the ingest thread waits for it gets it back only after the ingest's turn and a wake-up
    # from the other CPU, which cost as much as hashing them did.
    NOGIL_MIN_BLOCKS = 1024

# Blocks without extra keys, of up to KVCM_CHAIN_MAX_TOKENS ids, are hashed by block_chain.h;
# the rest (extra keys, larger blocks, whose pickle may split frames) by the encoders here.
cdef extern from "block_chain.h":
    enum:
        KVCM_CHAIN_MAX_TOKENS
        KVCM_CHAIN_PICKLE
        KVCM_CHAIN_CBOR
        KVCM_CHAIN_CBOR_64
        KVCM_CHAIN_FNV_64
    int kvcm_chain(int kind, const uint64_t *tok, size_t nblocks, size_t n, unsigned char *parent,
                   uint64_t *keys_out, unsigned char *digests_out) nogil


cdef extern from "key_memo.h":
    enum: KVCM_MEMO_WAYS
    struct kvcm_memo:
        size_t sets
        size_t nstaged
        uint64_t hits, misses
    int kvcm_memo_init(kvcm_memo *m, size_t blocks, size_t n)
    void kvcm_memo_free(kvcm_memo *m)
    void kvcm_memo_enter_staged(kvcm_memo *m)
    int kvcm_memo_chain(kvcm_memo *m, int kind, const uint64_t *tok, size_t nblocks, size_t n,
                        unsigned char *parent, uint64_t *keys_out, unsigned char *digests_out) nogil


cdef class KeyMemo:
    """The keys of recently hashed blocks of `block_size` ids, for about `blocks` blocks
    (key_memo.h): a request whose prefix was hashed before is looked up instead of hashed.
    Exact - an entry is used only for the same chain kind, parent digest and ids - and
    shared by every BlockHasher of that block size. blocks 0, or blocks of more than 64 ids:
    off (hashing goes on without it)."""
    cdef kvcm_memo _m
    cdef bint _ready

    def __init__(self, size_t blocks, Py_ssize_t block_size):
        if block_size <= 0:
            raise ValueError("block_size must be positive, got %d" % block_size)
        if self._ready:     # another thread may be using the table: it stays as it is
            raise RuntimeError("a KeyMemo is initialised once")
        kvcm_memo_init(&self._m, blocks, <size_t>block_size)
        self._ready = True

    def __dealloc__(self):
        kvcm_memo_free(&self._m)

    @property
    def capacity(self):
        """Blocks it can hold (0: off)."""
        return self._m.sets * KVCM_MEMO_WAYS

    @property
    def hits(self):
        """Blocks whose key it gave."""
        return self._m.hits

    @property
    def misses(self):
        """Blocks it did not hold, hashed instead (a call enters the first 256)."""
        return self._m.misses

    @property
    def staged(self):
        """New blocks the last call built entries for, not yet in the table."""
        return self._m.nstaged

    def enter_staged(self):
        """Puts the last call's new blocks into the table now, for a caller that has sent
        its answer (else the next call does, before it looks anything up)."""
        kvcm_memo_enter_staged(&self._m)


cdef inline uint64_t digest_u64(const unsigned char *d, Py_ssize_t n) noexcept nogil:
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    for i in range(n - 8, n):
        v = (v << 8) | d[i]
    return v


cdef inline void u64_be(uint64_t v, unsigned char *out) noexcept nogil:
    cdef int i
    for i in range(8):
        out[7 - i] = (v >> (8 * i)) & 0xFF


cdef inline uint64_t fnv1a64(const unsigned char *data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ data[i]) * 0x100000001b3ULL
    return h


cdef uint64_t llmd_root(bint with_model, str seed, namespace) except? 0:
    seed_bytes = seed.encode("utf-8")
    cdef uint64_t seed_hash = fnv1a64(<const unsigned char *>PyBytes_AS_STRING(seed_bytes),
                                      PyBytes_GET_SIZE(seed_bytes))
    if not with_model:
        return seed_hash
    root = cbor_encode([seed_hash, None, namespace])
    return fnv1a64(<const unsigned char *>PyBytes_AS_STRING(root), PyBytes_GET_SIZE(root))


cdef class BlockHasher:
    """Chained block keys of full blocks of `block_size` tokens.

    `seed` is the engines' PYTHONHASHSEED as a string; None means unset, for which vLLM
    >= 0.29 uses "vllm-none-hash". `namespace` (model or LoRA name) only enters the `kvcm`
    algorithm's root.
    """
    cdef readonly str algo
    cdef readonly object seed
    cdef readonly Py_ssize_t block_size
    cdef readonly object namespace
    cdef Algo _algo
    cdef unsigned char _root[32]
    cdef Py_ssize_t _digest_len

    def __init__(self, str algo="sha256", seed=None, Py_ssize_t block_size=16, namespace=None):
        cdef unsigned char d[32]
        if algo not in ALGORITHMS:
            raise ValueError("unknown hash algorithm %r (expected one of %s)" % (algo, ", ".join(ALGORITHMS)))
        if block_size <= 0:
            raise ValueError("block_size must be positive, got %d" % block_size)
        if seed is not None and not isinstance(seed, str):
            raise TypeError("seed must be a str or None")
        self.algo = algo
        self.seed = seed
        self.block_size = block_size
        self.namespace = namespace
        self._algo = <Algo><int>ALGORITHMS.index(algo)
        if self._algo >= ALGO_LLMD:
            self._digest_len = 8
            u64_be(llmd_root(self._algo == ALGO_LLMD, "" if seed is None else seed, namespace), self._root)
            return
        seed_str = UNSET_SEED if seed is None else seed
        if self._algo == ALGO_PICKLE:
            root = pickle5_encode(seed_str)
        elif self._algo == ALGO_KVCM:
            root = cbor_encode([seed_str, None, namespace])
        else:
            root = cbor_encode(seed_str)
        kvcm_sha256(<const unsigned char *>PyBytes_AS_STRING(root), PyBytes_GET_SIZE(root), d)
        if self._algo >= ALGO_CBOR_64:
            self._digest_len = 8
            memcpy(self._root, d + 24, 8)  # 64-bit chains carry only the last 8 bytes
        else:
            self._digest_len = 32
            memcpy(self._root, d, 32)

    @property
    def root(self):
        """The parent of block 0: vLLM's NONE_HASH (32 bytes), or 8 bytes for 64-bit chains."""
        return PyBytes_FromStringAndSize(<char *>self._root, self._digest_len)

    def __repr__(self):
        return "BlockHasher(algo=%r, seed=%r, block_size=%d, namespace=%r)" % (
            self.algo, self.seed, self.block_size, self.namespace)

    cdef int _encode(self, WBuf *b, const unsigned char *parent, Py_ssize_t plen,
                     const uint64_t *tok, object extra) except -1:
        """Serialises one block's (parent, tokens, extra) into b (reset first)."""
        cdef Pickler p
        cdef Py_ssize_t n = self.block_size
        if self._algo == ALGO_PICKLE:
            pk_begin(&p, b)
            pk_boundary(&p)
            if (pk_save_bytes(&p, parent, plen) or pk_save_uint_tuple(&p, tok, n)):
                raise MemoryError()
            if extra is None:
                pk_boundary(&p)
                if pk_put_op(&p, 0x4E):
                    raise MemoryError()
            else:
                # memo indices 0 and 1 are the parent and the token tuple
                pk_save_obj(&p, extra, {}, 1)
            if pk_room(&p, 2):
                raise MemoryError()
            wb_put1(b, 0x87)  # TUPLE3
            pk_memoize(&p)
            if pk_end(&p):
                raise MemoryError()
        else:
            b.len = 0
            if wb_reserve(b, 10):
                raise MemoryError()
            wb_put1(b, 0x83)
            if self._algo == ALGO_CBOR:
                if cbor_put_bytes(b, parent, plen):
                    raise MemoryError()
            else:
                cbor_head(b, 0, digest_u64(parent, 8))
            if cbor_put_uints(b, tok, n):
                raise MemoryError()
            cbor_put_obj(b, extra, 1)
        return 0

    cdef inline uint64_t _digest(self, const WBuf *b, unsigned char *parent) noexcept nogil:
        """Hashes one serialised block: its digest becomes the next parent (digest_len
        bytes); returns its key."""
        cdef unsigned char d[32]
        cdef uint64_t key
        if self._algo >= ALGO_LLMD:
            key = fnv1a64(b.data, b.len)
            u64_be(key, parent)
            return key
        kvcm_sha256(b.data, b.len, d)
        memcpy(parent, d + 32 - self._digest_len, self._digest_len)
        return digest_u64(d, 32)

    cdef inline int _chain_kind(self) noexcept nogil:
        if self._algo == ALGO_PICKLE:
            return KVCM_CHAIN_PICKLE
        if self._algo == ALGO_CBOR:
            return KVCM_CHAIN_CBOR
        if self._algo >= ALGO_LLMD:
            return KVCM_CHAIN_FNV_64
        return KVCM_CHAIN_CBOR_64

    cdef int chain(self, const uint64_t *tok, Py_ssize_t nblocks, object extra_keys,
                   unsigned char *parent, uint64_t *keys_out, unsigned char *digests_out,
                   kvcm_memo *memo=NULL) except -1:
        """Hashes nblocks full blocks of tok. `parent` holds the starting parent digest
        (digest_len bytes) and ends as the last block's; digests_out (nblocks * digest_len
        bytes) may be NULL. extra_keys: None or a list/tuple, one entry per block (missing
        trailing entries are None). memo: looked up and filled for blocks without extra
        keys, or NULL."""
        cdef Py_ssize_t i, dl = self._digest_len
        cdef WBuf b
        cdef int rc
        if extra_keys is not None and not isinstance(extra_keys, (list, tuple)):
            raise TypeError("extra_keys must be a list with one entry per block (None or a tuple)")
        if (extra_keys is None or all(e is None for e in extra_keys[:nblocks])) and self.block_size <= KVCM_CHAIN_MAX_TOKENS:
            if nblocks >= NOGIL_MIN_BLOCKS:
                with nogil:
                    rc = kvcm_memo_chain(memo, self._chain_kind(), tok, nblocks, self.block_size, parent,
                                         keys_out, digests_out)
            else:
                rc = kvcm_memo_chain(memo, self._chain_kind(), tok, nblocks, self.block_size, parent,
                                     keys_out, digests_out)
            if rc:
                raise MemoryError()
            return 0
        wb_init(&b)
        try:
            for i in range(nblocks):
                extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
                self._encode(&b, parent, dl, tok + i * self.block_size, extra)
                keys_out[i] = self._digest(&b, parent)
                if digests_out != NULL:
                    memcpy(digests_out + i * dl, parent, dl)
        finally:
            wb_free(&b)
        return 0

    cdef inline void root_into(self, unsigned char *parent) noexcept:
        memcpy(parent, self._root, self._digest_len)

    cdef _run(self, tokens, extra_keys, parent, bint want_digests, KeyMemo memo):
        cdef U64s tok
        cdef Py_ssize_t nblocks, i, dl = self._digest_len
        cdef unsigned char par[32]
        cdef array keys
        cdef bytes digests = None
        if parent is None:
            self.root_into(par)
        else:
            self._set_parent(parent, par)
        load_u64s(tokens, &tok, "tokens")
        try:
            nblocks = tok.n // self.block_size
            keys = new_u64_array(nblocks)
            if want_digests:
                digests = PyBytes_FromStringAndSize(NULL, nblocks * dl)
            self.chain(tok.data, nblocks, extra_keys, par, <uint64_t *>keys.data.as_ulonglongs,
                       <unsigned char *>PyBytes_AS_STRING(digests) if want_digests else NULL,
                       NULL if memo is None else &memo._m)
        finally:
            u64s_free(&tok)
        if want_digests:
            return [digests[i * dl:(i + 1) * dl] for i in range(nblocks)]
        return keys

    cdef _set_parent(self, parent, unsigned char *par):
        if self._digest_len == 8 and type(parent) is int:
            if not 0 <= parent < 2 ** 64:
                raise ValueError("parent key must be in [0, 2**64)")
            for i in range(8):
                par[7 - i] = (parent >> (8 * i)) & 0xFF
            return
        if not isinstance(parent, bytes) or len(parent) != self._digest_len:
            raise ValueError("parent must be a %d-byte digest%s" % (
                self._digest_len, " or an int key" if self._digest_len == 8 else ""))
        memcpy(par, PyBytes_AS_STRING(parent), self._digest_len)

    def keys(self, tokens, extra_keys=None, parent=None, KeyMemo memo=None):
        """Keys (the uint64 vLLM publishes) of every full block, as array('Q').

        extra_keys: one entry per block, None or a tuple in vLLM's tagged form (missing
        trailing entries are None). parent: the digest (or, for 64-bit chains, the key) of
        the block before tokens[0], to continue a chain; None starts at the root. memo: a
        KeyMemo of this block size to look blocks up in and enter them into."""
        return self._run(tokens, extra_keys, parent, False, memo)

    def digests(self, tokens, extra_keys=None, parent=None, KeyMemo memo=None):
        """Full digests of every full block (32 bytes; 8 for the 64-bit chains)."""
        return self._run(tokens, extra_keys, parent, True, memo)
