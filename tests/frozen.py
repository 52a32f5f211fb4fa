"""Helpers of the frozen-binary tests (test_binary, test_systemd_units): where the binary is,
a bare environment, a fake NOTIFY_SOCKET that records who sent each message, `kvcm serve`
run from the binary, and vLLM's captures published into it with the scores they imply."""

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import msgpack
import pytest
import zmq

from aio import free_port, poll_until
from captures import IndexModel, event_fields
from conftest import ROOT, SHARED
from kvcm._core import BlockHasher
from procfs import children

ONEFILE = ROOT / "dist" / "kvcm"
ONEDIR = ROOT / "dist" / "kvcm-onedir" / "kvcm"
IN_CI = os.environ.get("CI") == "true"
QWEN = "Qwen/Qwen3-0.6B"
TOKENIZER = SHARED / "fixtures" / "tokenizers" / "qwen2.5-instruct"
TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}
WAIT = 30.0


def until(condition, what, deadline=WAIT):
    """poll_until with the frozen binary's longer deadline (onefile unpacks itself first)."""
    return poll_until(condition, what, deadline)


def prerequisite(present, message):
    """Skips the test when something it needs is missing; fails instead under CI=true, where
    `make test` must have made it (its prereq-* targets)."""
    if not present:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def built(path):
    prerequisite(path.is_file(), "%s is not built: `make prereq-binary` builds it, as root (make test does)"
                 % path.relative_to(ROOT))
    return path


def bare_env(tmp_path):
    """A bare environment: {"PATH", "HOME", "TMPDIR"} with fresh directories under tmp_path."""
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}


def leftovers(env):
    return [p for p in os.listdir(env["TMPDIR"]) if p.startswith("_MEI")]


def run(binary, *args, env, stdin=None, timeout=WAIT):
    return subprocess.run([str(binary), *args], env=env, input=stdin, capture_output=True,
                          timeout=timeout)


class Notify:
    """A fake NOTIFY_SOCKET that records each datagram with its sender's pid (SCM_CREDENTIALS)."""

    def __init__(self, directory="/tmp"):
        self.dir = tempfile.mkdtemp(prefix="kvcm-nfy-", dir=directory)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages = []      # (pid, text)

    def receive(self):
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return self.messages
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            self.messages.append((pid, data.decode()))

    def find(self, line):
        """(pid, message) of the first message holding `line`, or None."""
        for pid, text in self.receive():
            if line in text.split("\n"):
                return pid, text
        return None

    def count(self, line):
        return sum(1 for _, text in self.receive() if line in text.split("\n"))

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def check_template_workers(server, interpreter):
    """kvcm serve --trust-request-chat-template from a binary: two template workers, each the
    binary run again as one process (no bootloader, no unpacking of its own) under its
    address-space limit; a request template renders in one; a render the sandbox cannot
    interrupt is answered 422 and its worker killed and replaced."""
    def two_workers(previous=()):
        found = children(interpreter)
        return found if len(found) == 2 and found != list(previous) else None
    workers = until(two_workers, "two template workers")
    for pid in workers:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            assert f.read().split(b"\0")[1] == b"_template-worker"
        assert children(pid) == [], "a template worker runs as one process"
        with open("/proc/%d/limits" % pid) as f:
            limit = [line for line in f if line.startswith("Max address space")][0].split()[3]
        assert limit.isdigit(), "a template worker has no address-space limit: %s" % limit
    messages = [{"role": "user", "content": "hi"}]
    reply = server.ok("POST", "/v1/tokenize", {"model": QWEN, "messages": messages,
                                               "chat_template": "{{ messages[0].content }}!"})
    assert reply["prompt"] == "hi!"
    status, data = server.request("POST", "/v1/tokenize", {"model": QWEN, "messages": messages,
                                                           "chat_template": "{{ lipsum(10000000) }}"})
    assert status == 422 and b"--template-timeout" in data, data
    replaced = until(lambda: two_workers(workers), "a replacement template worker")
    (gone,) = set(workers) - set(replaced)
    until(lambda: not os.path.exists("/proc/%d/stat" % gone) or gone not in children(interpreter),
          "the killed worker to be gone")
    reply = server.ok("POST", "/v1/tokenize", {"model": QWEN, "messages": messages,
                                               "chat_template": "{{ messages[0].content }}?"})
    assert reply["prompt"] == "hi?"
    return replaced


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class Server:
    """The binary's `kvcm serve` in a bare environment, with a fake NOTIFY_SOCKET and the
    systemd watchdog variables set as systemd sets them: WATCHDOG_PID is the main process
    (the onefile bootloader), so the interpreter must accept its parent's pid.

    With `root` (a directory the prefix chroots into), the binary and tokenizer paths are
    paths inside it, and the notify socket is made there too."""

    def __init__(self, binary, env, *args, watchdog_usec=300000, prefix=(), notify_mode=None,
                 tokenizer=TOKENIZER, root=None):
        self.notify = Notify(os.path.join(root, "tmp") if root else "/tmp")
        if notify_mode is not None:      # for a service user other than ours
            os.chmod(self.notify.dir, 0o755)
            os.chmod(self.notify.path, notify_mode)
        self.http_port, self.zmq_port = free_port(), free_port()
        self.stderr_file = tempfile.TemporaryFile()
        notify_path = "/" + os.path.relpath(self.notify.path, root) if root else self.notify.path
        env = dict(env, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(watchdog_usec))
        self.args = ["serve", "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
                     "--zmq-bind", "tcp://127.0.0.1:%d" % self.zmq_port,
                     "--tokenizer", "%s=%s" % (QWEN, tokenizer), *args]
        # `exec` keeps the pid: WATCHDOG_PID is the pid of the binary's main process.
        self.proc = subprocess.Popen(["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"',
                                      *map(str, prefix), str(binary), *self.args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr_file)

    def stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")

    def wait_for(self, line):
        def found():
            if self.proc.poll() is not None:
                raise AssertionError("kvcm exited (%s) before %s; stderr:\n%s" % (self.proc.returncode, line,
                                                                                   self.stderr()))
            return self.notify.find(line)
        return until(found, line)

    def request(self, method, path, body=None):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=WAIT)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def ok(self, method, path, body=None):
        status, data = self.request(method, path, body)
        assert status == 200, (path, status, data[:500])
        return json.loads(data)

    def close(self):
        if self.proc.poll() is None:
            # SIGTERM: the onefile bootloader passes it on to kvcm; a SIGKILL would leave
            # that child running
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr_file.close()
        self.notify.close()


def publish(server, captures):
    """Sends every capture's frames as they are, through a PUB socket connected to kvcm's
    bound SUB, after probing until kvcm receives (a PUB drops what it sends before the
    subscription arrives); waits until each stream applied its last batch."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 1000)
    pub.connect("tcp://127.0.0.1:%d" % server.zmq_port)
    try:
        probe_rank = 4242
        topic = captures[0].topic.encode()

        def connected():
            pub.send_multipart([topic, bytes(8), msgpack.packb([time.time(), [], probe_rank])])
            return any(s["dp_rank"] == probe_rank for s in server.ok("GET", "/v1/pods")["pods"])
        until(connected, "kvcm to receive from the PUB socket")
        for capture in captures:
            for message in capture.messages:
                pub.send_multipart([message.topic, message.seq, message.payload])
            last = int.from_bytes(capture.messages[-1].seq, "big")

            def applied():
                return any((s["pod"], s["model"], s["dp_rank"]) == (capture.pod, capture.model, capture.dp_rank)
                           and s["last_seq"] == last and s["state"] not in ("replaying", "applying")
                           for s in server.ok("GET", "/v1/pods")["pods"])
            until(applied, "kvcm to apply %s up to seq %d" % (capture.dir, last))
    finally:
        pub.close()
        ctx.term()


def expected_scores(captures):
    """[(model, token ids, {pod: score})] for every prompt a BlockStored of a base model
    carried, from what the events say each pod holds at the end (captures.IndexModel)."""
    config = captures[0].hash_config
    seed, block_size = config["seed"], config["block_size"]
    model = IndexModel(lambda lora, tokens: BlockHasher("kvcm", seed, block_size, namespace=lora).keys(tokens))
    prompts = []
    for capture in captures:
        for message in capture.messages:
            events = message.decoded[1]
            model.apply(capture.pod, capture.model, events)
            for event in events:
                tag, fields = event_fields(event)
                if (tag == "BlockStored" and fields.get("token_ids") and fields.get("parent_block_hash") is None
                        and not fields.get("lora_name")):
                    prompts.append((capture.model, list(fields["token_ids"])))
    hasher = BlockHasher(config["algo"], seed, block_size)
    out = []
    for name, tokens in prompts:
        scores, running = {}, None
        for key in hasher.keys(tokens):
            held = {}
            for pod, tier in model.entries.get((name, key), ()):
                held.setdefault(pod, set()).add(tier)
            running = set(held) if running is None else running & set(held)
            for pod in running:
                scores[pod] = scores.get(pod, 0.0) + max(TIER_WEIGHTS.get(t, 1.0) for t in held[pod])
        out.append((name, tokens, scores))
    return out
