"""kvcm sim's configuration: llm-d's YAML file and precedence (flags > environment > file >
defaults), its environment variables, Go-style flags, the checks, and the configuration it
prints at start (the same as GET /admin/config)."""

import json
import re

import pytest

from kvcm.sim.config import parse_args
from kvcm.sim.durations import duration, format_duration
from kvcm.sim.settings import ConfigError, LoraModule
from sim_harness import InProcessSim, Process, free_port


def write(tmp_path, text):
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    return str(path)


GO_YAML = """\
port: 9001
model: "Qwen/Qwen2.5-1.5B-Instruct"
served-model-name: ["alias-a", "alias-b"]
max-loras: 2
max-cpu-loras: 5
max-num-seqs: 7
mode: echo
time-to-first-token: 2s
inter-token-latency: 100ms
enable-kvcache: true
kv-cache-size: 2048
block-size: 32
hash-seed: "42"
zmq-endpoint: "tcp://127.0.0.1:5600"
event-batch-size: 32
use-vllm-map-event-format: false
global-cache-hit-threshold: 0.5
failure-types: [rate_limit, server_error]
lora-modules:
  - '{"name": "sql", "path": "/a/sql", "base_model_name": "Qwen/Qwen2.5-1.5B-Instruct"}'
  - {"name": "doc", "path": "/a/doc"}
fake-metrics:
  running-requests: 3
  kv-cache-usage: "oscillate:0:1:10s"
  loras:
    - '{"running":"sql","waiting":"","timestamp":1257894567}'
enable-prefix-caching: true
tensor-parallel-size: 4
"""


def test_llmd_yaml_file(tmp_path):
    c = parse_args(["--config", write(tmp_path, GO_YAML)])
    assert (c.port, c.model, c.served_model_names, c.max_loras, c.max_cpu_loras, c.max_num_seqs, c.mode) == (
        9001, "Qwen/Qwen2.5-1.5B-Instruct", ("alias-a", "alias-b"), 2, 5, 7, "echo")
    assert (c.time_to_first_token, c.inter_token_latency) == (2.0, pytest.approx(0.1))
    assert (c.enable_kvcache, c.kv_cache_size, c.block_size, c.hash_seed, c.zmq_endpoint) == (
        True, 2048, 32, "42", "tcp://127.0.0.1:5600")
    assert (c.event_batch_size, c.event_format, c.global_cache_hit_threshold) == (32, "go-array", 0.5)
    assert c.failure_types == ("rate_limit", "server_error")
    assert c.lora_modules == (LoraModule("sql", "/a/sql", "Qwen/Qwen2.5-1.5B-Instruct"), LoraModule("doc", "/a/doc"))
    assert c.fake_metrics.as_json() == {"running-requests": 3.0, "kv-cache-usage": "oscillate:0:1:10s",
                                        "loras": [{"running": "sql", "waiting": "", "timestamp": 1257894567.0}]}


def test_precedence_flags_environment_file_defaults(tmp_path):
    path = write(tmp_path, 'model: from-file\nhash-seed: "file"\nmax-num-seqs: 3\nport: 9001\n')
    env = {"SIM_MODEL": "from-env", "PYTHONHASHSEED": "env"}
    c = parse_args(["--config", path], env)
    assert (c.model, c.hash_seed, c.max_num_seqs, c.served_model_names) == ("from-env", "env", 3, ("from-env",))
    c = parse_args(["--config", path, "--model", "from-flag", "--hash-seed", "", "--max-num-seqs", "5"], env)
    assert (c.model, c.hash_seed, c.max_num_seqs) == ("from-flag", "", 5)   # a flag wins even at a default value
    assert parse_args(["--config", path], {"SIM_MODEL": "", "PYTHONHASHSEED": ""}).model == "from-file"
    assert parse_args([]).hash_seed is None and parse_args([]).max_num_seqs == 5


def test_pod_environment():
    c = parse_args(["--port", "8200"], {"POD_IP": "10.1.2.3", "POD_NAME": "sim-0", "POD_NAMESPACE": "ns",
                                        "VLLM_SERVER_DEV_MODE": "1"})
    assert (c.pod_ip, c.pod_name, c.pod_namespace, c.dev_mode) == ("10.1.2.3", "sim-0", "ns", True)
    assert c.topic_for(c.pod_for(8200)) == "kv@10.1.2.3:8200@Qwen/Qwen3-0.6B"     # llm-d's topic
    assert not parse_args([], {"VLLM_SERVER_DEV_MODE": "true"}).dev_mode          # only "1", as vLLM


def test_go_style_flags():
    c = parse_args(["--enable-kvcache=false", "--v", "5", "--self-signed-certs", "--enable-sleep-mode",
                    "--use-vllm-map-event-format", "--lora-modules", '{"name": "x", "path": "/x"}', "y=/y"])
    assert (c.enable_kvcache, c.log_level, c.self_signed_certs, c.enable_sleep_mode, c.event_format) == (
        False, "debug", True, True, "map")
    assert c.lora_modules == (LoraModule("x", "/x"), LoraModule("y", "/y"))
    assert parse_args(["-v", "1"]).log_level == "warning" and parse_args(["--v", "2"]).log_level == "info"
    assert parse_args(["--v", "5", "--log-level", "error"]).log_level == "error"
    assert parse_args(["--enable-kvcache", "true"]).enable_kvcache is True
    assert not parse_args(["--enable-sleep-mode", "--no-enable-sleep-mode"]).enable_sleep_mode


def test_durations_in_go_form():
    assert duration("1m30s") == 90 and duration("1h2m") == 3720 and duration("500ns") == pytest.approx(5e-7)
    assert duration("10ms") == pytest.approx(0.01) and duration("20") == pytest.approx(0.02)
    for seconds, text in ((0, "0s"), (0.1, "100ms"), (1.5, "1.5s"), (250e-6, "250µs")):
        assert format_duration(seconds) == text and duration(text) == pytest.approx(seconds)
    for bad in ("1x", "ms", "1ms2", "-1s", "1 s"):
        with pytest.raises(ValueError):
            duration(bad)


@pytest.mark.parametrize("argv, message", [
    (["--max-loras", "2", "--max-cpu-loras", "1"], "--max-cpu-loras (1) may not be less than --max-loras (2)"),
    (["--lora-modules", '{"name": "a", "base_model_name": "other"}'], "unknown base model 'other'"),
    (["--lora-modules", '{"path": "/p"}'], "with a non-empty name"),
    (["--ssl-certfile", "c.pem"], "must be given together"),
    (["--ssl-certfile", "c", "--ssl-keyfile", "k", "--self-signed-certs"], "cannot be combined"),
    (["--kv-cache-transfer-latency", "1s", "--kv-cache-transfer-latency-std-dev", "400ms"], "at most 30%"),
    (["--global-cache-hit-threshold", "1.5"], "between 0 and 1"),
    (["--min-tool-call-integer-param", "5", "--max-tool-call-integer-param", "4"], "may not be less than"),
    (["--tool-call-extra-call-probability", "101"], "between 0 and 100"),
    (["--latency-calculator", "fast"], "invalid choice"),
    (["--event-format", "map", "--use-vllm-map-event-format=false"], "contradicts --event-format map"),
    (["--fake-metrics", '{"kv-cache-usage": 2}'], "between 0 and 1"),
    (["--fake-metrics", '{"running-requests": "wave:0:1:1s"}'], "unknown function 'wave'"),
    (["--fake-metrics", '{"prefix-cache-hits": 5}'], "go together"),
    (["--fake-metrics", '{"request-success-total": {"done": 1}}'], "invalid finish reason 'done'"),
    (["--fake-metrics", '{"ttft-buckets-values": [' + "1," * 23 + "1]}"], "has 24 values for 23 buckets"),
    (["--fake-metrics", '{"nonsense": 1}'], "unknown key 'nonsense'"),
    (["--max-request-body-size-mb", "513"], "between 1 and 512"),
    (["--data-parallel-rank", "-1"], "must not be negative"),
])
def test_invalid_configurations(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv)


@pytest.mark.parametrize("text, message", [
    ("port: [1, 2]\n", "port:"),
    ("nonsense: 1\n", "unknown key 'nonsense'"),
    ("- a\n- b\n", "expected a mapping"),
    ("port: : :\n", "not valid YAML"),
    ("time-to-first-token: soon\n", "not a duration"),
])
def test_bad_config_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--config", write(tmp_path, text)])
    with pytest.raises(ConfigError, match="No such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_a_go_command_line_starts_prints_its_configuration_and_notes(tmp_path):
    port = free_port()
    config = write(tmp_path, "mode: echo\nmax-num-seqs: 3\n")
    sim = Process("sim", "--host", "127.0.0.1", "--port", port, "--config", config, "--zmq-endpoint", "",
                  "--enable-prefix-caching", "--tensor-parallel-size", "2", "--v", "2", "--time-to-first-token",
                  "10ms", "--logtostderr")
    try:
        client = sim.wait_http(port, "/health/ready")
        err = sim.stderr()
        for flag in ("enable-prefix-caching", "tensor-parallel-size", "logtostderr"):
            assert "kvcm sim: note: --%s is accepted and has no effect" % flag in err
        line = next(line for line in err.splitlines() if "configuration: {" in line)
        printed = json.loads(line.split("configuration: ", 1)[1])
        assert printed == client.ok("GET", "/admin/config")
        assert (printed["mode"], printed["max-num-seqs"], printed["time-to-first-token"], printed["port"]) == (
            "echo", 3, "10ms", port)
        assert sim.stop() == 0
    finally:
        sim.close()


def test_admin_config_view_matches_the_flags():
    with InProcessSim("--served-model-name", "a", "b", "--lora-modules", "x=/x", "--inter-token-latency", "1.5s",
                      "--fake-metrics", '{"waiting-requests": 2}') as s:
        view = s.client.ok("GET", "/admin/config")
        assert (view["served-model-name"], view["inter-token-latency"], view["lora-modules"]) == (
            ["a", "b"], "1.5s", [{"name": "x", "path": "/x", "base_model_name": None}])
        assert view["fake-metrics"] == {"waiting-requests": 2.0} and view["event-batch-size"] is None
