"""NVIDIA Dynamo's standalone-indexer HTTP API over kvcm, so a router written for
`python -m dynamo.indexer` can point at kvcm unchanged (README, "Dynamo-compatible API").

- `POST /register` {instance_id, endpoint, model_name, block_size, dp_rank?, routing_group?,
  replay_endpoint?} adds a connect-mode engine (kvcm/ingest.py) named `<instance_id>:<dp_rank>`
  whose events go to model_name's index; `POST /unregister` {instance_id, model_name, dp_rank?,
  routing_group?} removes it (or every rank of the instance). Both change state, so they
  follow the admin rules of /v1/engines.
- `GET /workers[?model_name=&routing_group=]` lists the registered instances.
- `POST /query` {token_ids, model_name, routing_group?, lora_name?, cache_salt?}: kvcm hashes
  the tokens (with the LoRA adapter's name as the model when given) and answers matched tokens
  of the (model_name, routing_group) instances; `POST /query_by_hash` takes kvcm keys (what
  /v1/hash answers) in `block_hashes` instead.

Answers have Dynamo's shape: {"scores": {instance: {dp_rank: tokens}}, "frequencies": [],
"instances": {instance: {"longest_matched", "gpu", "dp", "cpu", "disk"}}}. kvcm matches a
prefix across tiers: `longest_matched`, `cpu` and `disk` are that run, `gpu` (and `scores`)
the run's blocks the device tier holds.
"""

import dataclasses
from urllib.parse import parse_qsl

from kvcm.backend import then
from kvcm.bodies import TOKEN_ID_TYPES, json_object
from kvcm.http import BadRequest, HttpError, json_response

DEFAULT_GROUP = "default"
DEVICE_TIER = "gpu"
U64_MAX = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Worker:
    """One registration: an instance's data-parallel rank and the engine that feeds it."""
    instance_id: int
    dp_rank: int
    model: str
    group: str
    endpoint: str

    @property
    def engine(self):
        return engine_name(self.instance_id, self.dp_rank)


class Group:
    """The workers of one (model, routing group) as queries need them: the engines to score
    and each engine's instance and rank as answer keys. Built once per change of the
    registrations, not per query."""

    def __init__(self, workers):
        self.ranks = {w.engine: (str(w.instance_id), str(w.dp_rank)) for w in workers}
        self.engines = list(self.ranks)


def engine_name(instance_id, dp_rank):
    return "%d:%d" % (instance_id, dp_rank)


def _uint(body, name, required=False, default=None, limit=U64_MAX):
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("field %r is required" % name)
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise BadRequest("field %r must be an integer from 0 to %d" % (name, limit))
    return value


def _text(body, name, required=False, default=None):
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest("field %r is required" % name)
        return default
    if not isinstance(value, str) or not value:
        raise BadRequest("field %r must be a non-empty string" % name)
    return value


class DynamoApi:
    """The routes; `admin(request)` raises unless the request may change state."""

    def __init__(self, indexer, admin, add_engine, fast_ids=True):
        self.indexer = indexer
        self.fast_ids = fast_ids
        self.admin = admin
        self.add_engine = add_engine    # coroutine (name, endpoint, replay, model): checks and connects
        self.workers = {}               # engine name -> Worker
        self._groups = {}               # (model, group) -> Group, until the workers change

    def routes(self, router):
        router.add("POST", "/register", self.register)
        router.add("POST", "/unregister", self.unregister)
        router.add("GET", "/workers", self.list_workers)
        router.add("POST", "/query", self.query)
        router.add("POST", "/query_by_hash", self.query_by_hash)

    def _current(self):
        """The registrations whose engines are still there (DELETE /v1/engines may remove one)."""
        engines = {spec.name for spec in self.indexer.ingest.engines}
        for name in [n for n in self.workers if n not in engines]:
            self.forget(name)
        return self.workers.values()

    def forget(self, engine):
        """Drops the registration fed by `engine` (unregistered, or its engine removed)."""
        if self.workers.pop(engine, None) is not None:
            self._groups.clear()

    # -- registration ----------------------------------------------------------------------

    def register(self, request):
        self.admin(request)
        body = json_object(request)
        instance = _uint(body, "instance_id", required=True)
        endpoint = _text(body, "endpoint", required=True)
        model = _text(body, "model_name", required=True)
        block_size = _uint(body, "block_size", required=True)
        dp_rank = _uint(body, "dp_rank", default=0, limit=(1 << 32) - 1)
        group = _text(body, "routing_group", default=DEFAULT_GROUP)
        replay = _text(body, "replay_endpoint")
        if block_size != self.indexer.config.block_size:
            raise HttpError(409, "block_size mismatch: kvcm hashes blocks of %d tokens (--block-size), requested %d"
                            % (self.indexer.config.block_size, block_size))
        for w in self._current():
            if w.instance_id == instance and (w.model, w.group) != (model, group):
                raise HttpError(409, "instance %d is already registered for model=%s routing_group=%s"
                                % (instance, w.model, w.group))
            if w.instance_id == instance and w.dp_rank == dp_rank:
                raise HttpError(409, "instance %d dp_rank %d already registered" % (instance, dp_rank))
        return self._register(Worker(instance, dp_rank, model, group, endpoint), replay)

    async def _register(self, worker, replay):
        await self.add_engine(worker.engine, worker.endpoint, replay, worker.model)
        self.workers[worker.engine] = worker
        self._groups.clear()
        return json_response(201, {"status": "ok"})

    def unregister(self, request):
        self.admin(request)
        body = json_object(request)
        instance = _uint(body, "instance_id", required=True)
        model = _text(body, "model_name", required=True)
        dp_rank = _uint(body, "dp_rank", limit=(1 << 32) - 1)
        group = _text(body, "routing_group")
        gone = [w for w in self._current() if w.instance_id == instance and w.model == model
                and (dp_rank is None or w.dp_rank == dp_rank) and (group is None or w.group == group)]
        if not gone:
            raise HttpError(404, "instance %d not found" % instance)
        for w in gone:
            self.forget(w.engine)
            self.indexer.ingest.remove_engine(w.engine)
        return json_response(200, {"status": "ok"})

    def list_workers(self, request):
        wanted = dict(parse_qsl(request.query))
        model, group = wanted.get("model_name"), wanted.get("routing_group")
        instances = {}
        for w in sorted(self._current(), key=lambda w: (w.instance_id, w.dp_rank)):
            if (model is not None and w.model != model) or (group is not None and w.group != group):
                continue
            entry = instances.setdefault(w.instance_id, {
                "instance_id": w.instance_id, "source": "zmq", "status": "active", "model_name": w.model,
                "routing_group": w.group, "block_size": self.indexer.config.block_size,
                "endpoints": {}, "listeners": {}})
            entry["endpoints"][str(w.dp_rank)] = w.endpoint
            entry["listeners"][str(w.dp_rank)] = {"endpoint": w.endpoint, "status": "active"}
        return json_response(200, list(instances.values()))

    # -- queries ---------------------------------------------------------------------------

    def _group(self, body):
        """(model, the Group of its routing group); 404 when no instance serves them."""
        model = _text(body, "model_name", required=True)
        group = _text(body, "routing_group", default=DEFAULT_GROUP)
        members = self._groups.get((model, group))
        if members is None:
            workers = [w for w in self._current() if w.model == model and w.group == group]
            if not workers:
                raise HttpError(404, "no indexer for model=%s routing_group=%s" % (model, group))
            # bounded: a key is a (model, group) some registered worker has
            members = self._groups[(model, group)] = Group(workers)
        return model, members

    def query(self, request):
        body = json_object(request, self.fast_ids)
        namespace, engines, salt, (_, members) = self._query_fields(body)
        try:
            return self._answer(self.indexer.lookup_tokens(namespace, body["token_ids"], engines, salt), members)
        except (TypeError, ValueError) as e:
            raise BadRequest("field 'token_ids' must be a list of non-negative integers below 2**64 (%s)"
                             % e) from None

    def _query_fields(self, body):
        """(namespace to hash and look up in, engines to score, cache salt, (namespace, Group))
        of a /query body; the scoring lane's first half of query() too."""
        ids = body.get("token_ids")
        if ids is None:
            raise BadRequest("field 'token_ids' is required")
        if not isinstance(ids, TOKEN_ID_TYPES):
            raise BadRequest("field 'token_ids' must be a list of non-negative integers")
        model, members = self._group(body)
        lora = _text(body, "lora_name")
        salt = _text(body, "cache_salt")
        namespace = lora if lora is not None else model
        return namespace, members.engines, salt, (namespace, members)

    def _lane_answer(self, context, ids, keys, detailed):
        namespace, members = context
        return self._shape(self.indexer.score_result(namespace, ids, keys, detailed), members)

    def lane_route(self, lane):
        """Serves /query on the scoring lane (kvcm/_score_lane.pxi) as query() does."""
        lane.add("/query", self._query_fields, self._lane_answer)

    def query_by_hash(self, request):
        body = json_object(request)
        keys = body.get("block_hashes")
        if keys is None:
            raise BadRequest("field 'block_hashes' is required")
        if not isinstance(keys, list) or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= U64_MAX for k in keys):
            raise BadRequest("field 'block_hashes' must be a list of kvcm keys (integers from 0 to 2**64-1)")
        model, members = self._group(body)
        namespace = _text(body, "lora_name", default=model)
        return self._answer(self.indexer.lookup_keys(namespace, keys, members.engines), members)

    def _answer(self, found, members):
        """The Dynamo-shaped answer to a lookup's result, now or later."""
        return then(found, lambda result: json_response(200, self._shape(result, members)), _unavailable)

    def _shape(self, result, members):
        block_size = self.indexer.config.block_size
        ranks = members.ranks
        scores, instances = {}, {}
        for pod, m in result["matched"].items():
            names = ranks.get(pod)
            blocks = m["blocks"]
            if names is None or not blocks:
                continue
            longest = m["tokens"]
            gpu = min(blocks, m["tiers"].get(DEVICE_TIER, 0)) * block_size
            instance, rank = names
            if gpu:
                scores.setdefault(instance, {})[rank] = gpu
            entry = instances.get(instance)
            if entry is None:   # the common case: one rank per instance
                instances[instance] = {"longest_matched": longest, "gpu": gpu, "dp": {rank: gpu},
                                       "cpu": longest, "disk": longest}
                continue
            entry["dp"][rank] = gpu
            entry["gpu"] = max(entry["gpu"], gpu)
            entry["longest_matched"] = entry["cpu"] = entry["disk"] = max(entry["longest_matched"], longest)
        return {"scores": scores, "frequencies": [], "instances": instances}


def _unavailable(error):
    return HttpError(503, str(error), type="index_unavailable", headers=(("Retry-After", "1"),))


__all__ = ["DynamoApi", "engine_name"]
