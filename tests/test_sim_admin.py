"""kvcm sim's operational side over real TCP: /admin/config at run time, sleep mode, the
startup delay, fake metrics, --log-http, the body limit, HTTPS."""

import json
import logging
import socket
import ssl
import urllib.request

import pytest

from sim_harness import WAIT, InProcessSim, Subscriber, plain, unpack, until

USER = [{"role": "user", "content": "hi there"}]
WORDS = " ".join("w%d" % i for i in range(40))


def samples(client, name):
    return {labels: value for (metric, labels), value in client.metrics().items() if metric == name}


# -- /admin/config ----------------------------------------------------------------------------------

def test_admin_config_changes_latencies_at_run_time():
    with InProcessSim("--mode", "echo", "--time-to-first-token", "20ms") as s:
        c = s.client
        c.complete(prompt="x", max_tokens=1)
        assert c.metrics()[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(0.02)
        view = c.ok("POST", "/admin/config", {"time-to-first-token": "50ms", "inter-token-latency": 10_000_000})
        assert (view["time-to-first-token"], view["inter-token-latency"]) == ("50ms", "10ms")   # ns, as Go's JSON
        c.complete(prompt="a b c", max_tokens=3)
        m = c.metrics()
        assert m[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(0.07)
        assert m[("vllm:inter_token_latency_seconds_sum", ())] == pytest.approx(0.02)          # 2 intervals
        # per-token from now on: TTFT = overhead + uncached tokens x per token
        c.ok("POST", "/admin/config", {"latency-calculator": "per-token", "prefill-overhead": "5ms",
                                        "prefill-time-per-token": "1ms"})
        c.complete(prompt=WORDS, max_tokens=1)
        assert c.metrics()[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(0.07 + 0.045)
        assert c.ok("GET", "/admin/config")["latency-calculator"] == "per-token"


def test_admin_config_changes_failure_injection_at_run_time():
    with InProcessSim() as s:
        c = s.client
        assert c.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 200
        c.ok("POST", "/admin/config", {"failure-injection-rate": 100, "failure-types": ["rate_limit"]})
        assert c.post("/v1/completions", {"prompt": "x"}).status == 429
        c.ok("POST", "/admin/config", {"failure-injection-rate": 0})
        assert c.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).status == 200


@pytest.mark.parametrize("body, message", [
    ({"port": 1}, "field 'port' is not admin-configurable"),
    ({"time-to-first-token": "1s", "time-to-first-token-std-dev": "500ms"}, "at most 30%"),
    ({"time-to-first-token": "soon"}, "not a duration"),
    ({"failure-injection-rate": 150}, "between 0 and 100"),
    ({"failure-types": ["meteor"]}, "unknown failure type 'meteor'"),
    ({"latency-calculator": "fast"}, "--latency-calculator must be"),
    ({"time-factor-under-load": 0.5}, ">= 1.0"),
    ({"fake-metrics": {"running-requests": 1}}, "fake metrics cannot be updated"),
    ([1, 2], "JSON object"),
])
def test_bad_admin_changes_change_nothing(body, message):
    with InProcessSim("--time-to-first-token", "10ms") as s:
        before = s.client.ok("GET", "/admin/config")
        reply = s.client.post("/admin/config", body)
        assert reply.status == 400 and message in reply.error, reply
        assert s.client.ok("GET", "/admin/config") == before


# -- sleep mode ---------------------------------------------------------------------------------------

def test_sleep_clears_the_cache_and_wake_up_restores_it():
    sub = Subscriber()
    with InProcessSim("--zmq-endpoint", sub.endpoint, "--mode", "echo", "--enable-sleep-mode",
                      environ={"VLLM_SERVER_DEV_MODE": "1"}) as s:
        c = s.client
        until(lambda: c.post("/reset_prefix_cache").status == 200 and sub.messages(), "the first batch")
        c.complete(prompt=WORDS, max_tokens=1)
        assert len(c.kv_cache()["blocks"]) == 2 and c.ok("GET", "/is_sleeping") == {"is_sleeping": False}
        start = len(sub.messages())
        assert c.post("/sleep").status == 200 and c.ok("GET", "/is_sleeping") == {"is_sleeping": True}
        cleared = sub.wait(start + 1)[start]
        assert plain(unpack(cleared[2]))[1] == [{"type": "AllBlocksCleared"}]
        state = c.kv_cache()
        assert state["blocks"] == [] and state["enabled"] is False
        # asleep: requests are answered without the cache (nothing cached, nothing stored)
        out = c.complete(prompt=WORDS, max_tokens=1)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 and c.kv_cache()["blocks"] == []
        assert c.post("/wake_up?tags=weights").status == 200                 # not the KV cache
        assert c.ok("GET", "/is_sleeping") == {"is_sleeping": False} and c.kv_cache()["enabled"] is False
        assert c.post("/wake_up?tags=kv_cache").status == 200
        assert c.kv_cache()["enabled"] is True
        c.complete(prompt=WORDS, max_tokens=1)
        assert c.complete(prompt=WORDS, max_tokens=1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    sub.close()


@pytest.mark.parametrize("args, environ", [((), {"VLLM_SERVER_DEV_MODE": "1"}), (("--enable-sleep-mode",), {})])
def test_sleep_needs_sleep_mode_and_dev_mode(args, environ):
    with InProcessSim("--mode", "echo", *args, environ=environ) as s:
        s.client.complete(prompt=WORDS, max_tokens=1)
        assert s.client.post("/sleep").status == 200                          # accepted, and ignored
        assert s.client.ok("GET", "/is_sleeping") == {"is_sleeping": False} and len(s.client.kv_cache()["blocks"]) == 2


def test_wake_up_without_tags_restores_the_cache():
    with InProcessSim("--enable-sleep-mode", environ={"VLLM_SERVER_DEV_MODE": "1"}) as s:
        s.client.post("/sleep")
        s.client.post("/wake_up")
        assert s.client.kv_cache()["enabled"] is True


# -- startup ------------------------------------------------------------------------------------------

def test_startup_duration_keeps_readiness_down():
    with InProcessSim("--startup-duration", "1s") as s:
        c = s.client
        first = [c.get("/health/ready"), c.get("/ready"), c.get("/health")]
        assert [r.status for r in first] == [503, 503, 200]
        assert c.complete(prompt="x", max_tokens=1)["usage"]["completion_tokens"] == 1   # requests still run
        until(lambda: c.get("/health/ready").status == 200, "the startup duration to pass")
        assert c.get("/ready").status == 200


# -- fake metrics -------------------------------------------------------------------------------------

FAKE = {"running-requests": 7, "waiting-requests": "squarewave:3:9:1h", "kv-cache-usage": 0.25,
        "ttft-buckets-values": [1, 0, 2], "tpot-buckets-values": [0, 4],
        "request-prompt-tokens": [1, 2], "request-generation-tokens": [0, 0, 3],
        "request-success-total": {"stop": 5, "tool_calls": 1}, "prefix-cache-hits": 10, "prefix-cache-queries": 40,
        "loras": [{"running": "a,b", "waiting": "c", "timestamp": 1257894567}]}


def test_fake_metrics_replace_the_real_ones():
    with InProcessSim("--fake-metrics", json.dumps(FAKE), "--max-loras", "3") as s:
        c = s.client
        c.complete(prompt="real traffic", max_tokens=2)             # never reported
        m = c.metrics()
        assert (m[("vllm:num_requests_running", ())], m[("vllm:num_requests_waiting", ())],
                m[("vllm:kv_cache_usage_perc", ())]) == (7, 3, 0.25)
        assert m[("vllm:time_to_first_token_seconds_count", ())] == 3
        assert m[("vllm:time_to_first_token_seconds_bucket", (("le", "0.001"),))] == 1
        assert m[("vllm:time_to_first_token_seconds_bucket", (("le", "0.01"),))] == 3
        assert m[("vllm:time_to_first_token_seconds_sum", ())] == pytest.approx(0.001 + 2 * 0.01)
        assert m[("vllm:inter_token_latency_seconds_count", ())] == m[("vllm:time_per_output_token_seconds_count", ())] == 4
        # the token totals default to the histograms' sums (samples sit on the bucket bounds 1, 2, 5)
        assert m[("vllm:prompt_tokens_total", ())] == 1 * 1 + 2 * 2 and m[("vllm:generation_tokens_total", ())] == 15
        assert m[("vllm:request_success_total", (("finished_reason", "stop"),))] == 5
        assert m[("vllm:request_success_total", (("finished_reason", "tool_calls"),))] == 1
        assert m[("vllm:request_success_total", (("finished_reason", "remote_decode"),))] == 0
        assert (m[("vllm:prefix_cache_hits_total", ())], m[("vllm:prefix_cache_queries_total", ())]) == (10, 40)
        assert m[("vllm:e2e_request_latency_seconds_count", ())] == 0
        [(labels, stamp)] = samples(c, "vllm:lora_requests_info").items()
        assert dict(labels) == {"max_lora": "3", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
        assert stamp == 1257894567
        # a partial update: the others stay
        view = c.ok("POST", "/admin/config", {"fake-metrics": {"running-requests": 2, "ttft-buckets-values": []}})
        assert view["fake-metrics"]["running-requests"] == 2.0 and view["fake-metrics"]["kv-cache-usage"] == 0.25
        m = c.metrics()
        assert (m[("vllm:num_requests_running", ())], m[("vllm:kv_cache_usage_perc", ())]) == (2, 0.25)
        assert m[("vllm:time_to_first_token_seconds_count", ())] == 0
        assert c.post("/fake_metrics", {"kv-cache-usage": 0.5}).status == 204     # llm-d's older route
        assert c.metrics()[("vllm:kv_cache_usage_perc", ())] == 0.5
        bad = c.post("/fake_metrics", {"kv-cache-usage": 5})
        assert bad.status == 500 and "Failed to update fake metrics" in bad.error


def test_fake_metric_functions_follow_time():
    with InProcessSim("--fake-metrics", json.dumps({"running-requests": "ramp:0:9:20ms",
                                                    "kv-cache-usage": "rampreset:0.2:0.2:1s"}),
                      "--fake-metrics-refresh-interval", "10ms") as s:
        until(lambda: s.client.metrics()[("vllm:num_requests_running", ())] == 9, "the ramp to reach its end")
        assert s.client.metrics()[("vllm:kv_cache_usage_perc", ())] == pytest.approx(0.2)


def test_fake_functions_math():
    from kvcm.sim.fakemetrics import Generated

    assert Generated("oscillate:0:10:4s").at(1) == pytest.approx(10) and Generated("oscillate:0:10:4s").at(3) == \
        pytest.approx(0)
    assert Generated("ramp:10:0:5s").at(2.5) == 5 and Generated("ramp:10:0:5s").at(9) == 0
    assert Generated("rampreset:0:10:2s").at(3) == 5
    assert [Generated("squarewave:1:2:2s").at(t) for t in (0.5, 1.5, 2.5)] == [1, 2, 1]


# -- --log-http, the body limit ---------------------------------------------------------------------

def test_log_http(caplog):
    with caplog.at_level(logging.INFO, logger="kvcm.sim.http"):
        with InProcessSim("--log-http") as s:
            s.client.post("/v1/completions", {"prompt": "logged words", "max_tokens": 1},
                          headers={"Authorization": "Bearer t"})
            s.client.post("/v1/completions", {"prompt": "x", "model": "nope"})
    text = caplog.text
    assert "HTTP request: POST /v1/completions" in text and "logged words" in text and "Bearer t" in text
    assert "HTTP response: status 200" in text and "HTTP response: status 404" in text
    with caplog.at_level(logging.INFO, logger="kvcm.sim.http"):
        caplog.clear()
        with InProcessSim() as s:
            s.client.post("/v1/completions", {"prompt": "quiet", "max_tokens": 1})
    assert "HTTP request" not in caplog.text


def test_max_request_body_size():
    with InProcessSim("--max-request-body-size-mb", "1") as s:
        reply = s.client.post("/tokenize", {"prompt": "x" * (1 << 20)})
        assert reply.status == 413
        assert s.client.post("/tokenize", {"prompt": "x" * 1000}).status == 200


# -- HTTPS --------------------------------------------------------------------------------------------

def _https_get(port, path, context):
    with urllib.request.urlopen("https://127.0.0.1:%d%s" % (port, path), context=context, timeout=WAIT) as r:
        return r.status, r.read()


def test_https_with_certificate_files(tmp_path):
    from kvcm.sim.tls import self_signed_pem

    cert, key = self_signed_pem(("127.0.0.1",))
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    with InProcessSim("--ssl-certfile", str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem")) as s:
        port = s.ranks[0].port
        trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        assert _https_get(port, "/health/ready", trusting) == (200, b'{"status":"ready"}')
        with pytest.raises(OSError):               # plain HTTP is not served
            s.client.get("/health", timeout=5)


def test_https_with_a_self_signed_certificate(caplog):
    with caplog.at_level(logging.WARNING, logger="asyncio"), InProcessSim("--self-signed-certs") as s:
        port = s.ranks[0].port
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _https_get(port, "/health", ssl.create_default_context())
        loose = ssl.create_default_context()
        loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
        assert _https_get(port, "/v1/models", loose)[0] == 200
        pem = ssl.get_server_certificate(("127.0.0.1", port))
        trusting = ssl.create_default_context(cadata=pem)          # self-signed: it is its own issuer
        assert _https_get(port, "/health", trusting)[0] == 200
        # a client that ends TLS properly (close_notify, then its FIN) is not a warning
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            tls = trusting.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
            tls.unwrap()
        until(lambda: not s.on_loop(lambda: s.ranks[0].http._connections), "the connections to close")
    assert "eof_received" not in caplog.text


def test_bad_certificate_files_fail_at_start(tmp_path):
    from kvcm.sim.app import Simulator
    from kvcm.sim.config import parse_args

    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        Simulator(parse_args(["--ssl-certfile", str(tmp_path / "bad.pem"), "--ssl-keyfile", str(tmp_path / "bad.pem")]))
