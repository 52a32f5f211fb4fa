"""The flags of `kvcm sim` and the validated configuration they make.

Names follow llm-d's inference simulator and vLLM (DESIGN.md §7). Durations are written
like llm-d's: `10ms`, `1.5s`, `250us`, `2m`; a bare number means milliseconds (llm-d's
older integer form). Invalid values fail at start with one line (exit status 2).
"""

import argparse
import dataclasses
import math
import re
from typing import Optional, Tuple

from kvcm.cli import add_hash_options
from kvcm.endpoints import check_endpoint
from kvcm.publisher import EVENT_FORMATS, dp_endpoint

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DEFAULT_TOPIC = "kv@{pod}@{model}"
MODES = ("echo", "random")
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

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|µs|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1e-3}


class ConfigError(ValueError):
    """An invalid combination of flags; one line."""


def duration(text):
    """`10ms`, `1.5s`, `250us`, `2m`, or a number of milliseconds -> seconds (float >= 0)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError("not a duration: %r (write e.g. 10ms, 1.5s, 250us)" % text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _percent(text):
    value = float(text)
    if not 0.0 <= value <= 100.0:
        raise ValueError("must be a percentage between 0 and 100")
    return value


def _factor(text):
    value = float(text)
    if not (value >= 1.0 and math.isfinite(value)):
        raise ValueError("must be a number >= 1.0")
    return value


def _lora_module(text):
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError("expected NAME=PATH")
    return name.strip(), path.strip()


def _failure_type(text):
    if text not in FAILURE_TYPES:
        raise ValueError("unknown failure type (expected one of %s)" % ", ".join(FAILURE_TYPES))
    return text


def _typed(function, name):
    """An argparse type whose error message is function's ValueError text."""
    def parse(text):
        try:
            return function(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError("%r: %s" % (text, exc)) from None
    parse.__name__ = name
    return parse


def add_sim_arguments(parser):
    """Every `kvcm sim` flag, with its default."""
    seconds = _typed(duration, "duration")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="HTTP listen address (default: %(default)s)")
    g.add_argument("--port", type=_typed(_non_negative_int, "port"), default=8000,
                   help="HTTP port of rank 0; rank r listens on port + r (0 = any free port; default: %(default)s)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="the model name: in the event topic and, without --served-model-name, in the API "
                        "(default: %(default)s)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model names the API accepts; the first is reported (default: --model)")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a directory with tokenizer.json [+ tokenizer_config.json, chat template]; "
                        "default: --model if it is such a directory, else the word-level tokenizer")
    g.add_argument("--max-model-len", type=_typed(_positive_int, "count"), default=4096,
                   help="context window in tokens, prompt plus output (default: %(default)s)")
    g.add_argument("--lora-modules", nargs="+", type=_typed(_lora_module, "NAME=PATH"), default=[],
                   metavar="NAME=PATH", help="LoRA adapters loaded at start")
    g.add_argument("--data-parallel-size", type=_typed(_positive_int, "count"), default=1,
                   help="ranks in this process; rank r offsets the HTTP, ZMQ and replay ports by r "
                        "(default: %(default)s)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level on stderr (default: %(default)s)")

    g = parser.add_argument_group("scheduling and latency")
    g.add_argument("--max-num-seqs", type=_typed(_positive_int, "count"), default=5,
                   help="requests running at once (default: %(default)s)")
    g.add_argument("--max-waiting-queue-length", type=_typed(_non_negative_int, "count"), default=1000,
                   help="requests waiting beyond those; more are refused with 429 (default: %(default)s)")
    g.add_argument("--time-to-first-token", type=seconds, default=0.0, metavar="DURATION",
                   help="a constant TTFT; when 0, TTFT = --prefill-overhead + uncached prompt tokens x "
                        "--prefill-time-per-token (default: 0)")
    g.add_argument("--time-to-first-token-std-dev", type=seconds, default=0.0, metavar="DURATION",
                   help="jitter of the constant TTFT (at most 30%% of it; default: 0)")
    g.add_argument("--prefill-overhead", type=seconds, default=0.0, metavar="DURATION",
                   help="fixed part of a computed TTFT (default: 0)")
    g.add_argument("--prefill-time-per-token", type=seconds, default=0.0, metavar="DURATION",
                   help="prefill time per prompt token not found in the KV cache (default: 0)")
    g.add_argument("--prefill-time-std-dev", type=seconds, default=0.0, metavar="DURATION",
                   help="jitter of a computed TTFT (default: 0)")
    g.add_argument("--inter-token-latency", type=seconds, default=0.0, metavar="DURATION",
                   help="time between output tokens (default: 0)")
    g.add_argument("--inter-token-latency-std-dev", type=seconds, default=0.0, metavar="DURATION",
                   help="jitter of the inter-token latency (at most 30%% of it; default: 0)")
    g.add_argument("--time-factor-under-load", type=_typed(_factor, "factor"), default=1.0,
                   help="latencies are multiplied by a factor growing linearly from 1 (one request "
                        "running) to this (--max-num-seqs running) (default: %(default)s)")

    g = parser.add_argument_group("responses")
    g.add_argument("--mode", default="random", choices=MODES,
                   help="echo: answer with the prompt (chat: the last message); random: random "
                        "sentences (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    g.add_argument("--failure-injection-rate", type=_typed(_percent, "percent"), default=0.0,
                   help="percentage of completion requests answered with an injected error (default: 0)")
    g.add_argument("--failure-types", nargs="+", type=_typed(_failure_type, "failure type"), default=None,
                   metavar="TYPE", help="injected errors to choose from: %s (default: all)"
                   % ", ".join(FAILURE_TYPES))

    g = parser.add_argument_group("KV cache and events")
    add_hash_options(g)
    g.add_argument("--kv-cache-size", type=_typed(_positive_int, "count"), default=1024,
                   help="KV cache blocks per rank (default: %(default)s)")
    g.add_argument("--zmq-endpoint", default="tcp://127.0.0.1:5557",
                   help="where KV events go: bound when it has '*' or '::' (or is ipc/inproc), else "
                        "connected, as vLLM does; '' publishes nothing (default: %(default)s)")
    g.add_argument("--topic", default=DEFAULT_TOPIC,
                   help="event topic; {pod} and {model} are replaced (default: %(default)s)")
    g.add_argument("--pod-id", default=None,
                   help="the pod in the topic (default: 127.0.0.1:<the rank's HTTP port>)")
    g.add_argument("--replay-endpoint", default=None,
                   help="bind a replay ROUTER here (vLLM's protocol; rank r offsets the port)")
    g.add_argument("--event-format", default="map", choices=EVENT_FORMATS,
                   help="map: vLLM >= 0.24 events (0.33's fields); array: vLLM 0.20's layout "
                        "(default: %(default)s)")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = DEFAULT_MODEL
    served_model_names: Tuple[str, ...] = (DEFAULT_MODEL,)
    tokenizer: Optional[str] = None
    max_model_len: int = 4096
    lora_modules: Tuple[Tuple[str, str], ...] = ()
    data_parallel_size: int = 1
    log_level: str = "info"
    max_num_seqs: int = 5
    max_waiting_queue_length: int = 1000
    time_to_first_token: float = 0.0
    time_to_first_token_std_dev: float = 0.0
    prefill_overhead: float = 0.0
    prefill_time_per_token: float = 0.0
    prefill_time_std_dev: float = 0.0
    inter_token_latency: float = 0.0
    inter_token_latency_std_dev: float = 0.0
    time_factor_under_load: float = 1.0
    mode: str = "random"
    seed: int = 0
    failure_injection_rate: float = 0.0
    failure_types: Tuple[str, ...] = tuple(FAILURE_TYPES)
    hash_algo: str = "sha256"
    hash_seed: Optional[str] = None
    block_size: int = 16
    kv_cache_size: int = 1024
    zmq_endpoint: str = "tcp://127.0.0.1:5557"
    topic: str = DEFAULT_TOPIC
    pod_id: Optional[str] = None
    replay_endpoint: Optional[str] = None
    event_format: str = "map"

    def __post_init__(self):
        if self.block_size < 1:
            raise ConfigError("--block-size must be at least 1, got %d" % self.block_size)
        if not self.served_model_names or not all(self.served_model_names):
            raise ConfigError("--served-model-name: names must not be empty")
        if not self.model:
            raise ConfigError("--model must not be empty")
        for mean, std, flag in ((self.time_to_first_token, self.time_to_first_token_std_dev, "--time-to-first-token"),
                                (self.inter_token_latency, self.inter_token_latency_std_dev, "--inter-token-latency")):
            if std > MAX_STD_DEV_SHARE * mean + 1e-12:
                raise ConfigError("%s-std-dev may be at most 30%% of %s" % (flag, flag))
        loras = set()
        for name, _ in self.lora_modules:
            if name in self.served_model_names:
                raise ConfigError("--lora-modules %s: the name is already a served model name" % name)
            if name in loras:
                raise ConfigError("--lora-modules %s: the name is given twice" % name)
            loras.add(name)
        if self.zmq_endpoint:
            self._check_endpoint(self.zmq_endpoint, "--zmq-endpoint")
        if self.replay_endpoint is not None:
            self._check_endpoint(self.replay_endpoint, "--replay-endpoint")
        if self.port and self.port + self.data_parallel_size - 1 > 65535:
            raise ConfigError("--port %d + --data-parallel-size %d goes past port 65535"
                              % (self.port, self.data_parallel_size))
        if not self.failure_types:
            raise ConfigError("--failure-types: give at least one type")

    def _check_endpoint(self, endpoint, flag):
        try:
            for rank in range(self.data_parallel_size):
                check_endpoint(dp_endpoint(endpoint, rank), flag)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_args(cls, args):
        return cls(
            host=args.host, port=args.port, model=args.model,
            served_model_names=tuple(args.served_model_name or (args.model,)),
            tokenizer=args.tokenizer, max_model_len=args.max_model_len,
            lora_modules=tuple(args.lora_modules), data_parallel_size=args.data_parallel_size,
            log_level=args.log_level, max_num_seqs=args.max_num_seqs,
            max_waiting_queue_length=args.max_waiting_queue_length,
            time_to_first_token=args.time_to_first_token,
            time_to_first_token_std_dev=args.time_to_first_token_std_dev,
            prefill_overhead=args.prefill_overhead, prefill_time_per_token=args.prefill_time_per_token,
            prefill_time_std_dev=args.prefill_time_std_dev, inter_token_latency=args.inter_token_latency,
            inter_token_latency_std_dev=args.inter_token_latency_std_dev,
            time_factor_under_load=args.time_factor_under_load, mode=args.mode, seed=args.seed,
            failure_injection_rate=args.failure_injection_rate,
            failure_types=tuple(args.failure_types or FAILURE_TYPES),
            hash_algo=args.hash_algo, hash_seed=args.hash_seed, block_size=args.block_size,
            kv_cache_size=args.kv_cache_size, zmq_endpoint=args.zmq_endpoint, topic=args.topic,
            pod_id=args.pod_id, replay_endpoint=args.replay_endpoint, event_format=args.event_format)

    @property
    def served_model_name(self):
        """The name responses and metrics report."""
        return self.served_model_names[0]

    def pod_for(self, http_port):
        """The pod id of the rank listening on http_port."""
        return self.pod_id if self.pod_id is not None else "127.0.0.1:%d" % http_port

    def topic_for(self, pod):
        return self.topic.replace("{pod}", pod).replace("{model}", self.model)


def parse_args(argv):
    """SimConfig from `kvcm sim` arguments (for tests and tools); ConfigError when invalid."""
    from kvcm.cli import _Parser

    parser = _Parser(prog="kvcm sim")
    add_sim_arguments(parser)
    return SimConfig.from_args(parser.parse_args(argv))


__all__ = ["ConfigError", "SimConfig", "add_sim_arguments", "duration", "parse_args"]
