"""HTTP routes of `kvcm serve` (DESIGN.md §5) over an Indexer.

Scoring by token ids is answered synchronously, inside the protocol's data_received, with no
Task: that is the path schedulers call on every request. Requests that need a tokenizer are
coroutines (long encodes run in a worker thread), and so is everything that reads a shared
index (--index redis://…): a store that cannot answer turns into 503 with Retry-After.
"""

import hmac
import ipaddress
import logging

from kvcm import chat, tokenize
from kvcm._core import DumpAborted, ScoreLane
from kvcm.backend import IndexUnavailable, then
from kvcm.bodies import TOKEN_ID_TYPES, json_object
from kvcm.dynamo import DynamoApi
from kvcm.endpoints import check_registered_endpoint
from kvcm.http import BadRequest, HttpError, Response, Router, StreamingResponse, json_response
from kvcm.indexer import Busy, TemplatesUnavailable
from kvcm.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kvcm.ratelog import RateLimitedLog
from kvcm.status import Status

log = logging.getLogger("kvcm.api")
rate_log = RateLimitedLog(log)

# The setting behind each kind of render limit, named in the 422 answer.
_LIMIT_OPTIONS = {"time": "--template-timeout", "output": "--template-max-output",
                  "memory": "the template workers' memory limit"}

_CHAT_OPTIONS = ("chat_template", "chat_template_kwargs", "add_generation_prompt", "tools", "documents",
                 "continue_final_message")


# ---- request fields ---------------------------------------------------------------------

def _body(request):
    return json_object(request)


def _field(body, name, kinds, what, required=False):
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("field %r is required" % name)
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise BadRequest("field %r must be %s" % (name, what))
    return value


def _as_tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _model(body, default):
    """The request's model, else the configured default (--default-model, llm-d's MODEL_NAME)."""
    model = _field(body, "model", str, "a string", required=default is None)
    return default if model is None else model


def _token_ids(body):
    # only the container here: the core checks every item while it converts them (a Python
    # loop over 1024 ids would cost more than hashing them)
    return _field(body, "token_ids", TOKEN_ID_TYPES, "a list of non-negative integers")


def _bad_token_ids(error):
    return BadRequest("field 'token_ids' must be a list of non-negative integers below 2**64 (%s)" % error)


def _pods(body):
    pods = _field(body, "pods", list, "a list of pod names")
    if pods is not None and not all(isinstance(p, str) for p in pods):
        raise BadRequest("field 'pods' must be a list of pod names")
    return pods


def _messages(body, required=False):
    messages = _field(body, "messages", list, "a list of chat messages", required)
    if messages is not None and not all(isinstance(m, dict) for m in messages):
        raise BadRequest("field 'messages' must be a list of objects")
    return messages


def _chat_options(body):
    options = {}
    for name, kinds, what in (("chat_template", str, "a string"),
                              ("chat_template_kwargs", dict, "an object"),
                              ("add_generation_prompt", bool, "a boolean"),
                              ("continue_final_message", bool, "a boolean"),
                              ("tools", list, "a list"),
                              ("documents", list, "a list")):
        value = _field(body, name, kinds, what)
        if value is not None:
            options[name] = value
    return options


def _unavailable(error, type="index_unavailable"):
    return HttpError(503, str(error), type=type, headers=(("Retry-After", "1"),))


def _ok(body):
    return json_response(200, body)




def _one_input(body, names):
    given = [n for n in names if body.get(n) is not None]
    if len(given) != 1:
        raise BadRequest("give exactly one of %s" % ", ".join(repr(n) for n in names))
    return given[0]


# ---- the routes -------------------------------------------------------------------------

class Api:
    """Handlers bound to one Indexer; `router` is what the HTTP server serves."""

    def __init__(self, indexer, metrics, *, admin_token=None, ready=lambda: True, fast_ids=True):
        self.indexer = indexer
        self.fast_ids = fast_ids    # token ids parsed by the core from the body (kvcm/bodies.py)
        self.metrics = metrics
        self.admin_token = admin_token
        self.default_model = indexer.config.default_model
        self.ready = ready
        r = self.router = Router()
        r.add("POST", "/v1/score", self.score)
        r.add("POST", "/score_completions", self.score_completions)
        r.add("POST", "/score_chat_completions", self.score_chat_completions)
        r.add("POST", "/v1/tokenize", self.tokenize)
        r.add("POST", "/v1/hash", self.hash)
        r.add("GET", "/v1/pods", self.pods)
        r.add("DELETE", "/v1/pods/{pod}", self.delete_pod)
        r.add("GET", "/v1/engines", self.engines)
        r.add("GET", "/v1/snapshot", self.snapshot)
        r.add("POST", "/v1/engines", self.add_engine)
        r.add("DELETE", "/v1/engines/{name}", self.remove_engine)
        self.dynamo = DynamoApi(indexer, self._admin, self._connect_engine, fast_ids)
        self.dynamo.routes(r)
        r.add("GET", "/health", self.health)
        r.add("GET", "/ready", self.readiness)
        r.add("GET", "/metrics", self.metrics_text)
        self.status = Status(indexer, metrics, self.not_ready)
        r.add("GET", "/v1/status", self.status.json)
        r.add("GET", "/", self.status.page)
        r.add("GET", "/status", self.status.page)

    # -- scoring ---------------------------------------------------------------------------

    def score(self, request):
        body = json_object(request, self.fast_ids)
        model, pods, salt, source = self._score_fields(body)
        if source == "token_ids":
            try:
                found = self.indexer.lookup_tokens(model, _token_ids(body), pods, salt)
            except (TypeError, ValueError) as e:
                raise _bad_token_ids(e) from None
            return then(found, _ok, _unavailable)
        return self._score_text(body, model, pods, salt)

    def _score_fields(self, body):
        """(model, pods, cache salt, which of token_ids, prompt, messages) of a /v1/score body."""
        return (_model(body, self.default_model), _pods(body), _field(body, "cache_salt", str, "a string"),
                _one_input(body, ("token_ids", "prompt", "messages")))

    def _lane_fields(self, body):
        """The scoring lane's first half of score(): raises unless the body scores token ids."""
        if len(body) == 2 and type(body.get("model")) is str:    # what schedulers send: nothing else to read
            model = body["model"]
            return model, None, None, model
        model, pods, salt, source = self._score_fields(body)
        if source != "token_ids":
            raise BadRequest("not a token-id body")
        return model, pods, salt, model

    def lane(self):
        """The scoring lane for /v1/score and Dynamo's /query (kvcm/_score_lane.pxi), or None
        when the index does not score in this process or token ids are parsed the general way."""
        index = self.indexer.backend.local_index
        if index is None or not self.fast_ids:
            return None
        lane = ScoreLane(self.indexer.sink, index, self.indexer.scorer)
        lane.add("/v1/score", self._lane_fields, self.indexer.score_result,
                 score_counts=self.indexer.score_counts, block_size=self.indexer.config.block_size)
        self.dynamo.lane_route(lane)
        return lane

    async def _score_text(self, body, model, pods, salt):
        ids, _ = await self._tokenize(body, model)
        return json_response(200, await self._scores(model, ids, pods, salt))

    async def _scores(self, model, ids, pods=None, salt=None):
        try:
            return await self.indexer.score_tokens_async(model, ids, pods, salt)
        except IndexUnavailable as e:
            raise _unavailable(e) from None

    async def _tokenize(self, body, model):
        """(ids, rendered chat text or None) for a request with a prompt or messages."""
        messages = _messages(body)
        prompt = None if messages is not None else _field(body, "prompt", str, "a string", required=True)
        add_special = _field(body, "add_special_tokens", bool, "a boolean")
        options = _chat_options(body) if messages is not None else {}
        # label only models that have a tokenizer: request contents must not grow the metrics
        label = self.indexer.tokenizer_name(model)
        if label not in self.indexer.tokenizers:
            label = "unknown"
        try:
            with self.metrics.timed_tokenize(label):
                return await self.indexer.tokenize(
                    model, prompt=prompt, messages=messages,
                    add_special_tokens=True if add_special is None else add_special, **options)
        except tokenize.UnknownModel as e:
            raise HttpError(404, str(e)) from None
        except tokenize.TokenizerLoadError as e:
            raise HttpError(500, str(e)) from None
        except chat.TemplateLimitExceeded as e:
            raise self._over_limit(e) from None
        except chat.TemplateError as e:
            raise BadRequest(str(e)) from None
        except Busy as e:
            rate_log.warning("tokenize-busy", "refusing requests: %s", e)
            raise _unavailable(e, "busy") from None
        except TemplatesUnavailable as e:
            rate_log.error("templates-unavailable", "%s", e)
            raise _unavailable(e, "unavailable") from None

    def _over_limit(self, error):
        self.metrics.templates_stopped.labels(error.limit).inc()
        rate_log.warning("template-" + error.limit, "a chat template render was stopped: %s", error.message)
        return HttpError(422, "%s (limit: %s)" % (error.message, _LIMIT_OPTIONS.get(error.limit, error.limit)),
                         type="template_limit_exceeded")

    async def score_completions(self, request):
        # llm-d: {"prompt", "model"} -> {pod: score}, null when the prompt fills no block
        body = _body(request)
        model = _model(body, self.default_model)
        _field(body, "prompt", str, "a string", required=True)
        ids, _ = await self._tokenize(body, model)
        result = await self._scores(model, ids)
        return json_response(200, result["scores"] if result["blocks"] else None)

    async def score_chat_completions(self, request):
        # llm-d: {"model", "messages", ...} -> {"podScores": {...} | null, "templated_messages"}
        body = _body(request)
        model = _model(body, self.default_model)
        _messages(body, required=True)
        ids, text = await self._tokenize(body, model)
        result = await self._scores(model, ids)
        return json_response(200, {"podScores": result["scores"] if result["blocks"] else None,
                                   "templated_messages": text})

    async def tokenize(self, request):
        body = _body(request)
        model = _model(body, self.default_model)
        _one_input(body, ("prompt", "messages"))
        ids, text = await self._tokenize(body, model)
        out = {"model": model, "token_ids": ids, "count": len(ids)}
        if text is not None:
            out["prompt"] = text
        return json_response(200, out)

    def hash(self, request):
        body = json_object(request, self.fast_ids)
        model = _model(body, self.default_model)
        ids = _token_ids(body)
        if ids is None:
            raise BadRequest("field 'token_ids' is required")
        salt = _field(body, "cache_salt", str, "a string")
        try:
            keys = self.indexer.keys(model, ids, salt)
        except (TypeError, ValueError) as e:
            raise _bad_token_ids(e) from None
        return json_response(200, {"model": model, "mode": self.indexer.sink.mode_of(model), "keys": list(keys)})

    # -- pods and engines ------------------------------------------------------------------

    def pods(self, request):
        return then(self.indexer.pod_listing(), _ok)

    def delete_pod(self, request):
        self._admin(request)
        pod = request.params["pod"]
        return then(self.indexer.forget_pod(pod), lambda removed: _ok({"pod": pod, "removed": removed}),
                    _unavailable)

    def engines(self, request):
        return json_response(200, {"engines": [_engine_json(e) for e in self.indexer.ingest.engines]})

    def add_engine(self, request):
        self._admin(request)
        body = _body(request)
        name = _field(body, "name", str, "a string", required=True)
        endpoint = _field(body, "endpoint", str, "a string", required=True)
        replay = _field(body, "replay", str, "a string")
        model = _field(body, "model", str, "a string")
        return self._add_engine(name, endpoint, replay, model)

    async def _add_engine(self, name, endpoint, replay, model):
        await self._connect_engine(name, endpoint, replay, model)
        return json_response(201, {"engine": name})

    async def _connect_engine(self, name, endpoint, replay, model):
        # a client of the admin API may only name reachable TCP engines (kvcm/endpoints.py)
        try:
            await check_registered_endpoint(endpoint, "endpoint")
            if replay is not None:
                await check_registered_endpoint(replay, "replay endpoint")
            self.indexer.ingest.add_engine(name, endpoint, replay=replay, model=model)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except OSError as e:     # out of sockets or file descriptors
            raise HttpError(503, str(e), headers=(("Retry-After", "1"),)) from None

    def remove_engine(self, request):
        self._admin(request)
        name = request.params["name"]
        try:
            self.indexer.ingest.remove_engine(name)
        except KeyError:
            raise HttpError(404, "no engine named %r" % name) from None
        self.dynamo.forget(name)
        return json_response(200, {"engine": name, "removed": True})

    async def snapshot(self, request):
        """The in-memory index as a snapshot (kvcm/snapshot.py), for --bootstrap-from."""
        self._admin(request)
        if self.indexer.state is None:
            raise HttpError(409, "the index is shared: its store keeps the state, there is no snapshot")
        chunks = self.indexer.state.stream()
        try:
            first = await chunks.__anext__()
        except DumpAborted as e:
            raise HttpError(503, str(e), headers=(("Retry-After", "1"),)) from None
        return StreamingResponse(200, _then(first, chunks))

    def _admin(self, request):
        """Mutating endpoints: the bearer token when one is configured, else loopback only."""
        if self.admin_token is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HttpError(401, "this endpoint needs Authorization: Bearer <admin token>",
                                headers=(("WWW-Authenticate", 'Bearer realm="kvcm"'),))
            if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
                raise HttpError(403, "the admin token is wrong")
            return
        if not _is_loopback(request.peer):
            raise HttpError(403, "admin endpoints accept loopback clients only unless --admin-token is set")

    # -- health ----------------------------------------------------------------------------

    def health(self, request):
        return json_response(200, {"status": "ok"})

    def readiness(self, request):
        reason = self.not_ready()
        if reason is not None:
            raise HttpError(503, "not ready: " + reason)
        return json_response(200, {"status": "ready"})

    def not_ready(self):
        """None when kvcm is ready, else why not."""
        if not self.ready():
            return "listeners are not up yet"
        reason = self.indexer.unavailable
        if reason is not None:
            return "the shared index is unavailable: %s" % reason
        return None

    def metrics_text(self, request):
        return Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)


def _engine_json(spec):
    return {"name": spec.name, "endpoint": spec.endpoint, "replay": spec.replay, "model": spec.model}


def _is_loopback(peer):
    if not peer:
        return True  # a Unix socket or an inherited socket without an address: local
    try:
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    # a dual-stack [::] socket shows IPv4 clients as ::ffff:a.b.c.d
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


_STATIC_ENDPOINTS = frozenset(("/v1/score", "/score_completions", "/score_chat_completions", "/v1/tokenize",
                               "/v1/hash", "/v1/pods", "/v1/engines", "/v1/snapshot", "/health", "/ready",
                               "/metrics", "/v1/status", "/", "/status",
                               "/register", "/unregister", "/workers", "/query", "/query_by_hash"))
_PARAM_ENDPOINTS = (("/v1/pods/", "/v1/pods/{pod}"), ("/v1/engines/", "/v1/engines/{name}"))


async def _then(first, rest):
    yield first
    async for chunk in rest:
        yield chunk


def _endpoint_label(path):
    """The route pattern of a path: metric labels must not grow with pod names or junk paths."""
    if path in _STATIC_ENDPOINTS:
        return path
    for prefix, pattern in _PARAM_ENDPOINTS:
        if path.startswith(prefix):
            return pattern
    return "other"


class RequestTimer:
    """An HttpServer on_response hook feeding the request histogram; timer_for() hands the
    server the histogram's own observe for the scoring lane's answers, which come too often
    for a round of Python calls each."""

    def __init__(self, metrics):
        self.metrics = metrics

    def __call__(self, request, status, seconds):
        if request is None:
            self.metrics.observe_request("other", "-", status, seconds)
        else:
            self.metrics.observe_request(_endpoint_label(request.path), request.method, status, seconds)

    def timer_for(self, request, status):
        """observe(seconds) for answers with that status to requests like `request`, or None."""
        histogram = self.metrics.requests.histogram(_endpoint_label(request.path), request.method, status)
        return None if histogram is None else histogram.observe


__all__ = ["Api", "RequestTimer"]
