"""The operational routes of one simulated rank: health, metrics, LoRA adapters, the cache,
sleep mode and run-time configuration.

- GET /health: 200 while the process works. GET /health/ready (and /ready, llm-d's name):
  200 once every rank listens and `--startup-duration` has passed, else 503.
- GET /metrics (kvcm.sim.metrics).
- POST /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's).
- POST /reset_prefix_cache (vLLM's); GET /sim/kv_cache: the pool's contents, what a
  KV-event consumer should hold for this pod.
- Sleep mode (vLLM's, with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1, else /sleep does
  nothing): POST /sleep empties the KV cache (AllBlocksCleared) and turns it off; POST
  /wake_up turns it on again unless `tags` name only other things (`?tags=weights`); GET
  /is_sleeping.
- GET /admin/config: the configuration (kvcm.sim.settings.SimConfig.as_json); POST
  /admin/config changes latencies, failure injection and fake metrics at run time, all or
  nothing (400 names the field at fault); POST /fake_metrics (llm-d's older route) changes
  fake metrics.
- GET /query: vLLM's Mooncake bootstrap answer, `{dp_rank: {"engine_id"}}`, the engine id
  prefill answers name in kv_transfer_params.
"""

import time
from urllib.parse import parse_qs

import orjson

from kvcm.http import Response, json_response
from kvcm.sim.errors import error
from kvcm.sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kvcm.sim.requests import body_of, field
from kvcm.sim.settings import ConfigError

_EMPTY = Response(200, b"", content_type=None)


class AdminRoutes:
    """The operational routes of one rank (see `kvcm.sim.app.Rank`)."""

    def __init__(self, rank, router, ready):
        self.rank = rank
        self.ready = ready            # every rank listens
        self.started = time.monotonic()
        self.sleeping = False
        for method, path, handler in (
                ("GET", "/health", self.health),
                ("GET", "/health/ready", self.readiness),
                ("GET", "/ready", self.readiness),
                ("GET", "/metrics", self.metrics),
                ("POST", "/v1/load_lora_adapter", self.load_lora),
                ("POST", "/v1/unload_lora_adapter", self.unload_lora),
                ("POST", "/reset_prefix_cache", self.reset_prefix_cache),
                ("GET", "/sim/kv_cache", self.kv_cache),
                ("POST", "/sleep", self.sleep),
                ("POST", "/wake_up", self.wake_up),
                ("GET", "/is_sleeping", self.is_sleeping),
                ("GET", "/admin/config", self.get_config),
                ("POST", "/admin/config", self.post_config),
                ("POST", "/fake_metrics", self.fake_metrics),
                ("GET", "/query", self.query)):
            router.add(method, path, handler)

    # -- health -----------------------------------------------------------------------------

    def health(self, request):
        return _EMPTY

    def readiness(self, request):
        if not self.ready() or time.monotonic() - self.started < self.rank.config.startup_duration:
            raise error(503, "not ready")
        return json_response(200, {"status": "ready"})

    def metrics(self, request):
        return Response(200, self.rank.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    # -- LoRA -----------------------------------------------------------------------------

    def load_lora(self, request):
        body = body_of(request)
        name = field(body, "lora_name", str, "a string")
        path = field(body, "lora_path", str, "a string")
        if not name or not path:
            raise error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        self.rank.loras.load(name, path)
        return Response(200, "Success: LoRA adapter '%s' added successfully." % name, content_type="text/plain")

    def unload_lora(self, request):
        body = body_of(request)
        name = field(body, "lora_name", str, "a string")
        if not name:
            raise error(400, "'lora_name' must be provided.", param="lora_name")
        self.rank.loras.unload(name)
        self.rank.slots.unregistered(name)
        return Response(200, "Success: LoRA adapter '%s' removed successfully." % name, content_type="text/plain")

    # -- the cache ----------------------------------------------------------------------------

    def reset_prefix_cache(self, request):
        if not self.rank.engine.reset_prefix_cache():
            raise error(409, "cannot reset the prefix cache: %d KV blocks are in use by running requests"
                        % self.rank.cache.used)
        return _EMPTY

    def kv_cache(self, request):
        r, cache = self.rank, self.rank.cache
        return json_response(200, {"pod": r.pod, "model": r.config.model, "dp_rank": r.index,
                                   "block_size": cache.block_size, "capacity": cache.capacity, "used": cache.used,
                                   "usage": cache.usage, "enabled": cache.enabled, "blocks": cache.contents(),
                                   "eviction_order": cache.eviction_order()})

    # -- sleep mode -----------------------------------------------------------------------------

    def sleep(self, request):
        c = self.rank.config
        if c.enable_sleep_mode and c.dev_mode:
            self.sleeping = True
            if c.enable_kvcache:
                self.rank.cache.discard()
        return _EMPTY

    def wake_up(self, request):
        tags = parse_qs(request.query).get("tags")
        if self.rank.config.enable_kvcache and (tags is None or "kv_cache" in tags):
            self.rank.cache.activate()
        self.sleeping = False
        return _EMPTY

    def is_sleeping(self, request):
        return json_response(200, {"is_sleeping": self.sleeping})

    # -- configuration -------------------------------------------------------------------------

    def get_config(self, request):
        return json_response(200, self.rank.config.as_json())

    def _apply(self, changes):
        if not isinstance(changes, dict):
            raise ConfigError("the body must be a JSON object of settings")
        self.rank.set_config(self.rank.config.updated(changes))

    def post_config(self, request):
        try:
            self._apply(body_of(request))
        except ConfigError as exc:
            raise error(400, str(exc)) from None
        return self.get_config(request)

    def fake_metrics(self, request):
        try:
            self._apply({"fake-metrics": orjson.loads(request.body)})
        except (ConfigError, orjson.JSONDecodeError) as exc:
            raise error(500, "Failed to update fake metrics: %s" % exc) from None
        return Response(204, b"", content_type=None)

    def query(self, request):
        r = self.rank
        return json_response(200, {str(r.index): {"engine_id": r.engine_id}})
