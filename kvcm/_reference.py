"""The pure-Python twin of kvcm._core: the same functions and classes, written to be obviously
correct rather than fast (hashlib, pickle, dicts). Tests run every case against both.

Nothing here is used by the service.
"""

import hashlib
import pickle
import struct
from array import array
from collections import OrderedDict

ALGORITHMS = ("sha256", "sha256_cbor", "sha256_cbor_64bit", "kvcm", "llmd_fnv64a", "llmd_fnv64a_nomodel")
UNSET_SEED = "vllm-none-hash"
DEFAULT_MAX_BLOCKS = 10_000_000
DEFAULT_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}
MAX_TIERS = 16
MAX_NAMESPACES = 0xFFFF
MAX_KEYS_PER_ENGINE_HASH = 64
DUMP_BLOCKS = 1
_DUMP_ENGINE_MAP = (2, 3, 4)
_BLOCK_HEAD = struct.Struct("<QHH")   # key, namespace id, holder count; then u32 pod << 4 | tier


def _u64s(values, what):
    """The ints of values, checked as the core checks them."""
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError("%s: position %d is %s, not an int" % (what, i, type(v).__name__))
        if not 0 <= v < 2 ** 64:
            raise ValueError("%s: value %d at position %d is outside [0, 2**64)" % (what, v, i))
        out.append(int(v))
    return out


def sha256(data):
    return hashlib.sha256(bytes(data)).digest()


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for byte in bytes(data):
        h = ((h ^ byte) * 0x100000001b3) % 2 ** 64
    return h


# ---- encoders ------------------------------------------------------------------------------

def _cbor_head(major, value):
    if value < 24:
        return bytes([major << 5 | value])
    for extra, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([major << 5 | extra]) + value.to_bytes(width, "big")
    raise OverflowError("cbor_encode: int out of range")


def cbor_encode(obj):
    """Canonical (RFC 8949 deterministic) CBOR of None, bool, int in [-2**64, 2**64), bytes,
    str, tuple and list."""
    if obj is None:
        return b"\xf6"
    if obj is True:
        return b"\xf5"
    if obj is False:
        return b"\xf4"
    if type(obj) is int:
        if obj >= 0:
            return _cbor_head(0, obj)
        return _cbor_head(1, -1 - obj)
    if type(obj) is bytes:
        return _cbor_head(2, len(obj)) + obj
    if type(obj) is str:
        data = obj.encode("utf-8")
        return _cbor_head(3, len(data)) + data
    if type(obj) in (tuple, list):
        return _cbor_head(4, len(obj)) + b"".join(cbor_encode(x) for x in obj)
    raise TypeError("cbor_encode: unsupported type %s" % type(obj).__name__)


def _check_pickle_types(obj):
    if obj is None or type(obj) in (bool, int, bytes, str):
        return
    if type(obj) is tuple:
        for x in obj:
            _check_pickle_types(x)
        return
    raise TypeError("pickle5_encode: unsupported type %s" % type(obj).__name__)


def pickle5_encode(obj):
    """pickle.dumps(obj, protocol=5) for None, bool, int, bytes, str and tuple."""
    _check_pickle_types(obj)
    return pickle.dumps(obj, protocol=5)


# ---- block hasher --------------------------------------------------------------------------

def _u64(digest):
    return int.from_bytes(digest[-8:], "big")


MEMO_MAX_TOKENS = 64
MEMO_MAX_NEW = 256    # blocks one call enters at most
MEMO_WAYS = 8          # entries per set of the core's table: its capacity is a multiple of it


class KeyMemo:
    """The core's KeyMemo: digests of recent blocks by (algorithm, parent, ids), least
    recently used first out (the core's table is 8-way set-associative: which entries it
    keeps differs, never what an entry gives)."""

    def __init__(self, blocks, block_size):
        if block_size <= 0:
            raise ValueError("block_size must be positive, got %d" % block_size)
        sets = 1
        while MEMO_WAYS * sets < blocks:
            sets <<= 1
        self.block_size = block_size
        self.capacity = MEMO_WAYS * sets if blocks and block_size <= MEMO_MAX_TOKENS else 0
        self.hits = self.misses = 0
        self._entries = OrderedDict()
        self._staged = []

    @property
    def staged(self):
        return len(self._staged)

    def enter_staged(self):
        """Puts the last call's new blocks into the table (the next call does, else)."""
        for name, digest in self._staged:
            self._entries[name] = digest
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._staged = []

    def chain(self):
        """A call's view of the memo: it stages at most MEMO_MAX_NEW new blocks."""
        self.enter_staged()
        return _MemoCall(self)


class _MemoCall:
    def __init__(self, memo):
        self.memo, self.entered = memo, 0

    def digest(self, algo, parent, tokens, compute):
        """The block's digest from the memo, else compute(), staged while the call may."""
        memo = self.memo
        name = (algo, parent, tuple(tokens))
        if name in memo._entries:
            memo._entries.move_to_end(name)
            memo.hits += 1
            return memo._entries[name]
        memo.misses += 1
        digest = compute()
        if self.entered < MEMO_MAX_NEW:
            self.entered += 1
            if max(tokens, default=0) < 2 ** 32:       # entries keep 32-bit ids
                memo._staged.append((name, digest))
        return digest


class BlockHasher:
    def __init__(self, algo="sha256", seed=None, block_size=16, namespace=None):
        if algo not in ALGORITHMS:
            raise ValueError("unknown hash algorithm %r" % (algo,))
        if block_size <= 0:
            raise ValueError("block_size must be positive, got %d" % block_size)
        if seed is not None and not isinstance(seed, str):
            raise TypeError("seed must be a str or None")
        self.algo, self.seed, self.block_size, self.namespace = algo, seed, block_size, namespace
        if algo.startswith("llmd_"):
            # llm-d's keys: an unset seed is "", and the key is the whole FNV value
            root = fnv1a64((seed or "").encode("utf-8"))
            if algo == "llmd_fnv64a":
                root = fnv1a64(cbor_encode([root, None, namespace]))
            self._root = root.to_bytes(8, "big")
            return
        seed_str = UNSET_SEED if seed is None else seed
        if algo == "sha256":
            self._root = sha256(pickle.dumps(seed_str, protocol=5))
        elif algo == "sha256_cbor":
            self._root = sha256(cbor_encode(seed_str))
        elif algo == "sha256_cbor_64bit":
            self._root = sha256(cbor_encode(seed_str))[-8:]
        else:
            self._root = sha256(cbor_encode([seed_str, None, namespace]))[-8:]

    @property
    def root(self):
        return self._root

    def _block_digest(self, parent, tokens, extra):
        if self.algo == "sha256":
            return sha256(pickle5_encode((parent, tuple(tokens), extra)))
        if self.algo == "sha256_cbor":
            return sha256(cbor_encode((parent, tuple(tokens), extra)))
        if self.algo.startswith("llmd_"):
            return fnv1a64(cbor_encode((_u64(parent), tuple(tokens), extra))).to_bytes(8, "big")
        return sha256(cbor_encode((_u64(parent), tuple(tokens), extra)))[-8:]

    def digests(self, tokens, extra_keys=None, parent=None, memo=None):
        tokens = _u64s(tokens, "tokens")
        dl = len(self._root)
        if parent is None:
            parent = self._root
        elif dl == 8 and type(parent) is int:
            if not 0 <= parent < 2 ** 64:
                raise ValueError("parent key must be in [0, 2**64)")
            parent = parent.to_bytes(8, "big")
        elif not isinstance(parent, bytes) or len(parent) != dl:
            raise ValueError("parent must be a %d-byte digest" % dl)
        # like the core's, a memo serves SHA-256 chains of blocks without extra keys only
        if (memo is None or not memo.capacity or memo.block_size != self.block_size or self.algo.startswith("llmd_")
                or any(e is not None for e in (extra_keys or ()))):
            memo = None
        call = None if memo is None or len(tokens) < self.block_size else memo.chain()
        out = []
        for i in range(len(tokens) // self.block_size):
            extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
            block = tokens[i * self.block_size:(i + 1) * self.block_size]
            if memo is None:
                parent = self._block_digest(parent, block, extra)
            else:
                parent = call.digest(self.algo, parent, block,
                                     lambda parent=parent, block=block: self._block_digest(parent, block, None))
            out.append(parent)
        return out

    def keys(self, tokens, extra_keys=None, parent=None, memo=None):
        return array("Q", [_u64(d) for d in self.digests(tokens, extra_keys, parent, memo)])


# ---- index ---------------------------------------------------------------------------------

class Index:
    """Same semantics as kvcm._core.Index: exact LRU over distinct blocks (a store touches
    every block it names, a lookup the blocks it matched), set semantics per (pod, tier)."""

    def __init__(self, max_blocks=DEFAULT_MAX_BLOCKS, max_namespaces=MAX_NAMESPACES):
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        if not 2 <= max_namespaces <= MAX_NAMESPACES:
            raise ValueError("max_namespaces must be between 2 and %d" % MAX_NAMESPACES)
        self.capacity = max_blocks
        self._blocks = OrderedDict()  # (ns, key) -> set of (pod, tier); last = most recent
        self._tiers = []
        self._namespaces = set()
        self._max_namespaces = max_namespaces
        self._engine = _ReferenceEngineMap(max_blocks)
        self.evictions = 0

    @property
    def tiers(self):
        return tuple(self._tiers)

    @property
    def namespaces(self):
        return len(self._namespaces), self._max_namespaces

    def __len__(self):
        return len(self._blocks)

    def _intern_namespace(self, ns):
        if ns not in self._namespaces:
            if len(self._namespaces) >= self._max_namespaces:
                raise ValueError("too many distinct namespace names")
            self._namespaces.add(ns)

    def _intern_tier(self, tier):
        if tier not in self._tiers:
            if len(self._tiers) >= MAX_TIERS:
                raise ValueError("too many distinct tier names")
            self._tiers.append(tier)

    def store(self, ns, pod, tier, keys):
        keys = _u64s(keys, "keys")
        self._intern_namespace(ns)
        self._intern_tier(tier)
        added = 0
        for key in keys:
            block = (ns, key)
            if block in self._blocks:
                self._blocks.move_to_end(block)
            else:
                if len(self._blocks) >= self.capacity:
                    self._blocks.popitem(last=False)
                    self.evictions += 1
                self._blocks[block] = set()
            if (pod, tier) not in self._blocks[block]:
                self._blocks[block].add((pod, tier))
                added += 1
        return added

    def remove(self, ns, pod, tier, keys):
        removed = 0
        for key in _u64s(keys, "keys"):
            holders = self._blocks.get((ns, key))
            if holders and (pod, tier) in holders:
                holders.discard((pod, tier))
                removed += 1
                if not holders:
                    del self._blocks[(ns, key)]
        return removed

    def clear_pod(self, pod, tier=None, ns=None):
        removed = 0
        for block in list(self._blocks):
            if ns is not None and block[0] != ns:
                continue
            holders = self._blocks[block]
            for entry in [e for e in holders if e[0] == pod and (tier is None or e[1] == tier)]:
                holders.discard(entry)
                removed += 1
            if not holders:
                del self._blocks[block]
        return removed

    def clear_namespace(self, ns):
        self._engine.clear_namespace(ns)
        removed = 0
        for block in [b for b in self._blocks if b[0] == ns]:
            removed += len(self._blocks.pop(block))
        return removed

    def forget_namespaces(self, names):
        removed = 0
        for ns in set(names) & self._namespaces:
            removed += self.clear_namespace(ns)
            self._namespaces.discard(ns)
        return removed

    def _walk(self, ns, keys, pods, weight):
        matches = {}  # pod -> [score, blocks, {tier: n}]
        keys = _u64s(keys, "keys")
        for i, key in enumerate(keys):
            holders = self._blocks.get((ns, key))
            if not holders:
                break
            held = {}  # pod -> tiers held on this block
            for pod, tier in holders:
                if i == 0 and (pods is None or pod in pods):
                    matches.setdefault(pod, [0.0, 0, {}])
                if pod in matches and matches[pod][1] == i:
                    held.setdefault(pod, []).append(tier)
            if not held:
                break
            self._blocks.move_to_end((ns, key))
            for pod, tiers in held.items():
                m = matches[pod]
                m[0] += max(weight(t) for t in tiers)
                m[1] += 1
                for t in tiers:
                    m[2][t] = m[2].get(t, 0) + 1
        return matches

    def lookup_prefix(self, ns, keys, pods=None):
        return {pod: (m[1], m[2]) for pod, m in self._walk(ns, keys, pods, lambda t: 1.0).items()}

    def pod_blocks(self, pod):
        counts = {}
        for holders in self._blocks.values():
            for p, tier in holders:
                if p == pod:
                    counts[tier] = counts.get(tier, 0) + 1
        return counts

    def stats(self):
        pods = {}
        for holders in self._blocks.values():
            for pod, tier in holders:
                pods.setdefault(pod, {}).setdefault(tier, 0)
                pods[pod][tier] += 1
        return {
            "blocks": len(self._blocks),
            "entries": sum(len(h) for h in self._blocks.values()),
            "capacity": self.capacity,
            "evictions": self.evictions,
            "engine_map_entries": self._engine.count(),
            "pods": pods,
        }

    def map_engine(self, ns, engine_hashes, keys):
        engine_hashes, keys = _u64s(engine_hashes, "engine_hashes"), _u64s(keys, "keys")
        self._intern_namespace(ns)
        if not engine_hashes:
            if keys:
                raise ValueError("keys given without engine hashes")
            return
        if not keys or len(keys) % len(engine_hashes):
            raise ValueError("len(keys) must be a positive multiple of len(engine_hashes)")
        per = len(keys) // len(engine_hashes)
        if per > MAX_KEYS_PER_ENGINE_HASH:
            raise ValueError("more than %d keys per engine hash" % MAX_KEYS_PER_ENGINE_HASH)
        for i, e in enumerate(engine_hashes):
            self._engine.set(ns, e, tuple(keys[i * per:(i + 1) * per]))

    def resolve(self, ns, engine_hashes):
        return [self._engine.get(ns, e) for e in _u64s(engine_hashes, "engine_hashes")]

    def dump(self):
        """Same chunk format for blocks as the core (ids numbered here in order of first
        use), all at once; the engine map goes in the tables as plain values."""
        return _ReferenceDump(self)

    def load(self, tables, chunks):
        if self._blocks or self._namespaces:
            raise ValueError("a dump loads into an empty index only")
        namespaces, pods, tiers = (tables.get(t) for t in ("namespaces", "pods", "tiers"))
        if not all(isinstance(names, list) for names in (namespaces, pods, tiers)):
            raise ValueError("malformed dump: the name tables are not lists")
        try:
            for kind, data in chunks:
                if kind in _DUMP_ENGINE_MAP:   # the core's raw engine map: its own to read
                    continue
                if kind != DUMP_BLOCKS:
                    raise ValueError("unknown chunk kind %r" % (kind,))
                at = 0
                while at < len(data):
                    key, ns, n = _BLOCK_HEAD.unpack_from(data, at)
                    at += _BLOCK_HEAD.size
                    for (pod_tier,) in struct.iter_unpack("<I", data[at:at + 4 * n]):
                        self.store(namespaces[ns], pods[pod_tier >> 4], tiers[pod_tier & 15], [key])
                    at += 4 * n
            for gen, entries in (("old", tables.get("reference_engine_map_old", [])),
                                 ("young", tables.get("reference_engine_map_young", []))):
                for ns, epoch, ehash, keys in entries:
                    self._intern_namespace(ns)
                    getattr(self._engine, gen)[(ns, epoch, ehash)] = tuple(keys)
            self._engine.epochs = dict(tables.get("reference_engine_map_epochs", {}))
        except (struct.error, IndexError, TypeError, ValueError) as exc:
            self.__init__(self.capacity, self._max_namespaces)
            raise ValueError("malformed dump: %s" % exc) from None


class _ReferenceDump:
    def __init__(self, index):
        self._index = index
        self._names = {"namespaces": {}, "pods": {}, "tiers": {}}
        self._records = list(index._blocks.items())   # oldest first
        self._done = False

    def _id(self, table, name):
        return self._names[table].setdefault(name, len(self._names[table]))

    def next(self, max_items=65536):
        if not self._records:
            return None
        out = bytearray()
        for (ns, key), holders in self._records[:max_items]:
            ordered = sorted(holders)
            out += _BLOCK_HEAD.pack(key, self._id("namespaces", ns), len(ordered))
            for pod, tier in ordered:
                out += struct.pack("<I", self._id("pods", pod) << 4 | self._id("tiers", tier))
        del self._records[:max_items]
        return DUMP_BLOCKS, bytes(out)

    def close(self):
        self._records = []

    def tables(self):
        engine = self._index._engine
        return {
            **{table: list(names) for table, names in self._names.items()},
            "reference_engine_map_young": [[*entry, list(keys)] for entry, keys in engine.young.items()],
            "reference_engine_map_old": [[*entry, list(keys)] for entry, keys in engine.old.items()],
            "reference_engine_map_epochs": dict(engine.epochs),
            "blocks": len(self._index._blocks),
        }


class _ReferenceEngineMap:
    """Two generations: inserts go to the young dict; when it holds gen_cap entries the old
    one is dropped and the young one becomes old; a hit in the old one is copied forward.
    Counted in keys, as the C map counts entries. Clearing a namespace starts a new epoch
    for it: its old entries stop resolving but stay counted until their generation goes."""

    def __init__(self, capacity):
        self.gen_cap = max(capacity // 2, 512)
        self.young, self.old = {}, {}
        self.epochs = {}

    def _size(self, gen):
        return sum(len(v) for v in gen.values())

    def _id(self, ns, ehash):
        return (ns, self.epochs.get(ns, 0), ehash)

    def set(self, ns, ehash, keys):
        entry = self._id(ns, ehash)
        self.young.pop(entry, None)
        self.old.pop(entry, None)
        if self._size(self.young) >= self.gen_cap:
            self.old, self.young = self.young, {}
        self.young[entry] = keys

    def get(self, ns, ehash):
        entry = self._id(ns, ehash)
        if entry in self.young:
            return self.young[entry]
        keys = self.old.get(entry, ())
        if keys:
            self.set(ns, ehash, keys)
        return keys

    def count(self):
        return self._size(self.young) + self._size(self.old)

    def clear_namespace(self, ns):
        self.epochs[ns] = self.epochs.get(ns, 0) + 1


class Scorer:
    def __init__(self, weights=None, default_weight=1.0):
        self._weights = dict(DEFAULT_TIER_WEIGHTS if weights is None else weights)
        for name, w in list(self._weights.items()) + [("default", default_weight)]:
            if not isinstance(name, str) or not float(w) >= 0.0:
                raise ValueError("tier weight %r=%r must be a non-negative number" % (name, w))
        self.default_weight = float(default_weight)

    @property
    def weights(self):
        return dict(self._weights)

    def _weight(self, tier):
        return self._weights.get(tier, self.default_weight)

    def score(self, index, ns, keys, pods=None):
        return {pod: m[0] for pod, m in index._walk(ns, keys, pods, self._weight).items()}

    def score_detailed(self, index, ns, keys, pods=None):
        return {pod: (m[0], m[1], m[2]) for pod, m in index._walk(ns, keys, pods, self._weight).items()}


__all__ = ["ALGORITHMS", "UNSET_SEED", "sha256", "cbor_encode", "pickle5_encode", "BlockHasher",
           "Index", "Scorer"]
