"""The generation API of one simulated rank: vLLM's OpenAI-compatible server, in miniature.

Routes: POST /v1/completions and /v1/chat/completions (non-streaming and SSE), POST
/inference/v1/generate (vLLM's token-in, token-out endpoint), POST /v1/embeddings, GET
/v1/models, POST /tokenize and /detokenize, POST /v1/completions/render and
/v1/chat/completions/render (token ids without generating).

Errors are `{"error": {"message", "type", "param", "code"}}` (kvcm.sim.errors) with vLLM's
messages where it has them: an unknown model is 404, a prompt that does not fit the context
is 400, a full waiting queue is 429. Streams are SSE (`data: <json>` events, then `data:
[DONE]`): for chat a role chunk per choice, then one chunk per token, a finish chunk per
choice with its `finish_reason`, and with `stream_options.include_usage` a last chunk with
`usage` and no choices (the others then carry `"usage": null`). A client that goes away
mid-stream aborts its request.

Request headers, as llm-d's simulator reads them: `X-Request-Id` (with
`--enable-request-id-headers`: the response's id, echoed back), `X-Return-Error: STATUS`
(answer with that error, nothing generated), `X-Cache-Threshold-Finish-Reason: true` (end
with finish reason cache_threshold). With POD_NAME / POD_NAMESPACE set, answers carry
`x-inference-pod`, `x-inference-port` and `x-inference-namespace`. A share
(`--failure-injection-rate`) of generation requests fails with one of llm-d's injected
errors.
"""

import asyncio
import base64
import random
import struct
import time
import uuid

import orjson

from kvcm import chat as _chat
from kvcm.http import StreamingResponse, json_response
from kvcm.sim import text
from kvcm.sim.engine import KV_CACHE_FULL, EngineClosed, KVCacheFull, QueueFull, Sequence
from kvcm.sim.errors import error
from kvcm.sim.lengths import answer_length
from kvcm.sim.requests import Params, body_of, chat_options, field, messages_of
from kvcm.sim.responses import Chat, Completion, Generate
from kvcm.sim.settings import FAILURE_TYPES
from kvcm.sim.tools import check_tools, make_tool_calls, tool_choice

# llm-d's injected failures: message (with the model for %s) and param
INJECTED = {
    "rate_limit": ("Rate limit reached for %s in organization org-xxx on requests per min (RPM): Limit 3, Used 3, "
                   "Requested 1.", None),
    "invalid_api_key": ("Incorrect API key provided.", None),
    "context_length": ("This model's maximum context length is 4096 tokens. However, your messages resulted in "
                       "4500 tokens.", "messages"),
    "server_error": ("The server is overloaded or not ready yet.", None),
    "invalid_request": ("Invalid request: missing required parameter 'model'.", "model"),
    "model_not_found": ("The model '%s-nonexistent' does not exist", "model"),
}


def _sse(obj):
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stub_embedding(tokens, dimensions):
    """llm-d's deterministic stand-in embedding of token ids (float32 values in [-1, 1))."""
    values = []
    for i in range(dimensions):
        if i < len(tokens):
            value = 2 * (tokens[i] % 1024) / 1024 - 1
        elif tokens:
            value = 2 * (tokens[i % len(tokens)] % 256) / 256 - 1
        else:
            value = 0.0
        values.append(value)
    return values


class SimServer:
    """The generation routes of one rank (see `kvcm.sim.app.Rank` for what a rank holds)."""

    def __init__(self, rank, router):
        self.rank = rank
        self.created = int(time.time())
        self._rng = random.Random("%d/requests/%d" % (rank.config.seed, rank.index))
        self._failures = random.Random("%d/failures/%d" % (rank.config.seed, rank.index))
        for method, path, handler in (
                ("POST", "/v1/completions", self.completions),
                ("POST", "/v1/chat/completions", self.chat_completions),
                ("POST", "/inference/v1/generate", self.generate),
                ("POST", "/v1/embeddings", self.embeddings),
                ("GET", "/v1/models", self.models),
                ("POST", "/tokenize", self.tokenize),
                ("POST", "/detokenize", self.detokenize),
                ("POST", "/v1/completions/render", self.render_completion),
                ("POST", "/v1/chat/completions/render", self.render_chat)):
            router.add(method, path, handler)

    @property
    def config(self):
        return self.rank.config

    @property
    def tokenizer(self):
        return self.rank.tokenizer

    # -- models ---------------------------------------------------------------------------

    def _model(self, body, base_only=False):
        """(the model name to report, the LoRA or None); 404 for an unknown model."""
        model = field(body, "model", str, "a string")
        if model is None:
            return self.config.served_model_name, None
        if model in self.config.served_model_names:
            return model, None
        lora = self.rank.loras.get(model)
        if lora is None:
            raise error(404, "The model `%s` does not exist." % model, param="model")
        if base_only:
            raise error(400, "The model `%s` is a LoRA adapter and is not supported by the render endpoints."
                        % model, param="model")
        return model, lora

    def models(self, request):
        c = self.config
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": c.model,
                 "parent": None, "max_model_len": c.max_model_len} for name in c.served_model_names]
        data += [{"id": lora.name, "object": "model", "created": self.created, "owned_by": "vllm",
                  "root": lora.path, "parent": c.served_model_name, "max_model_len": c.max_model_len}
                 for lora in self.rank.loras]
        return json_response(200, {"object": "list", "data": data})

    # -- tokenizing -----------------------------------------------------------------------

    def _render(self, messages, options):
        try:
            return self.tokenizer.render_chat(messages, **options)
        except _chat.TemplateError as exc:
            raise error(400, str(exc)) from None

    def _chat_ids(self, body):
        messages = messages_of(body)
        prompt = self._render(messages, chat_options(body))
        return messages, self.tokenizer.encode(prompt, field(body, "add_special_tokens", bool, "a boolean", False))

    def _check_ids(self, ids):
        limit = self.tokenizer.max_token_id
        for token in ids:
            if type(token) is not int or not 0 <= token <= limit:
                raise error(400, "Token id %r is out of vocabulary" % (token,))
        return ids

    def _prompts(self, body, name="prompt"):
        """[(token ids, text or None)] of a completion request's prompt (or embedding input)."""
        prompt = body.get(name)
        add_special = field(body, "add_special_tokens", bool, "a boolean", True)
        if isinstance(prompt, str):
            return [(self.tokenizer.encode(prompt, add_special), prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [(self.tokenizer.encode(p, add_special), p) for p in prompt]
            if all(type(t) is int for t in prompt):
                return [(self._check_ids(prompt), None)]
            if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
                return [(self._check_ids(p), None) for p in prompt]
        raise error(400, "%r must be a string, a list of strings, a list of token ids or a list of token id "
                         "lists" % name, param=name)

    def tokenize(self, request):
        body = body_of(request)
        self._model(body)
        if body.get("messages") is not None:
            prompt = self._render(messages_of(body), chat_options(body))
            ids = self.tokenizer.encode(prompt, field(body, "add_special_tokens", bool, "a boolean", False))
        else:
            prompt = field(body, "prompt", str, "a string")
            if prompt is None:
                raise error(400, "give 'prompt' or 'messages'")
            ids = self.tokenizer.encode(prompt, field(body, "add_special_tokens", bool, "a boolean", True))
        strs = self.tokenizer.token_strs(ids) if field(body, "return_token_strs", bool, "a boolean") else None
        return json_response(200, {"count": len(ids), "max_model_len": self.config.max_model_len,
                                   "tokens": ids, "token_strs": strs})

    def detokenize(self, request):
        body = body_of(request)
        self._model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise error(400, "'tokens' must be a list of token ids", param="tokens")
        return json_response(200, {"prompt": self.tokenizer.decode(self._check_ids(ids))})

    def render_completion(self, request):
        body = body_of(request)
        self._model(body, base_only=True)
        return json_response(200, [{"token_ids": ids} for ids, _ in self._prompts(body)])

    def render_chat(self, request):
        body = body_of(request)
        self._model(body, base_only=True)
        return json_response(200, {"token_ids": self._chat_ids(body)[1]})

    def embeddings(self, request):
        body = body_of(request)
        model, _ = self._model(body)
        request_id, headers = self._request_id(request)
        dimensions = field(body, "dimensions", int, "an integer")
        if dimensions is not None and dimensions < 1:
            raise error(400, "dimensions must be at least 1", param="dimensions")
        encoding = field(body, "encoding_format", str, "a string", "float")
        if encoding not in ("float", "base64"):
            raise error(400, "'encoding_format' must be float or base64", param="encoding_format")
        prompts = self._prompts(body, "input")
        if any(text == "" for _, text in prompts):
            raise error(400, "input cannot be an empty string", param="input")
        inputs = [ids for ids, _ in prompts]
        data = []
        for index, ids in enumerate(inputs):
            values = stub_embedding(ids, dimensions or self.config.default_embedding_dimensions)
            packed = struct.pack("<%df" % len(values), *values)
            embedding = base64.b64encode(packed).decode() if encoding == "base64" else \
                list(struct.unpack("<%df" % len(values), packed))
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(ids) for ids in inputs)
        reply = json_response(200, {"id": "embd-" + request_id, "object": "list", "created": int(time.time()),
                                    "model": model, "data": data,
                                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        reply.headers = headers
        return reply

    # -- generation -----------------------------------------------------------------------

    def _request_id(self, request):
        """The request's id (its X-Request-Id with --enable-request-id-headers) and the headers
        every answer to it carries."""
        c, headers = self.config, []
        request_id = (c.enable_request_id_headers and request.headers.get("x-request-id")) or uuid.uuid4().hex
        if c.pod_name:
            headers += [("x-inference-pod", c.pod_name), ("x-inference-port", str(self.rank.port))]
        if c.pod_namespace:
            headers.append(("x-inference-namespace", c.pod_namespace))
        if c.enable_request_id_headers:
            headers.append(("X-Request-Id", request_id))
        return request_id, tuple(headers)

    @staticmethod
    def _return_error(request):
        """X-Return-Error: STATUS answers with that error."""
        value = request.headers.get("x-return-error")
        if not value:
            return
        try:
            status = int(value)
        except ValueError:
            status = None
        if status is None or not 400 <= status <= 599:
            raise error(400, "Invalid X-Return-Error header value %s: must be an HTTP error status (400-599)"
                        % orjson.dumps(value).decode())
        raise error(status, "Simulated error triggered by X-Return-Error header (code %d)" % status)

    def _inject_failure(self):
        c = self.config
        if not c.failure_injection_rate or self._failures.random() * 100.0 >= c.failure_injection_rate:
            return
        kind = self._failures.choice(c.failure_types)
        message, param = INJECTED[kind]
        raise error(FAILURE_TYPES[kind], message % c.model if "%s" in message else message, param)

    def _limit(self, prompt, params):
        """The most output tokens the prompt leaves room for; 400 when it does not fit."""
        c, count = self.config, len(prompt)
        if not count:
            raise error(400, "The decoder prompt cannot be empty", param="prompt")
        if count >= c.max_model_len:
            raise error(400, "This model's maximum context length is %d tokens. However, your request has %d "
                             "input tokens. Please reduce the length of the input." % (c.max_model_len, count))
        if params.max_tokens is not None and count + params.max_tokens > c.max_model_len:
            raise error(400, "'max_tokens' or 'max_completion_tokens' is too large: %d. This model's maximum "
                             "context length is %d tokens and your request has %d input tokens (%d > %d - %d)."
                        % (params.max_tokens, c.max_model_len, count, params.max_tokens, c.max_model_len, count),
                        param="max_tokens")
        return params.max_tokens if params.max_tokens is not None else c.max_model_len - count

    def _output(self, rng, prompt, echo_text, params, tools):
        limit = self._limit(prompt, params)
        if tools is not None:
            calls = make_tool_calls(tools[0], tools[1], self.config, rng)
            if calls:
                return text.tool_output(self.tokenizer, calls)
        if self.config.mode == "echo":
            if echo_text is None:           # a prompt given as token ids
                echo_text = self.tokenizer.decode(prompt)
            return text.echo_output(self.tokenizer, echo_text, limit)
        count, reason = answer_length(rng, params.max_tokens, limit, params.ignore_eos, params.min_tokens)
        return text.random_output(self.tokenizer, rng, count, reason)

    def _sequences(self, request, prompts, params, lora, tools=None):
        """One Sequence per (prompt, choice), reporting to one queue."""
        c = self.config
        most = c.max_num_seqs + c.max_waiting_queue_length
        if len(prompts) * params.n > most:
            raise error(400, "the request asks for %d sequences; at most %d can be queued (--max-num-seqs + "
                             "--max-waiting-queue-length)" % (len(prompts) * params.n, most), param="n")
        forced = request.headers.get("x-cache-threshold-finish-reason", "").strip().lower() in ("1", "t", "true")
        updates = asyncio.Queue() if params.stream else None
        seqs = []
        for prompt, echo_text in prompts:
            for _ in range(params.n):
                index = len(seqs)
                rng = random.Random("%d/%d" % (params.seed, index) if params.seed is not None
                                    else self._rng.getrandbits(64))
                output = self._output(rng, prompt, echo_text, params, tools)
                if params.remote_decode and output.finish_reason in ("stop", "length"):
                    output.finish_reason = "remote_decode"     # a prefill request, as llm-d answers it
                seqs.append(Sequence(prompt, output, rng=rng, lora=lora, cache_salt=params.cache_salt, choice=index,
                                     updates=updates, max_tokens=params.max_tokens,
                                     remote_prefill=params.remote_prefill,
                                     cache_hit_threshold=params.cache_hit_threshold, force_cache_threshold=forced))
        try:
            self.rank.engine.submit(seqs)
        except QueueFull as exc:
            raise error(429, str(exc)) from None
        except EngineClosed as exc:
            raise error(503, str(exc)) from None
        except KVCacheFull as exc:
            raise error(500, str(exc)) from None
        except ValueError as exc:
            raise error(400, str(exc)) from None
        return seqs, updates

    def _start(self, request, chat):
        """The common head of a generation request: (body, model, LoRA, params, request id,
        answer headers)."""
        body = body_of(request)
        request_id, headers = self._request_id(request)
        self._return_error(request)
        self._inject_failure()
        model, lora = self._model(body)
        return body, model, lora, Params(body, chat=chat), request_id, headers

    async def completions(self, request):
        body, model, lora, params, request_id, headers = self._start(request, chat=False)
        seqs, updates = self._sequences(request, self._prompts(body), params, lora)
        return await self._respond(Completion(model, params, seqs, request_id), seqs, updates, headers)

    async def chat_completions(self, request):
        body, model, lora, params, request_id, headers = self._start(request, chat=True)
        tools = body.get("tools")
        if tools is not None:
            check_tools(tools, not self.config.skip_tool_validation)
        messages, ids = self._chat_ids(body)
        seqs, updates = self._sequences(request, [(ids, text.message_text(messages[-1].get("content")))], params,
                                        lora, tool_choice(body, tools))
        return await self._respond(Chat(model, params, seqs, request_id), seqs, updates, headers)

    async def generate(self, request):
        body = body_of(request)
        request_id, headers = self._request_id(request)
        self._return_error(request)
        self._inject_failure()
        model, lora = self._model(body)
        ids = body.get("token_ids")
        if not isinstance(ids, list) or not ids:
            raise error(400, "Missing input token_ids", param="token_ids")
        sampling = field(body, "sampling_params", dict, "an object")
        if sampling is None:
            raise error(400, "Missing sampling_params field", param="sampling_params")
        # as vLLM's endpoint: the generation fields are sampling parameters; kv_transfer_params
        # may also come in sampling_params.extra_args
        extra = field(sampling, "extra_args", dict, "an object") or {}
        view = {**body, **sampling, "kv_transfer_params": body.get("kv_transfer_params") or
                extra.get("kv_transfer_params")}
        params = Params(view, chat=False)
        seqs, updates = self._sequences(request, [(self._check_ids(ids), None)], params, lora)
        return await self._respond(Generate(model, params, seqs, request_id), seqs, updates, headers)

    def _transfer(self, seqs):
        """kv_transfer_params for the decode pod of a prefill request."""
        r = self.rank
        return {"do_remote_decode": False, "do_remote_prefill": True, "remote_engine_id": r.engine_id,
                "remote_block_ids": seqs[0].block_ids, "remote_host": self.config.pod_ip or r.host,
                "remote_port": r.port, "tp_size": 1}

    async def _respond(self, shape, seqs, updates, headers):
        engine = self.rank.engine
        try:
            if self.config.on_kv_cache_full == "error":
                # as llm-d's simulator: the status is decided once the request is admitted or refused
                await asyncio.wait([seq.started for seq in seqs])
                if any(s.error is not None for s in seqs):
                    raise error(500, KV_CACHE_FULL)
            if updates is not None:
                return StreamingResponse(200, self._events(shape, seqs, updates), "text/event-stream",
                                         headers=(("Cache-Control", "no-cache"),) + headers)
            await asyncio.wait([seq.done for seq in seqs])   # unlike gather, never cancels them
        except BaseException:
            for seq in seqs:
                engine.abort(seq)
            raise
        finally:
            if updates is None:
                for seq in seqs:
                    engine.abort(seq)      # no-op once they ended
        if any(s.error is not None for s in seqs):
            raise error(500, KV_CACHE_FULL)
        if shape.params.remote_decode:
            shape.transfer = self._transfer(seqs)
        reply = json_response(200, shape.response())
        reply.headers = headers
        return reply

    async def _events(self, shape, seqs, updates):
        try:
            for chunk in shape.opening():
                yield _sse(chunk)
            pending = len(seqs)
            while pending:
                choice, index = await updates.get()
                if index is None:
                    pending -= 1
                    finish = shape.finish(seqs[choice])
                    if finish is not None:
                        yield _sse(finish)
                else:
                    yield _sse(shape.token(seqs[choice], index))
            if shape.params.include_usage:
                yield _sse(shape.usage_chunk())
            yield b"data: [DONE]\n\n"
        finally:
            for seq in seqs:
                self.rank.engine.abort(seq)
