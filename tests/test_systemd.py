"""kvcm.systemd against a fake manager: a real NOTIFY_SOCKET, real inherited sockets."""

import asyncio
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from kvcm import systemd

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEADLINE = 60.0          # generous: only a broken implementation waits this long


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)


class Manager:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock):
        self.sock = sock

    def recv(self):
        self.sock.settimeout(DEADLINE)
        return self.sock.recv(65536)

    def pending(self):
        """Every message already queued, without waiting."""
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(65536))
            except BlockingIOError:
                return messages


@pytest.fixture(params=["path", "abstract"])
def manager(request, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        directory = tempfile.mkdtemp(prefix="kvcm-notify-", dir="/tmp")   # short: sun_path is 108 bytes
        request.addfinalizer(lambda: shutil.rmtree(directory, ignore_errors=True))
        address = os.path.join(directory, "notify")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = "kvcm-test-%s" % uuid.uuid4().hex
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield Manager(sock)
    sock.close()


# -- sd_notify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("send, expected", [
    (lambda: systemd.ready(), b"READY=1"),
    (lambda: systemd.ready("listening on 0.0.0.0:8080"), b"READY=1\nSTATUS=listening on 0.0.0.0:8080"),
    (lambda: systemd.status("3 pods, 1200 blocks"), b"STATUS=3 pods, 1200 blocks"),
    (lambda: systemd.status("two\nREADY=1"), b"STATUS=two READY=1"),      # no injected assignment
    (lambda: systemd.ready("a\r\nb"), b"READY=1\nSTATUS=a b"),
    (lambda: systemd.stopping(), b"STOPPING=1"),
    (lambda: systemd.watchdog(), b"WATCHDOG=1"),
    (lambda: systemd.notify("RELOADING=1\nSTATUS=réload"), "RELOADING=1\nSTATUS=réload".encode()),
], ids=["ready", "ready-status", "status", "status-newline", "ready-crlf", "stopping", "watchdog", "raw"])
def test_messages_reach_the_manager(manager, send, expected):
    assert send() is True
    assert manager.recv() == expected


def test_messages_arrive_in_order(manager):
    for send in (systemd.ready, systemd.watchdog, systemd.stopping):
        assert send()
    assert [manager.recv() for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


@pytest.mark.parametrize("address", [None, "", "relative/path", "vsock:2:1234", "/nonexistent/kvcm/notify", "@"])
def test_no_usable_notify_socket_is_not_an_error(monkeypatch, address):
    if address is not None:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    for send in (systemd.ready, systemd.stopping, systemd.watchdog, lambda: systemd.status("x")):
        assert send() is False


def test_a_path_that_is_not_a_socket_is_not_an_error(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "file"))
    assert systemd.ready() is False


# -- watchdog ----------------------------------------------------------------------------------

def _unrelated_pid():
    return next(pid for pid in range(2, 1 << 22) if pid not in (os.getpid(), os.getppid()))


@pytest.mark.parametrize("usec, pid, expected", [
    ("4000000", None, 2.0),
    ("4000000", "self", 2.0),
    ("4000000", "parent", 2.0),                # the onefile bootloader's pid
    ("4000000", "other", None),
    ("4000000", "", 2.0),
    ("4000000", "abc", None),
    ("4000000", "0", None),
    ("30000000", None, 15.0),
    ("1", None, 0.5e-6),
    (None, None, None),
    ("", None, None),
    ("0", None, None),
    ("-5", None, None),
    ("2s", None, None),
    (None, "self", None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        pids = {"self": os.getpid(), "parent": os.getppid(), "other": _unrelated_pid()}
        monkeypatch.setenv("WATCHDOG_PID", str(pids.get(pid, pid)))
    assert systemd.watchdog_interval() == expected


def _child_watchdog_interval(pid):
    env = dict(os.environ, WATCHDOG_USEC="1000000", WATCHDOG_PID=str(pid))
    out = subprocess.run([sys.executable, "-c", "from kvcm import systemd; print(systemd.watchdog_interval())"],
                         env=env, cwd=ROOT, capture_output=True, timeout=DEADLINE, check=True)
    return out.stdout.decode().strip()


def test_watchdog_pid_of_the_parent_process_counts_in_a_real_child():
    assert _child_watchdog_interval(os.getpid()) == "0.5"      # we are the child's parent
    if os.getppid() > 0:
        assert _child_watchdog_interval(os.getppid()) == "None"   # its grandparent does not count


def _run_watchdog(pattern):
    """Runs watchdog_task until alive() has answered every entry of `pattern` (True, False or
    an exception to raise), then cancels it."""
    calls = []

    async def main():
        done = asyncio.Event()

        def alive():
            calls.append(None)
            if len(calls) >= len(pattern):
                done.set()
            answer = pattern[len(calls) - 1] if len(calls) <= len(pattern) else False
            if isinstance(answer, Exception):
                raise answer
            return answer

        task = asyncio.ensure_future(systemd.watchdog_task(alive))
        await asyncio.wait_for(done.wait(), DEADLINE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return calls


T, F = True, False


@pytest.mark.parametrize("pattern", [
    [T, T, T, F, F, F],
    [F, F, F],
    [T, F, F, T, F],                           # a recovered loop is pinged again
    [T, RuntimeError("check failed"), F],      # a failing check counts as not alive
    [T, 0, "", None, 1],                       # truthiness, as bool() sees it
])
def test_watchdog_pings_only_while_alive(manager, monkeypatch, pattern):
    monkeypatch.setenv("WATCHDOG_USEC", "2000")     # a 1 ms period
    calls = _run_watchdog(pattern)
    expected = sum(1 for answer in pattern if answer is True or answer == 1)
    # The ping of one answer is sent before alive() is asked again; the last answers were False.
    assert len(calls) >= len(pattern)
    assert manager.pending() == [b"WATCHDOG=1"] * expected


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "2000", "WATCHDOG_PID": "other"}])
def test_watchdog_task_returns_at_once_when_not_watched(manager, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, str(_unrelated_pid()) if value == "other" else value)
    calls = []
    asyncio.run(asyncio.wait_for(systemd.watchdog_task(lambda: calls.append(1) or True), DEADLINE))
    assert calls == [] and manager.pending() == []


# -- socket activation ---------------------------------------------------------------------------

CHILD = r"""
import fcntl, json, os, socket, sys
from kvcm import systemd

fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]     # out of the way of 3, 4, ...
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, systemd.LISTEN_FDS_START + i)
    os.close(fd)
pid = {"self": os.getpid(), "parent": os.getppid(), "other": int(sys.argv[3])}[sys.argv[2]]
os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS=str(len(fds)))
if sys.argv[4] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[4]
got = systemd.listen_fds_with_names()
print(json.dumps({
    "names": [name for name, _ in got],
    "fds": [sock.fileno() for _, sock in got],
    "kinds": [[int(sock.family), int(sock.type)] for _, sock in got],
    "inheritable": [os.get_inheritable(sock.fileno()) for _, sock in got],
    "env": sorted(k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ),
    "again": len(systemd.listen_fds()),
}), flush=True)
for name, sock in got:
    sock.settimeout(60)
    if sock.type == socket.SOCK_STREAM:
        conn, _ = sock.accept()
        conn.sendall(b"hello from " + name.encode())
        conn.close()
    else:
        data, peer = sock.recvfrom(100)
        sock.sendto(b"echo " + data, peer)
"""


@pytest.fixture
def passed_sockets():
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    read_end, write_end = os.pipe()
    yield {"tcp": tcp, "udp": udp, "pipe": read_end}
    tcp.close()
    udp.close()
    os.close(read_end)
    os.close(write_end)


def _fd(thing):
    return thing if isinstance(thing, int) else thing.fileno()


def _activate(passed, pid_mode, names):
    fds = [_fd(thing) for thing in passed]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ",".join(map(str, fds)), pid_mode,
                             str(_unrelated_pid()), names],
                            pass_fds=fds, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if not line:
        proc.wait(DEADLINE)
        pytest.fail("child failed: %s" % proc.stderr.read().decode(errors="replace"))
    return proc, json.loads(line)


def _finish(proc):
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err.decode(errors="replace")


def _talk(passed_socket, name):
    if passed_socket.type == socket.SOCK_STREAM:
        with socket.create_connection(passed_socket.getsockname(), timeout=DEADLINE) as conn:
            data = b""
            while chunk := conn.recv(100):
                data += chunk
        assert data == b"hello from " + name.encode()
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(DEADLINE)
            client.sendto(b"ping", passed_socket.getsockname())
            assert client.recv(100) == b"echo ping"


@pytest.mark.parametrize("pid_mode", ["self", "parent"])
@pytest.mark.parametrize("names, expected_names", [
    ("http:extra", ["http", "extra"]),
    ("-", ["unknown", "unknown"]),
    ("only-one", ["unknown", "unknown"]),       # a count mismatch names none
])
def test_listen_fds_returns_the_inherited_sockets(passed_sockets, pid_mode, names, expected_names):
    passed = [passed_sockets["tcp"], passed_sockets["udp"]]
    proc, report = _activate(passed, pid_mode, names)
    try:
        assert report["names"] == expected_names
        assert report["fds"] == [3, 4]
        assert report["kinds"] == [[socket.AF_INET, socket.SOCK_STREAM], [socket.AF_INET, socket.SOCK_DGRAM]]
        assert report["inheritable"] == [False, False]
        assert report["env"] == [] and report["again"] == 0
        for sock, name in zip(passed, expected_names):
            _talk(sock, name)
    finally:
        _finish(proc)


def test_listen_fds_skips_what_is_not_a_socket(passed_sockets):
    proc, report = _activate([passed_sockets["pipe"], passed_sockets["tcp"]], "self", "fifo:http")
    try:
        assert (report["names"], report["fds"]) == (["http"], [4])
        _talk(passed_sockets["tcp"], "http")
    finally:
        _finish(proc)


def test_listen_fds_for_another_process_are_left_alone(passed_sockets):
    proc, report = _activate([passed_sockets["tcp"]], "other", "http")
    _finish(proc)
    assert report == {"names": [], "fds": [], "kinds": [], "inheritable": [], "env": [], "again": 0}


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_FDS": "1"},                                   # no LISTEN_PID: not ours
    {"LISTEN_FDS": "1", "LISTEN_PID": "other"},
    {"LISTEN_FDS": "x", "LISTEN_PID": "self"},
    {"LISTEN_FDS": "-1", "LISTEN_PID": "self"},
    {"LISTEN_FDS": "0", "LISTEN_PID": "self", "LISTEN_FDNAMES": ""},
])
def test_listen_fds_without_usable_variables(monkeypatch, env):
    pids = {"self": str(os.getpid()), "other": str(_unrelated_pid())}
    for name, value in env.items():
        monkeypatch.setenv(name, pids.get(value, value))
    assert systemd.listen_fds() == []
    assert not any(name in os.environ for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
