"""One simulated engine (one data-parallel rank): scheduling, the latency model, KV events.

Scheduling is vLLM's FCFS in miniature: at most `max_num_seqs` requests run; the others wait
in a queue of at most `max_waiting_queue_length` (a request beyond that is refused: the API
answers 429). The head of the queue is admitted when a running slot is free and the KV cache
can hold it (it reserves every block it will need); otherwise everything behind it waits
too, as in vLLM.

Latency model (llm-d's simulator's, with its flag names): the first token comes
`--time-to-first-token` after admission when that is set, else `--prefill-overhead` +
(prompt tokens not found in the KV cache) x `--prefill-time-per-token`; each further token
`--inter-token-latency` after the previous one. Each is multiplied by the load factor
1 + (F - 1) x (running - 1) / (max_num_seqs - 1), F = `--time-factor-under-load` (1 when
one request runs, F when max_num_seqs do), and jittered by a normal draw with the matching
`*-std-dev`, clamped to ±70% of the mean.

KV events: the pool's events of one step (here: one pass of the event loop, in which every
request due at that moment advanced) are published as one batch.
"""

import asyncio
import collections
import logging
import time

log = logging.getLogger("kvcm.sim.engine")

_JITTER_CLAMP = 0.7


class QueueFull(Exception):
    """The waiting queue is at --max-waiting-queue-length."""


class EngineClosed(Exception):
    """The engine is shutting down."""


class Latency:
    """The latency model of one engine (see the module docstring)."""

    def __init__(self, config):
        self.config = config

    def _load(self, running):
        factor, seqs = self.config.time_factor_under_load, self.config.max_num_seqs
        if seqs <= 1 or factor == 1.0:
            return 1.0
        return 1.0 + (factor - 1.0) * (max(running, 1) - 1) / (seqs - 1)

    @staticmethod
    def _jitter(rng, mean, std_dev):
        if not std_dev or not mean:
            return mean
        value = rng.gauss(mean, std_dev)
        return min(max(value, mean * (1 - _JITTER_CLAMP)), mean * (1 + _JITTER_CLAMP))

    def time_to_first_token(self, rng, uncached_tokens, running):
        c = self.config
        if c.time_to_first_token:
            mean, std_dev = c.time_to_first_token, c.time_to_first_token_std_dev
        else:
            mean, std_dev = c.prefill_overhead + uncached_tokens * c.prefill_time_per_token, c.prefill_time_std_dev
        return self._jitter(rng, mean * self._load(running), std_dev)

    def inter_token(self, rng, running):
        c = self.config
        return self._jitter(rng, c.inter_token_latency * self._load(running), c.inter_token_latency_std_dev)


class Sequence:
    """One generation: a prompt, its precomputed output, and where its progress is reported.

    `updates` (optional, shared by the choices of one API request) receives
    `(choice, token_index)` for every token and `(choice, None)` at the end; `done` resolves
    when the sequence has ended (finished or aborted)."""

    def __init__(self, prompt, output, *, rng, lora=None, cache_salt=None, choice=0, updates=None,
                 max_tokens=None):
        self.prompt = prompt
        self.output = output
        self.rng = rng
        self.lora = lora
        self.cache_salt = cache_salt
        self.choice = choice
        self.updates = updates
        self.max_tokens = max_tokens
        self.arrival = time.monotonic()
        self.admitted = None
        self.first_token = None
        self.finished = None
        self.finish_reason = None      # output.finish_reason, or "abort"
        self.cached_tokens = 0
        self.generated = 0
        self.alloc = None
        self.task = None
        self.done = asyncio.get_running_loop().create_future()

    @property
    def positions(self):
        """Tokens whose KV the sequence will hold: the prompt and every output token but the
        last (its KV would be computed by a next step that never comes)."""
        return len(self.prompt) + max(len(self.output.ids) - 1, 0)

    def _update(self, item):
        if self.updates is not None:
            self.updates.put_nowait((self.choice, item))


class Engine:
    """The scheduler of one rank over its KVCache; `events` (an EventStream or None)
    publishes the pool's events once per step; `metrics` (SimMetrics or None) observes."""

    def __init__(self, config, cache, *, events=None, metrics=None):
        self.config = config
        self.cache = cache
        self.events = events
        self.metrics = metrics
        self.latency = Latency(config)
        self.waiting = collections.deque()
        self.running = set()
        self.loras_waiting = collections.Counter()
        self.loras_running = collections.Counter()
        self.finished = collections.Counter()        # finish reason -> requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._flush_pending = False
        self._closed = False
        cache.on_events = self._events_pending

    # -- requests ---------------------------------------------------------------------------

    def check_fits(self, seq):
        """Raises ValueError when the sequence can never fit in the KV cache."""
        need = self.cache.blocks_for(seq.positions)
        if need > self.cache.capacity:
            raise ValueError("the request needs %d KV cache blocks of %d tokens (%d tokens) but the cache "
                             "has %d blocks (--kv-cache-size)" % (need, self.cache.block_size, seq.positions,
                                                                  self.cache.capacity))

    def submit(self, seqs):
        """Queues the sequences of one request, all or none: QueueFull when they do not fit
        in the waiting queue, ValueError when one can never fit in the KV cache."""
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        for seq in seqs:
            self.check_fits(seq)
        room = self.config.max_waiting_queue_length - len(self.waiting)
        if not self.waiting:       # free running slots take requests at once; they are not waiting places
            room += max(self.config.max_num_seqs - len(self.running), 0)
        if len(seqs) > room:
            raise QueueFull("the waiting queue is full (%d requests, --max-waiting-queue-length %d)"
                            % (len(self.waiting), self.config.max_waiting_queue_length))
        for seq in seqs:
            self.waiting.append(seq)
            if seq.lora is not None:
                self.loras_waiting[seq.lora.name] += 1
        self._schedule()

    def abort(self, seq):
        """Stops a sequence wherever it is (the client went away); a no-op once it ended."""
        if seq.done.done():
            return
        if seq.task is not None:
            seq.task.cancel()
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if seq.lora is not None:
                self.loras_waiting[seq.lora.name] -= 1
            self._end(seq, "abort")

    async def close(self):
        """Aborts everything (shutdown) and publishes the last events."""
        self._closed = True
        for seq in list(self.waiting) + list(self.running):
            self.abort(seq)
        tasks = [seq.task for seq in self.running if seq.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._flush()

    def reset_prefix_cache(self):
        """POST /reset_prefix_cache: False while requests hold blocks."""
        return self.cache.reset()

    # -- scheduling -------------------------------------------------------------------------

    def _schedule(self):
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            alloc = self.cache.allocate(seq.prompt, seq.positions, lora=seq.lora, cache_salt=seq.cache_salt)
            if alloc is None:
                return      # the head waits for KV blocks, and everything behind it
            self.waiting.popleft()
            if seq.lora is not None:
                self.loras_waiting[seq.lora.name] -= 1
                self.loras_running[seq.lora.name] += 1
            seq.alloc = alloc
            seq.cached_tokens = alloc.hit_tokens
            seq.admitted = time.monotonic()
            self.running.add(seq)
            seq.task = asyncio.ensure_future(self._run(seq))

    async def _run(self, seq):
        reason = "abort"
        try:
            ids = seq.output.ids
            uncached = len(seq.prompt) - seq.cached_tokens
            await self._sleep_until(seq.admitted + self.latency.time_to_first_token(seq.rng, uncached, len(self.running)))
            due = time.monotonic()
            for i in range(len(ids)):
                if i:
                    due += self.latency.inter_token(seq.rng, len(self.running))
                    await self._sleep_until(due)
                    self.cache.append(seq.alloc, ids[i - 1])
                else:
                    seq.first_token = time.monotonic()
                seq.generated = i + 1
                seq._update(i)
            reason = seq.output.finish_reason
        finally:
            self.running.discard(seq)
            if seq.lora is not None:
                self.loras_running[seq.lora.name] -= 1
            self.cache.free(seq.alloc)
            self._end(seq, reason)
            if not self._closed:
                self._schedule()

    @staticmethod
    async def _sleep_until(when):
        delay = when - time.monotonic()
        await asyncio.sleep(delay if delay > 0 else 0)

    def _end(self, seq, reason):
        seq.finished = time.monotonic()
        seq.finish_reason = reason
        self.finished[reason] += 1
        self.generation_tokens += seq.generated
        if seq.admitted is not None:
            self.prompt_tokens += len(seq.prompt)
        if self.metrics is not None:
            self.metrics.observe(seq)
        seq._update(None)
        if not seq.done.done():
            seq.done.set_result(reason)

    # -- events -----------------------------------------------------------------------------

    def _events_pending(self):
        if not self._flush_pending and self.events is not None:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self):
        self._flush_pending = False
        events = self.cache.take_events()
        if events and self.events is not None:
            try:
                self.events.publish(events)
            except Exception:        # a closed or broken socket must not stop the engine
                log.exception("cannot publish %d KV events", len(events))
