"""End to end: `python -m kvcm serve` as a subprocess on free ports, with a fake systemd
NOTIFY_SOCKET; the vLLM wire captures published through real PUB sockets; scoring, the llm-d
endpoints and the `kvcm score` / `kvcm tokenize` clients over real TCP; signals, invalid
configuration, ports in use, configuration precedence and socket activation."""

import json
import os
import re
import signal
import socket
import sys

import pytest

from captures import load_captures
from kvcm._core import BlockHasher
from kvcm.publisher import Publisher
from serving import (BLOCK, QWEN, TOKENIZERS, WAIT, Client, Engine, PrefixModel, Serve, free_port, run_cli,
                     run_serve, serve, stored, until)  # noqa: F401 (serve: a fixture)

LOCAL = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def server(shared):
    """One server for the tests that only read or add pods of their own (requests may bring
    their own chat templates)."""
    s = Serve.standard("--trust-request-chat-template")
    s.ready = s.wait_ready()
    yield s
    s.close()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# -- the vLLM captures, end to end ------------------------------------------------------------

def check_scores(client, model, queries, when):
    """Scores every query as the model says; returns the (namespace, salt) that found a pod."""
    found = set()
    for namespace, salt, prefix in queries:
        query = list(prefix) + [7] * 5                   # a partial last block never counts
        body = {"token_ids": query} if salt is None else {"token_ids": query, "cache_salt": salt}
        result = client.score(namespace, **body)
        scores, matched = model.expected(namespace, query, salt)
        where = "%s: %s %s, %d blocks" % (when, namespace, salt, len(prefix) // BLOCK)
        assert result["model"] == namespace and result["blocks"] == len(prefix) // BLOCK, where
        assert result["tokens"] == len(query), where
        assert result["scores"] == pytest.approx(scores), where
        assert result["matched"] == matched, where
        if scores:
            found.add((namespace, salt))
    return found


def check_pod_blocks(client, model, pods, when):
    for pod in pods:
        expected = {}
        for holders in model.holders.values():
            for p, tier in holders:
                if p == pod:
                    expected[tier] = expected.get(tier, 0) + 1
        for entry in client.streams(pod):
            assert entry["blocks"] == expected, "%s: /v1/pods of %s" % (when, pod)


@pytest.mark.parametrize("version", ["0.33.0", "0.20.0"])
def test_vllm_captures_end_to_end(serve, shared, version):
    """Every capture of one vLLM version through a PUB socket (DP ranks on their own ports,
    as vLLM offsets them), then after each message /v1/score by token ids equals what the
    events mean for every stored prefix, LoRA and cache-salted ones included."""
    captures = [c for c in load_captures(shared) if c.version == version]
    config = captures[0].hash_config
    assert all(c.hash_config["seed"] == config["seed"] for c in captures)
    ranks = sorted({0} | {c.dp_rank for c in captures})
    seed = [] if config["seed"] is None else ["--hash-seed", config["seed"]]
    server = serve(*seed, "--hash-algo", config["algo"], "--block-size", str(config["block_size"]),
                   zmq_offsets=ranks)
    client = server.client

    everything = PrefixModel(config["block_size"])
    for capture in captures:
        for message in capture.messages:
            everything.apply(capture.pod, capture.model, message.decoded[1])
    queries = everything.chains()
    assert any(salt for _, salt, _ in queries) and any(ns != QWEN for ns, _, _ in queries)

    model = PrefixModel(config["block_size"])
    found = set()
    for capture in captures:
        with Publisher(server.zmq_endpoint, topic=capture.topic, dp_rank=capture.dp_rank) as pub:
            client.connected(pub)
            for message in capture.messages:
                seq = pub.publish_raw(message.payload, seq=int.from_bytes(message.seq, "big"), topic=message.topic)
                model.apply(capture.pod, capture.model, message.decoded[1])
                client.caught_up(capture.pod, capture.model, seq, capture.dp_rank)
                when = "after %s seq %d" % (capture.dir, seq)
                found |= check_scores(client, model, queries, when)
                check_pod_blocks(client, model, [c.pod for c in captures], when)
        entry = client.stream(capture.pod, capture.model, capture.dp_rank)
        assert (entry["gaps"], entry["replays"], entry["state"]) == (0, 0, "ok"), entry

    metrics = client.metrics()
    assert metrics[("kvcm_hash_parity_mismatch_total", ())] == 0
    assert metrics[("kvcm_hash_parity_verified_total", ())] > 0
    assert found == {(ns, salt) for ns, salt, _ in queries}      # every kind of chain was seen scoring
    # every message, and the two probe batches of each publisher (Client.connected)
    assert metrics[("kvcm_ingest_applied_batches_total", ())] == sum(len(c.messages) + 2 for c in captures)
    assert not any(v for (name, _), v in metrics.items() if name.endswith("drops_total")), \
        {k: v for k, v in metrics.items() if k[0].endswith("drops_total") and v}
    assert client.ok("POST", "/v1/hash", {"model": QWEN, "token_ids": list(range(32))})["mode"] == "parity"
    assert server.stop() == 0


# -- the llm-d endpoints and the CLI clients -------------------------------------------------------

PROMPT = "Routing requests to the pod that already caches the prompt prefix saves prefill work. " * 3
CHAT = [{"role": "user", "content": PROMPT}]


def test_llmd_endpoints_return_the_pods_holding_the_prompt(server):
    client = server.client
    ids = client.tokenize(QWEN, prompt=PROMPT)["token_ids"]
    chat = client.tokenize(QWEN, messages=CHAT)
    full, cpu = len(ids) // BLOCK, 1
    assert full >= 3
    with Engine(client, server.zmq_endpoint, "llmd-full", QWEN) as a, \
            Engine(client, server.zmq_endpoint, "llmd-cpu", QWEN) as b, \
            Engine(client, server.zmq_endpoint, "llmd-chat", QWEN) as c:
        for e in (a, b, c):
            e.connect()
        a.send(stored(ids))
        b.send(stored(ids[:cpu * BLOCK], medium="CPU"))
        c.send(stored(chat["token_ids"]))
    assert client.ok("POST", "/score_completions", {"model": QWEN, "prompt": PROMPT}) == pytest.approx(
        {"llmd-full": float(full), "llmd-cpu": 0.8})
    assert client.ok("POST", "/score_chat_completions", {"model": QWEN, "messages": CHAT}) == {
        "podScores": {"llmd-chat": float(len(chat["token_ids"]) // BLOCK)},
        "templated_messages": chat["prompt"]}
    assert client.ok("POST", "/score_completions", {"model": QWEN, "prompt": "too short"}) is None
    assert client.ok("POST", "/score_chat_completions", {
        "model": QWEN, "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages[0].content }}",
    }) == {"podScores": None, "templated_messages": "hi"}


CLI_CASES = [
    ("score", ["--prompt", PROMPT], "/v1/score", {"prompt": PROMPT}),
    ("score", ["--messages", json.dumps(CHAT)], "/v1/score", {"messages": CHAT}),
    ("score", ["--tokens", ",".join(map(str, range(40)))], "/v1/score", {"token_ids": list(range(40))}),
    ("score", ["--tokens", json.dumps(list(range(40))), "--pods", "llmd-cpu,nobody"], "/v1/score",
     {"token_ids": list(range(40)), "pods": ["llmd-cpu", "nobody"]}),
    ("score", ["--prompt", PROMPT, "--pods", "llmd-cpu"], "/v1/score", {"prompt": PROMPT, "pods": ["llmd-cpu"]}),
    ("tokenize", ["--prompt", PROMPT], "/v1/tokenize", {"prompt": PROMPT}),
    ("tokenize", ["--messages", json.dumps(CHAT)], "/v1/tokenize", {"messages": CHAT}),
]


@pytest.mark.parametrize("command, args, path, body", CLI_CASES,
                         ids=["%s-%d" % (c[0], i) for i, c in enumerate(CLI_CASES)])
def test_cli_clients_print_the_servers_json_reply(server, command, args, path, body):
    status, out, err = run_cli(command, "--url", server.client.url, "--model", QWEN, *args)
    assert (status, err) == (0, ""), err
    assert json.loads(out) == server.client.ok("POST", path, dict(body, model=QWEN))
    assert out.endswith("\n") and out.count("\n") == 1


def test_cli_clients_report_errors(server):
    status, out, err = run_cli("tokenize", "--url", server.client.url, "--model", "nobody/here", "--prompt", "x")
    assert status == 1, (out, err)
    reply = json.loads(out)
    assert reply["error"]["code"] == 404 and QWEN in reply["error"]["message"]
    dead = "http://127.0.0.1:%d" % free_port()
    status, out, err = run_cli("score", "--url", dead, "--model", QWEN, "--tokens", "1,2,3")
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and "cannot reach" in err, err


def test_bad_traffic_is_counted_and_the_service_stays_up(server):
    client = server.client
    topic = b"kv@bad-traffic@" + QWEN.encode()
    garbage = [
        [topic, bytes(8)],                                  # two frames
        [topic, b"\x00\x01", b"\x90"],                      # a short seq frame
        [b"kv@no-model", bytes(8), b"\x90"],                  # a topic without pod and model
        [topic, (1).to_bytes(8, "big"), b"\xc1\xff\x00"],    # not msgpack
        [topic, (2).to_bytes(8, "big"), b"\x93\xcb"],         # truncated
    ]
    with Publisher(server.zmq_endpoint, topic=topic.decode()) as pub:
        client.connected(pub)
        before = client.metrics()
        for frames in garbage:
            pub.send_frames(frames)

        def dropped():
            now = client.metrics()
            return sum(v for (name, _), v in now.items() if name.endswith("drops_total")) - \
                sum(v for (name, _), v in before.items() if name.endswith("drops_total"))
        until(lambda: dropped() >= len(garbage), "kvcm to count %d dropped messages" % len(garbage))
        ids = list(range(500, 532))
        seq = pub.publish([stored(ids)], seq=3)
        client.caught_up("bad-traffic", QWEN, seq)
    assert client.score(QWEN, token_ids=ids)["scores"] == {"bad-traffic": 2.0}
    assert server.alive() and client.ok("GET", "/health") == {"status": "ok"}


def test_json_log_format(serve):
    server = serve("--log-format", "json")
    server.client.ok("GET", "/health")
    lines = [json.loads(line) for line in server.stderr().splitlines()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines), lines
    assert any(line["logger"] == "kvcm.serve" and "127.0.0.1:%d" % server.http_port in line["msg"] for line in lines)
    assert server.stop() == 0


def test_busy_polling_follows_answers_and_the_metrics_say_how_its_spins_ended(serve, server):
    busy = serve("--busy-poll-us", "2000")
    for i in range(20):      # token ids (the core's lane), then prompts (the general path)
        fields = {"token_ids": list(range(i, i + 64))} if i % 2 else {"prompt": "hello %d" % i}
        busy.client.score(QWEN, **fields)
    metrics = busy.client.metrics()
    spins = [metrics[("kvcm_http_busy_polls_total", (("outcome", outcome),))] for outcome in ("event", "timeout", "read")]
    assert sum(spins) >= 20, spins
    assert not any(name == "kvcm_http_busy_polls_total" for name, _ in server.client.metrics())


# -- systemd notify and signals ------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ready_only_when_serving_then_watchdog_and_stopping_on_signal(serve, sig):
    server = serve(env={"WATCHDOG_USEC": "200000"})     # a ping every 0.1 s
    # READY=1 came: both sockets must answer now, without any retry
    assert server.client.ok("GET", "/health") == {"status": "ok"}
    assert server.client.ok("GET", "/ready") == {"status": "ready"}
    socket.create_connection(("127.0.0.1", server.zmq_port), timeout=5).close()
    status = [line for line in server.ready.split("\n") if line.startswith("STATUS=")]
    assert status and "127.0.0.1:%d" % server.http_port in status[0] and server.zmq_endpoint in status[0], status
    server.notify.wait_for("WATCHDOG=1", alive=server.alive)
    assert server.stop(sig) == 0, server.stderr()
    lines = server.notify.lines()
    assert "STOPPING=1" in lines and lines.index("READY=1") < lines.index("STOPPING=1"), lines
    assert lines.count("READY=1") == 1
    assert "Traceback" not in server.stderr(), server.stderr()
    assert refused(server.http_port)


def test_a_request_in_flight_at_sigterm_is_answered_before_exit(serve):
    server = serve()
    body = json.dumps({"model": QWEN, "token_ids": list(range(64))}).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT) as conn:
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: kvcm\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = conn.recv(65536)                     # kvcm has read the head: the request is in flight
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        conn.sendall(body[:10])
        server.send(signal.SIGTERM)
        server.notify.wait_for("STOPPING=1", alive=server.alive)
        conn.sendall(body[10:])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply
    assert b"connection: close" in head.lower(), head
    assert json.loads(payload)["blocks"] == 4
    assert server.wait() == 0


def test_admin_token_from_the_environment(serve):
    server = serve(env={"KVCM_ADMIN_TOKEN": "from-env"})
    assert server.client.delete("/v1/pods/x").status == 401
    assert server.client.delete("/v1/pods/x", headers={"Authorization": "Bearer nope"}).status == 403
    assert server.client.delete("/v1/pods/x", headers={"Authorization": "Bearer from-env"}).status == 200
    assert "from-env" not in server.stderr()


def test_sighup_reloads_tokenizers_and_log_level_and_survives_a_bad_file(serve, tmp_path):
    models = tmp_path / "models"
    (models / "first").mkdir(parents=True)
    (models / "first" / "tokenizer.json").symlink_to(TOKENIZERS / "gpt2" / "tokenizer.json")
    config = tmp_path / "kvcm.toml"
    config.write_text('log_level = "warning"\n')
    server = serve("--tokenizers-dir", str(models), "--config", str(config))
    client = server.client
    reloads = []

    def sighup():
        server.send(signal.SIGHUP)
        until(lambda: len(reloaded()) > len(reloads), "STATUS=reloaded after SIGHUP #%d" % (len(reloads) + 1))
        reloads[:] = reloaded()
        assert client.ok("GET", "/health") == {"status": "ok"}

    def reloaded():
        return [line for line in server.notify.lines() if line.startswith("STATUS=reloaded")]

    missing = client.post("/v1/tokenize", {"model": "later", "prompt": "hello"})
    assert missing.status == 404 and "first" in missing.error
    (models / "later").symlink_to(TOKENIZERS / "gpt2", target_is_directory=True)
    sighup()
    assert client.tokenize("later", prompt="hello world")["token_ids"] == [31373, 995]     # gpt2's ids
    assert "SIGHUP: reloaded" not in server.stderr()          # still at log level warning

    config.write_text('log_level = "info"\n')
    sighup()
    assert "SIGHUP: reloaded" in server.stderr()

    config.write_text('log_level = "info"\nlog_levle = "debug"\n')
    sighup()
    assert "configuration not reloaded" in server.stderr() and "log_levle" in server.stderr()
    assert client.tokenize(QWEN, prompt="still here")["count"] > 0
    assert server.stop() == 0


# -- configuration -----------------------------------------------------------------------------

BAD_CONFIG = [
    ("block-size-0", ["--block-size", "0"], {}, None, ["--block-size", "0"]),
    ("block-size-text", ["--block-size", "sixteen"], {}, None, ["--block-size", "sixteen"]),
    ("env-port", [], {"KVCM_HTTP_PORT": "abc"}, None, ["KVCM_HTTP_PORT", "abc"]),
    ("env-port-range", [], {"KVCM_HTTP_PORT": "70000"}, None, ["KVCM_HTTP_PORT", "70000"]),
    ("toml-unknown-key", [], {}, "http_prot = 9000\n", ["http_prot", "http_port"]),
    ("toml-wrong-type", [], {}, 'block_size = "16"\n', ["block_size"]),
    ("toml-syntax", [], {}, "http_port = \n", ["TOML"]),
    ("hash-mode", ["--hash-mode", "bogus"], {}, None, ["--hash-mode", "bogus"]),
    ("hash-algo", [], {"KVCM_HASH_ALGO": "md5"}, None, ["KVCM_HASH_ALGO", "md5"]),
    ("zmq-endpoint", ["--zmq-bind", "tcp://nohost"], {}, None, ["--zmq-bind", "tcp://nohost"]),
    ("engine", ["--engine", "e1"], {}, None, ["--engine", "e1"]),
    ("unknown-flag", ["--http-prot", "1"], {}, None, ["--http-prot"]),
    ("missing-config", ["--config", "/nonexistent/kvcm.toml"], {}, None, ["/nonexistent/kvcm.toml"]),
    ("tokenizer-dir", ["--tokenizer", "m=/nonexistent/tok"], {}, None, ["/nonexistent/tok"]),
    ("index", ["--index", "redis://127.0.0.1:port/0"], {}, None, ["--index", "bad port"]),
]


@pytest.mark.parametrize("args, env, toml, words", [c[1:] for c in BAD_CONFIG], ids=[c[0] for c in BAD_CONFIG])
def test_invalid_configuration_exits_2_with_one_line(tmp_path, args, env, toml, words):
    # safe listeners in case it starts anyway (it then runs until run_serve kills it and fails)
    base = {"KVCM_HTTP_HOST": "127.0.0.1", "KVCM_HTTP_PORT": "0", "KVCM_ZMQ_BIND": LOCAL}
    if toml is not None:
        path = tmp_path / "kvcm.toml"
        path.write_text(toml)
        args = ["--config", str(path)] + args
    status, out, err = run_serve(*args, env=dict(base, **env), timeout=15)
    assert status == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith(("kvcm serve: error: ", "kvcm: error: ")), err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("which", ["http", "zmq"])
def test_a_port_in_use_fails_with_a_clear_line_and_no_ready(shared, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http_port = port if which == "http" else free_port()
        zmq_port = port if which == "zmq" else free_port()
        server = Serve("--http-host", "127.0.0.1", "--http-port", str(http_port),
                       "--zmq-bind", "tcp://127.0.0.1:%d" % zmq_port)
        try:
            status = server.wait()
            err = server.stderr()
            assert status == 2, err             # a setting to change, as for a bad value
            assert len(err.splitlines()) == 1, err
            last = err.splitlines()[-1]
            assert last.startswith("kvcm serve: error: ") and str(port) in last and "in use" in last.lower(), err
            assert "Traceback" not in err, err
            assert "READY=1" not in server.notify.lines()
        finally:
            server.close()


PRECEDENCE = [
    # (layers given, the one that wins)
    (("file",), "file"),
    (("file", "env"), "env"),
    (("file", "env", "flag"), "flag"),
    (("file", "flag"), "flag"),
    (("env-file",), "file"),           # the file named by KVCM_CONFIG instead of --config
    (("llmd",), "llmd"),               # llm-d's HTTP_PORT: below everything else
    (("llmd", "file"), "file"),
    (("llmd", "env"), "env"),
    (("llmd", "flag"), "flag"),
]


@pytest.mark.parametrize("layers, winner", PRECEDENCE, ids=["+".join(p[0]) for p in PRECEDENCE])
def test_configuration_precedence_decides_which_port_answers(shared, tmp_path, layers, winner):
    ports = {}
    while len(set(ports.values())) < 5:
        ports = {layer: free_port() for layer in ("file", "env", "flag", "llmd", "zmq")}
    # ZMQ on a port picked here too: one the kernel picked at bind time could be a layer's port
    zmq = "tcp://127.0.0.1:%d" % ports.pop("zmq")
    config = tmp_path / "kvcm.toml"
    config.write_text('http_host = "127.0.0.1"\nhttp_port = %d\nzmq_bind = ["%s"]\n' % (ports["file"], zmq))
    args, env = [], {"KVCM_HTTP_HOST": "127.0.0.1", "KVCM_ZMQ_BIND": zmq}
    if "llmd" in layers:
        env["HTTP_PORT"] = str(ports["llmd"])
    if "file" in layers:
        args += ["--config", str(config)]
    if "env-file" in layers:
        env["KVCM_CONFIG"] = str(config)
    if "env" in layers:
        env["KVCM_HTTP_PORT"] = str(ports["env"])
    if "flag" in layers:
        args += ["--http-port", str(ports["flag"])]
    server = Serve(*args, env=env)
    try:
        ready = server.wait_ready()
        assert "127.0.0.1:%d" % ports[winner] in ready, ready
        assert Client("127.0.0.1", ports[winner]).ok("GET", "/health") == {"status": "ok"}
        for layer, port in ports.items():
            if layer != winner:
                assert refused(port), "%s's port %d answers too" % (layer, port)
        assert server.stop() == 0
    finally:
        server.close()


def test_llm_ds_environment_configures_kvcm_and_is_logged(shared):
    http_port, zmq_port = free_port(), free_port()
    env = {"KVCM_HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(http_port), "ZMQ_ENDPOINT": "tcp://127.0.0.1:%d" % zmq_port,
           "MODEL_NAME": QWEN, "BLOCK_SIZE": "32", "PYTHONHASHSEED": "0", "ZMQ_TOPIC": "kv@",
           "HF_TOKEN": "hf_do_not_log_me", "POOL_CONCURRENCY": "4"}
    server = Serve(env=env)
    try:
        ready = server.wait_ready()
        assert "http 127.0.0.1:%d, zmq tcp://127.0.0.1:%d" % (http_port, zmq_port) in ready, ready
        client = Client("127.0.0.1", http_port)
        ids = list(range(64))
        hashed = client.ok("POST", "/v1/hash", {"token_ids": ids})           # MODEL_NAME: no model needed
        assert hashed == {"model": QWEN, "mode": "parity", "keys": list(BlockHasher("sha256", "0", 32).keys(ids))}
        assert client.ok("POST", "/v1/score", {"token_ids": ids})["model"] == QWEN
        assert server.stop() == 0
        err = server.stderr()
        for line in ("--http-port %d from llm-d's HTTP_PORT" % http_port, "--hash-seed 0 from llm-d's PYTHONHASHSEED",
                     "--default-model %s from llm-d's MODEL_NAME" % QWEN, "HF_TOKEN is set and ignored",
                     "POOL_CONCURRENCY is set and ignored"):
            assert line in err, err
        assert "hf_do_not_log_me" not in err
    finally:
        server.close()


def test_port_0_picks_free_ports_and_says_which(shared):
    server = Serve("--http-host", "127.0.0.1", "--http-port", "0", "--zmq-bind", LOCAL)
    try:
        ready = server.wait_ready()
        match = re.search(r"http 127\.0\.0\.1:(\d+), zmq (tcp://127\.0\.0\.1:\d+)", ready)
        assert match, ready
        port = int(match.group(1))
        assert port != 0 and Client("127.0.0.1", port).ok("GET", "/health") == {"status": "ok"}
        assert "127.0.0.1:%d" % port in server.stderr()            # logged too
        socket.create_connection(("127.0.0.1", int(match.group(2).rsplit(":", 1)[1])), timeout=5).close()
        assert server.stop() == 0
    finally:
        server.close()


# -- socket activation -------------------------------------------------------------------------

def listening(family):
    if family == socket.AF_INET:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
        except OSError:
            sock.close()
            pytest.skip("no dual-stack IPv6 on this host")
    sock.listen()
    return sock


def activated(sock, unused_port):
    """kvcm serve as systemd starts it with one socket: the socket as fd 3, LISTEN_FDS=1 and
    LISTEN_PID naming the started process — here a launcher that execs into kvcm and whose
    parent we are (kvcm accepts its parent's pid too, for the frozen binary's bootloader)."""
    fd = sock.fileno()
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.execv(sys.executable, [sys.executable, '-m', 'kvcm', 'serve'] + sys.argv[2:])")
    server = Serve("--http-host", "127.0.0.1", "--http-port", str(unused_port), "--zmq-bind", LOCAL,
                   env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())},
                   command=[sys.executable, "-c", launcher, str(fd)], pass_fds=(fd,))
    sock.close()
    return server


def test_socket_activation_serves_the_passed_socket_instead_of_the_port(shared):
    sock = listening(socket.AF_INET)
    port, unused = sock.getsockname()[1], free_port()
    server = activated(sock, unused)
    try:
        ready = server.wait_ready()
        assert "127.0.0.1:%d" % port in ready, ready
        client = Client("127.0.0.1", port)
        assert client.ok("GET", "/health") == {"status": "ok"}
        assert client.delete("/v1/pods/nobody").status == 200       # a loopback client: admin allowed
        assert refused(unused)
        assert server.stop() == 0
    finally:
        server.close()


def test_a_local_client_on_a_dual_stack_socket_is_loopback_for_admin(shared):
    """`ListenStream=8080` (the usual kvcm.socket) makes a dual-stack [::] socket, so an IPv4
    client on 127.0.0.1 arrives as ::ffff:127.0.0.1, and must count as loopback."""
    sock = listening(socket.AF_INET6)
    port = sock.getsockname()[1]
    server = activated(sock, free_port())
    try:
        server.wait_ready()
        client = Client("127.0.0.1", port)
        assert client.ok("GET", "/health") == {"status": "ok"}
        reply = client.delete("/v1/pods/nobody")
        assert reply.status == 200, reply
        assert server.stop() == 0
    finally:
        server.close()
