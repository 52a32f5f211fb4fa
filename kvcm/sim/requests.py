"""Fields of the simulated API's requests: read, type-checked, turned into 400s that name the
field (`param`)."""

import orjson

from kvcm.sim.errors import error

_CHAT_OPTIONS = (("chat_template", str), ("chat_template_kwargs", dict), ("add_generation_prompt", bool),
                 ("continue_final_message", bool), ("tools", list), ("documents", list))
_MULTIMODAL_PARTS = ("image_url", "input_audio", "audio_url", "video_url", "image", "input_image", "file")


def body_of(request):
    """The JSON object of the body, whatever the Content-Type says (curl -d sends a form type)."""
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise error(400, "the request body is not valid JSON: %s" % exc) from None
    if not isinstance(body, dict):
        raise error(400, "the request body must be a JSON object")
    return body


def field(body, name, kind, what, default=None):
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise error(400, "%r must be %s" % (name, what), param=name)
    return value


def count(body, name, low):
    value = field(body, name, int, "an integer")
    if value is not None and value < low:
        raise error(400, "%r must be at least %d, got %d" % (name, low, value), param=name)
    return value


def chat_options(body):
    options = {}
    for name, kind in _CHAT_OPTIONS:
        value = field(body, name, kind, "a " + kind.__name__)
        if value is not None:
            options[name] = value
    return options


def messages_of(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise error(400, "'messages' must be a non-empty list of messages", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise error(400, "every message must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise error(400, "a message's 'content' must be a string or a list of parts", param="messages")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") in _MULTIMODAL_PARTS:
                raise error(400, "multimodal inputs (%s) are not supported by kvcm sim: it simulates text "
                                 "models only" % part["type"], param="messages")
    return messages


class Params:
    """The generation parameters of one completion or chat request."""

    def __init__(self, body, chat):
        self.max_tokens = count(body, "max_completion_tokens", 1) if chat else None
        if self.max_tokens is None:
            self.max_tokens = count(body, "max_tokens", 1)
        self.min_tokens = count(body, "min_tokens", 0) or 0
        self.n = count(body, "n", 1) or 1
        self.seed = field(body, "seed", int, "an integer")
        self.ignore_eos = field(body, "ignore_eos", bool, "a boolean", False)
        self.stream = field(body, "stream", bool, "a boolean", False)
        options = field(body, "stream_options", dict, "an object")
        if options is not None and not self.stream:
            raise error(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        self.include_usage = bool(options and field(options, "include_usage", bool, "a boolean", False))
        self.cache_salt = field(body, "cache_salt", str, "a string")
        if self.cache_salt == "":
            raise error(400, "Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt")
        self.cache_hit_threshold = field(body, "cache_hit_threshold", (int, float), "a number between 0 and 1")
        if self.cache_hit_threshold is not None and not 0 <= self.cache_hit_threshold <= 1:
            raise error(400, "'cache_hit_threshold' must be a number between 0 and 1", param="cache_hit_threshold")
        transfer = field(body, "kv_transfer_params", dict, "an object") or {}
        self.remote_prefill = bool(field(transfer, "do_remote_prefill", bool, "a boolean", False))
        self.remote_decode = bool(field(transfer, "do_remote_decode", bool, "a boolean", False))
        if self.remote_decode and self.stream:
            raise error(400, "Prefill does not support streaming", param="stream")
        self.top_logprobs = self._logprobs(body, chat)

    @staticmethod
    def _logprobs(body, chat):
        """None (no logprobs), or how many alternatives per token (vLLM's limit: 20)."""
        if chat:
            if not field(body, "logprobs", bool, "a boolean", False):
                if body.get("top_logprobs") is not None:
                    raise error(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
                return None
            top = count(body, "top_logprobs", 0)
            value, name = (0 if top is None else top), "top_logprobs"
        else:
            value, name = count(body, "logprobs", 0), "logprobs"
            if value is None:
                return None
        if value > 20:
            raise error(400, "%r must be at most 20, got %d" % (name, value), param=name)
        return value
