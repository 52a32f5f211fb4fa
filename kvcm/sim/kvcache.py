"""The KV block pool of one simulated engine, with vLLM's prefix-cache semantics and events.

Like vLLM's BlockPool (vllm/v1/core/block_pool.py):

- `capacity` blocks of `block_size` tokens, each with a reference count. Free blocks wait in
  one queue, initially in id order; allocation takes the oldest free block, and a request's
  blocks go back at the tail in reverse order when it ends (its last block is evicted
  first). A free block keeps its hash and can be hit again until it is taken: eviction is
  LRU by release time.
- A full block is named by the chained hash of kvcm._core.BlockHasher, with vLLM >= 0.31's
  tagged extra keys: `("lora", name, path)` on every block of a LoRA request and
  `("cache_salt", salt)` on block 0. Partial blocks have no hash.
- A request reuses the longest cached prefix of its prompt (contiguous from block 0, at most
  up to the prompt's next-to-last token: as vLLM, the last prompt token is always computed,
  so a fully cached prompt reports one block less as a hit) and allocates the rest: the
  prompt's blocks at admission, a block per `block_size` output tokens as they are computed.
  Admission reserves every block the request will need, so decoding never runs out.
- Keys: with llm-d's `llmd_fnv64a` keys (as llm-d's simulator publishes them) a LoRA request
  is keyed in the LoRA's namespace and the base model in its served name's, without extra
  keys (see `Keying`).
- Events, as vLLM publishes them: one BlockStored per (request, step) for its newly full
  blocks (parent = the hash before the first of them, token ids, block size, LoRA id and
  name, medium GPU, the untagged extra keys, group 0); a BlockRemoved with one hash when a
  cached block is evicted; AllBlocksCleared on reset. They are vLLM >= 0.24's maps here;
  kvcm.sim.events writes them in the configured format.
- Eviction prefers, as llm-d's simulator does, the cached blocks of LoRA adapters that are
  not loaded (`loaded_loras`): the oldest of those goes before any other cached block.
- Disabled (`--enable-kvcache false`, or asleep after `discard()`): nothing is cached, hit,
  held or announced; requests get detached allocations.

One difference, on purpose: vLLM can hold two blocks with the same hash (two requests that
computed the same block) and announces the removal of either one, after which a consumer
believes the hash gone although the other copy is still cached. Here BlockRemoved is sent
when the last block holding a hash is evicted, so a consumer's view always equals `contents()`.
"""

import collections
import itertools

from kvcm._core import BlockHasher
from kvcm.publisher import all_blocks_cleared, block_removed, block_stored

MEDIUM = "GPU"
KV_CACHE_SPEC_KIND = "full_attention"   # what vLLM >= 0.22 stamps on a plain model's BlockStored
LLMD_ALGORITHMS = ("llmd_fnv64a", "llmd_fnv64a_nomodel")
_NAMESPACES = 256    # llm-d keyers kept (one per served name or LoRA)


class Keying:
    """How a request's blocks are named. vLLM's algorithms: one chain for every request (kvcm's
    own algorithm in the model's namespace), the LoRA (`("lora", name, path)`) and the cache
    salt in the tagged extra keys. llm-d's keys: a chain per model namespace (`served_name`,
    or the LoRA's name), no extra keys."""

    def __init__(self, algo, seed, block_size, model, served_name=None):
        self.llmd = algo in LLMD_ALGORITHMS
        self.algo, self.seed, self.block_size = algo, seed, block_size
        self.base_name = served_name or model
        self._hashers = collections.OrderedDict()
        self._single = None if self.llmd else BlockHasher(algo, seed, block_size, namespace=model)

    def hasher(self, lora):
        if self._single is not None:
            return self._single
        namespace = self.base_name if lora is None else lora.name
        hasher = self._hashers.get(namespace)
        if hasher is None:
            hasher = self._hashers[namespace] = BlockHasher(self.algo, self.seed, self.block_size, namespace=namespace)
            if len(self._hashers) > _NAMESPACES:
                self._hashers.popitem(last=False)
        return hasher

    def extra_keys(self, blocks, lora, cache_salt, first=0):
        """vLLM >= 0.31's tagged extra keys of `blocks` blocks starting at block `first` (the
        salt only on block 0); None when none has any."""
        if self.llmd or (lora is None and cache_salt is None):
            return None
        lora_key = ("lora", lora.name, lora.path) if lora is not None else None
        keys = []
        for i in range(first, first + blocks):
            items = tuple(k for k in (lora_key, ("cache_salt", cache_salt) if i == 0 and cache_salt is not None
                                      else None) if k is not None)
            keys.append(items or None)
        return keys

    def published_extra(self, lora, cache_salt, index):
        """A block's extra keys as events carry them (untagged)."""
        if self.llmd:
            return None
        return [x for x in (lora.name if lora is not None else None, cache_salt if index == 0 else None)
                if x is not None] or None


class Lora:
    """A loaded LoRA adapter: vLLM's lora_int_id, name and path (the path is hashed, never
    published)."""

    __slots__ = ("id", "name", "path")

    def __init__(self, lora_id, name, path):
        self.id = lora_id
        self.name = name
        self.path = path

    def __repr__(self):
        return "Lora(%d, %r, %r)" % (self.id, self.name, self.path)


class _Block:
    __slots__ = ("id", "ref", "digest", "hash", "parent", "tokens", "lora", "extra", "released")

    def __init__(self, block_id):
        self.id = block_id
        self.ref = 0
        self.released = 0
        self._forget()

    def _forget(self):
        self.digest = None     # full digest: the cache key and the parent of the next block
        self.hash = None       # the uint64 events carry
        self.parent = None
        self.tokens = ()
        self.lora = None
        self.extra = None


class Allocation:
    """The blocks one request holds, in token order, and what is needed to extend them. A
    detached allocation (the cache is disabled) holds nothing; one made before `discard()`
    keeps its blocks until freed but names no more of them."""

    __slots__ = ("blocks", "tokens", "digests", "hasher", "lora", "cache_salt", "reserved", "hit_tokens", "epoch")

    def __init__(self, tokens, digests, hasher, lora, cache_salt, epoch):
        self.blocks = []
        self.tokens = tokens          # every token whose KV the blocks hold (prompt, then output)
        self.digests = digests        # of the full blocks
        self.hasher = hasher
        self.lora = lora
        self.cache_salt = cache_salt
        self.reserved = 0             # blocks promised for the output still to come
        self.hit_tokens = 0           # prompt tokens found in the cache at admission
        self.epoch = epoch            # None: detached


class KVCache:
    """One rank's block pool. `on_events()` is called when events become pending;
    `take_events()` returns them (the engine publishes them). `loaded_loras` (a set of
    adapter names, or None: every adapter counts as loaded) steers eviction."""

    def __init__(self, capacity, keying, *, enabled=True, on_events=None, loaded_loras=None):
        if capacity < 1:
            raise ValueError("the KV cache needs at least one block")
        self.capacity = capacity
        self.keying = keying
        self.block_size = keying.block_size
        self.enabled = enabled
        self.on_events = on_events
        self.loaded_loras = loaded_loras
        self._blocks = [_Block(i) for i in range(capacity)]
        self._free = dict.fromkeys(self._blocks)   # insertion-ordered: the free queue
        self._free_lora = {}                       # adapter -> its cached free blocks, in queue order
        self._cached = {}                          # digest -> [blocks holding it]
        self._reserved = 0
        self._stamps = itertools.count(1)
        self._epoch = 0
        self._events = []
        self.queries = 0    # prompt tokens looked up (vllm:prefix_cache_queries)
        self.hits = 0       # of which were cached (vllm:prefix_cache_hits)

    # -- sizes ------------------------------------------------------------------------------

    def blocks_for(self, positions):
        """Blocks needed to hold the KV of `positions` tokens."""
        return -(-positions // self.block_size)

    @property
    def used(self):
        """Blocks referenced by running requests."""
        return self.capacity - len(self._free)

    @property
    def usage(self):
        """vllm:kv_cache_usage_perc: the share of blocks in use."""
        return self.used / self.capacity

    @property
    def available(self):
        """Blocks a new request may take: free ones not promised to running requests."""
        return len(self._free) - self._reserved

    # -- requests ---------------------------------------------------------------------------

    def allocate(self, prompt, positions, *, lora=None, cache_salt=None):
        """Admits a request whose KV will span `positions` tokens (the prompt plus every output
        token but the last): reuses the longest cached prefix, allocates the prompt's other
        blocks, stores its full ones and reserves the rest. None when the free blocks do not
        suffice now (the request waits); ValueError when it can never fit."""
        if not self.enabled:
            return Allocation(list(prompt), [], None, lora, cache_salt, None)
        need = self.blocks_for(max(positions, len(prompt)))
        if need > self.capacity:
            raise ValueError("the request needs %d KV cache blocks of %d tokens but the cache has %d"
                             % (need, self.block_size, self.capacity))
        bs = self.block_size
        hasher = self.keying.hasher(lora)
        digests = list(hasher.digests(prompt, self.keying.extra_keys(len(prompt) // bs, lora, cache_salt)))
        prefix = []
        for digest in digests[:max(len(prompt) - 1, 0) // bs]:
            holders = self._cached.get(digest)
            if not holders:
                break
            prefix.append(holders[0])
        taken = need - len(prefix) + sum(1 for block in prefix if not block.ref)
        if taken > self.available:
            return None
        alloc = Allocation(list(prompt), digests, hasher, lora, cache_salt, self._epoch)
        for block in prefix:
            if not block.ref:
                self._unfree(block)
            block.ref += 1
        alloc.blocks = prefix + [self._take() for _ in range(self.blocks_for(len(prompt)) - len(prefix))]
        self._store(alloc, len(prefix), len(digests))
        alloc.reserved = need - len(alloc.blocks)
        self._reserved += alloc.reserved
        alloc.hit_tokens = len(prefix) * bs
        self.queries += len(prompt)
        self.hits += alloc.hit_tokens
        return alloc

    def append(self, alloc, token):
        """One more token's KV computed (an output token): a new block when it starts one,
        a BlockStored when it fills one."""
        if alloc.epoch is None:
            return
        alloc.tokens.append(token)
        position = len(alloc.tokens) - 1
        bs = self.block_size
        if position // bs == len(alloc.blocks):
            if not alloc.reserved:
                raise RuntimeError("request outgrew its KV reservation")
            alloc.reserved -= 1
            self._reserved -= 1
            alloc.blocks.append(self._take())
        if (position + 1) % bs == 0 and alloc.epoch == self._epoch:
            index = position // bs
            parent = alloc.digests[index - 1] if index else None
            extra = self.keying.extra_keys(1, alloc.lora, alloc.cache_salt, first=index)
            alloc.digests.extend(alloc.hasher.digests(alloc.tokens[index * bs:], extra, parent))
            self._store(alloc, index, index + 1)

    def free(self, alloc):
        """The request ended: its blocks go to the free queue's tail, last block first."""
        self._reserved -= alloc.reserved
        alloc.reserved = 0
        for block in reversed(alloc.blocks):
            block.ref -= 1
            if not block.ref:
                self._release(block)
        alloc.blocks = []

    def reset(self):
        """Forgets every cached block (POST /reset_prefix_cache). False, and nothing changes,
        while requests hold blocks (vLLM refuses then too)."""
        if self.used:
            return False
        self._forget_all()
        return True

    def discard(self):
        """Sleep: forgets every cached block, even those running requests hold (they keep
        the blocks until they end, but name no more), and disables the cache."""
        self._forget_all()
        self._epoch += 1
        self.enabled = False

    def activate(self):
        """Wake up: the cache works again (empty)."""
        self.enabled = True

    def _forget_all(self):
        for block in self._blocks:
            block._forget()
        self._cached.clear()
        self._free_lora.clear()
        self._emit(all_blocks_cleared())

    # -- events -----------------------------------------------------------------------------

    def take_events(self):
        events, self._events = self._events, []
        return events

    def _emit(self, event):
        self._events.append(event)
        if len(self._events) == 1 and self.on_events is not None:
            self.on_events()

    # -- inspection -------------------------------------------------------------------------

    def contents(self):
        """Every cached hash, once: `{"hash", "parent", "token_ids", "lora_name", "extra_keys"
        (untagged, as published), "ref_cnt"}` (parent: the hash of the block before, which
        may have been evicted since)."""
        out = []
        for holders in self._cached.values():
            block = holders[0]
            out.append({"hash": block.hash, "parent": block.parent, "token_ids": list(block.tokens),
                        "lora_name": block.lora, "extra_keys": block.extra,
                        "ref_cnt": sum(b.ref for b in holders)})
        return out

    def eviction_order(self):
        """Hashes of the cached free blocks, next to be evicted first."""
        first = sorted(self._evictable(), key=lambda b: b.released)
        rest = [b for b in self._free if b.digest is not None and b not in set(first)]
        return [b.hash for b in first + rest]

    # -- internals --------------------------------------------------------------------------

    def _evictable(self):
        """The cached free blocks of adapters that are not loaded (evicted first)."""
        loaded = self.loaded_loras
        if loaded is None:
            return []
        return [b for name, blocks in self._free_lora.items() if name not in loaded for b in blocks]

    def _release(self, block):
        block.released = next(self._stamps)
        self._free[block] = None
        if block.digest is not None and block.lora is not None:
            self._free_lora.setdefault(block.lora, {})[block] = None

    def _unfree(self, block):
        del self._free[block]
        blocks = self._free_lora.get(block.lora)
        if blocks is not None and block in blocks:
            del blocks[block]
            if not blocks:
                del self._free_lora[block.lora]

    def _victim(self):
        """The free block to take: the queue's head when it caches nothing, else the oldest
        cached block of an adapter that is not loaded, else the head."""
        head = next(iter(self._free))
        if head.digest is None or self.loaded_loras is None:
            return head
        oldest = None
        for name, blocks in self._free_lora.items():
            if name not in self.loaded_loras:
                first = next(iter(blocks))
                if oldest is None or first.released < oldest.released:
                    oldest = first
        return head if oldest is None else oldest

    def _take(self):
        """A free block, evicting what it caches."""
        block = self._victim()
        self._unfree(block)
        if block.digest is not None:
            holders = self._cached[block.digest]
            holders.remove(block)
            if not holders:
                del self._cached[block.digest]
                self._emit(block_removed([block.hash], medium=MEDIUM, group_idx=0))
            block._forget()
        block.ref = 1
        return block

    def _store(self, alloc, start, end):
        """Names blocks start..end-1 of alloc (newly full) and announces them."""
        if start >= end:
            return
        bs = self.block_size
        lora = alloc.lora
        hashes, extras = [], []
        for i in range(start, end):
            block = alloc.blocks[i]
            digest = alloc.digests[i]
            block.digest = digest
            block.hash = int.from_bytes(digest[-8:], "big")
            block.parent = alloc.blocks[i - 1].hash if i else None
            block.tokens = tuple(alloc.tokens[i * bs:(i + 1) * bs])
            block.lora = lora.name if lora is not None else None
            block.extra = self.keying.published_extra(lora, alloc.cache_salt, i)
            self._cached.setdefault(digest, []).append(block)
            hashes.append(block.hash)
            extras.append(block.extra)
        self._emit(block_stored(
            hashes, alloc.blocks[start - 1].hash if start else None, alloc.tokens[start * bs:end * bs], bs,
            lora_id=lora.id if lora is not None else None, medium=MEDIUM,
            lora_name=lora.name if lora is not None else None, extra_keys=extras, group_idx=0,
            kv_cache_spec_kind=KV_CACHE_SPEC_KIND))
