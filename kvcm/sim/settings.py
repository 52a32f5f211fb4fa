"""The validated configuration of one `kvcm sim` (`SimConfig`), and what may change at run time.

A `SimConfig` is immutable and checks itself when built: an invalid combination raises
`ConfigError` with one line. `POST /admin/config` builds a new one with `updated()`, which
accepts only the fields llm-d's simulator lets an operator change while it runs (latencies,
failure injection, fake metrics) and validates the result as a whole, so a request either
applies every change or none.

`as_json()` is the configuration as `kvcm sim` prints it at start and `GET /admin/config`
returns it: one key per flag, named as the flag, durations written like `100ms`.
"""

import dataclasses
import math
from typing import Optional, Tuple

from kvcm.endpoints import check_endpoint
from kvcm.sim.durations import duration, format_duration
from kvcm.sim.fakemetrics import FakeMetrics
from kvcm.wire import dp_endpoint

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_TOPIC = "kv@{pod}@{model}"
MODES = ("echo", "random")
LATENCY_CALCULATORS = ("", "constant", "per-token")
ON_KV_CACHE_FULL = ("wait", "error")
# llm-d's failure types, with the status each answers
FAILURE_TYPES = {
    "rate_limit": 429,
    "invalid_api_key": 401,
    "context_length": 400,
    "server_error": 503,
    "invalid_request": 400,
    "model_not_found": 404,
}
MAX_STD_DEV_SHARE = 0.3   # llm-d: a standard deviation may be at most 30% of its mean

class ConfigError(ValueError):
    """An invalid combination of settings; one line."""


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter loaded at start (`--lora-modules`)."""
    name: str
    path: str
    base_model_name: Optional[str] = None


# Fields whose values are durations (seconds), written as Go durations in as_json()
DURATION_FIELDS = frozenset((
    "time_to_first_token", "time_to_first_token_std_dev", "prefill_overhead", "prefill_time_per_token",
    "prefill_time_std_dev", "inter_token_latency", "inter_token_latency_std_dev", "kv_cache_transfer_latency",
    "kv_cache_transfer_latency_std_dev", "kv_cache_transfer_time_per_token", "kv_cache_transfer_time_std_dev",
    "startup_duration", "fake_metrics_refresh_interval"))
LATENCY_FIELDS = frozenset((
    "time_to_first_token", "time_to_first_token_std_dev", "prefill_overhead", "prefill_time_per_token",
    "prefill_time_std_dev", "inter_token_latency", "inter_token_latency_std_dev", "kv_cache_transfer_latency",
    "kv_cache_transfer_latency_std_dev", "kv_cache_transfer_time_per_token", "kv_cache_transfer_time_std_dev",
    "time_factor_under_load", "latency_calculator"))
# What POST /admin/config may change (llm-d's admin-configurable fields)
ADMIN_FIELDS = LATENCY_FIELDS | {"failure_injection_rate", "failure_types", "fake_metrics"}


@dataclasses.dataclass(frozen=True)
class SimConfig:
    # server
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    served_model_names: Tuple[str, ...] = (DEFAULT_MODEL,)
    tokenizer: Optional[str] = None
    force_dummy_tokenizer: bool = False
    max_model_len: int = 4096
    data_parallel_size: int = 1
    data_parallel_rank: Optional[int] = None
    log_level: str = "info"
    log_http: bool = False
    max_request_body_size_mb: int = 8
    startup_duration: float = 0.0
    enable_sleep_mode: bool = False
    dev_mode: bool = False                  # VLLM_SERVER_DEV_MODE=1: /sleep acts
    enable_request_id_headers: bool = False
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    self_signed_certs: bool = False
    pod_name: Optional[str] = None          # POD_NAME
    pod_namespace: Optional[str] = None     # POD_NAMESPACE
    pod_ip: Optional[str] = None            # POD_IP
    # LoRA
    lora_modules: Tuple[LoraModule, ...] = ()
    max_loras: int = 1
    max_cpu_loras: Optional[int] = None     # None: --max-loras
    # scheduling and latency
    max_num_seqs: int = 5
    max_waiting_queue_length: int = 1000
    latency_calculator: str = ""
    time_to_first_token: float = 0.0
    time_to_first_token_std_dev: float = 0.0
    prefill_overhead: float = 0.0
    prefill_time_per_token: float = 0.0
    prefill_time_std_dev: float = 0.0
    inter_token_latency: float = 0.0
    inter_token_latency_std_dev: float = 0.0
    kv_cache_transfer_latency: float = 0.0
    kv_cache_transfer_latency_std_dev: float = 0.0
    kv_cache_transfer_time_per_token: float = 0.0
    kv_cache_transfer_time_std_dev: float = 0.0
    time_factor_under_load: float = 1.0
    # responses
    mode: str = "random"
    seed: int = 0
    failure_injection_rate: float = 0.0
    failure_types: Tuple[str, ...] = tuple(FAILURE_TYPES)
    default_embedding_dimensions: int = 384
    max_tool_call_integer_param: int = 100
    min_tool_call_integer_param: int = 0
    max_tool_call_number_param: float = 100.0
    min_tool_call_number_param: float = 0.0
    max_tool_call_array_param_length: int = 5
    min_tool_call_array_param_length: int = 1
    tool_call_not_required_param_probability: int = 50
    object_tool_call_not_required_field_probability: int = 50
    tool_call_extra_call_probability: int = 45
    skip_tool_validation: bool = False
    # KV cache and events
    enable_kvcache: bool = True
    hash_algo: str = "sha256"
    hash_seed: Optional[str] = None
    block_size: int = 16
    kv_cache_size: int = 1024
    global_cache_hit_threshold: float = 0.0
    on_kv_cache_full: str = "wait"
    zmq_endpoint: str = "tcp://127.0.0.1:5557"
    topic: str = DEFAULT_TOPIC
    pod_id: Optional[str] = None
    replay_endpoint: Optional[str] = None
    kv_events_replay_queue_size: int = 10_000
    event_format: str = "map"
    event_batch_size: Optional[int] = None  # None: one batch per engine step
    # metrics
    fake_metrics: Optional[FakeMetrics] = None
    fake_metrics_refresh_interval: float = 0.1

    def __post_init__(self):
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        for check in (self._check_names, self._check_latencies, self._check_loras, self._check_responses,
                      self._check_cache, self._check_endpoints, self._check_server):
            check()

    def _check_names(self):
        if not self.model:
            raise ConfigError("--model must not be empty")
        if not self.served_model_names or not all(self.served_model_names):
            raise ConfigError("--served-model-name: names must not be empty")
        if self.mode not in MODES:
            raise ConfigError("--mode must be one of %s, got %r" % (", ".join(MODES), self.mode))

    def _check_latencies(self):
        for name in DURATION_FIELDS:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError("--%s must be a duration >= 0" % _flag(name))
        for mean in ("time_to_first_token", "inter_token_latency", "kv_cache_transfer_latency"):
            if getattr(self, mean + "_std_dev") > MAX_STD_DEV_SHARE * getattr(self, mean) + 1e-12:
                raise ConfigError("--%s-std-dev may be at most 30%% of --%s" % (_flag(mean), _flag(mean)))
        if not (self.time_factor_under_load >= 1.0 and math.isfinite(self.time_factor_under_load)):
            raise ConfigError("--time-factor-under-load must be a number >= 1.0")
        if self.latency_calculator not in LATENCY_CALCULATORS:
            raise ConfigError("--latency-calculator must be constant or per-token (or empty), got %r"
                              % self.latency_calculator)

    def _check_loras(self):
        if self.max_loras < 1:
            raise ConfigError("--max-loras must be at least 1")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError("--max-cpu-loras (%d) may not be less than --max-loras (%d)"
                              % (self.max_cpu_loras, self.max_loras))
        names = set()
        for lora in self.lora_modules:
            if lora.name in self.served_model_names:
                raise ConfigError("--lora-modules %s: the name is already a served model name" % lora.name)
            if lora.name in names:
                raise ConfigError("--lora-modules %s: the name is given twice" % lora.name)
            if lora.base_model_name not in (None, "", self.model):
                raise ConfigError("--lora-modules %s: unknown base model %r (the model is %r)"
                                  % (lora.name, lora.base_model_name, self.model))
            names.add(lora.name)

    def _check_responses(self):
        if not 0.0 <= self.failure_injection_rate <= 100.0:
            raise ConfigError("--failure-injection-rate must be a percentage between 0 and 100")
        if not self.failure_types:
            raise ConfigError("--failure-types: give at least one type")
        for kind in self.failure_types:
            if kind not in FAILURE_TYPES:
                raise ConfigError("unknown failure type %r (expected one of %s)" % (kind, ", ".join(FAILURE_TYPES)))
        for low, high in (("min_tool_call_integer_param", "max_tool_call_integer_param"),
                          ("min_tool_call_number_param", "max_tool_call_number_param"),
                          ("min_tool_call_array_param_length", "max_tool_call_array_param_length")):
            if getattr(self, high) < getattr(self, low):
                raise ConfigError("--%s may not be less than --%s" % (_flag(high), _flag(low)))
        if self.min_tool_call_array_param_length < 0:
            raise ConfigError("--min-tool-call-array-param-length must not be negative")
        for name in ("tool_call_not_required_param_probability", "object_tool_call_not_required_field_probability",
                     "tool_call_extra_call_probability"):
            if not 0 <= getattr(self, name) <= 100:
                raise ConfigError("--%s must be between 0 and 100" % _flag(name))
        if self.default_embedding_dimensions < 1:
            raise ConfigError("--default-embedding-dimensions must be at least 1")

    def _check_cache(self):
        if self.block_size < 1:
            raise ConfigError("--block-size must be at least 1, got %d" % self.block_size)
        if self.kv_cache_size < 1:
            raise ConfigError("--kv-cache-size must be at least 1")
        if not 0.0 <= self.global_cache_hit_threshold <= 1.0:
            raise ConfigError("--global-cache-hit-threshold must be between 0 and 1")
        if self.on_kv_cache_full not in ON_KV_CACHE_FULL:
            raise ConfigError("--on-kv-cache-full must be wait or error")
        if self.event_batch_size is not None and self.event_batch_size < 1:
            raise ConfigError("--event-batch-size must be at least 1")
        if self.kv_events_replay_queue_size < 1:
            raise ConfigError("--kv-events-replay-queue-size must be at least 1")

    def _check_endpoints(self):
        for endpoint, flag in ((self.zmq_endpoint, "--zmq-endpoint"), (self.replay_endpoint, "--replay-endpoint")):
            if not endpoint:
                continue
            try:
                for rank in self.ranks:
                    check_endpoint(dp_endpoint(endpoint, rank), flag)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def _check_server(self):
        if self.data_parallel_size < 1:
            raise ConfigError("--data-parallel-size must be at least 1")
        if self.data_parallel_rank is not None and self.data_parallel_rank < 0:
            raise ConfigError("--data-parallel-rank must not be negative")
        if self.port and self.port + len(self.ranks) - 1 > 65535:
            raise ConfigError("--port %d + --data-parallel-size %d goes past port 65535"
                              % (self.port, self.data_parallel_size))
        if not 1 <= self.max_request_body_size_mb <= 512:
            raise ConfigError("--max-request-body-size-mb must be between 1 and 512")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("--ssl-certfile and --ssl-keyfile must be given together")
        if self.self_signed_certs and self.ssl_certfile:
            raise ConfigError("--self-signed-certs cannot be combined with --ssl-certfile/--ssl-keyfile")

    # -- derived values ---------------------------------------------------------------------

    @property
    def served_model_name(self):
        """The name responses and metrics report."""
        return self.served_model_names[0]

    @property
    def tls(self):
        return bool(self.ssl_certfile) or self.self_signed_certs

    @property
    def ranks(self):
        """The data-parallel ranks this process runs: every rank of --data-parallel-size, or
        only --data-parallel-rank (one process per rank, each a pod of its own)."""
        if self.data_parallel_rank is not None:
            return (self.data_parallel_rank,)
        return tuple(range(self.data_parallel_size))

    def http_port_of(self, rank):
        """Rank r of --data-parallel-size listens on --port + r; a --data-parallel-rank process
        on --port (0: any free port)."""
        if not self.port:
            return 0
        return self.port if self.data_parallel_rank is not None else self.port + rank

    def pod_for(self, http_port):
        """The pod id of the rank listening on http_port: --pod-id, else <POD_IP or 127.0.0.1>:<port>."""
        if self.pod_id is not None:
            return self.pod_id
        return "%s:%d" % (self.pod_ip or "127.0.0.1", http_port)

    def topic_for(self, pod):
        return self.topic.replace("{pod}", pod).replace("{model}", self.model)

    # -- run-time changes and the JSON view -----------------------------------------------------

    def updated(self, changes):
        """A new SimConfig with `changes` ({json key: value}, as POST /admin/config sends them)
        applied; ConfigError names the first key that is not admin-configurable or invalid."""
        values = {}
        for key, value in changes.items():
            name = key.replace("-", "_")
            if name not in ADMIN_FIELDS:
                raise ConfigError("field %r is not admin-configurable" % key)
            values[name] = self._admin_value(name, key, value)
        return dataclasses.replace(self, **values)

    def _admin_value(self, name, key, value):
        try:
            if name in DURATION_FIELDS:
                if isinstance(value, str):
                    return duration(value)
                return _number(value) * 1e-9          # Go's JSON form: nanoseconds
            if name == "latency_calculator":
                if not isinstance(value, str):
                    raise ValueError("must be a string")
                return value
            if name == "failure_types":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError("must be a list of failure types")
                return tuple(value) or tuple(FAILURE_TYPES)
            if name == "fake_metrics":
                if self.fake_metrics is None:
                    raise ValueError("the simulator reports real metrics; fake metrics cannot be updated")
                if value is None:
                    return self.fake_metrics
                if not isinstance(value, dict):
                    raise ValueError("must be an object")
                return self.fake_metrics.merged(value)
            return _number(value)
        except ValueError as exc:
            raise ConfigError("%s: %s" % (key, exc)) from None

    def as_json(self):
        """{flag name: value} of every setting (durations as Go writes them)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in DURATION_FIELDS:
                value = format_duration(value)
            elif field.name == "lora_modules":
                value = [{"name": m.name, "path": m.path, "base_model_name": m.base_model_name} for m in value]
            elif field.name == "fake_metrics":
                value = None if value is None else value.as_json()
            elif isinstance(value, tuple):
                value = list(value)
            out[_flag(field.name)] = value
        return out


def _flag(name):
    """The flag (without dashes) and JSON key of a field."""
    return "served-model-name" if name == "served_model_names" else name.replace("_", "-")


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return value

