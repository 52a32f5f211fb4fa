"""What llm-d-inference-sim (the Go simulator, >= 0.8) publishes, written independently of
kvcm: llm-d's request keys from cbor2 and a plain FNV-1a-64 (specs/llmd-request-keys.md), its
KV events byte for byte as Go's msgpack (vmihailenco/msgpack v5) encodes its structs, and its
transport habits.

- Keys: FNV-1a-64 over canonical CBOR `[parent, [tokens], null]`, the root salted with the
  name the request was served as (the first served alias, or the LoRA adapter's name).
- Array format (the simulator's default): every struct field written, as arrays ignore
  `omitempty`: BlockStored has 9 elements and carries 0, not nil, as the parent of a chain's
  first block; BlockRemoved 3, AllBlocksCleared 1. Map format: nil parents, and the
  `omitempty` fields left out when unset.
- Integers as Go's types encode them: block hashes and parents as fixed-width uint64 (0xcf),
  token ids as uint32 (0xce), the block size and DP rank in the shortest form, the timestamp
  as a float64.
- Topic `kv@<ip>:<port>@<model>` (older versions: `kv@<ip>@<model>`), `<model>` the base
  `--model` even when requests are served under an alias; seq numbers from 1.
- Events are batched and flushed when `max_batch` are pending or by a 1 s timer; a request
  stores only the blocks its prompt does not share with what is cached (parent: the last
  cached block), and evicting publishes one BlockRemoved per block.
"""

import threading
import time

import cbor2
import zmq

from eventgen import Raw, pack, uint

FLUSH_SECONDS = 1.0


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _cbor(value):
    return cbor2.dumps(value, canonical=True)


def llmd_root(seed="", model=None, with_model=True):
    """The parent of block 0: FNV64a(CBOR([FNV64a(seed), null, model])), or FNV64a(seed)
    for the older, unsalted keys."""
    root = fnv1a64(seed.encode("utf-8"))
    return fnv1a64(_cbor([root, None, model])) if with_model else root


def llmd_chain(parent, tokens, block_size, extra_keys=None):
    """The keys of every full block of tokens, chained from `parent`."""
    keys = []
    for i in range(len(tokens) // block_size):
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        parent = fnv1a64(_cbor([parent, list(tokens[i * block_size:(i + 1) * block_size]), extra]))
        keys.append(parent)
    return keys


def llmd_keys(tokens, model, block_size=16, seed=""):
    """llm-d's request keys of a prompt (llmd_fnv64a)."""
    return llmd_chain(llmd_root(seed, model), tokens, block_size)


# -- Go's msgpack encodings ------------------------------------------------------------------

def _u64(value):
    return uint(value, 8)


def _tokens(ids):
    return [uint(t, 4) for t in ids]


def _stored_array(hashes, parent, tokens, block_size, lora_id, lora_name):
    return pack(["BlockStored", [_u64(h) for h in hashes], _u64(0 if parent is None else parent),
                 _tokens(tokens), block_size, lora_id, "GPU", lora_name, None])


def _stored_map(hashes, parent, tokens, block_size, lora_id, lora_name):
    event = {"type": "BlockStored", "block_hashes": [_u64(h) for h in hashes],
             "parent_block_hash": None if parent is None else _u64(parent),
             "token_ids": _tokens(tokens), "block_size": block_size}
    if lora_id is not None:
        event["lora_id"] = lora_id
    event["medium"] = "GPU"
    if lora_name is not None:
        event["lora_name"] = lora_name
    return pack(event)


def _removed(hashes, form):
    if form == "array":
        return pack(["BlockRemoved", [_u64(h) for h in hashes], "GPU"])
    return pack({"type": "BlockRemoved", "block_hashes": [_u64(h) for h in hashes], "medium": "GPU"})


def _cleared(form):
    return pack(["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"})


def go_batch(events, dp_rank=0, ts=None):
    """[ts float64, [raw events], dp rank]: the batch struct, as an array."""
    return pack([float(time.time() if ts is None else ts), [Raw(e) for e in events], dp_rank])


def topic(ip, port, model):
    """`kv@<ip>:<port>@<model>`, or the older `kv@<ip>@<model>` when port is None."""
    pod = ip if port is None else "%s:%d" % (ip, port)
    return "kv@%s@%s" % (pod, model)


class GoSim:
    """One simulated pod: its block cache, and a PUB socket that connects to `endpoint` (as
    the simulator dials kvcm) and sends batches from a flushing thread."""

    def __init__(self, endpoint, *, model, ip="127.0.0.1", port=8000, served_name=None, form="array",
                 block_size=16, seed="", max_batch=16, flush_seconds=FLUSH_SECONDS, legacy_topic=False):
        self.model = model
        self.served_name = served_name or model
        self.form = form
        self.block_size = block_size
        self.seed = seed
        self.pod = ip if legacy_topic else "%s:%d" % (ip, port)
        self.topic = topic(ip, None if legacy_topic else port, model)
        self.endpoint = endpoint
        self.cached = {}              # key -> tokens of its block, in store order
        self._pending = []
        self._max_batch = max_batch
        self._flush_seconds = flush_seconds
        self._seq = 0
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.linger = 0
        self._pub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_every_second, daemon=True)
        self._thread.start()

    # -- what requests do ----------------------------------------------------------------

    def keys(self, tokens, lora=None):
        return llmd_keys(tokens, lora or self.served_name, self.block_size, self.seed)

    def request(self, tokens, lora=None, lora_id=None):
        """Caches the prompt's full blocks: one BlockStored of those not cached yet, its
        parent the last cached block (none: 0 in the array format, nil in maps)."""
        keys = self.keys(tokens, lora)
        hit = 0
        while hit < len(keys) and keys[hit] in self.cached:
            hit += 1
        if hit == len(keys):
            return keys
        parent = keys[hit - 1] if hit else None
        bs = self.block_size
        new_tokens = tokens[hit * bs:len(keys) * bs]
        for i, key in enumerate(keys[hit:]):
            self.cached[key] = new_tokens[i * bs:(i + 1) * bs]
        encode = _stored_array if self.form == "array" else _stored_map
        self._add(encode(keys[hit:], parent, new_tokens, bs, lora_id, lora))
        return keys

    def evict(self, keys):
        for key in keys:
            del self.cached[key]
            self._add(_removed([key], self.form))

    def reset(self):
        self.cached.clear()
        self._add(_cleared(self.form))

    # -- the sender ----------------------------------------------------------------------

    def _add(self, event):
        with self._lock:
            self._pending.append(event)
            if len(self._pending) >= self._max_batch:
                self._send_pending()

    def flush(self):
        with self._lock:
            self._send_pending()

    def _send_pending(self):
        if not self._pending:
            return
        self._seq += 1
        self.send_frames((self.topic.encode(), self._seq.to_bytes(8, "big"), go_batch(self._pending)))
        self._pending = []

    def send_frames(self, frames):
        self._pub.send_multipart(frames)

    def _flush_every_second(self):
        while not self._stop.wait(self._flush_seconds):
            self.flush()

    def close(self):
        self._stop.set()
        self._thread.join()
        self._pub.close(linger=0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
