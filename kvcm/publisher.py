"""A vLLM-compatible KV-event publisher: the wire behaviour of vLLM's `ZmqEventPublisher`.

Used by the tests, `kvcm sim` and `kvcm bench`. Wire format: specs/vllm-kv-events.md.

- A PUB socket that binds when the endpoint contains `*` or `::` or is ipc/inproc, and
  connects otherwise (so the same endpoint strings mean what they mean to vLLM).
- Every message is 3 frames: topic, seq (8 bytes big-endian, 0, 1, 2, ... per batch), a
  msgpack batch `[ts, events, dp_rank]`.
- Data-parallel rank r offsets a numeric TCP port by r (`*` ports are left alone) and
  suffixes ipc/inproc paths with `_dp<r>`, for the PUB and the replay endpoint alike.
- Optional replay: a ROUTER socket keeps the last `buffer_steps` batches and answers a
  request `[seq8]` (a DEALER sends `[b"", seq8]`) with every retained batch whose seq >= the
  start, then an end marker, in the layout of vLLM >= 0.26 (`"v26"`) or before (`"v25"`).
  By default a background thread polling the ROUTER answers requests, so replays are served
  while the owner keeps publishing; `close()` stops it. With `replay_thread=False` the owner
  answers them by calling `serve_replays()` (tests use this to decide when a replay lands).

One thread publishes; the replay thread only reads the buffer (under a lock).
"""

import collections
import threading
import time

import msgpack
import zmq

from kvcm.wire import END_SEQ, binds, dp_endpoint

REPLAY_LAYOUTS = ("v26", "v25")
EVENT_FORMATS = ("map", "array")

_REPLAY_POLL_S = 0.05  # how long close() may wait for the replay thread to notice


def _check_form(form):
    if form not in EVENT_FORMATS:
        raise ValueError("event form must be one of %s, got %r" % (EVENT_FORMATS, form))


def block_stored(block_hashes, parent_block_hash=None, token_ids=(), block_size=16, *,
                 lora_id=None, medium="GPU", lora_name=None, extra_keys=None, group_idx=None,
                 kv_cache_spec_kind=None, form="map"):
    """A BlockStored event. `form="map"` is vLLM >= 0.24 (fields whose default is None are
    left out when None); `form="array"` is vLLM 0.20's 10-element layout (every field
    written, nil when unset), which has no kv_cache_spec_kind."""
    _check_form(form)
    if form == "array":
        if kv_cache_spec_kind is not None:
            raise ValueError("vLLM 0.20's array layout has no kv_cache_spec_kind")
        return ["BlockStored", list(block_hashes), parent_block_hash, list(token_ids), block_size,
                lora_id, medium, lora_name, extra_keys, group_idx]
    event = {"type": "BlockStored", "block_hashes": list(block_hashes),
             "parent_block_hash": parent_block_hash, "token_ids": list(token_ids),
             "block_size": block_size, "lora_id": lora_id, "medium": medium, "lora_name": lora_name}
    if extra_keys is not None:
        event["extra_keys"] = extra_keys
    if group_idx is not None:
        event["group_idx"] = group_idx
    if kv_cache_spec_kind is not None:
        event["kv_cache_spec_kind"] = kv_cache_spec_kind
    return event


def block_removed(block_hashes, *, medium="GPU", group_idx=None, form="map"):
    """A BlockRemoved event (vLLM 0.20's array layout has 4 elements)."""
    _check_form(form)
    if form == "array":
        return ["BlockRemoved", list(block_hashes), medium, group_idx]
    event = {"type": "BlockRemoved", "block_hashes": list(block_hashes), "medium": medium}
    if group_idx is not None:
        event["group_idx"] = group_idx
    return event


def all_blocks_cleared(*, form="map"):
    _check_form(form)
    return ["AllBlocksCleared"] if form == "array" else {"type": "AllBlocksCleared"}


def encode_batch(events, *, ts=None, dp_rank=0):
    """The msgpack payload of one batch: `[ts, events, dp_rank]`."""
    return msgpack.packb([time.time() if ts is None else float(ts), list(events), dp_rank])


class Publisher:
    """Publishes KV-event batches like one vLLM engine (one data-parallel rank).

    `endpoint` / `replay_endpoint` are the addresses actually in use (after the DP offset,
    and with the port the system chose when binding a `*` or 0 port).
    """

    def __init__(self, endpoint="tcp://*:5557", *, topic="", dp_rank=0, replay_endpoint=None,
                 replay_layout="v26", buffer_steps=10_000, hwm=100_000, replay_thread=True, context=None):
        if replay_layout not in REPLAY_LAYOUTS:
            raise ValueError("replay_layout must be one of %s, got %r" % (REPLAY_LAYOUTS, replay_layout))
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be at least 1, got %r" % (buffer_steps,))
        self.topic = topic
        self.dp_rank = dp_rank
        self.replay_layout = replay_layout
        self.next_seq = 0
        self._topic = topic.encode("utf-8")
        self._buffer = collections.deque(maxlen=buffer_steps)  # (seq, topic, payload)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._router = None
        # a context of its own (one libzmq I/O thread per engine, as separate vLLM processes
        # have), unless the caller shares one between publishers and closes it itself
        self._own_ctx = context is None
        self._ctx = zmq.Context() if context is None else context
        self._sockets = []
        try:
            self._pub = self._socket(zmq.PUB)
            self._pub.sndhwm = hwm
            self.endpoint = self._open(self._pub, dp_endpoint(endpoint, dp_rank))
            self.replay_endpoint = None
            if replay_endpoint is not None:
                self._router = self._socket(zmq.ROUTER)
                # A replay is up to buffer_steps messages at once; the default HWM (1000)
                # would make the ROUTER silently drop the tail of a long one.
                self._router.sndhwm = buffer_steps + 1
                self._router.bind(dp_endpoint(replay_endpoint, dp_rank))
                self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
                if replay_thread:
                    self._thread = threading.Thread(target=self._serve_until_closed, daemon=True,
                                                    name="kvcm-replay %s" % self.replay_endpoint)
                    self._thread.start()
        except BaseException:
            self.close()
            raise

    def _socket(self, kind):
        sock = self._ctx.socket(kind)
        self._sockets.append(sock)
        return sock

    @staticmethod
    def _open(sock, endpoint):
        if binds(endpoint):
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(endpoint)
        return endpoint

    @property
    def socket(self):
        """The PUB socket (e.g. to attach a monitor); only the publishing thread may use it."""
        return self._pub

    def publish(self, events, *, ts=None, seq=None, deliver=True):
        """Publishes one batch of events; returns its seq. See publish_raw for seq/deliver."""
        return self.publish_raw(encode_batch(events, ts=ts, dp_rank=self.dp_rank), seq=seq,
                                deliver=deliver)

    def publish_raw(self, payload, *, seq=None, topic=None, deliver=True):
        """Publishes a pre-encoded payload; returns its seq.

        seq: send with this seq instead of the next one (the counter continues from seq+1),
        to skip, duplicate or rewind. topic: bytes sent instead of the publisher's topic.
        deliver=False keeps the batch in the replay buffer without sending it live: a message
        lost on the way.
        """
        if seq is None:
            seq = self.next_seq
        self.next_seq = seq + 1
        topic = self._topic if topic is None else topic
        with self._lock:
            self._buffer.append((seq, topic, payload))
        if deliver:
            self._pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
        return seq

    def send_frames(self, frames):
        """Sends arbitrary frames, outside the seq counter and the buffer (malformed input)."""
        self._pub.send_multipart(frames)

    def restart(self):
        """Behaves like a restarted engine: seq back to 0, replay buffer empty."""
        with self._lock:
            self._buffer.clear()
        self.next_seq = 0

    def serve_replays(self, timeout=0.0):
        """Answers the waiting replay requests, waiting up to `timeout` seconds for the first;
        returns how many were answered. Only for replay_thread=False (or from that thread)."""
        answered = 0
        while self._router.poll(0 if answered else int(timeout * 1000)):
            self._answer(self._router.recv_multipart())
            answered += 1
        return answered

    def _serve_until_closed(self):
        while not self._stop.is_set():
            self.serve_replays(_REPLAY_POLL_S)

    def _answer(self, request):
        # As vLLM: [identity, b"", seq8]; anything else is ignored.
        if len(request) != 3 or request[1] or len(request[2]) != 8:
            return
        identity, start = request[0], int.from_bytes(request[2], "big")
        with self._lock:
            batches = [b for b in self._buffer if b[0] >= start]
        if self.replay_layout == "v26":
            def reply(topic, seq8, payload):
                return (identity, b"", topic, seq8, payload)
        else:
            def reply(topic, seq8, payload):
                return (identity, b"", seq8, payload)
        for seq, topic, payload in batches:
            self._router.send_multipart(reply(topic, seq.to_bytes(8, "big"), payload))
        self._router.send_multipart(reply(b"", END_SEQ, b""))

    def close(self):
        """Stops the replay thread and closes the sockets (unsent messages are dropped, as
        vLLM does). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._own_ctx:
            if not self._ctx.closed:
                self._ctx.destroy(linger=0)
            return
        for sock in self._sockets:
            sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
