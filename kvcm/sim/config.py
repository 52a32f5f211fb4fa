"""The command line, config file and environment of `kvcm sim`, made into a `SimConfig`.

Names follow vLLM and llm-d's inference simulator (DESIGN.md §7), so their command lines and
YAML files work unchanged. Where the two simulators differ on purpose, `kvcm sim` keeps its
own default and a flag gives the other behaviour (`--hash-algo llmd_fnv64a`,
`--event-format go-array`, `--event-batch-size`, ...).

Precedence, as llm-d's simulator: flags > environment (`SIM_MODEL` for the model,
`PYTHONHASHSEED` for the hash seed) > the `--config` YAML file (keys are the flag names) >
defaults. `POD_IP` (the pod in the event topic), `POD_NAME`, `POD_NAMESPACE` (response
headers) and `VLLM_SERVER_DEV_MODE` come from the environment only.

Every flag is parsed with a default of None, which means "not given", so that a file value
can fill it; the real defaults are SimConfig's. Flags llm-d's simulator accepts but that do
nothing here (vLLM's `--enable-prefix-caching`, klog's file logging, its SQLite datasets and
image output) are accepted with a note on stderr. Invalid values fail at start with one line
(exit status 2).
"""

import argparse
import dataclasses
import math
import os

import orjson

from kvcm._core import ALGORITHMS
from kvcm.sim.durations import duration
from kvcm.sim.fakemetrics import FakeMetrics
from kvcm.sim.settings import (DEFAULT_MODEL, FAILURE_TYPES, LATENCY_CALCULATORS, MODES,
                               ON_KV_CACHE_FULL, ConfigError, LoraModule, SimConfig)

EVENT_FORMATS = ("map", "array", "go-array")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Accepted, with what they do here (printed once at start)
IGNORED = {
    "enable-prefix-caching": "prefix caching is always on",
    "no-enable-prefix-caching": "prefix caching is always on",
    "enforce-eager": "there is no model to run",
    "no-enforce-eager": "there is no model to run",
    "tensor-parallel-size": "there is no model to shard",
    "mm-processor-kwargs": "multimodal inputs are not supported",
    "ec-transfer-config": "there is no encoder cache to transfer",
    "mm-encoder-only": "multimodal inputs are not supported",
    "no-mm-encoder-only": "multimodal inputs are not supported",
    "omni": "image output is not simulated",
    "no-omni": "image output is not simulated",
    "image-emission-rate": "image output is not simulated",
    "time-to-generate-image": "image output is not simulated",
    "time-to-generate-image-std-dev": "image output is not simulated",
    "dataset-path": "SQLite datasets are not supported; responses are random sentences (or echoes)",
    "dataset-url": "SQLite datasets are not supported; nothing is downloaded",
    "dataset-in-memory": "SQLite datasets are not supported",
    "dataset-table-name": "SQLite datasets are not supported",
    "render-url": "tokenizers load from local files (--tokenizer)",
    "render-timeout": "tokenizers load from local files (--tokenizer)",
    "mm-render-timeout": "tokenizers load from local files (--tokenizer)",
}
# klog's flags (llm-d's simulator logs through klog): --v sets the log level, the others are
# about log files and headers; logs go to stderr
KLOG_FLAGS = ("add_dir_header", "alsologtostderr", "log_backtrace_at", "log_dir", "log_file", "log_file_max_size",
              "logtostderr", "one_output", "skip_headers", "skip_log_headers", "stderrthreshold", "vmodule")
_KLOG_NOTE = "klog's log files and headers are not used; logs go to stderr (--log-level, --v)"
_IGNORED_TOGGLES = ("enable-prefix-caching", "enforce-eager", "mm-encoder-only", "omni")
_IGNORED_BOOLS = ("dataset-in-memory", "alsologtostderr", "add_dir_header", "logtostderr", "one_output",
                  "skip_headers", "skip_log_headers")


# -- value types ----------------------------------------------------------------------------------

def _int(low):
    def parse(text):
        value = int(text)
        if value < low:
            raise ValueError("must be at least %d" % low if low else "must not be negative")
        return value
    return parse


def _float(low=None, high=None):
    def parse(text):
        value = float(text)
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise ValueError("must be a number" + (" between %g and %g" % (low, high) if high is not None else
                                                   " >= %g" % low if low is not None else ""))
        return value
    return parse


def _bool(text):
    value = str(text).strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def lora_module(text):
    """NAME=PATH, or llm-d's JSON form {"name", "path", "base_model_name"}."""
    text = text.strip() if isinstance(text, str) else text
    if isinstance(text, dict) or text.startswith("{"):
        try:
            spec = text if isinstance(text, dict) else orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError("invalid JSON (%s)" % exc) from None
        name, path, base = spec.get("name"), spec.get("path"), spec.get("base_model_name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError('expected {"name": ..., "path": ...} with a non-empty name')
        if path is not None and not isinstance(path, str) or base is not None and not isinstance(base, str):
            raise ValueError("path and base_model_name must be strings")
        return LoraModule(name.strip(), (path or name).strip(), base or None)
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError('expected NAME=PATH or {"name": ..., "path": ...}')
    return LoraModule(name.strip(), path.strip())


def fake_metrics(text):
    if isinstance(text, dict):
        return FakeMetrics(text)
    try:
        return FakeMetrics(orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        raise ValueError("invalid JSON (%s)" % exc) from None


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
    parse.__wrapped__ = function
    return parse


class _Ignored(argparse.Action):
    """A flag that is accepted and does nothing; noted in `ignored`."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored = (getattr(namespace, "ignored", None) or []) + [option_string.lstrip("-")]


# -- the flags --------------------------------------------------------------------------------------

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SimConfig)}


def _d(name, shown=None):
    """'(default: X)' for the help of SimConfig field `name`."""
    return "(default: %s)" % (shown if shown is not None else _DEFAULTS[name])


def add_sim_arguments(parser):
    """Every `kvcm sim` flag. Defaults are None ("not given"): see the module docstring."""
    parser.set_defaults(ignored=None)
    seconds = _typed(duration, "duration")
    count, natural, boolean = _typed(_int(1), "count"), _typed(_int(0), "count"), _typed(_bool, "boolean")
    percent = _typed(_float(0.0, 100.0), "percent")

    def flag(group, *names, **kw):
        group.add_argument(*names, default=None, **kw)

    def switch(group, name, help):
        """A Go-style boolean: --NAME, --NAME=true|false."""
        flag(group, name, nargs="?", const=True, type=boolean, metavar="BOOL", help=help)

    g = parser.add_argument_group("server")
    flag(g, "--config", metavar="FILE",
         help="a YAML file whose keys are these flags' names; flags and the environment win over it")
    flag(g, "--host", help="HTTP listen address %s" % _d("host"))
    flag(g, "--port", type=_typed(_int(0), "port"),
         help="HTTP port of rank 0; rank r listens on port + r (0 = any free port) %s" % _d("port"))
    flag(g, "--model", help="the model name: in the event topic and, without --served-model-name, in the API; "
                            "SIM_MODEL when not given %s" % _d("model"))
    flag(g, "--served-model-name", nargs="+", metavar="NAME",
         help="model names the API accepts; the first is reported (default: --model)")
    flag(g, "--tokenizer", metavar="DIR",
         help="a directory with tokenizer.json [+ tokenizer_config.json, chat template]; default: --model if it "
              "is such a directory, else the word-level tokenizer")
    switch(g, "--force-dummy-tokenizer", "use the word-level tokenizer even when --model or --tokenizer names a "
                                         "tokenizer directory (default: false)")
    flag(g, "--max-model-len", type=count, help="context window in tokens, prompt plus output %s"
                                                % _d("max_model_len"))
    flag(g, "--data-parallel-size", type=count,
         help="ranks in this process; rank r offsets the HTTP, ZMQ and replay ports by r %s"
              % _d("data_parallel_size"))
    flag(g, "--data-parallel-rank", type=natural,
         help="run only this rank (one process per rank, each a pod of its own): the ZMQ and replay ports are "
              "offset by it and every batch carries it, the HTTP port is --port; --data-parallel-size is ignored")
    flag(g, "--log-level", choices=LOG_LEVELS, help="log level on stderr %s" % _d("log_level"))
    flag(g, "--v", "-v", type=natural, metavar="N",
         help="klog's verbosity, as llm-d's simulator takes it: 0-1 warning, 2-3 info, 4+ debug")
    switch(g, "--log-http", "log every HTTP request and response (method, path, headers, bodies that are not "
                            "streamed) at info level; may log secrets such as Authorization headers (default: false)")
    flag(g, "--max-request-body-size-mb", type=_typed(_int(1), "megabytes"), metavar="MB",
         help="largest request body accepted, 1 to 512 %s" % _d("max_request_body_size_mb"))
    flag(g, "--startup-duration", type=seconds, metavar="DURATION",
         help="readiness (/health/ready, /ready) answers 503 for this long after start, as while a model "
              "loads; /health answers 200 all along (default: 0)")
    g.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=None,
                   help="POST /sleep puts the engine to sleep (it also needs VLLM_SERVER_DEV_MODE=1, as vLLM); "
                        "sleeping clears the KV cache (default: off)")
    switch(g, "--enable-request-id-headers", "answer with an X-Request-Id header: the request's own, else a "
                                             "new id; the id names the response (default: false)")
    flag(g, "--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate (PEM), with --ssl-keyfile")
    flag(g, "--ssl-keyfile", metavar="FILE", help="the private key (PEM) of --ssl-certfile")
    switch(g, "--self-signed-certs", "serve HTTPS with a self-signed certificate made at start (default: false)")

    g = parser.add_argument_group("LoRA adapters")
    flag(g, "--lora-modules", nargs="+", type=_typed(lora_module, "LoRA module"), metavar="NAME=PATH|JSON",
         help='LoRA adapters loaded at start: NAME=PATH or {"name": ..., "path": ..., "base_model_name": ...}')
    flag(g, "--max-loras", type=count, help="adapters that requests can use at the same time; a request for "
                                           "another one waits until one of them is idle %s" % _d("max_loras"))
    flag(g, "--max-cpu-loras", type=count, help="adapters kept in CPU memory; at least --max-loras "
                                               "(default: --max-loras)")

    g = parser.add_argument_group("scheduling and latency")
    flag(g, "--max-num-seqs", type=count, help="requests running at once %s" % _d("max_num_seqs"))
    flag(g, "--max-waiting-queue-length", type=natural,
         help="requests waiting beyond those; more are refused with 429 %s" % _d("max_waiting_queue_length"))
    flag(g, "--latency-calculator", choices=LATENCY_CALCULATORS, metavar="{constant,per-token}",
         help="constant: TTFT = --time-to-first-token; per-token: TTFT = --prefill-overhead + uncached prompt "
              "tokens x --prefill-time-per-token; unset: per-token when --time-to-first-token is 0, else constant")
    flag(g, "--time-to-first-token", type=seconds, metavar="DURATION", help="the constant TTFT (default: 0)")
    flag(g, "--time-to-first-token-std-dev", type=seconds, metavar="DURATION",
         help="jitter of the constant TTFT (at most 30%% of it; default: 0)")
    flag(g, "--prefill-overhead", type=seconds, metavar="DURATION", help="fixed part of a per-token TTFT (default: 0)")
    flag(g, "--prefill-time-per-token", type=seconds, metavar="DURATION",
         help="prefill time per prompt token not found in the KV cache (default: 0)")
    flag(g, "--prefill-time-std-dev", type=seconds, metavar="DURATION", help="jitter of a per-token TTFT (default: 0)")
    flag(g, "--inter-token-latency", type=seconds, metavar="DURATION", help="time between output tokens (default: 0)")
    flag(g, "--inter-token-latency-std-dev", type=seconds, metavar="DURATION",
         help="jitter of the inter-token latency (at most 30%% of it; default: 0)")
    flag(g, "--kv-cache-transfer-latency", type=seconds, metavar="DURATION",
         help="disaggregated decode (kv_transfer_params.do_remote_prefill): the constant time to fetch the "
              "prompt's KV from the prefill pod (default: 0)")
    flag(g, "--kv-cache-transfer-latency-std-dev", type=seconds, metavar="DURATION",
         help="jitter of the constant transfer time (at most 30%% of it; default: 0)")
    flag(g, "--kv-cache-transfer-time-per-token", type=seconds, metavar="DURATION",
         help="per-token transfer time: prompt tokens x this, used as the per-token TTFT is (default: 0)")
    flag(g, "--kv-cache-transfer-time-std-dev", type=seconds, metavar="DURATION",
         help="jitter of a per-token transfer time (default: 0)")
    flag(g, "--time-factor-under-load", type=_typed(_float(1.0), "factor"),
         help="latencies are multiplied by a factor growing linearly from 1 (one request running) to this "
              "(--max-num-seqs running) %s" % _d("time_factor_under_load"))

    g = parser.add_argument_group("responses")
    flag(g, "--mode", choices=MODES, help="echo: answer with the prompt (chat: the last message); random: random "
                                          "sentences %s" % _d("mode"))
    flag(g, "--seed", type=int, help="seed of every random choice %s" % _d("seed"))
    flag(g, "--failure-injection-rate", type=percent,
         help="percentage of generation requests answered with an injected error; POST /admin/config changes it "
              "(default: 0)")
    flag(g, "--failure-types", nargs="+", type=_typed(_failure_type, "failure type"), metavar="TYPE",
         help="injected errors to choose from: %s (default: all)" % ", ".join(FAILURE_TYPES))
    flag(g, "--default-embedding-dimensions", type=count,
         help="/v1/embeddings vector size when a request gives no dimensions %s" % _d("default_embedding_dimensions"))
    for name, kind, help in (
            ("max-tool-call-integer-param", int, "largest integer argument of a generated tool call"),
            ("min-tool-call-integer-param", int, "smallest integer argument of a generated tool call"),
            ("max-tool-call-number-param", float, "largest number argument of a generated tool call"),
            ("min-tool-call-number-param", float, "smallest number argument of a generated tool call"),
            ("max-tool-call-array-param-length", int, "longest array argument of a generated tool call"),
            ("min-tool-call-array-param-length", int, "shortest array argument of a generated tool call"),
            ("tool-call-not-required-param-probability", int,
             "percentage chance that a tool call includes an optional parameter"),
            ("object-tool-call-not-required-field-probability", int,
             "percentage chance that an object argument includes an optional field"),
            ("tool-call-extra-call-probability", int,
             "percentage chance of one more tool call, repeated until a roll fails or every tool is called")):
        flag(g, "--" + name, type=kind, help="%s %s" % (help, _d(name.replace("-", "_"))))
    switch(g, "--skip-tool-validation", "do not check tool schemas against llm-d's whitelist of JSON-schema "
                                        "keywords, as vLLM does not (default: false)")

    g = parser.add_argument_group("KV cache and events")
    switch(g, "--enable-kvcache", "simulate the KV cache: prefix hits, capacity and KV events; false: no cache, "
                                  "nothing cached, no events (default: true)")
    flag(g, "--hash-algo", choices=ALGORITHMS,
         help="block hashes: vLLM's (sha256, sha256_cbor, sha256_cbor_64bit), or llm-d's keys (llmd_fnv64a, salted "
              "with the served name or LoRA as llm-d's simulator does) %s" % _d("hash_algo"))
    flag(g, "--hash-seed", help="the engines' PYTHONHASHSEED (PYTHONHASHSEED when not given); unset = vLLM's "
                                "'vllm-none-hash' (llm-d keys: ''); --hash-seed '' is the empty-string seed")
    flag(g, "--block-size", type=int, help="tokens per block %s" % _d("block_size"))
    flag(g, "--kv-cache-size", type=count, help="KV cache blocks per rank %s" % _d("kv_cache_size"))
    flag(g, "--global-cache-hit-threshold", type=_typed(_float(0.0, 1.0), "fraction"),
         help="requests whose prompt hit rate (cached / prompt tokens) is below this end at once with "
              "finish_reason cache_threshold; a request's cache_hit_threshold wins (default: 0, off)")
    flag(g, "--on-kv-cache-full", choices=ON_KV_CACHE_FULL,
         help="wait: a request waits for free KV blocks, as vLLM; error: it fails with 500, as llm-d's simulator "
              "%s" % _d("on_kv_cache_full"))
    flag(g, "--zmq-endpoint", help="where KV events go: bound when it has '*' or '::' (or is ipc/inproc), else "
                                   "connected, as vLLM does; '' publishes nothing %s" % _d("zmq_endpoint"))
    flag(g, "--topic", help="event topic; {pod} and {model} are replaced %s" % _d("topic"))
    flag(g, "--pod-id", help="the pod in the topic (default: <POD_IP or 127.0.0.1>:<the rank's HTTP port>)")
    flag(g, "--replay-endpoint", "--kv-events-replay-endpoint", dest="replay_endpoint",
         help="bind a replay ROUTER here (vLLM's protocol; rank r offsets the port)")
    flag(g, "--kv-events-replay-queue-size", type=count,
         help="event batches kept for replay %s" % _d("kv_events_replay_queue_size"))
    flag(g, "--event-format", choices=EVENT_FORMATS,
         help="map: vLLM >= 0.24 events (0.33's fields); array: vLLM 0.20's layout; go-array: llm-d's "
              "simulator's 9-field arrays (parent 0 for none) %s" % _d("event_format"))
    switch(g, "--use-vllm-map-event-format", "llm-d's name for the format: true = --event-format map, "
                                             "false = --event-format go-array")
    flag(g, "--event-batch-size", type=count,
         help="send a batch when this many events wait, or 1 s after the last (llm-d's batching); "
              "default: one batch per engine step, as vLLM")

    g = parser.add_argument_group("metrics")
    flag(g, "--fake-metrics", type=_typed(fake_metrics, "JSON"), metavar="JSON",
         help="report these values on /metrics instead of the real ones (llm-d's keys, e.g. "
              '\'{"running-requests": 3, "kv-cache-usage": "oscillate:0:1:10s"}\')')
    flag(g, "--fake-metrics-refresh-interval", type=seconds, metavar="DURATION",
         help="how often function fake metrics are recomputed (default: 100ms)")

    g = parser.add_argument_group("accepted for compatibility with llm-d's simulator, without effect")
    for name in tuple(IGNORED) + KLOG_FLAGS:
        why = IGNORED.get(name, _KLOG_NOTE)
        if name.startswith("no-") or name in _IGNORED_TOGGLES:
            g.add_argument("--" + name, nargs=0, action=_Ignored, help=why)
        else:
            g.add_argument("--" + name, nargs="?" if name in _IGNORED_BOOLS else None, action=_Ignored,
                           metavar="VALUE", help=why)


# -- from flags, environment and file to SimConfig ------------------------------------------------------

def _actions():
    """{YAML key: argparse action} of every flag (the YAML keys are the flag names)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_sim_arguments(parser)
    return {option[2:]: action for action in parser._actions for option in action.option_strings
            if option.startswith("--")}


def _file_value(action, value):
    """A YAML value converted as the flag's text would be (lists for the flags that take several)."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
        return _bool(_text(value))
    convert = action.type or str
    if action.nargs == "+":
        return [_item(convert, v) for v in (value if isinstance(value, list) else [value])]
    value = _item(convert, value)
    if action.choices is not None and value not in action.choices:
        raise ValueError("must be one of %s" % ", ".join(map(str, action.choices)))
    return value


def _item(convert, value):
    """Structured values (a LoRA module or fake metrics written as a YAML mapping) go to the
    parsers as they are; scalars as their flag text."""
    if isinstance(value, dict):
        return getattr(convert, "__wrapped__", convert)(value)
    return convert(value if isinstance(value, str) else _text(value))


def _text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_file(path):
    """{flag dest: value} of a --config YAML file, and the ignored keys in it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("--config %s: %s" % (path, exc.strerror)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config %s: not valid YAML (%s)" % (path, str(exc).replace("\n", " "))) from None
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise ConfigError("--config %s: expected a mapping of flag names to values" % path)
    actions = _actions()
    values, ignored = {}, []
    for key, value in data.items():
        action = actions.get(key)
        if action is None or key == "config":
            raise ConfigError("--config %s: unknown key %r" % (path, key))
        if isinstance(action, _Ignored):
            ignored.append(key)
            continue
        try:
            values[action.dest] = None if value is None else _file_value(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError("--config %s: %s: %s" % (path, key, exc)) from None
    return values, ignored


def _log_level(verbosity):
    return "warning" if verbosity < 2 else "info" if verbosity < 4 else "debug"


def config_from(args, environ=None):
    """The SimConfig of parsed flags, the environment and the --config file; also the
    accepted-and-ignored flags and keys."""
    environ = os.environ if environ is None else environ
    values, ignored = load_file(args.config) if args.config else ({}, [])
    ignored = list(args.ignored or []) + ignored
    if environ.get("SIM_MODEL"):
        values["model"] = environ["SIM_MODEL"]
    if environ.get("PYTHONHASHSEED"):
        values["hash_seed"] = environ["PYTHONHASHSEED"]
    flags = {action.dest for action in _actions().values()}
    # only the sim's own flags: the command line adds attributes of its own (command, func, argv)
    values.update((k, v) for k, v in vars(args).items() if v is not None and k in flags)
    values.pop("config", None)
    verbosity = values.pop("v", None)
    if verbosity is not None and args.log_level is None:
        values["log_level"] = _log_level(verbosity)
    go_map = values.pop("use_vllm_map_event_format", None)
    if go_map is not None:
        wanted = "map" if go_map else "go-array"
        if args.event_format is None:
            values["event_format"] = wanted
        elif args.event_format != wanted:
            raise ConfigError("--use-vllm-map-event-format=%s contradicts --event-format %s"
                              % (str(go_map).lower(), args.event_format))
    fields = {("served_model_names" if k == "served_model_name" else k): tuple(v) if isinstance(v, list) else v
              for k, v in values.items() if v is not None}
    fields.setdefault("served_model_names", (fields.get("model", DEFAULT_MODEL),))
    fields["pod_name"] = environ.get("POD_NAME") or None
    fields["pod_namespace"] = environ.get("POD_NAMESPACE") or None
    fields["pod_ip"] = environ.get("POD_IP") or None
    fields["dev_mode"] = environ.get("VLLM_SERVER_DEV_MODE") == "1"
    return SimConfig(**fields), ignored


def notes(ignored):
    """One line per accepted-and-ignored flag or key."""
    out = []
    for name in dict.fromkeys(ignored):
        why = IGNORED.get(name, _KLOG_NOTE)
        out.append("kvcm sim: note: --%s is accepted and has no effect: %s" % (name, why))
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_args(argv, environ=None):
    """SimConfig from `kvcm sim` arguments (for tests and tools); ConfigError when invalid.
    The environment is empty unless given."""
    parser = _Parser(prog="kvcm sim")
    add_sim_arguments(parser)
    return config_from(parser.parse_args(argv), {} if environ is None else environ)[0]


__all__ = ["EVENT_FORMATS", "add_sim_arguments", "config_from", "load_file", "notes", "parse_args"]
