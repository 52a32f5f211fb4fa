"""kvcm.config: defaults < TOML file < KVCM_* environment < flags, validation, generated docs."""

import argparse
import dataclasses
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvcm.config import (CONFIG_ENV, LLMD_ENV, LLMD_IGNORED, OPTIONS, OPTIONS_BY_NAME, Config, ConfigError,
                         add_serve_arguments, load_config, serve_parser)
from kvcm.ingest import EngineSpec

MiB = 2**20


@pytest.fixture
def toml(tmp_path):
    """Writes kvcm.toml in a temp dir and returns its path."""
    def write(text, name="kvcm.toml"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)
    return write


def load(argv=(), env=None):
    return load_config(list(argv), environ=env or {})


def error_of(argv=(), env=None):
    with pytest.raises(ConfigError) as excinfo:
        load(argv, env)
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    return message


# -- defaults and the option table --------------------------------------------------------

def test_no_settings_give_the_design_defaults():
    config = load()
    assert config == Config()
    assert (config.http_host, config.http_port) == ("0.0.0.0", 8080)
    assert config.zmq_bind == ("tcp://*:5557",) and config.zmq_topic_prefix == "kv@"
    assert config.engines == () and config.replay_endpoint == {} and config.tokenizer == {}
    assert (config.hash_algo, config.hash_seed, config.block_size, config.hash_mode) == ("sha256", None, 16, "auto")
    assert (config.index, config.max_blocks) == ("memory", 10_000_000)
    assert config.tier_weights == {"gpu": 1.0, "cpu": 0.8}
    assert config.max_body == 8 * MiB
    assert (config.log_level, config.log_format, config.admin_token) == ("info", "text", None)


def test_table_and_dataclass_name_the_same_options():
    fields = {field.name for field in dataclasses.fields(Config)}
    assert fields == {option.name for option in OPTIONS} | {"file_engines", "notes"}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_documented_default_parses_to_the_dataclass_default(option):
    argv = [option.flag, option.default] if option.default is not None else []
    assert load(argv) == Config()


def test_config_is_frozen_and_hashable():
    config = load(["--tokenizer", "m=/d"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http_port = 1
    assert {config: 1}[load(["--tokenizer", "m=/d"])] == 1


# -- precedence: file < env < flag, for every option --------------------------------------

E = EngineSpec
# name: (TOML value, value read from it), (env text, value), (flag argv, value)
SAMPLES = {
    "http_host": (('"127.0.0.1"', "127.0.0.1"), ("::1", "::1"), (["--http-host", "localhost"], "localhost")),
    "http_port": (("9001", 9001), ("9002", 9002), (["--http-port", "0"], 0)),
    "max_body": (('"1KiB"', 1024), ("2KB", 2000), (["--max-body", "3M"], 3 * MiB)),
    "header_timeout": (("1.5", 1.5), ("2", 2.0), (["--header-timeout", "0.25"], 0.25)),
    "body_timeout": (("12", 12.0), ("13.5", 13.5), (["--body-timeout", "14"], 14.0)),
    "idle_timeout": (("30", 30.0), ("45.5", 45.5), (["--idle-timeout", "5"], 5.0)),
    "max_connections": (("10", 10), ("20", 20), (["--max-connections", "30"], 30)),
    "admin_token": (('"from-file"', "from-file"), ("from-env", "from-env"),
                    (["--admin-token", "from-flag"], "from-flag")),
    "tls_cert": (('"/c1.pem"', "/c1.pem"), ("/c2.pem", "/c2.pem"), (["--tls-cert", "/c3.pem"], "/c3.pem")),
    "tls_key": (('"/k1.pem"', "/k1.pem"), ("/k2.pem", "/k2.pem"), (["--tls-key", "/k3.pem"], "/k3.pem")),
    "zmq_bind": (('["tcp://*:6001"]', ("tcp://*:6001",)),
                 ("tcp://*:6002, ipc:///tmp/kvcm.sock", ("tcp://*:6002", "ipc:///tmp/kvcm.sock")),
                 (["--zmq-bind", "tcp://127.0.0.1:6003", "--zmq-bind", "tcp://*:6004"],
                  ("tcp://127.0.0.1:6003", "tcp://*:6004"))),
    "zmq_topic_prefix": (('"a@"', "a@"), ("b@", "b@"), (["--zmq-topic-prefix", ""], "")),
    "engine": (('["e1=tcp://h:1,model=m"]', (E("e1", "tcp://h:1", None, "m"),)),
               ("e2=tcp://h:2,replay=tcp://h:3;e3=tcp://h:4",
                (E("e2", "tcp://h:2", "tcp://h:3"), E("e3", "tcp://h:4"))),
               (["--engine", "e4=tcp://h:5,model=Qwen/Qwen3-0.6B"], (E("e4", "tcp://h:5", None, "Qwen/Qwen3-0.6B"),))),
    "replay_endpoint": (('{ "pod-a" = "tcp://h:1" }', {"pod-a": "tcp://h:1"}),
                        ("p1=tcp://h:2 p2=tcp://h:3", {"p1": "tcp://h:2", "p2": "tcp://h:3"}),
                        (["--replay-endpoint", "10.0.0.1:8000=tcp://10.0.0.1:5558"],
                         {"10.0.0.1:8000": "tcp://10.0.0.1:5558"})),
    "zmq_max_message": (('"1MiB"', MiB), ("2MB", 2_000_000), (["--zmq-max-message", "4096"], 4096)),
    "zmq_allow": (('["10.0.0.0/8"]', ("10.0.0.0/8",)),
                  ("192.168.1.7/24, fd00::1/8", ("192.168.1.0/24", "fd00::/8")),
                  (["--zmq-allow", "127.0.0.1", "--zmq-allow", "::1"], ("127.0.0.1/32", "::1/128"))),
    "hash_algo": (('"sha256_cbor"', "sha256_cbor"), ("sha256_cbor_64bit", "sha256_cbor_64bit"),
                  (["--hash-algo", "sha256"], "sha256")),
    "hash_seed": (('"1"', "1"), ("2", "2"), (["--hash-seed", "3"], "3")),
    "block_size": (("32", 32), ("64", 64), (["--block-size", "128"], 128)),
    "hash_mode": (('"vllm"', "vllm"), ("kvcm", "kvcm"), (["--hash-mode", "auto"], "auto")),
    "key_memo_blocks": (("0", 0), ("1000", 1000), (["--key-memo-blocks", "131072"], 131072)),
    "tokenizer": (('["m1=/models/m1"]', {"m1": "/models/m1"}), ("m2=/d2,m3=/d3", {"m2": "/d2", "m3": "/d3"}),
                  (["--tokenizer", "Qwen/Qwen2.5=/models/q"], {"Qwen/Qwen2.5": "/models/q"})),
    "tokenizers_dir": (('"/t1"', "/t1"), ("/t2", "/t2"), (["--tokenizers-dir", "/t3"], "/t3")),
    "trust_request_chat_template": (("true", True), ("no", False), (["--trust-request-chat-template"], True)),
    "template_timeout": (("0.5", 0.5), ("3", 3.0), (["--template-timeout", "4"], 4.0)),
    "template_max_output": (('"1KiB"', 1024), ("2000", 2000), (["--template-max-output", "3M"], 3 * MiB)),
    "tokenize_max_inflight": (("5", 5), ("6", 6), (["--tokenize-max-inflight", "7"], 7)),
    "tokenize_max_inflight_chars": (('"1M"', MiB), ("2000000", 2_000_000),
                                    (["--tokenize-max-inflight-chars", "3M"], 3 * MiB)),
    "index": (('"redis://127.0.0.1:6379/0"', "redis://127.0.0.1:6379/0"),
              ("unix:///run/valkey.sock", "unix:///run/valkey.sock"), (["--index", "memory"], "memory")),
    "max_blocks": (("5", 5), ("6", 6), (["--max-blocks", "7"], 7)),
    "tier_weights": (("{gpu = 1, cpu = 0.5}", {"gpu": 1.0, "cpu": 0.5}),
                     ("gpu=2,storage=0.1", {"gpu": 2.0, "storage": 0.1}),
                     (["--tier-weights", "cpu=0.9"], {"cpu": 0.9})),
    "state_dir": (('"/s1"', "/s1"), ("/s2", "/s2"), (["--state-dir", "/s3"], "/s3")),
    "snapshot_interval": (("30", 30.0), ("0.5", 0.5), (["--snapshot-interval", "600"], 600.0)),
    "bootstrap_from": (('"http://10.0.0.2:8080"', "http://10.0.0.2:8080"), ("http://a:1", "http://a:1"),
                       (["--bootstrap-from", "http://b:2"], "http://b:2")),
    "redis_timeout": (("0.5", 0.5), ("0.25", 0.25), (["--redis-timeout", "2"], 2.0)),
    "redis_ttl": (("3600", 3600), ("60", 60), (["--redis-ttl", "0"], 0)),
    "redis_backlog": (("5000", 5000), ("200000", 200_000), (["--redis-backlog", "1000"], 1000)),
    "redis_fail_open": (("true", True), ("no", False), (["--redis-fail-open"], True)),
    "log_level": (('"debug"', "debug"), ("WARNING", "warning"), (["--log-level", "error"], "error")),
    "log_format": (('"json"', "json"), ("text", "text"), (["--log-format", "json"], "json")),
    # CPU lists must name CPUs this process may use: these need CPUs 0 and 1 (CI has 2)
    "http_cpus": (("0", (0,)), ("1", (1,)), (["--http-cpus", "0-1"], (0, 1))),
    "busy_poll_us": (("50", 50), ("200", 200), (["--busy-poll-us", "1000"], 1000)),
    "ingest_cpus": (('"1"', (1,)), ("0", (0,)), (["--ingest-cpus", "1,0"], (0, 1))),
    "default_model": (('"m1"', "m1"), ("m2", "m2"), (["--default-model", "Qwen/Qwen3-0.6B"], "Qwen/Qwen3-0.6B")),
}


def test_samples_cover_every_option_but_the_engines_file():
    assert set(SAMPLES) == {option.name for option in OPTIONS} - {"engines_file"}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_layer_overrides_the_one_below(name, toml):
    option = OPTIONS_BY_NAME[name]
    (toml_text, from_file), (env_text, from_env), (argv, from_flag) = SAMPLES[name]
    # each layer's value differs from the one it overrides, so an ignored layer shows
    assert getattr(Config(), name) != from_file != from_env != from_flag
    path = toml("%s = %s\n" % (name, toml_text))
    env = {CONFIG_ENV: path}
    assert getattr(load([], env), name) == from_file
    env[option.env] = env_text
    assert getattr(load([], env), name) == from_env
    assert getattr(load(argv, env), name) == from_flag
    assert getattr(load(["--config", path] + argv, {}), name) == from_flag
    assert getattr(load(argv, {option.env: env_text}), name) == from_flag


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("blank", ["", "  ", "\n"])
def test_an_empty_environment_variable_is_unset(name, blank, toml):
    (toml_text, from_file), _, _ = SAMPLES[name]
    env = {OPTIONS_BY_NAME[name].env: blank}
    assert getattr(load([], env), name) == getattr(Config(), name)
    env[CONFIG_ENV] = toml("%s = %s\n" % (name, toml_text))
    assert getattr(load([], env), name) == from_file


def test_flags_from_a_cli_namespace_override_only_when_given():
    parser = argparse.ArgumentParser(prog="kvcm")
    sub = parser.add_subparsers(dest="command")
    add_serve_arguments(sub.add_parser("serve"))
    args = parser.parse_args(["serve", "--block-size", "32", "--zmq-bind", ""])
    env = {"KVCM_BLOCK_SIZE": "64", "KVCM_HTTP_PORT": "9090", "KVCM_ZMQ_BIND": "tcp://*:1"}
    config = load_config(args, environ=env)
    assert (config.block_size, config.http_port, config.zmq_bind) == (32, 9090, ())


def test_load_config_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("KVCM_HTTP_PORT", "9191")
    assert load_config([]).http_port == 9191
    assert load_config(None).http_port == 9191


def test_argv_must_be_a_list():
    with pytest.raises(TypeError):
        load_config("--http-port 1", environ={})


@pytest.mark.parametrize("argv, fragment", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--http-p", "1"], "unrecognized arguments"),       # no abbreviations: scripts must stay exact
    (["--block-size"], "expected one argument"),
])
def test_bad_command_lines_raise_config_error(argv, fragment):
    assert fragment in error_of(argv)


def test_config_file_from_env_and_flag(toml):
    from_env = toml("http_port = 1001\n", "env.toml")
    from_flag = toml("http_port = 1002\n", "flag.toml")
    assert load([], {CONFIG_ENV: from_env}).http_port == 1001
    assert load(["--config", from_flag], {CONFIG_ENV: from_env}).http_port == 1002
    assert load([], {CONFIG_ENV: ""}).http_port == 8080


# -- hash seed: unset vs the empty string ---------------------------------------------------

@pytest.mark.parametrize("toml_text, env_text, argv, expected", [
    (None, None, [], None),
    (None, None, ["--hash-seed", ""], ""),
    (None, None, ["--hash-seed", "0"], "0"),
    (None, "", [], None),                       # empty env = unset, not the empty seed
    (None, "42", [], "42"),
    ('""', None, [], ""),
    ("42", None, [], "42"),                     # a TOML integer is its decimal text
    ('""', "", [], ""),                         # an empty env does not clobber the file's ""
    ('"1"', None, ["--hash-seed", ""], ""),
    (None, "5", ["--hash-seed", ""], ""),
    ('""', "7", [], "7"),
])
def test_hash_seed_unset_versus_empty(toml, toml_text, env_text, argv, expected):
    env = {}
    if toml_text is not None:
        env[CONFIG_ENV] = toml("hash_seed = %s\n" % toml_text)
    if env_text is not None:
        env["KVCM_HASH_SEED"] = env_text
    assert load(argv, env).hash_seed == expected


# -- repeatable options --------------------------------------------------------------------

@pytest.mark.parametrize("argv, env, toml_text, expected", [
    (["--zmq-bind", ""], {}, None, ()),
    (["--zmq-bind", "none"], {}, None, ()),
    ([], {"KVCM_ZMQ_BIND": "none"}, None, ()),
    ([], {"KVCM_ZMQ_BIND": "NONE"}, None, ()),
    ([], {}, "zmq_bind = []", ()),
    (["--zmq-bind", "", "--zmq-bind", "tcp://*:5558"], {}, None, ("tcp://*:5558",)),
    (["--zmq-bind", "tcp://*:1"], {"KVCM_ZMQ_BIND": "tcp://*:2,tcp://*:3"}, None, ("tcp://*:1",)),
    ([], {"KVCM_ZMQ_BIND": "tcp://*:2"}, "zmq_bind = []", ("tcp://*:2",)),
    ([], {"KVCM_ZMQ_BIND": "tcp://*:1,tcp://*:2 tcp://*:3\ntcp://*:4\t, ipc:///x"}, None,
     ("tcp://*:1", "tcp://*:2", "tcp://*:3", "tcp://*:4", "ipc:///x")),
])
def test_zmq_bind_lists(toml, argv, env, toml_text, expected):
    env = dict(env)
    if toml_text is not None:
        env[CONFIG_ENV] = toml(toml_text + "\n")
    assert load(argv, env).zmq_bind == expected


def test_engine_specs_in_the_environment_are_separated_by_semicolons_or_newlines():
    env = {"KVCM_ENGINE": "a=tcp://h:1,replay=tcp://h:2,model=m ; b=tcp://h:3\n\n c=ipc:///e,model=x;"}
    assert load([], env).engine == (E("a", "tcp://h:1", "tcp://h:2", "m"), E("b", "tcp://h:3"),
                                    E("c", "ipc:///e", None, "x"))


def test_mapping_lists_from_toml_arrays_and_tables(toml):
    path = toml('tokenizer = { "Qwen/Qwen2.5" = "/m/q", llama = "/m/l" }\n'
                'replay_endpoint = ["p1=tcp://h:1", "p2 = tcp://h:2"]\n')
    config = load([], {CONFIG_ENV: path})
    assert config.tokenizer == {"Qwen/Qwen2.5": "/m/q", "llama": "/m/l"}
    assert config.replay_endpoint == {"p1": "tcp://h:1", "p2": "tcp://h:2"}


def test_relative_paths_in_the_file_are_relative_to_the_file(toml, tmp_path, monkeypatch):
    path = toml('tokenizers_dir = "tok"\nengines_file = "engines.txt"\n'
                'tokenizer = ["a=models/a", "b=/abs/b"]\n', "conf/kvcm.toml")
    (tmp_path / "conf" / "engines.txt").write_text("e=tcp://h:1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load([], {CONFIG_ENV: path})
    conf = str(tmp_path / "conf")
    assert config.tokenizers_dir == os.path.join(conf, "tok")
    assert config.tokenizer == {"a": os.path.join(conf, "models", "a"), "b": "/abs/b"}
    assert config.engines == (E("e", "tcp://h:1"),)
    assert load(["--tokenizers-dir", "tok"], {CONFIG_ENV: path}).tokenizers_dir == "tok"


# -- engines file -----------------------------------------------------------------------------

def test_engines_file_adds_to_engine_flags(tmp_path):
    path = tmp_path / "engines.txt"
    path.write_text("# engines\n\nf1=tcp://10.0.0.1:5557,model=m\n  f2=tcp://10.0.0.2:5557,replay=tcp://10.0.0.2:5558\n")
    config = load(["--engine", "a=tcp://h:1", "--engines-file", str(path)])
    assert config.engine == (E("a", "tcp://h:1"),)
    assert config.file_engines == (E("f1", "tcp://10.0.0.1:5557", None, "m"),
                                   E("f2", "tcp://10.0.0.2:5557", "tcp://10.0.0.2:5558"))
    assert [spec.name for spec in config.engines] == ["a", "f1", "f2"]


@pytest.mark.parametrize("content, fragment", [
    ("ok=tcp://h:1\nbad=tcp://nohost\n", ":2: "),
    ("a=tcp://h:1\n", "engine 'a' is given twice"),
    ("f=tcp://h:1\nf=tcp://h:2\n", "given twice"),
    (b"\xff\xfe\n", "not UTF-8"),
    (None, "cannot read"),
])
@pytest.mark.parametrize("layer", ["flag", "env", "file"])
def test_engines_file_errors_name_file_and_source(tmp_path, toml, content, fragment, layer):
    path = tmp_path / "engines.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    argv, env = ["--engine", "a=tcp://h:9"], {}
    if layer == "flag":
        argv += ["--engines-file", str(path)]
        source = "command line"
    elif layer == "env":
        env["KVCM_ENGINES_FILE"] = str(path)
        source = "KVCM_ENGINES_FILE"
    else:
        env[CONFIG_ENV] = toml('engines_file = "%s"\n' % path)
        source = "kvcm.toml, key engines_file"
    message = error_of(argv, env)
    assert message.startswith("--engines-file: ")
    assert fragment in message and source in message and str(path) in message


# -- validation: one line naming the option and its source ------------------------------------

BAD_TEXT = [
    ("block_size", "0", "between 1 and"), ("block_size", "-1", "between 1 and"),
    ("block_size", "abc", "expected an integer"), ("block_size", "1.5", "expected an integer"),
    ("block_size", "65537", "between 1 and"),
    ("http_port", "65536", "between 0 and 65535"), ("http_port", "-1", "between 0 and 65535"),
    ("http_port", "http", "expected an integer"),
    ("http_host", "a b", "whitespace"),
    ("max_connections", "0", "between 1"),
    ("busy_poll_us", "10001", "between 0 and 10000"),
    ("max_blocks", "0", "between 1"), ("max_blocks", str(2**33), "between 1"),
    ("key_memo_blocks", "-1", "between 0"), ("key_memo_blocks", str(2**27), "between 0"),
    ("header_timeout", "0", "above 0"), ("header_timeout", "-1", "above 0"), ("header_timeout", "nan", "above 0"),
    ("header_timeout", "inf", "above 0"), ("idle_timeout", "soon", "number of seconds"),
    ("hash_algo", "md5", "expected one of sha256, sha256_cbor, sha256_cbor_64bit"),
    ("hash_algo", "kvcm", "expected one of"),
    ("hash_mode", "parity", "expected one of auto, vllm, kvcm"),
    ("log_level", "verbose", "expected one of debug, info, warning, error"),
    ("log_format", "xml", "expected one of text, json"),
    ("zmq_bind", "tcp://nohost", "tcp://HOST:PORT"), ("zmq_bind", "udp://h:1", "tcp://HOST:PORT"),
    ("zmq_bind", "tcp://h:", "tcp://HOST:PORT"), ("zmq_bind", "tcp://:5557", "tcp://HOST:PORT"),
    ("zmq_bind", "tcp://h:70000", "tcp://HOST:PORT"), ("zmq_bind", "localhost:5557", "tcp://HOST:PORT"),
    ("replay_endpoint", "pod", "POD=ENDPOINT"), ("replay_endpoint", "=tcp://h:1", "POD=ENDPOINT"),
    ("replay_endpoint", "pod=", "POD=ENDPOINT"), ("replay_endpoint", "pod=tcp://nohost", "tcp://HOST:PORT"),
    ("engine", "e", "NAME=ENDPOINT"), ("engine", "e=tcp://nohost", "tcp://HOST:PORT"),
    ("engine", "e=tcp://h:1,foo=bar", "unknown option 'foo'"), ("engine", "e=tcp://h:1,model=", "needs a value"),
    ("engine", "e=tcp://h:1,replay=tcp://x", "replay endpoint"),
    ("tokenizer", "model", "MODEL=DIR"), ("tokenizer", "=/dir", "MODEL=DIR"), ("tokenizer", "m=", "MODEL=DIR"),
    ("tier_weights", "gpu", "TIER=WEIGHT"), ("tier_weights", "gpu=x", "not a number"),
    ("tier_weights", "gpu=-1", ">= 0"), ("tier_weights", "gpu=inf", ">= 0"), ("tier_weights", "gpu=nan", ">= 0"),
    ("tier_weights", "gpu=1,GPU=2", "given twice"), ("tier_weights", "=1", "bad tier name"),
    ("max_body", "8XB", "expected a size"), ("max_body", "-1", "expected a size"), ("max_body", "0", "between 1 byte"),
    ("max_body", "2GiB", "1GiB"), ("max_body", "0.5B", "between 1 byte"), ("max_body", "MiB", "expected a size"),
    ("index", "mysql://h", "expected 'memory'"), ("index", "redis://", "needs a host"),
    ("index", "redis://h:port", "bad port"), ("index", "redis://h/x", "database number"),
    ("index", "unix://", "socket path"), ("index", "redis:h", "expected 'memory'"), ("index", "Memory", "expected 'memory'"),
    ("redis_timeout", "0", "above 0"), ("redis_timeout", "6", "at most 5"),
    ("redis_ttl", "-1", "between 0"), ("redis_backlog", "999", "between 1000"),
    ("redis_fail_open", "maybe", "expected true or false"),
]
# repeatable options get two items that clash
BAD_LISTS = [
    ("replay_endpoint", ["p=tcp://h:1", "p=tcp://h:2"], "'p' given twice"),
    ("engine", ["e=tcp://h:1", "e=tcp://h:2"], "'e' given twice"),
    ("tokenizer", ["m=/a", "m=/b"], "'m' given twice"),
    ("zmq_bind", ["tcp://*:1", "tcp://*:1"], "given twice"),
]


def _env_text(option, items):
    return (";" if option.name == "engine" else ",").join(items)


@pytest.mark.parametrize("name, text, fragment", BAD_TEXT)
@pytest.mark.parametrize("layer", ["flag", "env"])
def test_bad_values_name_option_and_source(name, text, fragment, layer):
    option = OPTIONS_BY_NAME[name]
    if layer == "flag":
        message, source = error_of([option.flag, text]), "(from the command line)"
    else:
        message, source = error_of([], {option.env: text}), "(from environment variable %s)" % option.env
    assert message.startswith(option.flag + ": ")
    assert message.endswith(source)
    assert fragment in message


@pytest.mark.parametrize("name, items, fragment", BAD_LISTS)
def test_duplicate_list_items_are_rejected(name, items, fragment, toml):
    option = OPTIONS_BY_NAME[name]
    argv = [arg for item in items for arg in (option.flag, item)]
    assert fragment in error_of(argv)
    assert option.env in error_of([], {option.env: _env_text(option, items)})
    path = toml("%s = [%s]\n" % (name, ", ".join('"%s"' % item for item in items)))
    message = error_of([], {CONFIG_ENV: path})
    assert message.startswith(option.flag + ": ") and fragment in message and path in message


@pytest.mark.parametrize("flag", ["--http-host", "--tokenizers-dir", "--engines-file", "--admin-token"])
def test_empty_flag_values_are_rejected_where_meaningless(flag):
    assert error_of([flag, ""]).startswith(flag + ": must not be empty")


BAD_TOML = [
    ("block_size", "0", "between 1 and"), ("block_size", '"16"', "expected an integer, got a string"),
    ("block_size", "true", "got a boolean"), ("http_port", "70000", "between 0 and 65535"),
    ("http_port", "8080.5", "got a float"), ("max_blocks", "0", "between 1"),
    ("hash_algo", "1", "expected a string, got an integer"), ("hash_algo", '"md5"', "expected one of"),
    ("hash_seed", "true", "got a boolean"), ("hash_seed", "[]", "got an array"),
    ("zmq_bind", '"tcp://*:1"', "expected an array, got a string"), ("zmq_bind", "[1]", "array of strings"),
    ("zmq_bind", '["tcp://nohost"]', "tcp://HOST:PORT"),
    ("engine", '{ e = "tcp://h:1" }', "expected an array, got a table"),
    ("tokenizer", '{ m = 1 }', "expected a string, got an integer"), ("tokenizer", '{ "" = "/d" }', "MODEL=DIR"),
    ("replay_endpoint", '"p=tcp://h:1"', "array or a table, got a string"),
    ("tier_weights", '{ gpu = "1" }', "expected a number"), ("tier_weights", "1.0", "got a float"),
    ("tier_weights", '{ gpu = -1 }', ">= 0"),
    ("max_body", "0", "between 1 byte"), ("max_body", "true", "got a boolean"), ("max_body", '"lots"', "expected a size"),
    ("header_timeout", "0", "above 0"), ("header_timeout", '"10"', "got a string"),
    ("log_level", '"loud"', "expected one of"), ("index", '"http://h"', "expected 'memory'"),
    ("http_host", "1979-05-27", "got a date/time"),
    ("redis_fail_open", '"true"', "expected a boolean, got a string"), ("redis_ttl", "1.5", "got a float"),
]


@pytest.mark.parametrize("name, toml_text, fragment", BAD_TOML)
def test_bad_toml_values_name_option_file_and_key(name, toml_text, fragment, toml):
    path = toml("%s = %s\n" % (name, toml_text))
    for argv, env in (([], {CONFIG_ENV: path}), (["--config", path], {})):
        message = error_of(argv, env)
        assert message.startswith(OPTIONS_BY_NAME[name].flag + ": ")
        assert message.endswith("(from %s, key %s)" % (path, name))
        assert fragment in message


def test_a_bad_lower_layer_fails_even_when_a_higher_one_overrides_it(toml):
    path = toml("block_size = 0\n")
    assert "block_size" in error_of(["--block-size", "16"], {CONFIG_ENV: path})
    assert "KVCM_BLOCK_SIZE" in error_of(["--block-size", "16"], {"KVCM_BLOCK_SIZE": "0"})


@pytest.mark.parametrize("text, fragment", [
    ("http-port = 1\n", "unknown key 'http-port' (did you mean 'http_port'?)"),
    ("blok_size = 1\n", "unknown key 'blok_size' (did you mean 'block_size'?)"),
    ("config = 'other.toml'\n", "unknown key 'config'"),
    ("[http]\nport = 1\n", "unknown key 'http'"),
])
def test_unknown_toml_keys(toml, text, fragment):
    path = toml(text)
    message = error_of([], {CONFIG_ENV: path})
    assert message.startswith("%s: %s" % (path, fragment))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "missing.toml"), "cannot read"),
    (lambda d: str(d), "cannot read"),
    (lambda d: _write(d / "bad.toml", b"http_port = \n"), "is not valid TOML"),
    (lambda d: _write(d / "bad.toml", b"http_port = 1\nhttp_port = 2\n"), "is not valid TOML"),
    (lambda d: _write(d / "latin1.toml", b'admin_token = "\xe9"\n'), "is not UTF-8 text"),
])
@pytest.mark.parametrize("layer", ["flag", "env"])
def test_unreadable_config_files(tmp_path, make, fragment, layer):
    path = make(tmp_path)
    if layer == "flag":
        message, source = error_of(["--config", path]), "(from the command line)"
    else:
        message, source = error_of([], {CONFIG_ENV: path}), "(from environment variable KVCM_CONFIG)"
    assert message.startswith("--config: ") and message.endswith(source)
    assert fragment in message and path in message


def _write(path, data):
    path.write_bytes(data)
    return str(path)


def test_secrets_never_appear_in_errors_or_repr():
    assert "s3cr3t" not in error_of(["--admin-token", "s3 cr3t"])
    assert "s3cr3t" not in error_of(["--index", "redis://:s3cr3t@h/x"])
    assert "redis://:***@h/x" in error_of(["--index", "redis://:s3cr3t@h/x"])
    config = load(["--admin-token", "s3cr3t", "--index", "redis://user:s3cr3t@h:6379/1"])
    assert config.admin_token == "s3cr3t" and config.index == "redis://user:s3cr3t@h:6379/1"
    assert "s3cr3t" not in repr(config)
    assert "admin_token='***'" in repr(config) and "redis://user:***@h:6379/1" in repr(config)


# -- value syntaxes ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("1", 1), ("1000000", 1_000_000), ("100B", 100), ("8MiB", 8 * MiB), ("512KiB", 512 * 1024),
    ("1KB", 1000), ("1kb", 1000), ("1MB", 10**6), ("1GB", 10**9), ("1K", 1024), ("1M", MiB), ("1G", 2**30),
    ("1GiB", 2**30), ("1.5KiB", 1536), (" 8 MiB ", 8 * MiB), ("2mib", 2 * MiB), (".5K", 512),
])
def test_sizes(text, size, toml):
    assert load(["--max-body", text]).max_body == size
    assert load([], {"KVCM_MAX_BODY": text}).max_body == size
    assert load([], {CONFIG_ENV: toml('max_body = "%s"\n' % text)}).max_body == size


def test_size_as_a_toml_integer_is_bytes(toml):
    assert load([], {CONFIG_ENV: toml("max_body = 4096\n")}).max_body == 4096


@pytest.mark.parametrize("text, weights", [
    ("gpu=1.0,cpu=0.8", {"gpu": 1.0, "cpu": 0.8}),
    (" GPU = 0.5 , cpu=0 ", {"gpu": 0.5, "cpu": 0.0}),
    ("storage=0.25,", {"storage": 0.25}),
    ("", {}),
])
def test_tier_weights(text, weights):
    assert load(["--tier-weights", text]).tier_weights == weights


@pytest.mark.parametrize("url", [
    "memory", "redis://localhost", "redis://:pw@h:6379/2", "rediss://h:6380", "valkey://h", "valkeys://h/0",
    "unix:///run/redis.sock", "redis://[::1]:6379", "REDIS://h",
])
def test_index_urls(url):
    assert load(["--index", url]).index == url


# -- generated documentation --------------------------------------------------------------------

def test_env_file_lists_every_setting_commented_out_at_its_default():
    text = Config.as_env_file()
    lines = text.splitlines()
    assert all(not line or line.startswith("#") for line in lines)
    assignments = dict(re.findall(r"^#(KVCM_[A-Z_]+)=(.*)$", text, re.M))
    assert set(assignments) == {option.env for option in OPTIONS} | {CONFIG_ENV}
    for option in OPTIONS:
        assert assignments[option.env] == (option.default or "")
        assert len(re.findall(r"^#%s=" % option.env, text, re.M)) == 1
        assert option.flag in text
    # The file as shipped sets nothing; with every line uncommented it gives the defaults.
    assert load([], assignments) == Config()


def test_env_file_uses_comments_systemd_understands():
    for line in Config.as_env_file().splitlines():
        assert line == "" or line.startswith("# ") or line == "#" or re.fullmatch(r"#KVCM_[A-Z_]+=\S*", line)


def _normalized_help(parser):
    return " ".join(parser.format_help().split())


@pytest.mark.parametrize("build", ["standalone", "subcommand"])
def test_help_documents_every_flag_its_default_and_env_var(build):
    if build == "standalone":
        parser = serve_parser()
    else:
        sub = argparse.ArgumentParser(prog="kvcm").add_subparsers()
        parser = add_serve_arguments(sub.add_parser("serve"))
    text = _normalized_help(parser)
    assert "--config FILE" in text and CONFIG_ENV in text
    for option in OPTIONS:
        # a switch's value is optional: argparse shows it in brackets
        shape = "%s [%s]" if getattr(option.kind, "is_switch", False) else "%s %s"
        assert shape % (option.flag, option.metavar) in text
        assert "(default: %s; env %s" % (option.default if option.default is not None else "unset",
                                          option.env) in text


def test_the_template_output_limit_is_the_body_limit_unless_set():
    assert load(["--max-body", "1M"]).template_output_limit == MiB
    assert load(["--max-body", "1M", "--template-max-output", "5K"]).template_output_limit == 5 * 1024


# -- property-based: whatever the flags, environment and file say, one ConfigError or a Config ---

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
_WORDS = st.sampled_from(["", " ", "none", "0", "-1", "1.5", "1e999", "inf", "nan", "true", "off", "8MiB", "0B",
                          "2GiB", "tcp://*:5557", "tcp://h:0", "ipc://", "a=b", "m=/nonexistent", "e=tcp://h:1,x=y",
                          "redis://h:1/0", "redis://:p@h:x", "gpu=1,cpu=x", "gpu=-1", "ALL", "debug", "json"])
_VALUES = st.one_of(_TEXT, _WORDS)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)          # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[%s]" % ", ".join(_toml_value(v) for v in value)
    return "{%s}" % ", ".join("%s = %s" % (json.dumps(k), _toml_value(v)) for k, v in value.items())


_TOML_SCALARS = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), _VALUES)
_TOML_VALUES = st.one_of(_TOML_SCALARS, st.lists(_TOML_SCALARS, max_size=3),
                         st.dictionaries(_TEXT, _TOML_SCALARS, max_size=3))
_NAMES = [option.name for option in OPTIONS if option.name not in ("engines_file",)]


def _loads_or_config_error(argv, env):
    try:
        config = load(argv, env)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None
    assert isinstance(config, Config)
    return config


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([o for o in OPTIONS if o.name != "engines_file"]), _VALUES), max_size=6),
       st.dictionaries(st.sampled_from([o.env for o in OPTIONS if o.name != "engines_file"] + [CONFIG_ENV + "_X"]),
                       _VALUES, max_size=4))
def test_fuzz_flags_and_environment(flags, env):
    argv = [part for option, value in flags for part in (option.flag, value)]
    _loads_or_config_error(argv, env)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.one_of(st.sampled_from(_NAMES), _TEXT), _TOML_VALUES, max_size=5))
def test_fuzz_toml_files(tmp_path, document):
    path = tmp_path / "fuzz.toml"
    path.write_text("".join("%s = %s\n" % (json.dumps(k), _toml_value(v)) for k, v in document.items()),
                    encoding="utf-8")
    _loads_or_config_error(["--config", str(path)], {})


# -- llm-d's environment variables ----------------------------------------------------------

LLMD_SAMPLES = {    # llm-d's variable -> (its value, the option's value)
    "ZMQ_ENDPOINT": ("tcp://localhost:5557", ("tcp://localhost:5557",)),
    "ZMQ_TOPIC": ("kv@pool-a@", "kv@pool-a@"),
    "HTTP_PORT": ("8081", 8081),
    "BLOCK_SIZE": ("64", 64),
    "PYTHONHASHSEED": ("42", "42"),
    "REDIS_ADDR": ("10.0.0.5:6379", "redis://10.0.0.5:6379"),
    "MODEL_NAME": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
}


def test_llm_ds_variables_are_the_online_services():
    assert set(LLMD_ENV) == set(LLMD_SAMPLES)
    assert set(LLMD_IGNORED) == {"POOL_CONCURRENCY", "HF_TOKEN"}


@pytest.mark.parametrize("variable", sorted(LLMD_SAMPLES))
def test_an_llmd_variable_sets_its_option_below_every_other_layer(variable, toml):
    option = LLMD_ENV[variable]
    text, value = LLMD_SAMPLES[variable]
    env = {variable: text}
    config = load([], env)
    assert getattr(config, option.name) == value
    assert config.notes == ("%s %s from llm-d's %s" % (option.flag, value if variable == "REDIS_ADDR" else text,
                                                       variable),)
    (toml_text, from_file), (env_text, from_env), (argv, from_flag) = SAMPLES[option.name]
    assert getattr(load([], dict(env, **{CONFIG_ENV: toml("%s = %s\n" % (option.name, toml_text))})),
                   option.name) == from_file
    assert getattr(load([], dict(env, **{option.env: env_text})), option.name) == from_env
    overridden = load(argv, env)
    assert getattr(overridden, option.name) == from_flag and overridden.notes == ()


def test_redis_addr_keeps_a_url_as_given():
    assert load([], {"REDIS_ADDR": "rediss://:pw@cache:6380/2"}).index == "rediss://:pw@cache:6380/2"
    assert "pw" not in " ".join(load([], {"REDIS_ADDR": "rediss://:pw@cache:6380/2"}).notes)


def test_a_bad_llmd_value_fails_naming_the_variable_unless_something_else_sets_the_option(toml):
    message = error_of([], {"HTTP_PORT": "http"})
    assert message == "--http-port: expected an integer, got 'http' (from environment variable HTTP_PORT (llm-d's))"
    assert load([], {"HTTP_PORT": "http", "KVCM_HTTP_PORT": "9000"}).http_port == 9000
    assert load(["--block-size", "32"], {"BLOCK_SIZE": "0"}).block_size == 32
    assert load([], {"BLOCK_SIZE": "0", CONFIG_ENV: toml("block_size = 8\n")}).block_size == 8


def test_empty_llmd_variables_are_unset():
    assert load([], {name: " " for name in list(LLMD_ENV) + list(LLMD_IGNORED)}) == Config()
    assert load([], {"PYTHONHASHSEED": ""}).notes == ()


def test_pool_concurrency_and_hf_token_are_accepted_and_said_to_be_ignored():
    config = load([], {"POOL_CONCURRENCY": "8", "HF_TOKEN": "hf_secret"})
    assert config == Config()
    assert len(config.notes) == 2
    assert config.notes[0].startswith("POOL_CONCURRENCY is set and ignored: ") and "in order" in config.notes[0]
    assert config.notes[1].startswith("HF_TOKEN is set and ignored: kvcm never downloads")
    assert "hf_secret" not in repr(config)


@pytest.mark.parametrize("build", ["standalone", "cli"])
def test_help_lists_llmd_variables_with_their_kvcm_equivalents(build):
    if build == "standalone":
        text = _normalized_help(serve_parser())
    else:
        from kvcm.cli import build_parser
        text = _normalized_help(build_parser().subcommand("serve"))
    for variable, option in LLMD_ENV.items():
        assert "%s for %s (%s)" % (variable, option.flag, option.env) in text
        assert "llm-d's %s)" % variable in text
    assert "POOL_CONCURRENCY and HF_TOKEN are accepted and ignored" in text
