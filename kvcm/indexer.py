"""kvcm as a library: the index, the event ingest and the scorer behind one object.

The HTTP service is a thin layer over this; a Python router can embed it instead:

    indexer = Indexer(load_config(["--tokenizer", "Qwen/Qwen3-0.6B=/models/qwen3"]))
    await indexer.start()                       # ZMQ ingest on the running loop
    result = await indexer.score("Qwen/Qwen3-0.6B", prompt="...")
    best = max(result["scores"], key=result["scores"].get, default=None)
    await indexer.close()

With `--index redis://…` the index lives in a Redis-protocol store shared with other replicas
(kvcm/shared_index.py): scoring then needs a round trip, so use the coroutines
(score_tokens_async, pods_async, clear_pod_async), which work with either index.
"""

import asyncio
import logging

from kvcm import chat
from kvcm._core import EventSink, Index, Scorer
from kvcm.config import Config, load_config
from kvcm.inflight import Busy, InflightLimit
from kvcm.ingest import Ingest
from kvcm.shared_index import IndexUnavailable, SharedIndex
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
        self.shared = None if cfg.index == "memory" else SharedIndex(
            cfg.index, timeout=cfg.redis_timeout, ttl=cfg.redis_ttl, backlog_events=cfg.redis_backlog,
            fail_open=cfg.redis_fail_open)
        self.sink = EventSink(self.index, cfg.block_size, cfg.hash_algo, cfg.hash_seed, cfg.hash_mode,
                              journal=None if self.shared is None else self.shared.journal,
                              tiers=cfg.tier_weights)
        self.scorer = Scorer(cfg.tier_weights)
        self.ingest = Ingest(self.sink, binds=cfg.zmq_bind, topic_prefix=cfg.zmq_topic_prefix,
                             engines=cfg.engines, replay_endpoints=cfg.replay_endpoint,
                             on_applied=None if self.shared is None else self.shared.batch_done,
                             clears_on_restart=self.shared is None,
                             prefetch=None if self.shared is None else self.shared.prefetch,
                             position=None if self.shared is None else self.shared.position,
                             max_message=cfg.zmq_max_message, allow=cfg.zmq_allow)
        if self.shared is not None:
            self.shared.on_switch = self.ingest.resync_namespace
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
    def remote(self):
        """True when the index is a shared store (scoring is then a coroutine)."""
        return self.shared is not None

    @property
    def unavailable(self):
        """Why the index cannot answer now, or None."""
        return None if self.shared is None else self.shared.status

    async def start(self):
        """Loads the configured tokenizers (a broken one is logged: its requests fail, others
        work), connects the shared index, if any (kvcm starts even when the store is down),
        then starts the ZMQ ingest on the running loop (OSError when a socket cannot bind)."""
        # Parsing a tokenizer holds the GIL (a quarter of a second for a real one), which
        # would stall the loop at a model's first request even from a worker thread: the
        # models named by --tokenizer load now, before kvcm serves; those of
        # --tokenizers-dir, which may be many, on first use.
        await asyncio.get_running_loop().run_in_executor(None, self.tokenizers.load_all, True)
        if self.shared is not None:
            await self.shared.start(self.sink)
        try:
            await self.ingest.start()
            if self.templates is not None:
                await self.templates.start()
        except BaseException:
            await self.ingest.stop()
            if self.shared is not None:
                await self.shared.close()
            raise
        self.started = True

    async def close(self):
        self.started = False
        await self.ingest.stop()
        if self.templates is not None:
            await self.templates.close()
        if self.shared is not None:
            await self.shared.close()

    # ---- keys and scores --------------------------------------------------------------

    def keys(self, model, token_ids, cache_salt=None):
        """The kvcm keys of a token list for model, as the write path stores them."""
        return self.sink.keys_for(model, token_ids, cache_salt)

    def score_tokens(self, model, token_ids, pods=None, cache_salt=None):
        """Scores by token ids with the in-memory index; needs no tokenizer. The native
        /v1/score result."""
        keys = self.keys(model, token_ids, cache_salt)
        return self._result(model, token_ids, keys, self.match_keys(model, keys, pods))

    def match_keys(self, model, keys, pods=None):
        """{pod: (score, blocks, tiers)} from the in-memory index, counted as a scoring request:
        what score_tokens answers from, for callers that word their own answer."""
        if self.shared is not None:
            raise RuntimeError("the index is shared: use score_tokens_async")
        return self._counted(self.scorer.score_detailed(self.index, model, keys, pods))

    async def score_tokens_async(self, model, token_ids, pods=None, cache_salt=None):
        """score_tokens for either index. With a shared one: IndexUnavailable while the store
        cannot answer, unless --redis-fail-open (then empty scores and an `unavailable` note)."""
        if self.shared is None:
            return self.score_tokens(model, token_ids, pods, cache_salt)
        keys = self.keys(model, token_ids, cache_salt)
        weights, default = self.scorer.weights, self.scorer.default_weight
        try:
            contract, detailed = await self.shared.lookup(model, keys, pods, weights, default)
            if contract[0] and self.shared.adopt(model, *contract):
                # another replica switched the model's contract: key the request its way
                fresh = self.keys(model, token_ids, cache_salt)
                if list(fresh) != list(keys):
                    keys = fresh
                    contract, detailed = await self.shared.lookup(model, keys, pods, weights, default)
        except IndexUnavailable as exc:
            if not self.shared.fail_open:
                raise
            result = self._result(model, token_ids, keys, self._counted({}))
            result["unavailable"] = str(exc)
            return result
        return self._result(model, token_ids, keys, self._counted(detailed))

    def score_keys(self, model, keys, pods=None):
        """score_tokens for keys already computed (kvcm keys, as keys() gives them)."""
        return self._result(model, (), keys, self.match_keys(model, keys, pods))

    async def score_keys_async(self, model, keys, pods=None):
        """score_keys for either index (IndexUnavailable while a shared store cannot answer)."""
        if self.shared is None:
            return self.score_keys(model, keys, pods)
        _, detailed = await self.shared.lookup(model, keys, pods, self.scorer.weights, self.scorer.default_weight)
        return self._result(model, (), keys, self._counted(detailed))

    def _counted(self, detailed):
        """detailed, counted as one scoring request (warm when any pod matched)."""
        counts = self.score_counts
        counts["requests"] += 1
        if detailed:
            counts["warm"] += 1
        return detailed

    def _result(self, model, token_ids, keys, detailed):
        block_size = self.config.block_size
        return {
            "model": model,
            "scores": {pod: score for pod, (score, _, _) in detailed.items()},
            "blocks": len(keys),
            "tokens": len(token_ids),
            "matched": {pod: {"blocks": blocks, "tokens": blocks * block_size, "tiers": tiers}
                        for pod, (_, blocks, tiers) in detailed.items()},
        }

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

    def pods(self):
        """One entry per stream (pod, model, data-parallel rank); `blocks` counts the pod's
        entries per tier over every namespace it fed. In-memory index only."""
        if self.shared is not None:
            raise RuntimeError("the index is shared: use pods_async")
        return self._pods(self.index.pod_blocks)

    async def pods_async(self):
        """{"pods": pods()} for either index. A shared one adds "remote": the pods only other
        replicas ingest, [{"pod", "blocks"}]; `blocks` is null while the store cannot answer."""
        if self.shared is None:
            return {"pods": self.pods()}
        counts = await self.shared.pod_blocks()
        streams = self._pods(lambda pod: None if counts is None else counts.get(pod, {}))
        local = {entry["pod"] for entry in streams}
        remote = [{"pod": pod, "blocks": tiers} for pod, tiers in sorted((counts or {}).items())
                  if pod not in local]
        return {"pods": streams, "remote": remote}

    def _pods(self, blocks_of):
        out = []
        for stream in self.ingest.streams():
            entry = dict(stream)
            entry["blocks"] = blocks_of(stream["pod"])
            out.append(entry)
        return out

    def clear_pod(self, pod):
        """Forgets everything the pod holds, and its streams (the next batch of each is a
        new baseline); returns how many entries were removed. In-memory index only."""
        if self.shared is not None:
            raise RuntimeError("the index is shared: use clear_pod_async")
        self.ingest.forget_pod(pod)
        return self.index.clear_pod(pod)

    async def clear_pod_async(self, pod):
        """clear_pod() for either index (IndexUnavailable while a shared store is down)."""
        if self.shared is None:
            return self.clear_pod(pod)
        removed = await self.shared.clear_pod(pod)
        self.ingest.forget_pod(pod)
        return removed


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
