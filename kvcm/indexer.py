"""kvcm as a library: the index, the event ingest and the scorer behind one object.

The HTTP service is a thin layer over this; a Python router can embed it instead:

    indexer = Indexer(load_config(["--tokenizer", "Qwen/Qwen3-0.6B=/models/qwen3"]))
    await indexer.start()                       # ZMQ ingest on the running loop
    result = await indexer.score("Qwen/Qwen3-0.6B", prompt="...")
    best = max(result["scores"], key=result["scores"].get, default=None)
    await indexer.close()
"""

import asyncio
import logging

from kvcm._core import EventSink, Index, Scorer
from kvcm.config import Config, load_config
from kvcm.ingest import Ingest
from kvcm.tokenize import TokenizerRegistry

log = logging.getLogger("kvcm.indexer")

# Encodes longer than this many characters run in a worker thread (tokenizers releases the
# GIL), so one long prompt does not hold up every other request on the loop.
OFFLOOP_CHARS = 4096


class Indexer:
    """The index and everything that feeds and reads it, configured by a Config."""

    def __init__(self, config=None, *, tokenizers=None):
        self.config = config if config is not None else load_config([])
        cfg = self.config
        if cfg.index != "memory":
            raise ValueError("--index %s: only the in-memory index is available" % cfg.index)
        self.index = Index(cfg.max_blocks)
        self.sink = EventSink(self.index, cfg.block_size, cfg.hash_algo, cfg.hash_seed, cfg.hash_mode)
        self.scorer = Scorer(cfg.tier_weights)
        self.ingest = Ingest(self.sink, binds=cfg.zmq_bind, topic_prefix=cfg.zmq_topic_prefix,
                             engines=cfg.engines, replay_endpoints=cfg.replay_endpoint)
        self.tokenizers = tokenizers if tokenizers is not None else TokenizerRegistry(
            cfg.tokenizer, cfg.tokenizers_dir)
        self.started = False

    async def start(self):
        """Starts the ZMQ ingest on the running loop (OSError when a socket cannot bind)."""
        await self.ingest.start()
        self.started = True

    async def close(self):
        self.started = False
        await self.ingest.stop()

    # ---- keys and scores --------------------------------------------------------------

    def keys(self, model, token_ids, cache_salt=None):
        """The kvcm keys of a token list for model, as the write path stores them."""
        return self.sink.keys_for(model, token_ids, cache_salt)

    def score_tokens(self, model, token_ids, pods=None, cache_salt=None):
        """Scores by token ids; needs no tokenizer. The native /v1/score result."""
        keys = self.keys(model, token_ids, cache_salt)
        detailed = self.scorer.score_detailed(self.index, model, keys, pods)
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
        Raises tokenize.UnknownModel, tokenize.TokenizerLoadError, chat.TemplateError."""
        tokenizer = self.tokenizers.get(model)
        if messages is not None:
            text = tokenizer.render_chat(messages, **chat_options)
            return await self._encode(tokenizer, text, False), text
        return await self._encode(tokenizer, prompt, add_special_tokens), None

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
        return self.score_tokens(model, token_ids, pods, cache_salt)

    # ---- pods -------------------------------------------------------------------------

    def pods(self):
        """One entry per stream (pod, model, data-parallel rank); `blocks` counts the pod's
        entries per tier over every namespace it fed."""
        out = []
        for stream in self.ingest.streams():
            entry = dict(stream)
            entry["blocks"] = self.index.pod_blocks(stream["pod"])
            out.append(entry)
        return out

    def clear_pod(self, pod):
        """Forgets everything the pod holds; returns how many entries were removed."""
        return self.index.clear_pod(pod)


__all__ = ["Config", "Indexer", "load_config"]
