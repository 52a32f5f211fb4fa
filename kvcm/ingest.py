"""Event ingest: ZMQ sockets on the running asyncio loop, streams, sequence tracking, replay
and restart detection (DESIGN.md §4; wire format in specs/vllm-kv-events.md).

This module moves bytes and decides which batches to apply and in which order; decoding and
applying them is the core's EventSink.

- bind mode: one SUB socket binds every `binds` endpoint, subscribes to `topic_prefix`; pod
  and model come from the topic `kv@<pod>@<model>`.
- connect mode: one SUB socket per engine, subscribed to everything; pod = engine name,
  model = the engine's `model` or else the topic's.
- A stream is (pod, model, dp_rank). The first batch seen is the baseline; seq == last is a
  duplicate; a jump is a gap, filled by a replay when the stream has a replay endpoint
  (live batches are held meanwhile and applied in order afterwards) and otherwise counted,
  leaving the stream degraded; the live feed going backwards is an engine restart.
- A stream restored from a snapshot (kvcm/state.py) resumes by a replay from its last
  applied batch, which must come back first and unchanged (the same engine process, a buffer
  that still reaches back); otherwise its pod is cleared. /v1/pods shows the outcome.
- The stream table is bounded: when it is full, the least recently active stream is
  forgotten (if it comes back, its next batch is a new baseline), and its pod cleared when
  that was the pod's last stream. Clearing a pod forgets its streams.

Sockets are raw pyzmq sockets read through loop.add_reader on ZMQ_FD. That FD is
edge-triggered, so a reader drains until EAGAIN, but at most `batch_budget` messages and
`turn_seconds` per loop turn before it yields with call_soon, so a busy publisher cannot
starve HTTP scoring. With an in-memory index the reader is the core's native lane
(kvcm/_ingest_lane.pxi): it receives through libzmq's C API and applies the batches that continue
an open stream in order itself, without the GIL (a turn of at least LANE_TURN_SECONDS then);
each other message goes through _receive as before, in order. A stream is open to the lane
after a message _receive handled left it in order with nothing pending (_admit); _Stream's
properties take back what the lane applied and close the stream before anything else
changes it. A batch larger than `slice_bytes` is applied a slice of events per loop
turn, its stream's later batches held meanwhile, as during a replay. libzmq drops the
connection of a peer that sends a message larger than `max_message`, and admits only peers
in the `allow` networks when they are given (kvcm/zap.py).
"""

import asyncio
import collections
import dataclasses
import logging
import time
import zlib
from typing import Optional

import zmq

from kvcm._core import DecodeError, EventSink, FastStream, Lane, LaneSource, StreamContext, native_lane
from kvcm.endpoints import check_endpoint
from kvcm.ratelog import RateLimitedLog
from kvcm.wire import END_SEQ, dp_endpoint
from kvcm.zap import SourceFilter

log = logging.getLogger("kvcm.ingest")

ENGINE_SYNTAX = "NAME=ENDPOINT[,replay=EP][,model=M]"
U64_MAX = (1 << 64) - 1
DEFAULT_MAX_MESSAGE = 64 << 20
KEPT_PAYLOAD = 64 << 10
# The shortest loop turn of the native lane: it holds no GIL for the batches it applies, so
# its turn may be longer than turn_seconds (which bounds how long the Python path holds it).
LANE_TURN_SECONDS = 0.002


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """A connect-mode engine: kvcm connects a SUB socket to its PUB `endpoint`."""
    name: str
    endpoint: str
    replay: Optional[str] = None
    model: Optional[str] = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("engine name must not be empty")
        check_endpoint(self.endpoint, "engine %r: endpoint" % self.name, connect=True)
        if self.replay is not None:
            check_endpoint(self.replay, "engine %r: replay endpoint" % self.name, connect=True)
        if self.model is not None and not self.model:
            raise ValueError("engine %r: model must not be empty" % self.name)


def parse_engine(text):
    """`NAME=ENDPOINT[,replay=EP][,model=M]` -> EngineSpec; ValueError on anything else."""
    name, sep, rest = text.strip().partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ValueError("engine %r: expected %s" % (text, ENGINE_SYNTAX))
    endpoint, *options = rest.split(",")
    fields = {}
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if key not in ("replay", "model"):
            raise ValueError("engine %r: unknown option %r (expected %s)" % (name, key, ENGINE_SYNTAX))
        if key in fields:
            raise ValueError("engine %r: %s= given twice" % (name, key))
        if not value:
            raise ValueError("engine %r: %s= needs a value" % (name, key))
        fields[key] = value
    return EngineSpec(name, endpoint.strip(), **fields)


def read_engines_file(path):
    """One engine spec per line; blank lines and lines starting with # are skipped."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                specs.append(parse_engine(line))
            except ValueError as exc:
                raise ValueError("%s:%d: %s" % (path, lineno, exc)) from None
    return specs


def _topic_ids(topic):
    """(pod, model) from `kv@<pod>@<model>`, or None when the topic is not of that shape."""
    parts = topic.split(b"@")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    try:
        return parts[1].decode("utf-8"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _replay_reply(frames):
    """(seq8, payload) of one replay message as a DEALER receives it, in either layout, or
    None. The end marker is a reply whose seq8 is END_SEQ."""
    if len(frames) == 3 and not frames[0]:   # vLLM < 0.26: [b"", seq8, payload]
        return frames[1], frames[2]
    if len(frames) == 4 and not frames[0]:   # vLLM >= 0.26: [b"", topic, seq8, payload]
        return frames[2], frames[3]
    return None


class _Shared:
    """A field of _Stream the native lane may change or must not see change: read after what
    the lane applied was taken on, written after the stream was taken back from the lane."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, stream, owner=None):
        if stream is None:
            return self
        stream._synced()
        return getattr(stream, self.slot)

    def __set__(self, stream, value):
        stream._taken_back()
        setattr(stream, self.slot, value)


class _Stream:
    __slots__ = ("pod", "model", "dp_rank", "_ctx", "_last_seq", "_live_seq", "_last_time", "degraded", "restarted",
                 "_last_payload", "_resume_digest", "held", "_replay_task", "replay_started", "applying",
                 "_batches", "gaps", "missed", "replays", "restarts", "duplicates", "drops", "fast")

    def __init__(self, pod, model, dp_rank):
        self.pod, self.model, self.dp_rank = pod, model, dp_rank
        # the native lane's side of the stream: while it is open, the lane applies the
        # stream's next batches and keeps seq, payload, batch count and time (read below);
        # every change made here closes it first
        self.fast = FastStream(self)
        self._ctx = StreamContext(pod, model)
        self._last_seq = None     # highest seq applied (or skipped as lost)
        self._live_seq = None     # last seq seen on the live feed; it lags last_seq after a replay
        self._last_time = time.monotonic()
        self.degraded = False     # a gap went unfilled; only a restart makes the picture exact again
        self.restarted = False    # the engine restarted and a shared index has not been told yet
        self._last_payload = None # the batch of last_seq (or its digest, _kept): the digest tells
                                  # this engine process from a later one reusing its seqs
        self._resume_digest = None  # restored from a snapshot: the digest the replay must show first
        self.held = []            # (seq, payload) that arrived live while a replay was in flight
        self._replay_task = None  # the stream's task: a replay, a prefetch or a sliced batch
        self.replay_started = None
        self.applying = False     # the task applies a large batch a slice at a time
        self._batches = self.gaps = self.missed = self.replays = 0
        self.restarts = self.duplicates = self.drops = 0

    def _synced(self):
        """Takes on what the native lane applied (it keeps payloads of at most KEPT_PAYLOAD,
        which _kept keeps whole)."""
        fast = self.fast
        if fast.moved:
            fast.moved = False
            self._last_seq = self._live_seq = fast.seq
            self._last_payload = fast.payload()

    def _taken_back(self):
        self._synced()
        self.fast.open = False

    last_seq = _Shared()
    live_seq = _Shared()
    last_payload = _Shared()
    ctx = _Shared()
    replay_task = _Shared()
    resume_digest = _Shared()

    @property
    def batches(self):
        return self._batches + self.fast.batches

    @batches.setter
    def batches(self, value):
        self._batches = value - self.fast.batches

    @property
    def last_time(self):
        return max(self._last_time, self.fast.last_time)

    @last_time.setter
    def last_time(self, value):
        self._last_time = value

    @property
    def state(self):
        if self.replay_task is not None:
            return "applying" if self.applying else "replaying"
        return "degraded" if self.degraded else "ok"


class _Source:
    """One SUB socket and its reader; engine is None for the bind-mode socket; lane is its
    kvcm._core LaneSource when the native lane reads it."""
    __slots__ = ("sock", "fd", "engine", "handle", "lane")

    def __init__(self, sock, engine, lane):
        self.sock, self.fd, self.engine, self.handle = sock, sock.FD, engine, None
        self.lane = LaneSource(sock) if lane else None


class Ingest:
    """Feeds KV-event batches from ZMQ into `sink` (a kvcm._core.EventSink).

    Runs on the event loop that calls start(); every method must be called from it.
    """

    def __init__(self, sink, *, binds=("tcp://*:5557",), topic_prefix="kv@", engines=(),
                 replay_endpoints=None, batch_budget=256, turn_seconds=0.0002, replay_timeout=2.0, replay_interval=1.0,
                 max_held=8192, max_streams=4096, max_engines=1024, max_replays=16,
                 max_replay_batches=10_000, rcvhwm=10_000, on_applied=None, clears_on_restart=True,
                 prefetch=None, position=None, max_message=DEFAULT_MAX_MESSAGE, allow=(),
                 slice_bytes=64 << 10, native=True):
        self._sink = sink
        # A shared index takes each applied batch's effects (on_applied(stream, seq, resync))
        # and detects engine restarts itself, atomically with the restarted stream's first
        # batch; a clear sent from here could land after another replica's newer writes.
        self._on_applied = on_applied
        self._clears_on_restart = clears_on_restart
        # A shared index also knows engine hashes this kvcm never saw (a stream it takes over
        # from another replica): prefetch(missing) brings them in before the batch applies,
        # the stream's later batches held meanwhile, as during a replay.
        self._prefetch = prefetch
        # position(stream): the seq a shared index last applied for the stream, or None.
        self._position = position
        self._binds = [check_endpoint(ep, "--zmq-bind") for ep in binds]
        self._topic_prefix = topic_prefix.encode("utf-8")
        self._replay_endpoints = {pod: check_endpoint(ep, "replay endpoint of pod %r" % pod, connect=True)
                                  for pod, ep in (replay_endpoints or {}).items()}
        self._budget = batch_budget
        self._turn_seconds = turn_seconds
        self._replay_timeout = replay_timeout
        self._replay_interval = replay_interval
        self._max_held = max_held
        self._max_streams = max_streams
        self._max_engines = max_engines
        self._max_replays = max_replays
        self._max_replay_batches = max_replay_batches
        self._rcvhwm = rcvhwm
        self._max_message = max_message
        self._slice_bytes = slice_bytes
        self._filter = SourceFilter(allow, self._refused) if allow else None
        # The native lane (kvcm/_ingest_lane.pxi) takes the common batches of the in-memory index;
        # a shared index (prefetch, on_applied) sees every batch here.
        self._lane = (Lane(sink, min(slice_bytes, KEPT_PAYLOAD))
                      if native and isinstance(sink, EventSink) and prefetch is None and on_applied is None
                      and native_lane() else None)
        self._counts = {
            "messages": 0, "batches": 0, "drops_by_reason": {}, "duplicates": 0,
            "gaps": 0, "missed_batches": 0, "replays": 0, "replay_failures": 0,
            "replayed_batches": 0, "held_dropped": 0, "restarts": 0, "streams_evicted": 0,
            "engines_refused": 0, "publishers_refused": 0,
            "streams_restored": 0, "streams_resumed": 0, "streams_cleared": 0,
        }
        # (pod, model, dp_rank) -> how a stream restored from a snapshot came back: "restored"
        # while it catches up, then "resumed" or "cleared"; kept for the life of the process
        # (at most one per stream of the snapshot, which max_streams bounds)
        self._recovery = {}
        self._engines = {}
        for spec in engines:
            self._register(spec)
        self._streams = collections.OrderedDict()   # least recently active first
        self._pod_streams = collections.Counter()     # pod -> how many of its streams are known
        self._sources = {}          # None -> the bind socket, engine name -> its socket
        self._replays = set()
        self._loop = None
        self._ctx = None
        self._log = RateLimitedLog(log)   # what a publisher can make kvcm log
        self.bound = []             # the endpoints actually bound (ports chosen for * and 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self):
        """Binds the bind-mode socket and connects every registered engine. Raises OSError
        when an endpoint cannot be bound or connected (everything opened is closed again)."""
        if self._ctx is not None:
            raise RuntimeError("ingest already started")
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        # libzmq's default (1023) is below what the engine cap needs: every engine has a
        # socket, and so has every replay in flight; terminating the context takes one more
        # for each connection still pending (an inproc engine nobody bound), and libzmq
        # aborts when it cannot have it
        self._ctx.set(zmq.MAX_SOCKETS, 2 * self._max_engines + self._max_replays + 64)
        try:
            if self._filter is not None:
                self._filter.start(self._ctx, self._loop)
            if self._binds:
                sock = self._sub_socket(self._topic_prefix, "--zmq-bind")
                for endpoint in self._binds:
                    _zmq_call(sock.bind, endpoint, "--zmq-bind")
                    self.bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
                self._listen(None, sock, None)
            for spec in self._engines.values():
                self._connect(spec)
        except BaseException:
            await self.stop()
            raise
        for stream in list(self._streams.values()):
            if stream.resume_digest is not None:
                self._catch_up(stream, self._resume(stream, self._replay_endpoint(stream)))

    async def stop(self):
        """Cancels replays and closes every socket. Idempotent."""
        if self._lane is not None and self._ctx is not None:
            log.debug("ingest: the native lane applied %d of %d batches", self._lane.batches,
                     self.counters["batches"])
        tasks = list(self._replays)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for source in self._sources.values():
            self._unlisten(source)
        self._sources.clear()
        if self._filter is not None:
            self._filter.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self.bound = []

    # -- engines (connect mode) ------------------------------------------------------------

    @property
    def engines(self):
        return list(self._engines.values())

    def add_engine(self, name, endpoint, replay=None, model=None):
        """Registers an engine and, once started, connects to it. ValueError for a bad or
        duplicate entry or a full table (engines change only through this call and
        remove_engine, so a full table refuses instead of evicting); OSError when the system
        has no socket to spare."""
        spec = EngineSpec(name, endpoint, replay, model)
        self._register(spec)
        if self._ctx is not None:
            try:
                self._connect(spec)
            except BaseException:
                del self._engines[name]
                raise
        return spec

    def remove_engine(self, name):
        """Closes the engine's socket. Its streams and index entries stay: if the engine comes
        back, its seq shows whether it restarted meanwhile."""
        if name not in self._engines:
            raise KeyError("no engine named %r" % (name,))
        del self._engines[name]
        source = self._sources.pop(name, None)
        if source is not None:
            self._unlisten(source)

    def _register(self, spec):
        if spec.name in self._engines:
            raise ValueError("engine %r is already registered" % spec.name)
        if len(self._engines) >= self._max_engines:
            self._counts["engines_refused"] += 1
            raise ValueError("too many engines (at most %d)" % self._max_engines)
        self._engines[spec.name] = spec

    def _connect(self, spec):
        sock = self._sub_socket(b"", "engine %r" % spec.name)
        try:
            _zmq_call(sock.connect, spec.endpoint, "engine %r" % spec.name)
        except BaseException:
            sock.close()
            raise
        self._listen(spec.name, sock, spec)

    # -- sockets ---------------------------------------------------------------------------

    def _socket(self, kind, what):
        try:
            sock = self._ctx.socket(kind)
        except zmq.ZMQError as exc:   # EMFILE: out of sockets or of file descriptors
            raise OSError(exc.errno, "%s: no socket: %s" % (what, exc.strerror)) from None
        sock.linger = 0
        sock.maxmsgsize = self._max_message
        return sock

    def _sub_socket(self, subscribe, what):
        sock = self._socket(zmq.SUB, what)
        sock.rcvhwm = self._rcvhwm
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
        if self._filter is not None:
            self._filter.guard(sock)
        return sock

    def _listen(self, key, sock, engine):
        source = self._sources[key] = _Source(sock, engine, self._lane is not None)
        self._loop.add_reader(source.fd, self._on_readable, source)
        # Messages may already be queued, and their edge gone.
        source.handle = self._loop.call_soon(self._drain, source)

    def _unlisten(self, source):
        if source.handle is not None:
            source.handle.cancel()
        self._loop.remove_reader(source.fd)
        source.sock.close(linger=0)

    def _on_readable(self, source):
        if source.handle is None:   # else a continuation is already due to drain
            self._drain(source)

    def _drain(self, source):
        source.handle = None
        if source.lane is not None:
            return self._drain_lane(source)
        recv = source.sock.recv_multipart
        # bounded by count and by time: a turn of big batches must not delay scoring requests
        deadline = time.perf_counter() + self._turn_seconds
        for _ in range(self._budget):
            if time.perf_counter() > deadline:
                break
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._received(source, frames)
        # Budget spent with messages possibly left: the FD edge may be consumed already, so
        # come back next loop turn rather than wait for a new edge.
        source.handle = self._loop.call_soon(self._drain, source)

    def _drain_lane(self, source):
        """_drain through the native lane: it applies the common batches itself and hands
        back, in order, each message for the Python logic (_receive) and each batch it began
        whose rest needs the general path (_lane_rest)."""
        left = self._budget
        deadline = time.perf_counter() + max(self._turn_seconds, LANE_TURN_SECONDS)
        while left > 0:
            taken, item = self._lane.drain(source.lane, left, max(0.0, deadline - time.perf_counter()))
            left -= taken
            if item is None:
                return
            if item is False:
                break
            if isinstance(item, list):
                self._received(source, item)
            else:
                self._lane_rest(*item)
        source.handle = self._loop.call_soon(self._drain, source)

    def _received(self, source, frames):
        try:
            self._receive(source.engine, frames, source)
        except Exception as exc:
            self._drop("error")
            self._log.error("error", "ingest: unexpected error on a message", exc_info=exc)

    def _lane_rest(self, stream, seq, cursor):
        """The rest of a batch the lane applied in part, as _apply_now would go on (the
        lane counted the batch and took its seq)."""
        try:
            cursor.apply()
        except Exception as exc:
            self._failed(stream, exc)
            self._applied(stream, seq, False, False)
            return
        self._applied(stream, seq, False, True)

    def _admit(self, source, topic, dp_rank, stream):
        """Opens the stream to the native lane for this topic and dp_rank when its next batch
        in order is a common case: known position, no task, nothing held."""
        seq = stream.last_seq
        if (stream.replay_task is None and stream.resume_digest is None and seq is not None and 0 <= seq < U64_MAX
                and seq == stream.live_seq and not stream.held and not stream.ctx.needs_replay
                and self._lane.open(stream.fast, stream.ctx, seq)):
            source.lane.admit(topic, dp_rank, stream.fast)

    # -- live messages ---------------------------------------------------------------------

    def _receive(self, engine, frames, source=None):
        self._counts["messages"] += 1
        if len(frames) != 3:
            return self._drop("frames")
        topic, seq8, payload = frames
        if len(seq8) != 8:
            return self._drop("seq")
        ids = _topic_ids(topic)
        if engine is None:
            if ids is None:
                return self._drop("topic")
            pod, model = ids
        else:
            pod, model = engine.name, engine.model
            if model is None:
                if ids is None:
                    return self._drop("model")
                model = ids[1]
        try:
            batch = self._sink.decode(payload)   # decoded once: what follows reads the records
            _, dp_rank, _ = batch.check()
        except DecodeError as exc:
            return self._drop(exc.reason)
        stream_key = (pod, model, dp_rank or 0)
        stream = self._stream(*stream_key)
        self._on_live(stream, int.from_bytes(seq8, "big"), batch)
        if source is not None and source.lane is not None and self._streams.get(stream_key) is stream:
            self._admit(source, topic, dp_rank or 0, stream)

    def _stream(self, pod, model, dp_rank):
        """The stream, made the most recently active one; a new one when unknown, for which
        the least recently active one is forgotten when the table is full."""
        key = (pod, model, dp_rank)
        stream = self._streams.get(key)
        if stream is not None:
            self._streams.move_to_end(key)
        else:
            if len(self._streams) >= self._max_streams:
                self._evict_stream()
            stream = self._streams[key] = _Stream(pod, model, dp_rank)
            self._pod_streams[pod] += 1
        if self._lane is not None:
            stream.fast.stamp = self._lane.tick()
        return stream

    def _recency(self):
        """The streams, least recently active first. The native lane stamps the streams it
        applies batches for instead of reordering the table: then the stamps tell."""
        if self._lane is None:
            return list(self._streams.values())
        return sorted(self._streams.values(), key=_stamp)

    def _evict_stream(self):
        """Forgets the least recently active stream, preferring one not busy catching up.
        Without a stream its pod's entries could not be proven current any more (a restart
        would go unseen): when it was the pod's last stream, the pod is cleared. A shared
        index is left alone: other replicas may be ingesting the pod."""
        order = self._recency()
        stream = next((s for s in order if s.replay_task is None), order[0])
        stream = self._forget((stream.pod, stream.model, stream.dp_rank))
        self._counts["streams_evicted"] += 1
        cleared = self._clears_on_restart and stream.pod not in self._pod_streams
        if cleared:
            self._sink.clear_pod(stream.pod)
        self._log.warning("table_full:streams", "ingest: the stream table is full (%d streams): forgot the least "
                          "recently active, %s%s", self._max_streams, _name(stream),
                          ", and cleared its pod" if cleared else "")

    def forget_pod(self, pod):
        """Forgets the pod's streams: the pod was cleared, so its next batch on any stream is
        a new baseline. Returns how many streams went."""
        keys = [key for key in self._streams if key[0] == pod]
        for key in keys:
            self._forget(key)
        return len(keys)

    def clear_pod(self, pod, clear):
        """Forgets the pod's streams and calls clear() (which clears the pod in the index)
        in the same loop turn: no batch of the pod applies between the two. Returns what
        clear() returns."""
        self.forget_pod(pod)
        return clear()

    def _forget(self, key):
        stream = self._streams.pop(key)
        stream.fast.open = False
        self._pod_streams[stream.pod] -= 1
        if not self._pod_streams[stream.pod]:
            del self._pod_streams[stream.pod]
        _detach_task(stream)
        stream.held.clear()
        return stream

    def _on_live(self, stream, seq, payload):
        stream.last_time = time.monotonic()
        previous, stream.live_seq = stream.live_seq, seq
        if previous is None:
            # First sighting: the baseline, unless a shared index has the stream further back
            # (another replica ingested it): then what lies between is a gap like any other;
            # or unless a snapshot restored the stream: then it goes on from its position.
            known = self._position(stream) if self._position is not None else None
            if known is not None and known + 1 < seq:
                stream.last_seq = known
                self._advance(stream, seq, payload, may_replay=True)
                return
            if stream.last_seq is None:
                stream.last_seq, stream.last_payload = seq, _kept(payload)
                self._apply(stream, seq, payload)
                return
        if previous is not None and seq < previous:
            # One publisher's live feed is ordered, so going backwards means a new process.
            # (Compared with the live feed, not last_seq: after a replay the live feed may
            # still be delivering batches the replay already applied.)
            self._restart(stream, seq, payload)
        elif stream.replay_task is not None:
            self._hold(stream, seq, payload)
        elif seq <= stream.last_seq:
            self._duplicate(stream)
        else:
            self._advance(stream, seq, payload, may_replay=True)

    def _advance(self, stream, seq, payload, may_replay):
        """Applies a batch with seq > last_seq, replaying or counting what lies between.
        Returns what _apply returns."""
        missing = seq - stream.last_seq - 1
        if missing:
            if may_replay and self._start_replay(stream, stream.last_seq + 1):
                self._hold(stream, seq, payload)
                return None
            self._lost(stream, missing)
        stream.last_seq, stream.last_payload = seq, _kept(payload)
        return self._apply(stream, seq, payload)

    def _apply(self, stream, seq, payload, resync=False):
        """Applies a batch, or its first slice when it is large. Outside a task of the
        stream, the rest goes to a task of its own (the stream's later batches are held
        meanwhile) and None is returned; inside one (a replay), the cursor of the rest is
        returned for that task to finish with _finish."""
        inside = stream.replay_task is not None
        if self._prefetch is not None and not inside:
            missing = self._sink.missing_engine_hashes(stream.ctx, payload)
            if missing:
                self._catch_up(stream, self._prefetch_then_apply(stream, missing, seq, payload, resync))
                return None
        cursor = self._apply_now(stream, seq, payload, resync)
        if cursor is None or inside:
            return cursor
        self._catch_up(stream, self._apply_rest(stream, seq, cursor, resync), applying=True)
        return None

    async def _prefetch_then_apply(self, stream, missing, seq, payload, resync):
        await self._prefetch(missing)
        stream.replay_task = None    # so that what the batch needs (a resync) may start
        cursor = self._apply_now(stream, seq, payload, resync)
        if cursor is not None:       # a large batch: this task applies the rest
            stream.replay_task, stream.applying = asyncio.current_task(), True
            await self._apply_rest(stream, seq, cursor, resync)
            return
        self._release_held(stream, may_replay=True)

    async def _apply_rest(self, stream, seq, cursor, resync):
        """The rest of a large batch, as the stream's task; then the batches held meanwhile."""
        ok = await self._slices(stream, cursor)
        stream.replay_task, stream.applying = None, False
        self._applied(stream, seq, resync, ok)
        self._release_held(stream, may_replay=True)

    async def _finish(self, stream, seq, cursor, resync):
        """The rest of a large batch, inside a task of the stream that goes on afterwards."""
        self._applied(stream, seq, resync, await self._slices(stream, cursor))

    def _apply_now(self, stream, seq, payload, resync):
        """Applies a batch whole, or its first slice when it is larger than slice_bytes:
        returns None when the batch is done with (applied or dropped), else its cursor."""
        self._counts["batches"] += 1
        stream.batches += 1
        try:
            cursor = self._sink.cursor(stream.ctx, payload)
            if not cursor.apply(self._slice_bytes):
                return cursor
        except Exception as exc:
            self._failed(stream, exc)
            self._applied(stream, seq, resync, False)
            return None
        self._applied(stream, seq, resync, True)
        return None

    async def _slices(self, stream, cursor):
        """Applies the rest of a batch a slice per loop turn; whether it went without error."""
        try:
            while True:
                await asyncio.sleep(0)
                if cursor.apply(self._slice_bytes):
                    return True
        except Exception as exc:
            self._failed(stream, exc)
            return False

    def _failed(self, stream, exc):
        stream.drops += 1
        if isinstance(exc, DecodeError):
            self._drop(exc.reason)
            return
        # A bug, not bad input; counted, and it must not stop the stream (nor a replay).
        self._drop("error")
        self._log.error("apply_error", "ingest: applying a batch of %s failed", _name(stream), exc_info=exc)

    def _applied(self, stream, seq, resync, ok):
        if self._on_applied is not None:
            self._on_applied(stream, seq, resync)
        if ok and stream.ctx.needs_replay:
            stream.ctx.needs_replay = False
            self._resync(stream)

    def _resync(self, stream):
        """The sink could not apply everything: a decoupled chain met an unknown parent, or a
        namespace switched to decoupled mode and lost its entries on every pod. Replaying all
        that the engines still hold, in order, rebuilds it (parents first). A resync is a
        replay like any other, so one running refuses a second: no resync loops."""
        switched = set(self._sink.take_switched())
        self._start_replay(stream, 0)
        if switched:
            for other in self._recency():
                if other is not stream and not switched.isdisjoint(other.ctx.fed):
                    self._start_replay(other, 0)

    def resync_namespace(self, namespace):
        """Another kvcm sharing the index switched `namespace` to decoupled mode, clearing it on
        every pod: the streams that fed it replay what their engines still hold."""
        for stream in self._recency():
            if namespace in stream.ctx.fed:
                self._start_replay(stream, 0)

    def _restart(self, stream, seq, payload):
        self._counts["restarts"] += 1
        stream.restarts += 1
        self._log.warning("restart", "ingest: %s restarted (seq %d after %d): clearing the pod",
                          _name(stream), seq, stream.last_seq)
        _detach_task(stream)      # it was catching up with the previous process
        stream.held.clear()
        if self._clears_on_restart:
            self._sink.clear_pod(stream.pod)
        else:
            stream.restarted = True
        stream.ctx = StreamContext(stream.pod, stream.model)
        stream.degraded = False
        # The new process counts from 0: batches before seq are a gap of the new epoch.
        stream.last_seq = -1
        self._advance(stream, seq, payload, may_replay=True)

    def _hold(self, stream, seq, payload):
        if len(stream.held) < self._max_held:
            # the payload alone: a held batch is decoded again when its turn comes
            stream.held.append((seq, _payload(payload)))
        else:
            # The seq is then missing after the replay: a gap like any other.
            self._counts["held_dropped"] += 1

    def _duplicate(self, stream):
        self._counts["duplicates"] += 1
        stream.duplicates += 1

    def _lost(self, stream, missing):
        # sequence numbers are any u64: counts of what they skip stay within one
        self._counts["gaps"] += 1
        self._counts["missed_batches"] = min(self._counts["missed_batches"] + missing, U64_MAX)
        stream.gaps += 1
        stream.missed = min(stream.missed + missing, U64_MAX)
        if not stream.degraded:
            self._log.warning("gap", "ingest: %s lost %d batch(es) after seq %d; degraded",
                              _name(stream), missing, stream.last_seq)
        stream.degraded = True

    def _drop(self, reason):
        drops = self._counts["drops_by_reason"]
        drops[reason] = drops.get(reason, 0) + 1
        self._log.warning("drop:" + reason, "ingest: dropped a message (%s)", reason)

    def _refused(self):
        self._counts["publishers_refused"] += 1

    # -- replay ----------------------------------------------------------------------------

    def _replay_endpoint(self, stream):
        engine = self._engines.get(stream.pod)
        if engine is not None:
            return engine.replay     # one entry is one publisher: its address as given
        endpoint = self._replay_endpoints.get(stream.pod)
        # A bind-mode pod's entry names rank 0; vLLM offsets each rank's replay port by rank.
        return None if endpoint is None else dp_endpoint(endpoint, stream.dp_rank)

    def _start_replay(self, stream, start):
        """Starts a replay from seq `start` unless the stream has no replay endpoint, one is
        in flight (so a range is never requested twice at once), the last one started less
        than replay_interval ago, or max_replays are running. Returns whether it started."""
        endpoint = self._replay_endpoint(stream)
        now = time.monotonic()
        if (endpoint is None or stream.replay_task is not None
                or len(self._replays) >= self._max_replays
                or (stream.replay_started is not None
                    and now - stream.replay_started < self._replay_interval)):
            return False
        stream.replay_started = now
        self._catch_up(stream, self._replay(stream, endpoint, start))
        return True

    def _catch_up(self, stream, coroutine, applying=False):
        """Runs a replay, a prefetch or the rest of a large batch as the stream's task: live
        batches are held meanwhile."""
        stream.replay_task = task = self._loop.create_task(coroutine)
        stream.applying = applying
        self._replays.add(task)
        task.add_done_callback(lambda task: self._replay_done(stream, task))

    def _replay_done(self, stream, task):
        self._replays.discard(task)
        if stream.replay_task is task:
            # Cancelled by stop() (a restart detaches its task first), or a bug: the stream
            # must not stay "replaying", holding batches, for good.
            stream.replay_task, stream.applying = None, False
            stream.held.clear()
            if not task.cancelled():
                self._log.error("replay_error", "ingest: catching up %s failed", _name(stream),
                                exc_info=task.exception())

    async def _replay(self, stream, endpoint, start):
        """Fetches and applies one replay, then the batches held meanwhile. Cancelled by a
        restart of the stream or by stop()."""
        resync = start <= stream.last_seq   # re-applies batches already applied
        batches, complete = await self._fetch(endpoint, start)
        if complete:
            self._counts["replays"] += 1
            stream.replays += 1
        else:
            self._counts["replay_failures"] += 1
            self._log.warning("replay", "ingest: replay of %s from seq %d via %s did not complete",
                              _name(stream), start, endpoint)
        # An incomplete resync would re-apply a prefix of old history over newer state:
        # leave it. An incomplete gap fill is a prefix of what is missing: apply it.
        if complete or not resync:
            for n, (seq, payload) in enumerate(batches, 1):
                self._counts["replayed_batches"] += 1
                cursor, again = None, seq <= stream.last_seq
                if not again:
                    cursor = self._advance(stream, seq, payload, may_replay=False)
                elif resync:
                    cursor = self._apply_now(stream, seq, payload, resync=True)   # the engine's retained history, in order
                else:
                    self._duplicate(stream)
                if cursor is not None:
                    await self._finish(stream, seq, cursor, again)
                elif n % self._budget == 0:
                    await asyncio.sleep(0)
        stream.replay_task = None
        # After a failure, gaps are counted instead of retried at once.
        self._release_held(stream, may_replay=complete)

    def _release_held(self, stream, may_replay):
        """Applies the batches held while the stream was catching up, in seq order."""
        held, stream.held = sorted(stream.held, key=_seq_of), []
        for i, (seq, payload) in enumerate(held):
            if stream.replay_task is not None:   # a later gap (or a prefetch) started a task: hold on
                stream.held.extend(held[i:])
                return
            if seq <= stream.last_seq:
                self._duplicate(stream)
            else:
                self._advance(stream, seq, payload, may_replay=may_replay)

    async def _fetch(self, endpoint, start):
        """[(seq, payload)] replayed from `start` until the end marker, and whether the end
        marker came (before replay_timeout without a message, and within max_replay_batches)."""
        try:
            sock = self._socket(zmq.DEALER, "replay via %s" % endpoint)
        except OSError as exc:
            self._log.warning("replay", "ingest: %s", exc)
            return [], False
        sock.rcvhwm = self._max_replay_batches + 1   # a long replay arrives all at once
        readable = asyncio.Event()
        self._loop.add_reader(sock.FD, readable.set)
        batches = []
        try:
            sock.connect(endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")), zmq.NOBLOCK)
            while True:
                frames = await self._recv(sock, readable)
                if frames is None:
                    return batches, False
                reply = _replay_reply(frames)
                if reply is None:
                    self._drop("replay_frames")
                elif reply[0] == END_SEQ:
                    return batches, True
                elif len(reply[0]) != 8:
                    self._drop("replay_seq")
                elif len(batches) == self._max_replay_batches:
                    return batches, False
                else:
                    batches.append((int.from_bytes(reply[0], "big"), reply[1]))
                    if len(batches) % self._budget == 0:
                        await asyncio.sleep(0)
        except zmq.ZMQError as exc:
            self._log.warning("replay", "ingest: replay via %s failed: %s", endpoint, exc)
            return batches, False
        finally:
            self._loop.remove_reader(sock.FD)
            sock.close(linger=0)

    async def _recv(self, sock, readable):
        while True:
            readable.clear()
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return sock.recv_multipart(zmq.NOBLOCK)
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # (forgetting the stream, stop()) that comes as the socket turns readable, and
            # the replay would then wait out its timeout
            try:
                async with asyncio.timeout(self._replay_timeout):
                    await readable.wait()
            except TimeoutError:
                return None

    # -- snapshots (kvcm/state.py) -----------------------------------------------------------

    def positions(self):
        """Where each stream stands, for a snapshot taken now: the last applied seq, a digest
        of that batch (which tells this engine process from a later one that reuses its seq
        numbers), the namespaces the stream fed, least recently first."""
        return [{"pod": s.pod, "model": s.model, "dp_rank": s.dp_rank, "seq": s.last_seq,
                 "digest": _digest(s.last_payload) if s.resume_digest is None else s.resume_digest, "fed": list(s.ctx.fed), "degraded": s.degraded}
                for s in self._recency() if s.last_seq is not None and s.last_seq >= 0]

    def cut(self, start):
        """(start(), positions()) in one turn of the ingest's loop: a snapshot's dump starts
        at the positions it records, so replaying every batch after them reaches the truth."""
        return start(), self.positions()

    def restore_streams(self, positions):
        """Takes on the streams of a snapshot whose index was just loaded, before start():
        each resumes once started by a replay from its position. A stream that cannot be
        resumed, without a replay endpoint, has its pod cleared now: its entries may be
        missing afterwards, never stale. Returns how many streams were restored."""
        restored = 0
        for position in positions:
            try:
                key = (str(position["pod"]), position["model"], int(position["dp_rank"]))
                seq, digest = int(position["seq"]), int(position["digest"])
                fed = [name for name in position.get("fed", ()) if isinstance(name, str)]
            except (KeyError, TypeError, ValueError):
                continue
            if key in self._streams or not 0 <= seq <= U64_MAX or len(self._streams) >= self._max_streams:
                continue
            stream = self._stream(*key)
            stream.last_seq, stream.resume_digest = seq, digest
            stream.degraded = bool(position.get("degraded"))
            self._sink.restore_fed(stream.ctx, fed)
            self._recovery[key] = "restored"
            self._counts["streams_restored"] += 1
            restored += 1
            if self._replay_endpoint(stream) is None:
                self._clear_restored(stream, "it has no replay endpoint")
        return restored

    async def _resume(self, stream, endpoint):
        """Replays a restored stream from its position, which must be the first batch the
        replay returns and carry the digest recorded with it (the same engine process, whose
        buffer still reaches back), then everything after it; otherwise clears its pod."""
        start, digest = stream.last_seq, stream.resume_digest
        stream.resume_digest = None
        batches, complete = await self._fetch(endpoint, start)
        if not complete or not batches or batches[0][0] != start or _digest(batches[0][1]) != digest:
            why = ("its replay did not complete" if not complete else
                   "its replay no longer reaches back to seq %d" % start if not batches or batches[0][0] != start
                   else "its engine restarted (seq %d is another batch now)" % start)
            stream.replay_task = None
            self._clear_restored(stream, why)
            return
        self._counts["replays"] += 1
        stream.replays += 1
        for n, (seq, payload) in enumerate(batches, 1):
            self._counts["replayed_batches"] += 1
            if seq == start:   # it may have been applied in part when the snapshot was taken
                stream.last_payload = _kept(payload)
                cursor = self._apply_now(stream, seq, payload, resync=False)
            elif seq > stream.last_seq:
                cursor = self._advance(stream, seq, payload, may_replay=False)
            else:
                self._duplicate(stream)
                continue
            if cursor is not None:
                await self._finish(stream, seq, cursor, False)
            elif n % self._budget == 0:
                await asyncio.sleep(0)
        self._recovery[(stream.pod, stream.model, stream.dp_rank)] = "resumed"
        self._counts["streams_resumed"] += 1
        log.info("ingest: %s resumed from seq %d (%d batches replayed)", _name(stream), start, len(batches) - 1)
        stream.replay_task = None
        self._release_held(stream, may_replay=True)

    def _clear_restored(self, stream, why):
        """A restored stream cannot be trusted: its pod is cleared and every stream of the pod
        forgotten (their next batches are new baselines)."""
        self._log.warning("resume", "ingest: %s cannot be resumed from its snapshot (%s): clearing pod %s",
                          _name(stream), why, stream.pod)
        self._sink.clear_pod(stream.pod)
        for key, other in list(self._streams.items()):
            if other.pod == stream.pod:
                if self._recovery.get(key) is not None and self._recovery[key] != "cleared":
                    self._recovery[key] = "cleared"
                    self._counts["streams_cleared"] += 1
                self._forget(key)

    # -- observability ---------------------------------------------------------------------

    def tables(self):
        """{table: (entries, capacity)} of the ingest's bounded name tables."""
        return {"streams": (len(self._streams), self._max_streams),
                "engines": (len(self._engines), self._max_engines)}

    def streams(self):
        """One dict per stream, for /v1/pods."""
        now = time.monotonic()
        return [{
            "pod": s.pod, "model": s.model, "dp_rank": s.dp_rank,
            "last_seq": s.last_seq if s.last_seq >= 0 else None,
            "last_event_age_s": round(now - s.last_time, 3),
            "gaps": s.gaps, "missed_batches": s.missed, "replays": s.replays,
            "restarts": s.restarts, "duplicates": s.duplicates, "batches": s.batches,
            "drops": s.drops, "held": len(s.held), "state": s.state,
            "recovery": self._recovery.get((s.pod, s.model, s.dp_rank)),
        } for s in self._recency()]

    @property
    def counters(self):
        """The counters, those of the native lane summed in (a copy)."""
        counts = {name: dict(value) if isinstance(value, dict) else value for name, value in self._counts.items()}
        if self._lane is not None:
            counts["messages"] += self._lane.messages
            counts["batches"] += self._lane.batches
        return counts


def _detach_task(stream):
    if stream.replay_task is not None:   # detached first: its end must not touch the stream
        task, stream.replay_task, stream.applying = stream.replay_task, None, False
        task.cancel()


def _payload(batch):
    """The bytes of a batch: live ones arrive decoded (a kvcm._core Batch), replayed ones not."""
    return getattr(batch, "payload", batch)


def _kept(batch):
    """What a stream keeps of its last batch for the digest: a small payload itself (no
    work per batch), a large one's digest at once (no large buffer held per stream)."""
    payload = _payload(batch)
    return payload if len(payload) <= KEPT_PAYLOAD else zlib.crc32(payload)


def _digest(kept):
    if kept is None:
        return 0
    return kept if isinstance(kept, int) else zlib.crc32(kept)


def _stamp(stream):
    return stream.fast.stamp


def _seq_of(item):
    return item[0]


def _name(stream):
    return "stream %s/%s/dp%d" % (stream.pod, stream.model, stream.dp_rank)


def _zmq_call(method, endpoint, what):
    try:
        method(endpoint)
    except zmq.ZMQError as exc:
        raise OSError(exc.errno, "%s %s: %s" % (what, endpoint, exc.strerror)) from None
