"""Configuration of `kvcm serve` (DESIGN.md §7): one frozen `Config`, built from
defaults < llm-d's environment variables < TOML file < `KVCM_*` environment < command-line
flags.

Every option is one row of `OPTIONS`; the flags, their `--help`, the environment variables,
the TOML keys and the example env file (`Config.as_env_file()`) all come from that table, so
they cannot drift apart.

Rules of the layers:
- TOML (`--config FILE`, or `KVCM_CONFIG`): keys are the option names with `_`; lists are
  arrays (`zmq_bind = []` binds nothing); `MODEL=DIR` and `POD=EP` lists may also be tables;
  `tier_weights` a string or a table. Relative paths in the file are relative to the file's
  directory. An unknown key or a value of the wrong type is an error.
- Environment: `KVCM_` + the upper-cased name. An empty (or blank) value means unset, so an
  env file may list every key. Lists are comma- or whitespace-separated, except
  `KVCM_ENGINE`, whose entries are separated by `;` or newlines (an engine spec contains
  commas). Consequently the empty-string hash seed cannot come from the environment
  (`KVCM_HASH_SEED=` is unset): give it as `--hash-seed ''` or `hash_seed = ""`.
- Flags: only flags given on the command line override (their argparse default is
  SUPPRESS). A repeatable flag replaces the lower layers' list; it does not extend it.
- On the command line and in the environment, a list given as the single word `none` is
  the empty list (`--zmq-bind ''` too), e.g. `KVCM_ZMQ_BIND=none` for connect mode only.
- llm-d's environment: the variables llm-d's online indexing service reads (`ZMQ_ENDPOINT`,
  `HTTP_PORT`, `REDIS_ADDR`, ...; `LLMD_ENV`) stand in for options nothing else sets, so kvcm
  drops into an llm-d deployment. They are not kvcm's own (`PYTHONHASHSEED` and `HTTP_PORT`
  may be set for other programs), so one is read only for an option no other layer gives:
  a stray value cannot stop a kvcm configured otherwise. `POOL_CONCURRENCY` and `HF_TOKEN`
  are accepted and ignored (`LLMD_IGNORED`); `Config.notes` says so, and which were used.
- Sizes (`--max-body`): a bare number is bytes; units B, KB/MB/GB (powers of 1000),
  KiB/MiB/GiB and K/M/G (powers of 1024, as systemd reads them), case-insensitive.

Every invalid value raises ConfigError with one line naming the option and its source.
"""

import argparse
import dataclasses
import difflib
import fractions
import math
import os
import re
import textwrap
import tomllib
import urllib.parse
from typing import Mapping, Optional, Sequence, Union

from kvcm._core import DEFAULT_KEY_MEMO_BLOCKS, ENGINE_ALGORITHMS, KNOWN_TIERS, MAX_TIERS
from kvcm.endpoints import check_endpoint
from kvcm.ingest import DEFAULT_MAX_MESSAGE, EngineSpec, parse_engine, read_engines_file
from kvcm.placement import parse_cpus
from kvcm.urls import redact_url
from kvcm.zap import parse_network

ENV_PREFIX = "KVCM_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class ConfigError(ValueError):
    """An invalid setting. str() is one line naming the option and where the value came from."""

    def __init__(self, message, option=None, source=None):
        super().__init__(str(message).replace("\r", " ").replace("\n", " "))
        self.option = option
        self.source = source


# -- value kinds: how one option's value is read from text (flag, env) and from TOML --------

def _toml_type(value):
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                       (str, "a string"), (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date/time"


class _Kind:
    toml_types = (str,)           # TOML value types accepted as they are (bool never counts as int)
    expected = "a string"
    is_path = False
    is_switch = False

    def from_text(self, text):
        raise NotImplementedError

    def from_toml(self, value):
        return self.from_text(value)

    def check_toml_type(self, value):
        if isinstance(value, bool) or not isinstance(value, self.toml_types):   # a bool is an int too
            raise ValueError("expected %s, got %s" % (self.expected, _toml_type(value)))


class _Text(_Kind):
    def __init__(self, allow_empty=False, secret=False):
        self.allow_empty, self.secret = allow_empty, secret

    def from_text(self, text):
        if not self.allow_empty:
            if not text:
                raise ValueError("must not be empty")
            if any(c.isspace() for c in text):
                raise ValueError("must not contain whitespace" if self.secret else
                                 "must not contain whitespace, got %r" % text)
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ValueError("must not contain control characters")
        return text


class _Path(_Kind):
    is_path = True

    def from_text(self, text):
        if not text:
            raise ValueError("must not be empty")
        return text


class _HashSeed(_Kind):
    """Any string, "" included; a TOML integer is the same seed as its decimal text."""
    toml_types = (str, int)
    expected = "a string or an integer"

    def from_text(self, text):
        return text

    def from_toml(self, value):
        return str(value)


class _Cpus(_Kind):
    """A CPU list such as 0-3,8 (TOML: that string, or one CPU's number)."""
    toml_types = (str, int)
    expected = "a CPU list (string) or a CPU number"

    def from_text(self, text):
        return parse_cpus(text)

    def from_toml(self, value):
        return parse_cpus(str(value))


class _Choice(_Kind):
    def __init__(self, *choices):
        self.choices = choices

    def from_text(self, text):
        if text.lower() not in self.choices:
            raise ValueError("expected one of %s, got %r" % (", ".join(self.choices), text))
        return text.lower()


class _Integer(_Kind):
    toml_types = (int,)
    expected = "an integer"

    def __init__(self, low, high):
        self.low, self.high = low, high

    def from_text(self, text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expected an integer, got %r" % text) from None
        return self.from_toml(value)

    def from_toml(self, value):
        if not self.low <= value <= self.high:
            raise ValueError("must be between %d and %d, got %d" % (self.low, self.high, value))
        return value


class _Switch(_Kind):
    """On or off: a flag with an optional value on the command line (alone = on); true/false
    (1/0, yes/no, on/off) as text; a boolean in TOML."""
    toml_types = (bool,)
    expected = "a boolean"
    is_switch = True
    _WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def from_text(self, text):
        value = self._WORDS.get(text.strip().lower())
        if value is None:
            raise ValueError("expected true or false (1/0, yes/no, on/off), got %r" % text)
        return value

    def from_toml(self, value):
        return value

    def check_toml_type(self, value):
        if not isinstance(value, bool):
            raise ValueError("expected a boolean, got %s" % _toml_type(value))


class _Seconds(_Kind):
    toml_types = (int, float)
    expected = "a number of seconds"
    MAX = 86400.0

    def __init__(self, maximum=None):
        if maximum is not None:
            self.MAX = maximum

    def from_text(self, text):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds, got %r" % text) from None
        return self.from_toml(value)

    def from_toml(self, value):
        if not (math.isfinite(value) and 0 < value <= self.MAX):
            raise ValueError("must be a number of seconds above 0 and at most %g, got %r" % (self.MAX, value))
        return float(value)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class _Size(_Kind):
    toml_types = (str, int)
    expected = "a size (string) or a number of bytes"
    MAX = 2**30

    def from_text(self, text):
        match = _SIZE_RE.fullmatch(text)
        unit = match and _SIZE_UNITS.get(match.group(2).lower())
        if unit is None:
            raise ValueError("expected a size such as 8MiB, 512KiB or 1000000 (bytes; units B, KB, MB, "
                             "GB, KiB, MiB, GiB, K, M, G), got %r" % text)
        return self.from_toml(int(fractions.Fraction(match.group(1)) * unit))

    def from_toml(self, value):
        if isinstance(value, str):
            return self.from_text(value)
        if not 1 <= value <= self.MAX:
            raise ValueError("must be between 1 byte and 1GiB, got %d bytes" % value)
        return value


class _TierWeights(_Kind):
    toml_types = (str, dict)
    expected = 'a string like "gpu=1.0,cpu=0.8" or a table of numbers'

    def from_text(self, text):
        pairs = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            tier, sep, weight = (s.strip() for s in item.partition("="))
            if not sep:
                raise ValueError("expected TIER=WEIGHT[,TIER=WEIGHT...], got %r" % item)
            try:
                pairs.append((tier, float(weight)))
            except ValueError:
                raise ValueError("tier %r: weight %r is not a number" % (tier, weight)) from None
        return self._weights(pairs)

    def from_toml(self, value):
        if isinstance(value, str):
            return self.from_text(value)
        for tier, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError("tier %r: expected a number, got %s" % (tier, _toml_type(weight)))
        return self._weights(value.items())

    @staticmethod
    def _weights(pairs):
        weights = {}
        for tier, weight in pairs:
            name = tier.lower()      # tiers come lower-cased from the events' medium
            if not name or any(c.isspace() or c in ",=" for c in name):
                raise ValueError("bad tier name %r" % tier)
            if name in weights:
                raise ValueError("tier %r given twice" % name)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError("tier %r: weight must be a finite number >= 0, got %r" % (name, weight))
            weights[name] = float(weight)
        # events may name the known media and these: together they must fit the tier table
        if len(set(weights) | set(KNOWN_TIERS)) > MAX_TIERS:
            raise ValueError("at most %d tiers counting the known ones (%s), got %d"
                             % (MAX_TIERS, ", ".join(KNOWN_TIERS), len(set(weights) | set(KNOWN_TIERS))))
        return weights


INDEX_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix")


class _IndexUrl(_Kind):
    def from_text(self, text):
        if text == "memory":
            return text
        shown = redact_url(text)
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in INDEX_SCHEMES or not text.lower().startswith(parts.scheme + "://"):
            raise ValueError("expected 'memory' or a redis://, rediss://, valkey://, valkeys:// or unix:// "
                             "URL, got %r" % shown)
        if parts.scheme == "unix":
            if not parts.path.strip("/"):
                raise ValueError("%r: a unix:// URL needs a socket path, e.g. unix:///run/redis.sock" % shown)
            return text
        try:
            parts.port
        except ValueError:
            raise ValueError("%r: bad port" % shown) from None
        if not parts.hostname:
            raise ValueError("%r: needs a host, e.g. redis://127.0.0.1:6379/0" % shown)
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError("%r: the path must be a database number, got %r" % (shown, database))
        return text


class _Endpoint(_Kind):
    def __init__(self, connect=False):
        self.connect = connect

    def from_text(self, text):
        return check_endpoint(text.strip(), "endpoint", self.connect)


class _Network(_Kind):
    def from_text(self, text):
        return str(parse_network(text))


class _Engine(_Kind):
    def from_text(self, text):
        return parse_engine(text)


class _Pair(_Kind):
    """KEY=VALUE items (`POD=EP`, `MODEL=DIR`); in TOML also a table {KEY = VALUE}."""

    def __init__(self, syntax, value_kind):
        self.syntax, self.value_kind = syntax, value_kind
        self.key_label = syntax.partition("=")[0].lower()
        self.is_path = value_kind.is_path

    def from_text(self, text):
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError("expected %s, got %r" % (self.syntax, text))
        return self.pair(key.strip(), value.strip())

    def pair(self, key, value):
        if not key or not value:
            raise ValueError("expected %s, got %r" % (self.syntax, "%s=%s" % (key, value)))
        try:
            return key, self.value_kind.from_text(value)
        except ValueError as exc:
            raise ValueError("%s %r: %s" % (self.key_label, key, exc)) from None


class _Repeated:
    """A repeatable option: a list of `item` values, combined into a tuple or a dict."""

    def __init__(self, item, separator=r"[,\s]+"):
        self.item = item
        self.separator = re.compile(separator)

    @property
    def is_path(self):
        return self.item.is_path

    def combine(self, values):
        if isinstance(self.item, _Pair):
            result = {}
            for key, value in values:
                if key in result:
                    raise ValueError("%r given twice" % key)
                result[key] = value
            return result
        seen = set()
        for value in values:
            key = value.name if isinstance(value, EngineSpec) else value
            if key in seen:
                raise ValueError("%r given twice" % key)
            seen.add(key)
        return tuple(values)

    def from_items(self, items):
        items = [item for item in items if item.strip()]
        if len(items) == 1 and items[0].strip().lower() == "none":
            items = []
        return self.combine([self.item.from_text(item) for item in items])

    def from_env(self, text):
        return self.from_items(self.separator.split(text))

    def from_toml(self, value, base_dir):
        pairs = isinstance(self.item, _Pair)
        if isinstance(value, dict) and pairs:
            for key, entry in value.items():
                if not isinstance(entry, str):
                    raise ValueError("%r: expected a string, got %s" % (key, _toml_type(entry)))
            values = [self.item.pair(key, entry) for key, entry in value.items()]
        elif isinstance(value, list):
            for entry in value:
                if not isinstance(entry, str):
                    raise ValueError("expected an array of strings, got %s in it" % _toml_type(entry))
            values = [self.item.from_text(entry) for entry in value]
        else:
            raise ValueError("expected an array%s, got %s" % (" or a table" if pairs else "", _toml_type(value)))
        if self.is_path:
            values = [(key, _resolve(path, base_dir)) for key, path in values]
        return self.combine(values)


def _resolve(path, base_dir):
    return os.path.normpath(os.path.join(base_dir, path)) if base_dir else path


# -- the option table -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    default: Optional[str]    # as written on the command line; None = unset
    metavar: str
    help: str
    group: str
    kind: object
    llmd_env: Optional[str] = None   # the variable llm-d's online service reads for it

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def env(self):
        return ENV_PREFIX + self.name.upper()

    @property
    def repeatable(self):
        return isinstance(self.kind, _Repeated)

    @property
    def env_syntax(self):
        if not self.repeatable:
            return ""
        return "';'- or newline-separated" if self.name == "engine" else "comma- or whitespace-separated"


HASH_ALGOS = ENGINE_ALGORITHMS     # vLLM's, and llm-d's request keys (llmd_fnv64a, llmd_fnv64a_nomodel)
HASH_MODES = ("auto", "vllm", "kvcm")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MAX_BLOCK_SIZE = 65536
MAX_INDEX_BLOCKS = 0xFFFFFFF0     # the index addresses blocks with u32 slab indices (index.h)

_HTTP, _INGEST, _HASHING, _TOKENIZERS, _INDEX, _SHARED, _LOGGING = (
    "HTTP server", "event ingest (ZMQ)", "block hashing", "tokenizers", "index and scoring",
    "shared index (Redis/Valkey)", "logging")

OPTIONS = (
    Option("http_host", "0.0.0.0", "HOST", "HTTP listen address", _HTTP, _Text()),
    Option("http_port", "8080", "PORT", "HTTP listen port; 0 = pick a free one and log it", _HTTP,
           _Integer(0, 65535), llmd_env="HTTP_PORT"),
    Option("max_body", "8MiB", "SIZE",
           "request body limit: bytes, or a size in B, KB/MB/GB (powers of 1000), KiB/MiB/GiB or K/M/G "
           "(powers of 1024); at most 1GiB", _HTTP, _Size()),
    Option("header_timeout", "10", "SECONDS", "time a client has to send a request line and its headers, "
           "from its connection or its previous request", _HTTP, _Seconds()),
    Option("body_timeout", "30", "SECONDS", "time a client has to send a request body, from the end of its "
           "headers", _HTTP, _Seconds()),
    Option("idle_timeout", "120", "SECONDS", "time a keep-alive connection may stay idle", _HTTP, _Seconds()),
    Option("max_connections", "1000", "N", "concurrent HTTP connections; more are answered 503", _HTTP,
           _Integer(1, 1_000_000)),
    Option("http_cpus", None, "CPUS", "CPUs the event loop (HTTP, scoring) and the workers it starts run on, "
           "e.g. 0 or 0-1 (Linux); give the ingest others with --ingest-cpus; unset = any", _HTTP, _Cpus()),
    Option("busy_poll_us", "0", "MICROSECONDS", "after answering, the event loop spins up to this long for the "
           "next request instead of sleeping: lower latency for CPU time (0 = off; at most 10000)", _HTTP,
           _Integer(0, 10_000)),
    Option("admin_token", None, "TOKEN",
           "bearer token for the admin endpoints; unset = loopback clients only (prefer the environment "
           "variable: flags show in ps)", _HTTP, _Text(secret=True)),
    Option("tls_cert", None, "FILE", "serve HTTPS: PEM certificate chain (with --tls-key)", _HTTP, _Path()),
    Option("tls_key", None, "FILE", "PEM private key of --tls-cert", _HTTP, _Path()),
    Option("zmq_bind", "tcp://*:5557", "ENDPOINT",
           "SUB endpoint to bind for engines that connect (bind mode); repeatable; '' or none = none",
           _INGEST, _Repeated(_Endpoint()), llmd_env="ZMQ_ENDPOINT"),
    Option("zmq_topic_prefix", "kv@", "PREFIX", "topic prefix subscribed to in bind mode", _INGEST,
           _Text(allow_empty=True), llmd_env="ZMQ_TOPIC"),
    Option("engine", None, "NAME=EP[,replay=EP][,model=M]",
           "engine whose PUB endpoint kvcm connects to (connect mode); repeatable", _INGEST,
           _Repeated(_Engine(), separator=r"[;\n]+")),
    Option("engines_file", None, "FILE", "file of engine specs, one per line (# comments)", _INGEST, _Path()),
    Option("replay_endpoint", None, "POD=EP", "replay (ROUTER) endpoint of a bind-mode pod; repeatable",
           _INGEST, _Repeated(_Pair("POD=ENDPOINT", _Endpoint(connect=True)))),
    Option("zmq_max_message", "64MiB", "SIZE",
           "largest ZMQ message accepted; libzmq drops the connection of a publisher that sends a larger one",
           _INGEST, _Size()),
    Option("ingest_cpus", None, "CPUS", "CPUs the ingest thread and libzmq's I/O thread run on, e.g. 1 or "
           "2-3 (Linux; in-memory index); unset = any", _INGEST, _Cpus()),
    Option("zmq_allow", None, "CIDR",
           "accept ZMQ publishers (and connect-mode engines) only from this network, e.g. 10.0.0.0/8; "
           "repeatable; unset = from any address", _INGEST, _Repeated(_Network())),
    Option("hash_algo", "sha256", "ALGO", "the engines' prefix-caching hash: " + ", ".join(HASH_ALGOS),
           _HASHING, _Choice(*HASH_ALGOS)),
    Option("hash_seed", None, "SEED",
           "the engines' PYTHONHASHSEED; unset = vLLM >= 0.29's default (llm-d's algorithms: ''); '' is "
           "the empty-string seed (flag or TOML only: an empty KVCM_HASH_SEED means unset)", _HASHING,
           _HashSeed(), llmd_env="PYTHONHASHSEED"),
    Option("block_size", "16", "N", "tokens per KV block, as the engines' --block-size", _HASHING,
           _Integer(1, MAX_BLOCK_SIZE), llmd_env="BLOCK_SIZE"),
    Option("hash_mode", "auto", "MODE",
           "auto (parity, switching a model to decoupled on mismatch), vllm (parity) or kvcm (decoupled)",
           _HASHING, _Choice(*HASH_MODES)),
    Option("key_memo_blocks", str(DEFAULT_KEY_MEMO_BLOCKS), "N",
           "blocks whose keys scoring remembers (about 150 bytes each, allocated as used): a prompt "
           "whose prefix was scored before is looked up instead of hashed; 0 = off", _HASHING,
           _Integer(0, 1 << 26)),
    Option("tokenizer", None, "MODEL=DIR", "tokenizer directory of a model (local files only); repeatable",
           _TOKENIZERS, _Repeated(_Pair("MODEL=DIR", _Path()))),
    Option("tokenizers_dir", None, "DIR",
           "root searched for tokenizers (sub-directories with tokenizer.json, Hugging Face cache layout)",
           _TOKENIZERS, _Path()),
    Option("trust_request_chat_template", "false", "BOOL",
           "accept a chat_template in requests (rendered in worker processes that are killed when they "
           "overrun); off: such requests are refused with 400", _TOKENIZERS, _Switch()),
    Option("template_timeout", "2", "SECONDS", "time limit of one chat template render", _TOKENIZERS,
           _Seconds(600.0)),
    Option("template_max_output", None, "SIZE",
           "largest rendered chat prompt, in characters; unset = the --max-body limit", _TOKENIZERS, _Size()),
    Option("tokenize_max_inflight", "64", "N", "requests tokenizing at once; more are answered 503",
           _TOKENIZERS, _Integer(1, 100_000)),
    Option("tokenize_max_inflight_chars", "16M", "SIZE",
           "prompt characters being tokenized at once (about 80 bytes of memory each while encoding); more "
           "are answered 503 (a request alone is always admitted)", _TOKENIZERS, _Size()),
    Option("index", "memory", "URL", "index backend: memory, or a redis://, rediss://, valkey:// or unix:// URL",
           _INDEX, _IndexUrl(), llmd_env="REDIS_ADDR"),
    Option("max_blocks", "10000000", "N", "index capacity in distinct blocks (LRU beyond)", _INDEX,
           _Integer(1, MAX_INDEX_BLOCKS)),
    Option("tier_weights", "gpu=1.0,cpu=0.8", "TIER=W,...",
           "scorer weight of each tier; tiers not listed weigh 1.0", _INDEX, _TierWeights()),
    Option("default_model", None, "MODEL", "the model of a scoring or tokenizing request that names none; "
           "unset = requests must name one", _INDEX, _Text(), llmd_env="MODEL_NAME"),
    Option("state_dir", None, "DIR", "keep the in-memory index across restarts: snapshots go here (on SIGTERM "
           "and every --snapshot-interval) and are loaded on start, then each stream catches up by replay; "
           "not with --index redis:// (the store keeps the state)", _INDEX, _Path()),
    Option("snapshot_interval", "60", "SECONDS", "time between snapshots to --state-dir", _INDEX,
           _Seconds()),
    Option("bootstrap_from", None, "URL", "start from a running kvcm's index: its base URL (GET /v1/snapshot, "
           "with --admin-token when set); used when --state-dir holds no snapshot", _INDEX, _Text()),
    Option("redis_timeout", "1", "SECONDS", "shared index (--index redis://...): limit on every call to the "
           "store", _SHARED, _Seconds(5.0)),
    Option("redis_ttl", "0", "SECONDS", "shared index: expire block and engine-hash keys this long after "
           "their last store; 0 = never (bound memory with maxmemory + allkeys-lru instead)", _SHARED,
           _Integer(0, 10 * 365 * 86400)),
    Option("redis_backlog", "100000", "EVENTS", "shared index: events kept while the store is unreachable, "
           "applied in order on reconnect; beyond it events are dropped, counted, and their pods "
           "cleared", _SHARED, _Integer(1000, 10_000_000)),
    Option("redis_fail_open", "false", "BOOL", "shared index: while the store is unreachable, answer scoring "
           "with empty scores instead of 503", _SHARED, _Switch()),
    Option("log_level", "info", "LEVEL", ", ".join(LOG_LEVELS), _LOGGING, _Choice(*LOG_LEVELS)),
    Option("log_format", "text", "FORMAT", "text or json lines on stderr", _LOGGING, _Choice(*LOG_FORMATS)),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
LLMD_ENV = {option.llmd_env: option for option in OPTIONS if option.llmd_env}
# llm-d's variables kvcm has no use for: accepted, and said so once at start.
LLMD_IGNORED = {
    "POOL_CONCURRENCY": "kvcm applies each engine stream's events in order on its event loop, so there "
                        "is no worker pool to size",
    "HF_TOKEN": "kvcm never downloads: tokenizers come from local files (--tokenizer, --tokenizers-dir)",
}
LLMD_EPILOG = (
    "llm-d's environment: when nothing else sets an option, kvcm reads the variable llm-d's online "
    "indexing service uses for it: %s (REDIS_ADDR may be a bare HOST:PORT). %s are accepted and ignored. "
    "KVCM_* variables, the --config file and flags take precedence."
    % (", ".join("%s for %s (%s)" % (name, option.flag, option.env) for name, option in LLMD_ENV.items()),
       " and ".join(LLMD_IGNORED)))


@dataclasses.dataclass(frozen=True, repr=False)
class Config:
    """Every `kvcm serve` setting, validated. Defaults are the ones of `OPTIONS`."""
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    max_body: int = 8 * 2**20
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 120.0
    max_connections: int = 1000
    http_cpus: Optional[tuple] = None
    busy_poll_us: int = 0
    admin_token: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    zmq_bind: tuple = ("tcp://*:5557",)
    zmq_topic_prefix: str = "kv@"
    engine: tuple = ()                      # EngineSpec from --engine, in order
    engines_file: Optional[str] = None
    replay_endpoint: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    zmq_max_message: int = DEFAULT_MAX_MESSAGE
    ingest_cpus: Optional[tuple] = None
    zmq_allow: tuple = ()
    hash_algo: str = "sha256"
    hash_seed: Optional[str] = None         # None = unset; "" is a real seed
    block_size: int = 16
    hash_mode: str = "auto"
    key_memo_blocks: int = DEFAULT_KEY_MEMO_BLOCKS
    tokenizer: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    tokenizers_dir: Optional[str] = None
    trust_request_chat_template: bool = False
    template_timeout: float = 2.0
    template_max_output: Optional[int] = None     # None = max_body
    tokenize_max_inflight: int = 64
    tokenize_max_inflight_chars: int = 16 * 2**20
    index: str = "memory"
    max_blocks: int = 10_000_000
    tier_weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"gpu": 1.0, "cpu": 0.8}, hash=False)
    default_model: Optional[str] = None
    state_dir: Optional[str] = None
    snapshot_interval: float = 60.0
    bootstrap_from: Optional[str] = None
    redis_timeout: float = 1.0
    redis_ttl: int = 0
    redis_backlog: int = 100_000
    redis_fail_open: bool = False
    log_level: str = "info"
    log_format: str = "text"
    # Not options, filled in by load_config: the engines read from engines_file, and lines
    # for the log about llm-d's environment variables (which stood in for options, which were
    # ignored).
    file_engines: tuple = ()
    notes: tuple = dataclasses.field(default=(), compare=False)

    @property
    def template_output_limit(self):
        """The largest rendered chat prompt: --template-max-output, else --max-body."""
        return self.max_body if self.template_max_output is None else self.template_max_output

    @property
    def engines(self):
        """Every connect-mode engine: --engine ones, then the engines file's."""
        return self.engine + self.file_engines

    def __repr__(self):
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "admin_token" and value is not None:
                value = "***"
            elif field.name == "index":
                value = redact_url(value)
            shown.append("%s=%r" % (field.name, value))
        return "Config(%s)" % ", ".join(shown)

    @classmethod
    def as_env_file(cls):
        """The text of an example kvcm.env: every KVCM_* setting, commented out at its default."""
        lines = [
            "# kvcm serve: environment file (systemd EnvironmentFile=). Generated by",
            "# kvcm.config.Config.as_env_file(); every setting is shown commented out at its default.",
            "#",
            "# Precedence: command-line flags > these variables > the TOML file (KVCM_CONFIG) > defaults.",
            "# An empty value means unset, so KVCM_NAME= lines may stay. Lists are comma- or",
            "# whitespace-separated, except KVCM_ENGINE (';'-separated: engine specs contain commas);",
            "# the single word none is the empty list (KVCM_ZMQ_BIND=none: connect mode only).",
            "# The empty-string hash seed cannot be set here: use --hash-seed '' or hash_seed = \"\" in TOML.",
            "",
            "# TOML configuration file (--config FILE)",
            "#%s=" % CONFIG_ENV,
        ]
        group = None
        for option in OPTIONS:
            if option.group != group:
                group = option.group
                lines += ["", "# ---- %s" % group]
            note = "; " + option.env_syntax if option.repeatable else ""
            lines.append("")
            usage = " ".join(filter(None, (option.flag, option.metavar)))
            lines += textwrap.wrap("%s (%s)%s" % (option.help, usage, note),
                                   width=92, initial_indent="# ", subsequent_indent="# ",
                                   break_long_words=False, break_on_hyphens=False)
            lines.append("#%s=%s" % (option.env, option.default or ""))
        return "\n".join(lines) + "\n"


# -- flags --------------------------------------------------------------------------------

def _help(option):
    default = option.default if option.default is not None else "unset"
    repeat = ", " + option.env_syntax if option.repeatable else ""
    llmd = "; llm-d's %s" % option.llmd_env if option.llmd_env else ""
    text = "%s (default: %s; env %s%s%s)" % (option.help, default, option.env, repeat, llmd)
    return text.replace("%", "%%")


def add_serve_arguments(parser):
    """Adds --config and every option's flag to an argparse parser. Flags not given leave no
    attribute (default SUPPRESS), so load_config can tell them from defaults."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML file with option names as keys (env %s)" % CONFIG_ENV)
    groups = {}
    for option in OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        if getattr(option.kind, "is_switch", False):
            # `--flag` alone turns it on; `--flag false` says so explicitly
            groups[option.group].add_argument(option.flag, dest=option.name, metavar=option.metavar,
                                              default=argparse.SUPPRESS, nargs="?", const="true",
                                              help=_help(option))
            continue
        groups[option.group].add_argument(
            option.flag, dest=option.name, metavar=option.metavar, default=argparse.SUPPRESS,
            action="append" if option.repeatable else "store", help=_help(option))
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def serve_parser(prog="kvcm serve"):
    """A stand-alone parser of the serve flags whose errors raise ConfigError."""
    return add_serve_arguments(_Parser(prog=prog, allow_abbrev=False, epilog=LLMD_EPILOG,
                                       description="Run the KV-cache-aware routing index service."))


# -- loading ------------------------------------------------------------------------------

def _error(option_label, problem, source):
    return ConfigError("%s: %s (from %s)" % (option_label, problem, source), option_label, source)


def _given_flags(args):
    if args is None:
        return {}
    if isinstance(args, (str, bytes)):
        raise TypeError("load_config takes an argparse.Namespace or a list of arguments, not a string")
    if not isinstance(args, argparse.Namespace):
        args = serve_parser().parse_args(list(args))
    names = ["config"] + [option.name for option in OPTIONS]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _read_toml(path, source):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise _error("--config", "cannot read %s: %s" % (path, exc.strerror or exc), source) from None
    except UnicodeDecodeError:
        raise _error("--config", "%s is not UTF-8 text" % path, source) from None
    except tomllib.TOMLDecodeError as exc:
        raise _error("--config", "%s is not valid TOML: %s" % (path, exc), source) from None
    for key in data:
        if key not in OPTIONS_BY_NAME:
            close = difflib.get_close_matches(key.replace("-", "_"), OPTIONS_BY_NAME, n=1)
            hint = " (did you mean %r?)" % close[0] if close else ""
            raise ConfigError("%s: unknown key %r%s" % (path, key, hint), key, path)
    return data


def _from_toml(option, value, base_dir):
    if option.repeatable:
        return option.kind.from_toml(value, base_dir)
    option.kind.check_toml_type(value)
    parsed = option.kind.from_toml(value)
    return _resolve(parsed, base_dir) if option.kind.is_path else parsed


def _from_env(option, text):
    return option.kind.from_env(text) if option.repeatable else option.kind.from_text(text)


def _from_flag(option, raw):
    return option.kind.from_items(raw) if option.repeatable else option.kind.from_text(raw)


def load_config(args: Union[argparse.Namespace, Sequence[str], None] = None,
                environ: Optional[Mapping[str, str]] = None) -> Config:
    """The Config from defaults < TOML file < environment < flags.

    `args`: a Namespace from a parser set up by add_serve_arguments, or the serve arguments
    as a list (None = no flags). `environ` defaults to os.environ. Raises ConfigError.
    """
    environ = os.environ if environ is None else environ
    flags = _given_flags(args)
    layers = []      # (option, source, reader, raw value), lowest precedence first

    path, source = flags.get("config"), "the command line"
    if path is None and environ.get(CONFIG_ENV, "").strip():
        path, source = environ[CONFIG_ENV], "environment variable " + CONFIG_ENV
    if path is not None:
        if not path:
            raise _error("--config", "must not be empty", source)
        base_dir = os.path.dirname(path)
        for name, value in _read_toml(path, source).items():
            layers.append((OPTIONS_BY_NAME[name], "%s, key %s" % (path, name),
                           lambda option, value: _from_toml(option, value, base_dir), value))
    for option in OPTIONS:
        text = environ.get(option.env)
        if text is not None and text.strip():
            layers.append((option, "environment variable " + option.env, _from_env, text))
    for option in OPTIONS:
        if option.name in flags:
            layers.append((option, "the command line", _from_flag, flags[option.name]))
    given = {option.name for option, *_ in layers}
    fallbacks = [(option, "environment variable %s (llm-d's)" % name, _from_llmd_env, environ[name])
                 for name, option in LLMD_ENV.items()
                 if option.name not in given and environ.get(name, "").strip()]
    layers[:0] = fallbacks

    values, sources = {}, {}
    for option, source, reader, raw in layers:
        try:
            values[option.name] = reader(option, raw)
        except ValueError as exc:
            raise _error(option.flag, exc, source) from None
        sources[option.name] = source
    if "engines_file" in values:
        values["file_engines"] = _read_engines(values["engines_file"], values.get("engine", ()),
                                               sources["engines_file"])
    notes = ["%s %s from llm-d's %s" % (option.flag, _shown(option, raw), option.llmd_env)
             for option, _, _, raw in fallbacks]
    notes += ["%s is set and ignored: %s" % (name, why) for name, why in LLMD_IGNORED.items()
              if environ.get(name, "").strip()]
    return Config(**values, notes=tuple(notes))


def _llmd_text(option, text):
    text = text.strip()
    if option.name == "index" and "://" not in text:
        text = "redis://" + text       # llm-d's REDIS_ADDR is HOST:PORT, or a URL
    return text


def _from_llmd_env(option, text):
    return _from_env(option, _llmd_text(option, text))


def _shown(option, text):
    text = _llmd_text(option, text)
    return redact_url(text) if option.name == "index" else text


def _read_engines(path, flag_engines, source):
    try:
        specs = read_engines_file(path)
    except OSError as exc:
        raise _error("--engines-file", "cannot read %s: %s" % (path, exc.strerror or exc), source) from None
    except UnicodeDecodeError:
        raise _error("--engines-file", "%s is not UTF-8 text" % path, source) from None
    except ValueError as exc:
        raise _error("--engines-file", exc, source) from None
    names = {spec.name for spec in flag_engines}
    for spec in specs:
        if spec.name in names:
            raise _error("--engines-file", "%s: engine %r is given twice" % (path, spec.name), source)
        names.add(spec.name)
    return tuple(specs)
