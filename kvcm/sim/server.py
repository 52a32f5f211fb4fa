"""The HTTP API of one simulated rank: vLLM's OpenAI-compatible server, in miniature.

Routes: POST /v1/completions and /v1/chat/completions (non-streaming and SSE), GET
/v1/models, POST /tokenize and /detokenize, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, POST /reset_prefix_cache, GET /health, /health/ready (and /ready,
llm-d's name), GET /metrics, and GET /sim/kv_cache (the pool's contents: what a KV-event
consumer should hold for this pod).

Errors are `{"error": {"message", "type", "code"}}` with vLLM's messages where it has them:
an unknown model is 404, a prompt that does not fit the context is 400, a full waiting queue
is 429. Streams are SSE (`data: <json>` events, then `data: [DONE]`): for chat a role chunk
per choice, then one chunk per token, a finish chunk per choice with its `finish_reason`,
and with `stream_options.include_usage` a last chunk with `usage` and no choices (the
others then carry `"usage": null`). A client that goes away mid-stream aborts its request.
"""

import asyncio
import random
import time
import uuid

import orjson

from kvcm import chat as _chat
from kvcm.http import HttpError, Response, Router, StreamingResponse, json_response
from kvcm.sim import text
from kvcm.sim.config import FAILURE_TYPES
from kvcm.sim.engine import EngineClosed, QueueFull, Sequence
from kvcm.sim.kvcache import Lora
from kvcm.sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

# The openai client's exception class names, which vLLM uses as error types
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 409: "ConflictError",
               429: "RateLimitError", 503: "ServiceUnavailableError"}
# random mode without max_tokens: at most this many tokens (finish_reason "stop")
RANDOM_MAX_TOKENS = 128
_CHAT_OPTIONS = (("chat_template", str), ("chat_template_kwargs", dict), ("add_generation_prompt", bool),
                 ("continue_final_message", bool), ("tools", list), ("documents", list))


def error(status, message):
    return HttpError(status, message, ERROR_TYPES.get(status))


# -- request fields -----------------------------------------------------------------------

def _body(request):
    """The JSON object of the body, whatever the Content-Type says (curl -d sends a form type)."""
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise error(400, "the request body is not valid JSON: %s" % exc) from None
    if not isinstance(body, dict):
        raise error(400, "the request body must be a JSON object")
    return body


def _field(body, name, kind, what, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise error(400, "%r must be %s" % (name, what))
    return value


def _count(body, name, low):
    value = _field(body, name, int, "an integer")
    if value is not None and value < low:
        raise error(400, "%r must be at least %d, got %d" % (name, low, value))
    return value


def _chat_options(body):
    options = {}
    for name, kind in _CHAT_OPTIONS:
        value = _field(body, name, kind, "a " + kind.__name__)
        if value is not None:
            options[name] = value
    return options


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise error(400, "'messages' must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise error(400, "every message must be an object with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise error(400, "a message's 'content' must be a string or a list of parts")
    return messages


class _Params:
    """The generation parameters of one completion or chat request."""

    def __init__(self, body, chat):
        self.max_tokens = _count(body, "max_completion_tokens", 1) if chat else None
        if self.max_tokens is None:
            self.max_tokens = _count(body, "max_tokens", 1)
        self.min_tokens = _count(body, "min_tokens", 0) or 0
        self.n = _count(body, "n", 1) or 1
        self.seed = _field(body, "seed", int, "an integer")
        self.ignore_eos = _field(body, "ignore_eos", bool, "a boolean", False)
        self.stream = _field(body, "stream", bool, "a boolean", False)
        options = _field(body, "stream_options", dict, "an object")
        if options is not None and not self.stream:
            raise error(400, "Stream options can only be defined when `stream=True`.")
        self.include_usage = bool(options and _field(options, "include_usage", bool, "a boolean", False))
        self.cache_salt = _field(body, "cache_salt", str, "a string")
        if self.cache_salt == "":
            raise error(400, "Parameter 'cache_salt' must be a non-empty string if provided.")


class LoraRegistry:
    """LoRA adapters loaded in one rank, with vLLM's ids (1, 2, … in load order)."""

    def __init__(self, base_names):
        self._base = set(base_names)
        self._loras = {}
        self._next_id = 1

    def load(self, name, path):
        if name in self._base:
            raise error(400, "The lora adapter '%s' has the name of a served model." % name)
        if name in self._loras:
            raise error(400, "The lora adapter '%s' has already been loaded." % name)
        lora = self._loras[name] = Lora(self._next_id, name, path)
        self._next_id += 1
        return lora

    def unload(self, name):
        if self._loras.pop(name, None) is None:
            raise error(404, "The lora adapter '%s' cannot be found." % name)

    def get(self, name):
        return self._loras.get(name)

    def __iter__(self):
        return iter(list(self._loras.values()))

    def __len__(self):
        return len(self._loras)


# -- the routes ---------------------------------------------------------------------------

class SimServer:
    """Handlers of one rank; `router` is what its HttpServer serves."""

    def __init__(self, config, rank, engine, tokenizer, loras, metrics, *, pod, ready=lambda: True):
        self.config = config
        self.rank = rank
        self.engine = engine
        self.tokenizer = tokenizer
        self.loras = loras
        self.metrics = metrics
        self.pod = pod
        self.ready = ready
        self.created = int(time.time())
        self._rng = random.Random("%d/requests/%d" % (config.seed, rank))
        self._failures = random.Random("%d/failures/%d" % (config.seed, rank))
        r = self.router = Router()
        r.add("POST", "/v1/completions", self.completions)
        r.add("POST", "/v1/chat/completions", self.chat_completions)
        r.add("GET", "/v1/models", self.models)
        r.add("POST", "/tokenize", self.tokenize)
        r.add("POST", "/detokenize", self.detokenize)
        r.add("POST", "/v1/load_lora_adapter", self.load_lora)
        r.add("POST", "/v1/unload_lora_adapter", self.unload_lora)
        r.add("POST", "/reset_prefix_cache", self.reset_prefix_cache)
        r.add("GET", "/health", self.health)
        r.add("GET", "/health/ready", self.readiness)
        r.add("GET", "/ready", self.readiness)
        r.add("GET", "/metrics", self.metrics_text)
        r.add("GET", "/sim/kv_cache", self.kv_cache)

    # -- models ---------------------------------------------------------------------------

    def _model(self, body):
        """(the model name to report, the LoRA or None); 404 for an unknown model."""
        model = _field(body, "model", str, "a string")
        if model is None:
            return self.config.served_model_name, None
        if model in self.config.served_model_names:
            return model, None
        lora = self.loras.get(model)
        if lora is None:
            raise error(404, "The model `%s` does not exist." % model)
        return model, lora

    def models(self, request):
        c = self.config
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": c.model,
                 "parent": None, "max_model_len": c.max_model_len} for name in c.served_model_names]
        data += [{"id": lora.name, "object": "model", "created": self.created, "owned_by": "vllm",
                  "root": lora.path, "parent": c.served_model_name, "max_model_len": c.max_model_len}
                 for lora in self.loras]
        return json_response(200, {"object": "list", "data": data})

    # -- tokenizing -----------------------------------------------------------------------

    def _render(self, messages, options):
        try:
            return self.tokenizer.render_chat(messages, **options)
        except _chat.TemplateError as exc:
            raise error(400, str(exc)) from None

    def _check_ids(self, ids):
        limit = self.tokenizer.max_token_id
        for token in ids:
            if type(token) is not int or not 0 <= token <= limit:
                raise error(400, "Token id %r is out of vocabulary" % (token,))
        return ids

    def _prompts(self, body):
        """[(token ids, text or None)] of a completion request's prompt."""
        prompt = body.get("prompt")
        add_special = _field(body, "add_special_tokens", bool, "a boolean", True)
        if isinstance(prompt, str):
            return [(self.tokenizer.encode(prompt, add_special), prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [(self.tokenizer.encode(p, add_special), p) for p in prompt]
            if all(type(t) is int for t in prompt):
                return [(self._check_ids(prompt), None)]
            if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
                return [(self._check_ids(p), None) for p in prompt]
        raise error(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                         "token id lists")

    def tokenize(self, request):
        body = _body(request)
        self._model(body)
        if body.get("messages") is not None:
            prompt = self._render(_messages(body), _chat_options(body))
            ids = self.tokenizer.encode(prompt, _field(body, "add_special_tokens", bool, "a boolean", False))
        else:
            prompt = _field(body, "prompt", str, "a string")
            if prompt is None:
                raise error(400, "give 'prompt' or 'messages'")
            ids = self.tokenizer.encode(prompt, _field(body, "add_special_tokens", bool, "a boolean", True))
        strs = self.tokenizer.token_strs(ids) if _field(body, "return_token_strs", bool, "a boolean") else None
        return json_response(200, {"count": len(ids), "max_model_len": self.config.max_model_len,
                                   "tokens": ids, "token_strs": strs})

    def detokenize(self, request):
        body = _body(request)
        self._model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise error(400, "'tokens' must be a list of token ids")
        return json_response(200, {"prompt": self.tokenizer.decode(self._check_ids(ids))})

    # -- generation -----------------------------------------------------------------------

    def _inject_failure(self, model):
        c = self.config
        if not c.failure_injection_rate or self._failures.random() * 100.0 >= c.failure_injection_rate:
            return
        kind = self._failures.choice(c.failure_types)
        message = {
            "rate_limit": "Rate limit reached for %s" % model,
            "invalid_api_key": "Incorrect API key provided.",
            "context_length": "This model's maximum context length is %d tokens. However, your request "
                              "has more input tokens than that." % c.max_model_len,
            "server_error": "The server is overloaded or not ready yet.",
            "invalid_request": "Invalid request: the request is not valid.",
            "model_not_found": "The model `%s-nonexistent` does not exist." % model,
        }[kind]
        raise error(FAILURE_TYPES[kind], message + " (injected failure: %s)" % kind)

    def _limit(self, prompt, params):
        """The most output tokens the prompt leaves room for; 400 when it does not fit."""
        c, count = self.config, len(prompt)
        if not count:
            raise error(400, "The decoder prompt cannot be empty")
        if count >= c.max_model_len:
            raise error(400, "This model's maximum context length is %d tokens. However, your request has %d "
                             "input tokens. Please reduce the length of the input." % (c.max_model_len, count))
        if params.max_tokens is not None and count + params.max_tokens > c.max_model_len:
            raise error(400, "'max_tokens' or 'max_completion_tokens' is too large: %d. This model's maximum "
                             "context length is %d tokens and your request has %d input tokens (%d > %d - %d)."
                        % (params.max_tokens, c.max_model_len, count, params.max_tokens, c.max_model_len, count))
        return params.max_tokens if params.max_tokens is not None else c.max_model_len - count

    def _output(self, rng, prompt, echo_text, params):
        limit = self._limit(prompt, params)
        if self.config.mode == "echo":
            if echo_text is None:           # a prompt given as token ids
                echo_text = self.tokenizer.decode(prompt)
            return text.echo_output(self.tokenizer, echo_text, limit)
        capped = params.max_tokens is None and limit > RANDOM_MAX_TOKENS
        high = RANDOM_MAX_TOKENS if capped else limit
        count = high if params.ignore_eos else rng.randint(min(max(params.min_tokens, 1), high), high)
        return text.random_output(self.tokenizer, rng, count, "length" if count == high and not capped else "stop")

    def _sequences(self, prompts, params, lora):
        """One Sequence per (prompt, choice), reporting to one queue."""
        c = self.config
        most = c.max_num_seqs + c.max_waiting_queue_length
        if len(prompts) * params.n > most:
            raise error(400, "the request asks for %d sequences; at most %d can be queued (--max-num-seqs + "
                             "--max-waiting-queue-length)" % (len(prompts) * params.n, most))
        updates = asyncio.Queue() if params.stream else None
        seqs = []
        for prompt, echo_text in prompts:
            for _ in range(params.n):
                index = len(seqs)
                rng = random.Random("%d/%d" % (params.seed, index) if params.seed is not None
                                    else self._rng.getrandbits(64))
                output = self._output(rng, prompt, echo_text, params)
                seqs.append(Sequence(prompt, output, rng=rng, lora=lora, cache_salt=params.cache_salt, choice=index,
                                     updates=updates, max_tokens=params.max_tokens))
        try:
            self.engine.submit(seqs)
        except QueueFull as exc:
            raise error(429, str(exc)) from None
        except EngineClosed as exc:
            raise error(503, str(exc)) from None
        except ValueError as exc:
            raise error(400, str(exc)) from None
        return seqs, updates

    async def completions(self, request):
        body = _body(request)
        model, lora = self._model(body)
        self._inject_failure(model)
        params = _Params(body, chat=False)
        seqs, updates = self._sequences(self._prompts(body), params, lora)
        return await self._respond(_Completion(model, params, seqs, params.n), seqs, updates)

    async def chat_completions(self, request):
        body = _body(request)
        model, lora = self._model(body)
        self._inject_failure(model)
        params = _Params(body, chat=True)
        messages = _messages(body)
        prompt = self._render(messages, _chat_options(body))
        ids = self.tokenizer.encode(prompt, _field(body, "add_special_tokens", bool, "a boolean", False))
        seqs, updates = self._sequences([(ids, text.message_text(messages[-1].get("content")))], params, lora)
        return await self._respond(_Chat(model, params, seqs, params.n), seqs, updates)

    async def _respond(self, shape, seqs, updates):
        if updates is not None:
            return StreamingResponse(200, self._events(shape, seqs, updates), "text/event-stream",
                                     headers=(("Cache-Control", "no-cache"),))
        try:
            await asyncio.wait([seq.done for seq in seqs])   # unlike gather, never cancels them
        finally:
            for seq in seqs:
                self.engine.abort(seq)      # no-op unless this handler was cancelled
        return json_response(200, shape.response())

    async def _events(self, shape, seqs, updates):
        try:
            for chunk in shape.opening():
                yield _sse(chunk)
            pending = len(seqs)
            while pending:
                choice, index = await updates.get()
                if index is None:
                    pending -= 1
                    yield _sse(shape.finish(seqs[choice]))
                else:
                    yield _sse(shape.token(seqs[choice], index))
            if shape.params.include_usage:
                yield _sse(shape.usage_chunk())
            yield b"data: [DONE]\n\n"
        finally:
            for seq in seqs:
                self.engine.abort(seq)

    # -- LoRA -----------------------------------------------------------------------------

    def load_lora(self, request):
        body = _body(request)
        name = _field(body, "lora_name", str, "a string")
        path = _field(body, "lora_path", str, "a string")
        if not name or not path:
            raise error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        self.loras.load(name, path)
        return Response(200, "Success: LoRA adapter '%s' added successfully." % name, content_type="text/plain")

    def unload_lora(self, request):
        body = _body(request)
        name = _field(body, "lora_name", str, "a string")
        if not name:
            raise error(400, "'lora_name' must be provided.")
        self.loras.unload(name)
        return Response(200, "Success: LoRA adapter '%s' removed successfully." % name, content_type="text/plain")

    # -- operations -----------------------------------------------------------------------

    def reset_prefix_cache(self, request):
        if not self.engine.reset_prefix_cache():
            raise error(409, "cannot reset the prefix cache: %d KV blocks are in use by running requests"
                        % self.engine.cache.used)
        return Response(200, b"", content_type=None)

    def health(self, request):
        return Response(200, b"", content_type=None)

    def readiness(self, request):
        if not self.ready():
            raise error(503, "not ready")
        return json_response(200, {"status": "ready"})

    def metrics_text(self, request):
        return Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    def kv_cache(self, request):
        cache = self.engine.cache
        return json_response(200, {"pod": self.pod, "model": self.config.model, "dp_rank": self.rank,
                                   "block_size": cache.block_size, "capacity": cache.capacity, "used": cache.used,
                                   "usage": cache.usage, "blocks": cache.contents(),
                                   "eviction_order": cache.eviction_order()})


def _sse(obj):
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# -- response shapes ------------------------------------------------------------------------

class _Shape:
    """What one request's response and stream chunks look like."""

    object = chunk_object = None

    def __init__(self, model, params, seqs, n):
        self.model = model
        self.params = params
        self.seqs = seqs
        self.n = n
        self.created = int(time.time())
        self.id = self.prefix + uuid.uuid4().hex

    def _chunk(self, choices):
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.params.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self):
        # a prompt counts once for its n choices, as vLLM counts it; its cached tokens are
        # those of its first choice (the others find the blocks it computed)
        firsts = self.seqs[::self.n]
        prompt = sum(len(s.prompt) for s in firsts)
        completion = sum(s.generated for s in self.seqs)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)}}

    def usage_chunk(self):
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def opening(self):
        return ()


class _Completion(_Shape):
    prefix = "cmpl-"
    object = chunk_object = "text_completion"

    def response(self):
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": s.choice, "text": "".join(s.output.pieces[:s.generated]), "logprobs": None,
                             "finish_reason": s.finish_reason, "stop_reason": None, "prompt_logprobs": None}
                            for s in self.seqs],
                "usage": self.usage()}

    def token(self, seq, index):
        return self._chunk([{"index": seq.choice, "text": seq.output.pieces[index], "logprobs": None,
                             "finish_reason": None, "stop_reason": None}])

    def finish(self, seq):
        return self._chunk([{"index": seq.choice, "text": "", "logprobs": None,
                             "finish_reason": seq.finish_reason, "stop_reason": None}])


class _Chat(_Shape):
    prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def response(self):
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": s.choice,
                             "message": {"role": "assistant", "content": "".join(s.output.pieces[:s.generated]),
                                         "tool_calls": []},
                             "logprobs": None, "finish_reason": s.finish_reason, "stop_reason": None}
                            for s in self.seqs],
                "usage": self.usage(), "prompt_logprobs": None}

    def opening(self):
        return [self._chunk([{"index": s.choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for s in self.seqs]

    def token(self, seq, index):
        return self._chunk([{"index": seq.choice, "delta": {"content": seq.output.pieces[index]}, "logprobs": None,
                             "finish_reason": None}])

    def finish(self, seq):
        return self._chunk([{"index": seq.choice, "delta": {}, "logprobs": None,
                             "finish_reason": seq.finish_reason}])
