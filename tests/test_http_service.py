"""`kvcm serve`'s HTTP port against slow, careless and eavesdropped clients, over real TCP:
slots held by clients that send nothing or drip a body are freed by --header-timeout and
--body-timeout, HTTP/1.1 needs a Host, and --tls-cert/--tls-key serve HTTPS (the admin
token then travels encrypted) to a real TLS client that checks the certificate."""

import http.client
import json
import select
import socket
import time

import pytest

from serving import QWEN, WAIT, run_serve, serve  # noqa: F401 (serve: a fixture)

ADMIN_TOKEN = "tls-admin-token"


def connect(server):
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_reply(sock):
    """(status, raw bytes) of the answer on sock, read until the server closes it."""
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data


def test_fifty_slow_clients_hold_the_fifty_slots_only_until_their_timeouts(serve):
    server = serve("--max-connections", "50", "--header-timeout", "5", "--body-timeout", "5")
    silent = [connect(server) for _ in range(25)]                 # never send a byte
    dripping = [connect(server) for _ in range(25)]               # a body at a byte at a time
    for sock in dripping:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: kvcm\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
    fast = connect(server)
    fast.sendall(b"GET /health HTTP/1.1\r\nHost: kvcm\r\n\r\n")
    status, _ = read_reply(fast)
    assert status == 503                                          # all fifty slots are taken
    answers, end = {}, time.monotonic() + 3 * WAIT
    while len(answers) < len(dripping):
        assert time.monotonic() < end, "slow bodies were never cut off"
        for sock in select.select([s for s in dripping if s not in answers], [], [], 0.1)[0]:
            answers[sock] = read_reply(sock)[0]
        for sock in dripping:
            if sock not in answers:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass
    assert set(answers.values()) == {408}, answers
    for sock in silent:
        assert read_reply(sock) == (None, b"")                    # closed without a word
    assert server.client.ok("GET", "/health") == {"status": "ok"}
    for sock in silent + dripping + [fast]:
        sock.close()


def test_http11_without_host_is_400_and_http10_without_is_served(serve):
    server = serve()
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
    status, data = read_reply(sock)
    assert status == 400 and b"Host" in data, data
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    assert read_reply(sock)[0] == 200


# -- TLS ----------------------------------------------------------------------------------------

@pytest.fixture
def certificates(tmp_path):
    from tls import make_certificates

    return make_certificates(tmp_path)


def https(server, ca, method, path, body=None, headers=None):
    from tls import client_context

    conn = http.client.HTTPSConnection("127.0.0.1", server.http_port, timeout=WAIT, context=client_context(ca))
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers=dict(headers or {}, **({"Content-Type": "application/json"} if body else {})))
        response = conn.getresponse()
        return response.status, response.read(), conn.sock.version()
    finally:
        conn.close()


def test_tls_serves_the_api_and_carries_the_admin_token_encrypted(serve, certificates):
    ca, cert, key = certificates
    server = serve("--tls-cert", str(cert), "--tls-key", str(key), env={"KVCM_ADMIN_TOKEN": ADMIN_TOKEN})
    assert "(TLS)" in server.ready
    status, body, version = https(server, ca, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"} and version in ("TLSv1.2", "TLSv1.3")
    status, body, _ = https(server, ca, "POST", "/v1/tokenize", {"model": QWEN, "prompt": "over TLS"})
    assert status == 200 and json.loads(body)["count"] > 0
    assert https(server, ca, "DELETE", "/v1/pods/nobody")[0] == 401
    status, body, _ = https(server, ca, "DELETE", "/v1/pods/nobody",
                            headers={"Authorization": "Bearer " + ADMIN_TOKEN})
    assert status == 200 and json.loads(body) == {"pod": "nobody", "removed": 0}
    # plain HTTP on the TLS port gets no HTTP answer, and logs at most a line per interval
    for _ in range(20):
        sock = connect(server)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: kvcm\r\n\r\n")
        assert read_reply(sock)[0] is None
        sock.close()
    assert https(server, ca, "GET", "/health")[0] == 200
    assert server.stderr().count("Traceback") <= 1, server.stderr()


@pytest.mark.parametrize("args, words", [
    (["--tls-cert", "{cert}"], ["--tls-key"]),
    (["--tls-key", "{key}"], ["--tls-cert"]),
    (["--tls-cert", "{key}", "--tls-key", "{key}"], ["certificate"]),
    (["--tls-cert", "{cert}", "--tls-key", "/nonexistent/key.pem"], ["/nonexistent/key.pem"]),
])
def test_tls_misconfiguration_fails_at_start_with_one_line(certificates, args, words):
    ca, cert, key = certificates
    args = [a.format(cert=cert, key=key) for a in args]
    status, _, err = run_serve("--http-port", "0", "--zmq-bind", "none", *args)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
