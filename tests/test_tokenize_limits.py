"""Tokenizing work in flight is bounded, against `kvcm serve` over TCP: by requests and by
characters, beyond which a request is answered 503 with Retry-After at once; and the memory
large prompts took returns to the OS afterwards.

A render that runs until its time limit (a runaway request template) holds its admission
for that long, which lets the tests fill the bound deterministically: whatever is asked
while a scrape of /metrics shows it in flight meets a full bound."""

import concurrent.futures
import errno
import os
import random
import shutil

import pytest

from procfs import status_mib
from serving import QWEN, TOKENIZERS, WAIT, Serve, until

RUNAWAY = ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
           "{{ messages[0].content }}")


def start(*args):
    server = Serve.standard("--log-level", "warning", *args)
    server.wait_ready()
    return server


def metric(server, name):
    return server.client.metrics().get((name, ()), 0.0)


def prompt(chars, seed=1):
    rng = random.Random(seed)
    words = ["routing", "cache", "prefix", "pod", "block", "engine", "score", "token"]
    text = " ".join(rng.choice(words) for _ in range(chars // 5 + 1))
    return text[:chars]


def test_requests_and_characters_in_flight_are_bounded_with_503_and_retry_after(shared):
    server = start("--trust-request-chat-template", "--template-timeout", "10",
                   "--tokenize-max-inflight", "2", "--tokenize-max-inflight-chars", "1M")
    client = server.client
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            big = [{"role": "user", "content": prompt(600_000)}]
            first = pool.submit(client.post, "/v1/score", {"model": QWEN, "messages": big, "chat_template": RUNAWAY})
            until(lambda: metric(server, "kvcm_tokenize_inflight_chars") >= 600_000, "the first render in flight")

            too_large = client.post("/v1/score", {"model": QWEN, "prompt": prompt(600_000, seed=2)})
            assert too_large.status == 503 and too_large.headers["retry-after"] == "1", too_large
            assert "characters" in too_large.error
            assert client.post("/v1/score", {"model": QWEN, "prompt": "fits"}).status == 200

            small = [{"role": "user", "content": "second"}]
            second = pool.submit(client.post, "/v1/score", {"model": QWEN, "messages": small, "chat_template": RUNAWAY})
            until(lambda: metric(server, "kvcm_tokenize_inflight_requests") >= 2, "the second render in flight")
            too_many = client.post("/v1/score", {"model": QWEN, "prompt": "one more"})
            assert too_many.status == 503 and too_many.headers["retry-after"] == "1", too_many
            assert "requests in flight" in too_many.error
            assert metric(server, "kvcm_tokenize_inflight_requests") == 2, "the bound was not full"
            assert client.ok("GET", "/health") == {"status": "ok"}    # other endpoints are not limited

            assert first.result(WAIT).status == 422 and second.result(WAIT).status == 422
        assert metric(server, "kvcm_tokenize_refused_total") == 2
        assert client.post("/v1/score", {"model": QWEN, "prompt": prompt(600_000, seed=2)}).status == 200
    finally:
        server.close()


def test_memory_returns_near_its_baseline_after_large_prompts(shared):
    """4 concurrent 4 M-character prompts (8 M characters may be in flight): the tokenizer
    needs ~80 bytes a character while it encodes; afterwards kvcm gives it back."""
    server = start("--max-body", "16MiB", "--tokenize-max-inflight-chars", "8M")
    client = server.client
    try:
        client.post("/v1/score", {"model": QWEN, "prompt": prompt(100_000)})     # everything loaded
        baseline = status_mib(server.proc.pid, "VmRSS")
        text = prompt(4_000_000)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.post("/v1/score", {"model": QWEN, "prompt": text}), range(4)))
        statuses = sorted(r.status for r in replies)
        assert statuses[0] == 200 and set(statuses) <= {200, 503}, replies
        until(lambda: metric(server, "kvcm_heap_trims_total") >= 1, "a heap trim")
        until(lambda: status_mib(server.proc.pid, "VmRSS") < baseline + 200,
              "RSS to return near its baseline of %.0f MiB" % baseline, deadline=WAIT)
    finally:
        server.close()


class HeldTokenizer:
    """A model directory whose tokenizer cannot finish loading until release(): one of its
    chat templates is a FIFO, which the loader reads until the test writes into it."""

    def __init__(self, root):
        fixture = TOKENIZERS / "qwen2.5-instruct"
        self.dir = root / "held"
        (self.dir / "additional_chat_templates").mkdir(parents=True)
        shutil.copy(fixture / "tokenizer.json", self.dir)
        shutil.copy(fixture / "tokenizer_config.json", self.dir)
        self.fifo = self.dir / "additional_chat_templates" / "plain.jinja"
        os.mkfifo(self.fifo)
        self.writer = None

    def loading(self):
        """True once kvcm opened the FIFO to read it (before that, opening it for writing
        without blocking fails)."""
        if self.writer is None:
            try:
                self.writer = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
        return self.writer is not None

    def release(self):
        if self.writer is not None:
            os.set_blocking(self.writer, True)
            os.write(self.writer, b"{% for m in messages %}{{ m.content }}{% endfor %}")
            os.close(self.writer)
            self.writer = None


def test_a_tokenizer_found_in_the_directory_loads_off_the_event_loop(tmp_path):
    """A --tokenizers-dir model loads on its first request (reading and compiling it takes
    a quarter of a second for a real one); meanwhile kvcm keeps answering."""
    held = HeldTokenizer(tmp_path)
    server = start("--tokenizers-dir", str(tmp_path))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.client.post, "/v1/tokenize", {"model": "held", "prompt": "hello"})
            until(held.loading, "kvcm to start reading the tokenizer's files")
            assert server.client.ok("GET", "/health", timeout=WAIT) == {"status": "ok"}
            held.release()
            reply = first.result(WAIT)
            assert reply.status == 200 and reply.json["token_ids"], reply
    finally:
        held.release()    # a failed test still lets the load (and the server) finish
        server.close()


def test_configured_tokenizers_load_before_kvcm_is_ready(tmp_path):
    """Parsing a tokenizer holds the GIL, so one loading at a first request would stall the
    loop even from a worker thread: the --tokenizer models load before READY=1."""
    held = HeldTokenizer(tmp_path)
    server = Serve.standard("--log-level", "warning", "--tokenizer", "held=%s" % held.dir)
    try:
        until(held.loading, "kvcm to start reading the tokenizer's files")
        assert "READY=1" not in server.notify.lines()
        held.release()
        server.wait_ready()
        assert server.client.ok("POST", "/v1/tokenize", {"model": "held", "prompt": "hello"})["token_ids"]
    finally:
        held.release()
        server.close()
