"""KV-event batches of one simulated rank: written in the configured format, batched, sent.

The pool (kvcm.sim.kvcache) produces vLLM >= 0.24's event maps; `--event-format` writes them
as

- `map`: vLLM >= 0.24 maps, byte for byte as vLLM's msgspec encoder writes them: the map
  header's width follows the number of fields the struct *declares*, not how many it writes
  (0.33's BlockStored declares 16 keys, so its map always has a map16 header, `de 00 0b` for
  the 11 it writes; BlockRemoved and AllBlocksCleared get fixmaps). Arrays, ints, strings
  and the float64 timestamp are the shortest msgpack forms, as the `msgpack` package writes
  them (tests/test_sim_kvcache.py checks it against vLLM's captures);
- `array`: vLLM 0.20's layout (BlockStored 10 elements, BlockRemoved 4, nil for unset);
- `go-array`: llm-d's simulator's layout, as its Go msgpack encoder writes it: BlockStored
  `[tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name, extra_keys]`
  with `0` for no parent and nil extra keys, BlockRemoved `[tag, hashes, medium]`; hashes
  (and the parent) always as 9-byte uint64, token ids always as 5-byte uint32.

Batches (`EventBatcher`): by default one per engine step, as vLLM publishes (everything one
pass of the event loop produced); with `--event-batch-size N`, llm-d's batching: a batch of N
as soon as N events wait, and whatever waits every second after the last send.

Replays answer in vLLM >= 0.26's layout `[topic, seq, payload]` (llm-d's simulator's too),
except for the `array` format (vLLM 0.20: `[seq, payload]`).
"""

import asyncio
import logging
import math
import time

import msgpack

from kvcm.publisher import Publisher

log = logging.getLogger("kvcm.sim.events")

FORMATS = ("map", "array", "go-array")
BATCH_DELAY = 1.0          # llm-d's flush timer

_packer = msgpack.Packer()
_MAP16 = b"\xde"


def as_array(event):
    """A vLLM >= 0.24 event map in vLLM 0.20's array layout."""
    kind = event["type"]
    if kind == "BlockStored":
        return [kind, event["block_hashes"], event["parent_block_hash"], event["token_ids"], event["block_size"],
                event.get("lora_id"), event.get("medium"), event.get("lora_name"), event.get("extra_keys"),
                event.get("group_idx")]
    if kind == "BlockRemoved":
        return [kind, event["block_hashes"], event.get("medium"), event.get("group_idx")]
    return [kind]


def encode_batch(events, *, ts=None, dp_rank=0):
    """The msgpack payload `[ts, events, dp_rank]` of one batch of maps or vLLM 0.20 arrays,
    as vLLM's encoder writes it."""
    pack = _packer.pack
    parts = [_packer.pack_array_header(3), pack(time.time() if ts is None else float(ts)),
             _packer.pack_array_header(len(events))]
    for event in events:
        if type(event) is dict and event.get("type") == "BlockStored":
            parts.append(_MAP16 + len(event).to_bytes(2, "big"))
            for key, value in event.items():
                parts.append(pack(key))
                parts.append(pack(value))
        else:
            parts.append(pack(event))
    parts.append(pack(dp_rank))
    return b"".join(parts)


def _u64s(values):
    return _packer.pack_array_header(len(values)) + b"".join(b"\xcf" + v.to_bytes(8, "big") for v in values)


def _go_event(event):
    pack = _packer.pack
    kind = event["type"]
    if kind == "BlockStored":
        tokens = event["token_ids"]
        parent = event["parent_block_hash"] or 0
        return b"".join((
            _packer.pack_array_header(9), pack(kind), _u64s(event["block_hashes"]),
            b"\xcf" + parent.to_bytes(8, "big"),
            _packer.pack_array_header(len(tokens)), b"".join(b"\xce" + t.to_bytes(4, "big") for t in tokens),
            pack(event["block_size"]), pack(event.get("lora_id")), pack(event.get("medium")),
            pack(event.get("lora_name")), pack(None)))
    if kind == "BlockRemoved":
        return _packer.pack_array_header(3) + pack(kind) + _u64s(event["block_hashes"]) + pack(event.get("medium"))
    return pack([kind])


def encode_go_batch(events, *, ts=None, dp_rank=0):
    """The payload of one batch as llm-d's simulator writes it (see the module docstring)."""
    return b"".join([_packer.pack_array_header(3), _packer.pack(time.time() if ts is None else float(ts)),
                     _packer.pack_array_header(len(events))] + [_go_event(e) for e in events] +
                    [_packer.pack(dp_rank)])


def encode(events, form, *, ts=None, dp_rank=0):
    """One batch of pool events (maps) in `form`."""
    if form == "go-array":
        return encode_go_batch(events, ts=ts, dp_rank=dp_rank)
    if form == "array":
        events = [as_array(e) for e in events]
    return encode_batch(events, ts=ts, dp_rank=dp_rank)


class EventStream:
    """One rank's KV events: a vLLM-compatible publisher (PUB bound or connected as vLLM
    decides from the endpoint, the rank's port offset, an optional replay ROUTER keeping
    `replay_batches` batches) sending one batch per call."""

    def __init__(self, endpoint, *, topic, dp_rank, replay_endpoint=None, form="map", replay_batches=10_000):
        if form not in FORMATS:
            raise ValueError("event format must be one of %s, got %r" % (", ".join(FORMATS), form))
        self.dp_rank = dp_rank
        self.form = form
        self.publisher = Publisher(endpoint, topic=topic, dp_rank=dp_rank, replay_endpoint=replay_endpoint,
                                   replay_layout="v25" if form == "array" else "v26", buffer_steps=replay_batches)

    @property
    def endpoint(self):
        return self.publisher.endpoint

    @property
    def replay_endpoint(self):
        return self.publisher.replay_endpoint

    @property
    def topic(self):
        return self.publisher.topic

    def publish(self, events):
        """Sends one batch of pool events; returns its seq."""
        return self.publisher.publish_raw(encode(events, self.form, dp_rank=self.dp_rank))

    def close(self):
        self.publisher.close()


class EventBatcher:
    """Takes a pool's events when it has some and sends them to `stream` (None: they are
    dropped) in batches (see the module docstring). Call `flush()` at the end."""

    def __init__(self, cache, stream, batch_size=None, delay=BATCH_DELAY):
        self.cache = cache
        self.stream = stream
        self.batch_size = batch_size
        self.delay = delay
        self._waiting = []
        self._step_pending = False
        self._timer = None
        self._last_send = time.monotonic()
        cache.on_events = self.pending

    def pending(self):
        """The pool has new events: collect them at the end of this loop pass."""
        if not self._step_pending:
            self._step_pending = True
            asyncio.get_running_loop().call_soon(self._collect)

    def _collect(self):
        self._step_pending = False
        self._waiting += self.cache.take_events()
        if self.stream is None:
            self._waiting.clear()
        elif self.batch_size is None:
            self._send(len(self._waiting))
        else:
            while len(self._waiting) >= self.batch_size:
                self._send(self.batch_size)
            self._arm()

    def _arm(self):
        """llm-d's timer ticks every `delay` seconds after the last send; it fires only when
        events wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._waiting:
            now = time.monotonic()
            due = self._last_send + max(1, math.ceil((now - self._last_send) / self.delay)) * self.delay
            self._timer = asyncio.get_running_loop().call_later(due - now, self._tick)

    def _tick(self):
        self._timer = None
        self._send(len(self._waiting))

    def _send(self, count):
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        self._last_send = time.monotonic()
        if not batch:
            return
        try:
            self.stream.publish(batch)
        except Exception:        # a closed or broken socket must not stop the engine
            log.exception("cannot publish %d KV events", len(batch))

    def flush(self):
        """Sends everything that waits (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting += self.cache.take_events()
        if self.stream is not None:
            while self._waiting:
                self._send(self.batch_size or len(self._waiting))
        self._waiting.clear()
