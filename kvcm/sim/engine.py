"""One simulated engine (one data-parallel rank): scheduling and the timing of each request.

Scheduling is vLLM's FCFS in miniature: at most `max_num_seqs` requests run; the others wait
in a queue of at most `max_waiting_queue_length` (a request beyond that is refused: the API
answers 429). The next request to run is the first in the queue whose LoRA adapter is loaded
(or that uses the base model), else the first whose adapter can take a GPU slot
(kvcm.sim.loras, llm-d's order). It runs when a running slot is free and the KV cache can
hold it (it reserves every block it will need); otherwise everything behind it waits too, as
in vLLM. With `--on-kv-cache-full error` it fails instead (HTTP 500), as llm-d's simulator
does.

Once admitted, a request whose prompt hit rate (cached / prompt tokens) is below its
`cache_hit_threshold` (else `--global-cache-hit-threshold`) ends at once with finish reason
`cache_threshold`; so does one that asks for it (the `X-Cache-Threshold-Finish-Reason`
header). Otherwise its first token comes after the time to first token and each further
token after an inter-token latency (kvcm.sim.latency); those computed values are what the
TTFT and inter-token histograms report.
"""

import asyncio
import collections
import logging
import time

from kvcm.sim.latency import Latency

log = logging.getLogger("kvcm.sim.engine")

KV_CACHE_FULL = "the kv cache does not have sufficient capacity to store this request"


class QueueFull(Exception):
    """The waiting queue is at --max-waiting-queue-length."""


class EngineClosed(Exception):
    """The engine is shutting down."""


class KVCacheFull(Exception):
    """--on-kv-cache-full error: the KV cache cannot hold the request now."""

    def __init__(self):
        super().__init__(KV_CACHE_FULL)


class Sequence:
    """One generation: a prompt, its precomputed output, and where its progress is reported.

    `updates` (optional, shared by the choices of one API request) receives
    `(choice, token_index)` for every token and `(choice, None)` at the end; `done` resolves
    when the sequence has ended (finished, aborted or failed: `error`). `group` is the list of
    sequences of its API request."""

    def __init__(self, prompt, output, *, rng, lora=None, cache_salt=None, choice=0, updates=None,
                 max_tokens=None, remote_prefill=False, cache_hit_threshold=None, force_cache_threshold=False):
        self.prompt = prompt
        self.output = output
        self.rng = rng
        self.lora = lora
        self.cache_salt = cache_salt
        self.choice = choice
        self.updates = updates
        self.max_tokens = max_tokens
        self.remote_prefill = remote_prefill
        self.cache_hit_threshold = cache_hit_threshold
        self.force_cache_threshold = force_cache_threshold
        self.group = [self]
        self.arrival = time.monotonic()
        self.admitted = None
        self.first_token = None
        self.finished = None
        self.finish_reason = None      # output.finish_reason, cache_threshold, or abort
        self.error = None
        self.cached_tokens = 0
        self.generated = 0
        self.block_ids = []            # the KV blocks of its prompt (kv_transfer_params of a prefill)
        self.ttft = None               # the computed time to first token
        self.itl_sum = 0.0             # the computed inter-token latencies
        self.alloc = None
        self.task = None
        self.started = asyncio.get_running_loop().create_future()   # admitted (True) or not (False)
        self.done = asyncio.get_running_loop().create_future()

    @property
    def lora_name(self):
        return self.lora.name if self.lora is not None else None

    @property
    def positions(self):
        """Tokens whose KV the sequence will hold: the prompt and every output token but the
        last (its KV would be computed by a next step that never comes)."""
        return len(self.prompt) + max(len(self.output.ids) - 1, 0)

    def _update(self, item):
        if self.updates is not None:
            self.updates.put_nowait((self.choice, item))


class Engine:
    """The scheduler of one rank over its KVCache and LoRA slots; `metrics` (SimMetrics or
    None) observes; `config` may be swapped at run time (POST /admin/config)."""

    def __init__(self, config, cache, slots, *, metrics=None):
        self.latency = Latency(config)
        self.config = config
        self.cache = cache
        self.slots = slots
        self.metrics = metrics
        self.waiting = collections.deque()
        self.running = set()
        self.loras_waiting = collections.Counter()
        self.loras_running = collections.Counter()
        self.finished = collections.Counter()        # finish reason -> requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._closed = False

    @property
    def config(self):
        return self.latency.config

    @config.setter
    def config(self, config):
        self.latency.config = config

    # -- requests ---------------------------------------------------------------------------

    def check_fits(self, seq):
        """Raises ValueError (KVCacheFull with --on-kv-cache-full error) when the sequence can
        never fit in the KV cache."""
        need = self.cache.blocks_for(seq.positions)
        if self.cache.enabled and need > self.cache.capacity:
            if self.config.on_kv_cache_full == "error":
                raise KVCacheFull()
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
            seq.group = seqs
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
            self._unqueue(seq)
            self._end(seq, "abort")

    async def close(self):
        """Aborts everything (shutdown)."""
        self._closed = True
        for seq in list(self.waiting) + list(self.running):
            self.abort(seq)
        tasks = [seq.task for seq in self.running if seq.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def reset_prefix_cache(self):
        """POST /reset_prefix_cache: False while requests hold blocks."""
        return self.cache.reset()

    # -- scheduling -------------------------------------------------------------------------

    def _next(self):
        """The waiting sequence to run next (llm-d's LoRA-aware order), or None."""
        if not +self.loras_waiting:
            return self.waiting[0]
        loaded = self.slots.loaded
        for seq in self.waiting:
            if seq.lora is None or seq.lora.name in loaded:
                return seq
        for seq in self.waiting:
            if self.slots.can_run(seq.lora.name):
                return seq
        return None

    def _unqueue(self, seq):
        self.waiting.remove(seq)
        if seq.lora is not None:
            self.loras_waiting[seq.lora.name] -= 1

    def _schedule(self):
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self._next()
            if seq is None:
                return      # every waiting request needs an adapter that cannot be loaded yet
            alloc = self.cache.allocate(seq.prompt, seq.positions, lora=seq.lora, cache_salt=seq.cache_salt)
            if alloc is None:
                if self.config.on_kv_cache_full != "error":
                    return      # it waits for KV blocks, and everything behind it
                self._unqueue(seq)
                seq.error = KVCacheFull()
                self._end(seq, "error")
                continue
            self._unqueue(seq)
            self.slots.acquire(seq.lora_name)
            if seq.lora is not None:
                self.loras_running[seq.lora.name] += 1
            seq.alloc = alloc
            seq.block_ids = [block.id for block in alloc.blocks[:self.cache.blocks_for(len(seq.prompt))]]
            seq.cached_tokens = alloc.hit_tokens
            seq.admitted = time.monotonic()
            seq.started.set_result(True)
            self.running.add(seq)
            seq.task = asyncio.ensure_future(self._run(seq))

    def _below_threshold(self, seq):
        if seq.force_cache_threshold:
            return True
        threshold = seq.cache_hit_threshold
        if threshold is None and self.config.global_cache_hit_threshold > 0:
            threshold = self.config.global_cache_hit_threshold
        if threshold is None or not self.cache.enabled:
            return False
        return seq.cached_tokens / len(seq.prompt) < threshold

    async def _run(self, seq):
        reason = "abort"
        try:
            if self._below_threshold(seq):
                reason = "cache_threshold"
                return
            ids = seq.output.ids
            seq.ttft = self.latency.time_to_first_token(seq.rng, len(seq.prompt), seq.cached_tokens,
                                                        len(self.running), seq.remote_prefill)
            await self._sleep_until(seq.admitted + seq.ttft)
            due = time.monotonic()
            for i in range(len(ids)):
                if i:
                    itl = self.latency.inter_token(seq.rng, len(self.running))
                    seq.itl_sum += itl
                    if self.metrics is not None:
                        self.metrics.inter_token(itl)
                    due += itl
                    await self._sleep_until(due)
                    self.cache.append(seq.alloc, ids[i - 1])
                else:
                    seq.first_token = time.monotonic()
                seq.generated = i + 1
                seq._update(i)
            reason = seq.output.finish_reason
        finally:
            self.running.discard(seq)
            self.slots.release(seq.lora_name)
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
        if seq.error is None:
            self.finished[reason] += 1
            self.generation_tokens += seq.generated
            if seq.admitted is not None:
                self.prompt_tokens += len(seq.prompt)
        if self.metrics is not None:
            self.metrics.observe(seq)
        if not seq.started.done():
            seq.started.set_result(False)
        seq._update(None)
        if not seq.done.done():
            seq.done.set_result(reason)
