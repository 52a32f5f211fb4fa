"""docs/sim-compatibility.md against what `kvcm sim` is: every flag of llm-d-inference-sim
(at commit eec055a) is in the table, the table's flags are the ones `kvcm sim --help` lists
(both ways), ignored flags are accepted with a note, and every endpoint answers on a running
simulator as the table says."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from kvcm.sim.config import add_sim_arguments, config_from, notes
from sim_harness import InProcessSim, clean_env

DOC = ROOT / "docs" / "sim-compatibility.md"

# llm-d-inference-sim's flags at eec055a (pkg/common/parser.go, and klog's)
GO_FLAGS = {
    "config", "port", "max-request-body-size-mb", "model", "served-model-name", "max-num-seqs",
    "max-waiting-queue-length", "max-loras", "max-cpu-loras", "max-model-len", "lora-modules", "mode",
    "inter-token-latency", "time-to-first-token", "prefill-overhead", "prefill-time-per-token", "prefill-time-std-dev",
    "kv-cache-transfer-time-per-token", "kv-cache-transfer-time-std-dev", "kv-cache-transfer-latency",
    "inter-token-latency-std-dev", "time-to-first-token-std-dev", "kv-cache-transfer-latency-std-dev", "seed",
    "time-factor-under-load", "max-tool-call-integer-param", "min-tool-call-integer-param",
    "max-tool-call-number-param", "min-tool-call-number-param", "max-tool-call-array-param-length",
    "min-tool-call-array-param-length", "tool-call-not-required-param-probability",
    "object-tool-call-not-required-field-probability", "tool-call-extra-call-probability", "enable-kvcache",
    "kv-cache-size", "global-cache-hit-threshold", "block-size", "hash-seed", "zmq-endpoint",
    "kv-events-replay-endpoint", "kv-events-replay-queue-size", "event-batch-size", "use-vllm-map-event-format",
    "data-parallel-size", "data-parallel-rank", "dataset-path", "dataset-url", "dataset-in-memory",
    "dataset-table-name", "render-url", "render-timeout", "mm-render-timeout", "force-dummy-tokenizer",
    "startup-duration", "enable-sleep-mode", "no-enable-sleep-mode", "enable-request-id-headers", "log-http",
    "skip-tool-validation", "failure-injection-rate", "failure-types", "ssl-certfile", "ssl-keyfile",
    "self-signed-certs", "latency-calculator", "default-embedding-dimensions", "fake-metrics",
    "fake-metrics-refresh-interval", "mm-encoder-only", "no-mm-encoder-only", "omni", "no-omni",
    "image-emission-rate", "time-to-generate-image", "time-to-generate-image-std-dev", "mm-processor-kwargs",
    "ec-transfer-config", "enforce-eager", "no-enforce-eager", "enable-prefix-caching", "no-enable-prefix-caching",
    "tensor-parallel-size",
    # klog
    "add_dir_header", "alsologtostderr", "log_backtrace_at", "log_dir", "log_file", "log_file_max_size",
    "logtostderr", "one_output", "skip_headers", "skip_log_headers", "stderrthreshold", "v", "vmodule",
}
# its HTTP routes at eec055a (pkg/communication/http.go)
GO_ENDPOINTS = {
    "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/chat/completions/render",
    "POST /v1/completions/render", "POST /v1/responses", "POST /v1/messages", "POST /inference/v1/generate",
    "POST /v1/embeddings", "GET /v1/models", "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter",
    "GET /metrics", "POST /fake_metrics", "GET /health", "GET /health/ready", "GET /query", "POST /tokenize",
    "POST /sleep", "POST /wake_up", "GET /is_sleeping", "GET /admin/config", "POST /admin/config",
}
GO_ENVIRONMENT = {"SIM_MODEL", "PYTHONHASHSEED", "POD_IP", "POD_NAME", "POD_NAMESPACE", "VLLM_SERVER_DEV_MODE"}


def tables():
    """{first column header: [row cells]} of every table in the document."""
    out, current = {}, None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = out.setdefault(cells[0], [])
        elif not set(cells[0]) <= set("-"):
            current.append(cells)
    return out


def names(cell):
    """The `--flags` (without dashes) of a cell."""
    return [n.lstrip("-") for n in re.findall(r"`(-{1,2}[\w-]+)`", cell)]


def help_flags():
    proc = subprocess.run([sys.executable, "-m", "kvcm", "sim", "--help"], cwd=ROOT, env=clean_env(),
                          capture_output=True, timeout=120, check=True)
    flags = set()
    for line in proc.stdout.decode().splitlines():
        if line.lstrip().startswith("-"):
            option_column = re.split(r"\s{2,}", line.strip())[0]
            flags.update(f.lstrip("-") for f in re.findall(r"(?<![\w-])--?[\w-]+", option_column))
    return flags - {"h", "help"}


def test_every_go_flag_is_in_the_table_and_the_table_is_the_help():
    rows = tables()["llm-d-inference-sim"]
    assert {names(r[0])[0] for r in rows} == GO_FLAGS
    kvcm_only = {names(r[0])[0] for r in tables()["kvcm sim"]}
    listed = set(kvcm_only)
    shown = help_flags()
    for go, ours, status, _ in rows:
        [go] = names(go)
        assert status in ("supported", "ignored"), (go, status)
        if status == "supported":
            assert names(ours) and set(names(ours)) <= shown, (go, ours)
            assert go in names(ours)          # llm-d's own name is accepted
            listed.update(names(ours))
        else:
            assert not ours and go in shown, go
            listed.add(go)
    assert shown == listed, ("in --help, not in the tables", shown - listed, "in the tables, not in --help",
                             listed - shown)
    assert not kvcm_only & GO_FLAGS


def _parser():
    import argparse

    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    return parser


def test_ignored_flags_are_accepted_with_a_note():
    parser = _parser()
    for go, _, status, _ in tables()["llm-d-inference-sim"]:
        if status != "ignored":
            continue
        [name] = names(go)
        action = next(a for a in parser._actions if "--" + name in a.option_strings)
        argv = ["--" + name] + ([] if action.nargs in (0, "?") else ["x"])
        config, ignored = config_from(parser.parse_args(argv), {})
        assert ignored == [name] and config == config_from(parser.parse_args([]), {})[0]
        [note] = notes(ignored)
        assert note.startswith("kvcm sim: note: --%s is accepted and has no effect: " % name)


def test_environment_table():
    rows = tables()["variable"]
    assert {r[0].strip("`") for r in rows} == GO_ENVIRONMENT and all(r[1] == "supported" for r in rows)


# one request per endpoint that a simulator answers with something other than 404/405
REQUESTS = {
    "POST /v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "POST /v1/completions": {"prompt": "hi", "max_tokens": 1},
    "POST /v1/chat/completions/render": {"messages": [{"role": "user", "content": "hi"}]},
    "POST /v1/completions/render": {"prompt": "hi"},
    "POST /v1/embeddings": {"input": "hi"},
    "POST /v1/load_lora_adapter": {"lora_name": "a", "lora_path": "/a"},
    "POST /v1/unload_lora_adapter": {"lora_name": "a"},
    "POST /fake_metrics": {"running-requests": 1},
    "POST /tokenize": {"prompt": "hi"},
    "POST /admin/config": {"failure-injection-rate": 0},
    "POST /inference/v1/generate": {"token_ids": [1, 2], "sampling_params": {"max_tokens": 1}},
}


@pytest.fixture(scope="module")
def sim():
    with InProcessSim("--fake-metrics", '{"running-requests": 0}') as s:
        yield s


@pytest.mark.parametrize("row", tables()["endpoint"], ids=lambda r: r[0])
def test_endpoints_answer_as_the_table_says(sim, row):
    endpoint, status = row[0].strip("`"), row[1]
    if endpoint.startswith("gRPC"):
        assert status == "not supported"
        return
    method, path = endpoint.split()
    reply = sim.client.request(method, path, REQUESTS.get(endpoint, {} if method == "POST" else None))
    if status == "supported":
        assert reply.status not in (404, 405) and reply.status < 500, (endpoint, reply)
    else:
        assert status == "not supported" and reply.status == 404, (endpoint, reply)


def test_every_go_endpoint_is_in_the_table():
    rows = tables()["endpoint"]
    assert {r[0].strip("`") for r in rows if not r[0].startswith("gRPC")} == GO_ENDPOINTS
