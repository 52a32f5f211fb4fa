"""kvcm as a library: the index, the event ingest and the scorer behind one object.

The HTTP service is a thin layer over this; a Python router can embed it instead:

    indexer = Indexer(load_config(["--tokenizer", "Qwen/Qwen3-0.6B=/models/qwen3"]))
    await indexer.start()                       # ZMQ ingest on the running loop
    result = await indexer.score("Qwen/Qwen3-0.6B", prompt="...")
    best = max(result["scores"], key=result["scores"].get, default=None)
    await indexer.close()

The index lives in a backend (kvcm/backend.py): this process's memory, or with
`--index redis://…` a Redis-protocol store shared with other replicas, where scoring needs a
round trip. The coroutines (score_tokens_async, score_keys_async, pods_async,
clear_pod_async) work with either; the synchronous methods need a backend that answers at
once (the in-memory one). kvcm's own HTTP API uses the operations that answer either way
(lookup_tokens, lookup_keys, pod_listing, forget_pod) with kvcm.backend.then().
"""

import asyncio
import logging

from kvcm import chat
from kvcm._core import EventSink, Index, Scorer
from kvcm.backend import IndexUnavailable, settled, then
from kvcm.backends import open_backend
from kvcm.config import Config, load_config
from kvcm.inflight import Busy, InflightLimit
from kvcm.ingest import Ingest
from kvcm.ingest_thread import IngestThread
from kvcm.state import StateKeeper
from kvcm.template_pool import TemplatePool, TemplatesUnavailable
from kvcm.tokenize import TokenizerRegistry

log = logging.getLogger("kvcm.indexer")

# Encodes longer than this many characters run in a worker thread (tokenizers releases the
# GIL), so one long prompt does not hold up every other request on the loop.
OFFLOOP_CHARS = 4096
# Worker processes rendering request-supplied chat templates (--trust-request-chat-template).
TEMPLATE_WORKERS = 2


class TemplateRefused(chat.TemplateError):
    """A request brought its own chat template and the operator does not trust those."""

    def __init__(self):
        super().__init__("this request supplies its own chat_template, which kvcm refuses unless started "
                         "with --trust-request-chat-template; omit chat_template to use the model's own")


class Indexer:
    """The index and everything that feeds and reads it, configured by a Config."""

    def __init__(self, config=None, *, tokenizers=None):
        self.config = config if config is not None else load_config([])
        cfg = self.config
        # With a shared index the local Index keeps only names and the engine-hash map (a
        # cache that resolves later events without a round trip); entries go to the store.
        self.index = Index(cfg.max_blocks)
        self.backend = open_backend(cfg, self.index)
        self.sink = EventSink(self.index, cfg.block_size, cfg.hash_algo, cfg.hash_seed, cfg.hash_mode,
                              journal=self.backend.journal, tiers=cfg.tier_weights,
                              key_memo_blocks=cfg.key_memo_blocks)
        self.scorer = Scorer(cfg.tier_weights)
        # The in-memory index lets the ingest run on a thread of its own, the second core; a
        # shared store's journal and client live on the event loop, and so does its ingest.
        if cfg.ingest_cpus is not None and not self.backend.ingest_thread:
            raise ValueError("--ingest-cpus places the in-memory index's ingest thread; with --index %s://... "
                             "the ingest runs on the event loop (--http-cpus), so leave it out"
                             % cfg.index.split("://")[0])
        placement = {"cpus": cfg.ingest_cpus} if self.backend.ingest_thread else {}
        ingest = IngestThread if self.backend.ingest_thread else Ingest
        self.ingest = ingest(self.sink, **placement, binds=cfg.zmq_bind, topic_prefix=cfg.zmq_topic_prefix,
                             engines=cfg.engines, replay_endpoints=cfg.replay_endpoint,
                             max_message=cfg.zmq_max_message, allow=cfg.zmq_allow, **self.backend.ingest_hooks())
        self.backend.attach(self.ingest)
        if not self.backend.snapshots and (cfg.state_dir or cfg.bootstrap_from):
            raise ValueError("--state-dir and --bootstrap-from keep the in-memory index; with --index %s://... "
                             "the store keeps the state, so leave them out" % cfg.index.split("://")[0])
        # in memory, a snapshot can always be streamed (GET /v1/snapshot); written to disk and
        # loaded with --state-dir, or loaded from a peer with --bootstrap-from
        self.state = StateKeeper(self, cfg.state_dir, cfg.snapshot_interval, cfg.bootstrap_from,
                                 cfg.admin_token) if self.backend.snapshots else None
        self.tokenizers = tokenizers if tokenizers is not None else TokenizerRegistry(
            cfg.tokenizer, cfg.tokenizers_dir)
        self.template_limits = chat.Limits(cfg.template_timeout, cfg.template_output_limit)
        self.templates = TemplatePool(TEMPLATE_WORKERS, self.template_limits) \
            if cfg.trust_request_chat_template else None
        self.inflight = InflightLimit(cfg.tokenize_max_inflight, cfg.tokenize_max_inflight_chars)
        self.started = False
        # What scoring found, for /metrics and the status page: requests, and those where some
        # pod held the first block (a pod without it is not in the result). Only what costs
        # nothing more to know: this runs on every scoring request.
        self.score_counts = {"requests": 0, "warm": 0}

    @property
    def unavailable(self):
        """Why the index cannot answer now, or None."""
        return self.backend.unavailable

    async def start(self):
        """Loads the configured tokenizers (a broken one is logged: its requests fail, others
        work), connects the shared index, if any (kvcm starts even when the store is down),
        loads a snapshot (--state-dir, --bootstrap-from), then starts the ZMQ ingest on the
        running loop (OSError when a socket cannot bind), whose restored streams resume."""
        # Parsing a tokenizer holds the GIL (a quarter of a second for a real one), which
        # would stall the loop at a model's first request even from a worker thread: the
        # models named by --tokenizer load now, before kvcm serves; those of
        # --tokenizers-dir, which may be many, on first use.
        await asyncio.get_running_loop().run_in_executor(None, self.tokenizers.load_all, True)
        await self.backend.start(self.sink)
        if self.state is not None:
            await self.state.restore()
        try:
            await self.ingest.start()
            if self.templates is not None:
                await self.templates.start()
        except BaseException:
            await self.ingest.stop()
            await self.backend.close()
            raise
        if self.state is not None:
            self.state.start_periodic()
        self.started = True

    async def close(self):
        """Stops; with --state-dir, after a last snapshot."""
        started, self.started = self.started, False
        if self.state is not None and started:
            await self.state.close()
        await self.ingest.stop()
        if self.templates is not None:
            await self.templates.close()
        await self.backend.close()

    # ---- keys and scores --------------------------------------------------------------

    def keys(self, model, token_ids, cache_salt=None):
        """The kvcm keys of a token list for model, as the write path stores them."""
        return self.sink.keys_for(model, token_ids, cache_salt)

    def lookup_tokens(self, model, token_ids, pods=None, cache_salt=None):
        """The native /v1/score result for token ids (no tokenizer needed), now or later (a
        value, or an awaitable with a backend that needs a round trip: kvcm.backend.then).
        IndexUnavailable while a shared store cannot answer, unless --redis-fail-open (then
        empty scores and an `unavailable` note)."""
        keys = self.keys(model, token_ids, cache_salt)
        return then(self.backend.score(model, keys, lambda: self.keys(model, token_ids, cache_salt), pods,
                                       self.scorer),
                    lambda found: self.score_result(model, token_ids, *found))

    def lookup_keys(self, model, keys, pods=None):
        """lookup_tokens for keys already computed (kvcm keys, as keys() gives them)."""
        return then(self.backend.score_keys(model, keys, pods, self.scorer),
                    lambda detailed: self.score_result(model, (), keys, detailed))

    def score_tokens(self, model, token_ids, pods=None, cache_salt=None):
        """lookup_tokens' result at once; needs a backend that answers at once."""
        self._need_answers_at_once("score_tokens_async")
        return self.lookup_tokens(model, token_ids, pods, cache_salt)

    async def score_tokens_async(self, model, token_ids, pods=None, cache_salt=None):
        return await settled(self.lookup_tokens(model, token_ids, pods, cache_salt))

    def score_keys(self, model, keys, pods=None):
        self._need_answers_at_once("score_keys_async")
        return self.lookup_keys(model, keys, pods)

    async def score_keys_async(self, model, keys, pods=None):
        return await settled(self.lookup_keys(model, keys, pods))

    def _need_answers_at_once(self, instead):
        if not self.backend.answers_at_once:
            raise RuntimeError("the index is shared: use %s" % instead)

    def score_result(self, model, token_ids, keys, detailed, note=None):
        """The /v1/score answer for a lookup's {pod: (score, blocks, {tier: blocks})}; counts it."""
        block_size = self.config.block_size
        counts = self.score_counts
        counts["requests"] += 1
        scores, matched = {}, {}
        if detailed:
            counts["warm"] += 1
            for pod, (score, blocks, tiers) in detailed.items():
                scores[pod] = score
                matched[pod] = {"blocks": blocks, "tokens": blocks * block_size, "tiers": tiers}
        out = {"model": model, "scores": scores, "blocks": len(keys), "tokens": len(token_ids), "matched": matched}
        if note is not None:
            out["unavailable"] = note
        return out

    async def tokenize(self, model, *, prompt=None, messages=None, add_special_tokens=True,
                       **chat_options):
        """(token ids, rendered chat prompt or None), with vLLM's semantics: a prompt is
        encoded with special tokens unless add_special_tokens is False; messages are rendered
        with the model's chat template and encoded without adding special tokens.

        Rendering runs off the event loop within --template-timeout and
        --template-max-output; a request's own template (chat_template that is not one of the
        model's template names) only with --trust-request-chat-template, in a worker process.
        Raises tokenize.UnknownModel, tokenize.TokenizerLoadError, chat.TemplateError
        (TemplateRefused, chat.TemplateLimitExceeded), inflight.Busy, TemplatesUnavailable."""
        name = self.tokenizer_name(model)
        tokenizer = self.tokenizers.loaded(name)
        if tokenizer is None:   # the first use reads and compiles megabytes: not on the loop
            tokenizer = await asyncio.get_running_loop().run_in_executor(None, self.tokenizers.get, name)
        if messages is None:
            with self.inflight.admit(len(prompt)):
                return await self._encode(tokenizer, prompt, add_special_tokens), None
        source = chat_options.get("chat_template")
        if tokenizer.is_template_source(source) and self.templates is None:
            raise TemplateRefused()
        with self.inflight.admit(_text_size(messages)) as ticket:
            if not tokenizer.is_template_source(source):
                return await asyncio.get_running_loop().run_in_executor(
                    None, self._render_and_encode, tokenizer, messages, chat_options, ticket)
            options = {k: v for k, v in chat_options.items() if k != "chat_template"}
            text = await self.templates.render(source, messages, special_tokens=tokenizer.special_tokens,
                                               **options)
            ticket.grow(len(text))
            return await self._encode(tokenizer, text, False), text

    def _render_and_encode(self, tokenizer, messages, chat_options, ticket):
        # in a worker thread: the model's own template, metered
        text = tokenizer.render_chat(messages, limits=self.template_limits, **chat_options)
        ticket.grow(len(text))
        return tokenizer.encode(text, add_special_tokens=False), text

    def tokenizer_name(self, model):
        """Whose tokenizer encodes requests for model: its own, else, for a LoRA adapter, its
        base model's (vLLM's rule), the base learnt from the streams that published the
        adapter's blocks."""
        if model not in self.tokenizers:
            base = self.sink.base_model(model)
            if base is not None and base in self.tokenizers:
                return base
        return model

    async def _encode(self, tokenizer, text, add_special_tokens):
        if len(text) <= OFFLOOP_CHARS:
            return tokenizer.encode(text, add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(
            None, tokenizer.encode, text, add_special_tokens)

    async def score(self, model, *, token_ids=None, prompt=None, messages=None, pods=None,
                    cache_salt=None, add_special_tokens=True, **chat_options):
        """Scores a request given as token ids, a completion prompt or chat messages."""
        given = [x is not None for x in (token_ids, prompt, messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of token_ids, prompt or messages")
        if token_ids is None:
            token_ids, _ = await self.tokenize(model, prompt=prompt, messages=messages,
                                               add_special_tokens=add_special_tokens, **chat_options)
        return await self.score_tokens_async(model, token_ids, pods, cache_salt)

    # ---- pods -------------------------------------------------------------------------

    def pod_listing(self):
        """{"pods": one entry per stream (pod, model, data-parallel rank)}, now or later;
        `blocks` counts the pod's entries per tier over every namespace it fed (null while a
        shared store cannot answer). A shared index adds "remote": the pods only other
        replicas ingest, [{"pod", "blocks"}]."""
        streams = list(self.ingest.streams())

        def listing(found):
            counts, others = found
            out = {"pods": [dict(stream, blocks=None if counts is None else counts.get(stream["pod"], {}))
                            for stream in streams]}
            if others is not None:
                out["remote"] = others
            return out
        return then(self.backend.pod_counts([s["pod"] for s in streams]), listing)

    def forget_pod(self, pod):
        """Forgets everything the pod holds, and its streams (the next batch of each is a
        new baseline): how many entries were removed, now or later (IndexUnavailable while a
        shared store is down; its streams are forgotten once the store has cleared it)."""
        if self.backend.answers_at_once:
            # in one turn of the ingest's loop: no batch of the pod applies in between
            return self.ingest.clear_pod(pod, lambda: self.backend.clear_pod(pod))

        def forget_streams(removed):
            self.ingest.forget_pod(pod)
            return removed
        return then(self.backend.clear_pod(pod), forget_streams)

    def pods(self):
        """pod_listing()["pods"] at once; needs a backend that answers at once."""
        self._need_answers_at_once("pods_async")
        return self.pod_listing()["pods"]

    async def pods_async(self):
        return await settled(self.pod_listing())

    def clear_pod(self, pod):
        """forget_pod() at once; needs a backend that answers at once."""
        self._need_answers_at_once("clear_pod_async")
        return self.forget_pod(pod)

    async def clear_pod_async(self, pod):
        return await settled(self.forget_pod(pod))


def _text_size(messages):
    """Characters of text in chat messages (their string fields and text parts): what a
    chat request is admitted with before its prompt is rendered."""
    return sum(_text_of(value) for message in messages if isinstance(message, dict)
               for value in message.values())


def _text_of(value):
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):      # content parts: strings or {"type": ..., "text": ...}
        return sum(_text_of(part.get("text") if isinstance(part, dict) else part) for part in value)
    return 0


__all__ = ["Busy", "Config", "IndexUnavailable", "Indexer", "TemplateRefused", "TemplatesUnavailable",
           "load_config"]
