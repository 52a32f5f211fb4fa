"""The bench's client connection over real sockets: a spinning client (`--client-spin`)
reads the same answers as a sleeping one, whole across partial sends, without allocating more
than it reads, and a server that never answers fails it within its timeout instead of holding
it forever."""

import socket
import threading
import tracemalloc

import pytest

from kvcm.bench.load import READ_SIZE, Connection, HttpError, closed_loop, request_bytes

BODY = b'{"scores": {"pod-a": 3.0}}' * 40
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)


class _Server(threading.Thread):
    """Answers each request on a connection with HEAD + BODY, the body in two sends with a
    pause between them; `silent` reads requests and never answers."""

    def __init__(self, silent=False):
        super().__init__(daemon=True)
        self.silent = silent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.stop = threading.Event()

    def run(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:          # closed before a client came
            return
        with conn:
            while not self.stop.is_set():
                data = b""
                while not data.endswith(b"}"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                if self.silent:
                    continue
                conn.sendall(HEAD + BODY[:100])
                self.stop.wait(0.02)
                conn.sendall(BODY[100:])

    def close(self):
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes an accept() no client answered
        except OSError:
            pass
        self.listener.close()
        self.join(5)


@pytest.fixture
def server(request):
    s = _Server(silent=getattr(request, "param", False))
    s.start()
    yield s
    s.close()


REQUEST = request_bytes("POST", "/v1/score", b'{"token_ids": [1, 2, 3]}')


@pytest.mark.parametrize("spin", [False, True])
def test_the_answer_is_read_whole_across_partial_sends(server, spin):
    with Connection(server.address, spin=spin) as conn:
        for _ in range(3):
            assert conn.call(REQUEST) == (200, BODY)


@pytest.mark.parametrize("spin", [False, True])
def test_reading_an_answer_allocates_no_more_than_it_reads(server, spin):
    """A read sized for the largest answer must not allocate that size each time: the
    allocation (an mmap at 256 KiB) would be inside every latency bench measures."""
    with Connection(server.address, spin=spin) as conn:
        conn.call(REQUEST)
        tracemalloc.start()
        try:
            for _ in range(3):
                assert conn.call(REQUEST) == (200, BODY)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < READ_SIZE // 2, peak     # this test's server thread reads 64 KiB at a time


def test_a_spinning_closed_loop_times_every_request(server):
    assert len(closed_loop(server.address, [REQUEST], 5, spin=True)) == 5


def test_a_spinning_client_drives_one_connection_only(server):
    with pytest.raises(ValueError, match="one connection"):
        closed_loop(server.address, [REQUEST], 5, concurrency=2, spin=True)


@pytest.mark.parametrize("server", [True], indirect=True)
def test_a_server_that_never_answers_fails_a_spinning_call_within_its_timeout(server):
    with Connection(server.address, timeout=0.3, spin=True) as conn:
        with pytest.raises(HttpError, match="no answer"):
            conn.call(REQUEST)


def test_a_server_that_reads_nothing_fails_a_spinning_send_within_its_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:   # connections queue, never read
        big = request_bytes("POST", "/v1/score", b"1" * (64 << 20))
        with Connection(listener.getsockname(), timeout=0.3, spin=True) as conn:
            with pytest.raises(OSError):
                conn.call(big)
