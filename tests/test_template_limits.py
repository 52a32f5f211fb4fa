"""Chat templates written to hurt, against `kvcm serve` over TCP: a request's own template is
refused unless the operator trusts them; trusted or not, every render runs off the event
loop within a time limit and an output cap, a runaway really stops (a worker process is
killed and replaced), and meanwhile /health, /metrics and ZMQ ingest keep being served.

That the loop kept answering is shown by ordering, never by timing: a /metrics scrape that
reports the render still in flight was itself answered during the render, and so was every
request made between two such scrapes."""

import concurrent.futures
import os
import shutil
import signal
import sys

import pytest

from aio import on_uvloop
from kvcm.chat import Limits
from kvcm.template_pool import TemplatePool, TemplatesUnavailable
from procfs import children, status_mib
from serving import QWEN, TOKENIZERS, WAIT, Engine, Serve, stored, tokens, until

TIMEOUT = 3                      # --template-timeout of the servers below
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_ENDPOINTS = ["/v1/score", "/v1/tokenize", "/score_chat_completions"]
HUGE = "{{ 'hello ' * 100000000 }}"                      # 600 MB if rendered
RUNAWAY = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
           "{% endfor %}{% endfor %}{% endfor %}")       # 10^15 empty iterations
UNMETERED = "{{ lipsum(10000000) }}"     # one call into code the sandbox cannot interrupt
MEGABYTE = "{{ messages[0].content }}" * 40000          # compiles for seconds
CUBIC = ("{% for a in messages %}{% for b in messages %}{% for c in messages %}{% endfor %}{% endfor %}"
         "{% endfor %}{{ messages[0].content }}")        # the model's own template, fed hostile data
EVIL = "evil/cubic-template"


def chat(model=QWEN, template=None, messages=MESSAGES):
    body = {"model": model, "messages": messages}
    if template is not None:
        body["chat_template"] = template
    return body


@pytest.fixture(scope="module")
def evil_model(tmp_path_factory, shared):
    """A copy of the Qwen tokenizer whose own chat template is cubic in the messages."""
    d = tmp_path_factory.mktemp("evil") / "model"
    shutil.copytree(TOKENIZERS / "qwen2.5-instruct", d)
    (d / "chat_template.jinja").write_text(CUBIC)
    return d


def start(*args):
    server = Serve.standard("--template-timeout", str(TIMEOUT), *args)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def trusting(shared, evil_model):
    server = start("--trust-request-chat-template", "--tokenizer", "%s=%s" % (EVIL, evil_model))
    yield server
    server.close()


@pytest.fixture(scope="module")
def cautious(shared, evil_model):
    server = start("--tokenizer", "%s=%s" % (EVIL, evil_model))
    yield server
    server.close()


@pytest.fixture
def background():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        yield pool


def metric(server, name, **labels):
    return server.client.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def in_flight(server):
    return metric(server, "kvcm_tokenize_inflight_requests")


def workers(server):
    """The server's template workers: its child processes."""
    return children(server.proc.pid)


def while_rendering(server, pending, *actions):
    """Runs each action while `pending` (a render) is still in flight, which scrapes of
    /metrics before and after prove; returns the actions' results."""
    until(lambda: in_flight(server) >= 1, "the render to be in flight")
    results = [action() for action in actions]
    assert in_flight(server) >= 1 and not pending.done(), "the render ended before the checks did"
    return results


# -- refused unless trusted ------------------------------------------------------------------------

@pytest.mark.parametrize("path", CHAT_ENDPOINTS)
def test_a_request_template_is_refused_unless_the_operator_trusts_them(cautious, path):
    reply = cautious.client.post(path, chat(template="{{ messages[0].content }}"))
    assert reply.status == 400, reply
    assert "--trust-request-chat-template" in reply.error and "chat_template" in reply.error
    assert cautious.client.post(path, chat(template=HUGE)).status == 400
    assert cautious.client.post(path, chat()).status == 200          # the model's own template


# -- output cap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CHAT_ENDPOINTS)
def test_a_template_rendering_gigabytes_is_422_and_kvcm_stays_small(trusting, path):
    reply = trusting.client.post(path, chat(template=HUGE))
    assert reply.status == 422, reply
    assert "600000000 characters" in reply.error and "--template-max-output" in reply.error
    assert trusting.client.ok("GET", "/health") == {"status": "ok"}
    assert status_mib(trusting.proc.pid, "VmHWM") < 512


def test_the_output_cap_is_the_option_when_set(shared):
    server = start("--trust-request-chat-template", "--template-max-output", "1000")
    try:
        assert server.client.post("/v1/tokenize", chat(template="{{ 'x' * 1000 }}")).status == 200
        for template in ("{{ 'x' * 1001 }}", "{% for i in range(11) %}{{ 'y' * 100 }}{% endfor %}"):
            reply = server.client.post("/v1/tokenize", chat(template=template))
            assert reply.status == 422 and "over the limit of 1000" in reply.error, reply
    finally:
        server.close()


# -- time limit, off the loop ----------------------------------------------------------------------

def test_a_runaway_template_leaves_health_metrics_and_ingest_answering(trusting, background):
    pending = background.submit(trusting.client.post, "/v1/tokenize", chat(template=RUNAWAY))
    model = "hostile-template-ingest"
    ids = tokens(31, 2)
    with Engine(trusting.client, trusting.zmq_endpoint, "pod-during-render", model) as engine:
        engine.connect()
        health, _ = while_rendering(trusting, pending, lambda: trusting.client.ok("GET", "/health"),
                                    lambda: engine.send(stored(ids)))
    assert health == {"status": "ok"}
    assert trusting.client.score(model, token_ids=ids)["scores"] == {"pod-during-render": 2.0}
    reply = pending.result(WAIT)
    assert reply.status == 422, reply
    assert "longer than %d s" % TIMEOUT in reply.error and "--template-timeout" in reply.error
    assert metric(trusting, "kvcm_template_renders_stopped_total", limit="time") >= 1


def test_compiling_a_megabyte_template_does_not_stall_kvcm(trusting, background):
    pending = background.submit(trusting.client.post, "/v1/tokenize", chat(template=MEGABYTE))
    (health,) = while_rendering(trusting, pending, lambda: trusting.client.ok("GET", "/health"))
    assert health == {"status": "ok"}
    reply = pending.result(WAIT)
    assert reply.status == 422 and "--template-timeout" in reply.error, reply


def test_the_models_own_template_is_metered_too(trusting, cautious, background):
    crowd = [{"role": "user", "content": "m%d" % i} for i in range(3000)]
    for server in (trusting, cautious):
        pending = background.submit(server.client.post, "/v1/tokenize", chat(EVIL, messages=crowd))
        (health,) = while_rendering(server, pending, lambda: server.client.ok("GET", "/health"))
        assert health == {"status": "ok"}
        reply = pending.result(WAIT)
        assert reply.status == 422 and "--template-timeout" in reply.error, reply
        # the render stopped inside its thread: nothing is left in flight, and the model works
        assert in_flight(server) == 0
        assert server.client.tokenize(EVIL, messages=MESSAGES)["prompt"] == "hi"


def test_a_render_the_sandbox_cannot_interrupt_is_killed_with_its_worker(trusting):
    before = workers(trusting)
    assert len(before) == 2
    killed = metric(trusting, "kvcm_template_worker_killed_total")
    reply = trusting.client.post("/v1/tokenize", chat(template=UNMETERED))
    assert reply.status == 422 and "stopped" in reply.error, reply
    assert metric(trusting, "kvcm_template_worker_killed_total") == killed + 1

    def replaced():
        now = workers(trusting)
        return now if len(now) == 2 and now != before else None
    after = until(replaced, "a replacement worker")
    gone = set(before) - set(after)
    assert len(gone) == 1 and not os.path.exists("/proc/%d/stat" % gone.pop())
    for _ in range(3):
        assert trusting.client.tokenize(QWEN, messages=MESSAGES, chat_template="{{ messages[0].content }}!")[
            "prompt"] == "hi!"


def test_a_template_that_exhausts_its_workers_memory_is_422_and_the_worker_replaced(trusting):
    doubling = ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s | length }}")
    before = workers(trusting)
    reply = trusting.client.post("/v1/tokenize", chat(template=doubling))
    assert reply.status == 422 and "memory" in reply.error, reply
    until(lambda: len(workers(trusting)) == 2 and workers(trusting) != before, "a replacement worker")
    assert status_mib(trusting.proc.pid, "VmHWM") < 512          # the worker's memory, not kvcm's
    assert trusting.client.tokenize(QWEN, messages=MESSAGES, chat_template="{{ messages[0].content }}")[
        "prompt"] == "hi"


# -- statuses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, words", [
    ("{{ messages | no_such_filter }}", ["no_such_filter"]),
    ("{% if messages is no_such_test %}x{% endif %}", ["no_such_test"]),
    ("{% if x %}" * 3000 + "{% endif %}" * 3000, ["nest"]),
])
def test_unknown_filters_and_tests_and_deep_nesting_are_400(trusting, template, words):
    for path in CHAT_ENDPOINTS:
        reply = trusting.client.post(path, chat(template=template))
        assert reply.status == 400, reply
        for word in words:
            assert word in reply.error, reply


# -- shutdown ------------------------------------------------------------------------------------

def test_sigterm_ends_kvcm_and_its_workers_during_a_runaway_render(shared, background):
    server = Serve.standard("--trust-request-chat-template", "--template-timeout", "600")
    try:
        server.wait_ready()
        pids = workers(server)
        assert len(pids) == 2
        pending = background.submit(server.client.request, "POST", "/v1/tokenize", chat(template=RUNAWAY))
        until(lambda: in_flight(server) >= 1, "the render to be in flight")
        server.send(signal.SIGTERM)
        assert server.wait(3 * WAIT) == 0, server.stderr()
        for pid in pids:
            until(lambda: not os.path.exists("/proc/%d/stat" % pid), "worker %d to end" % pid)
        pending.exception(WAIT)          # answered 503 or cut off: either way, not left hanging
    finally:
        server.close()


# -- workers that cannot start ---------------------------------------------------------------------

@on_uvloop
async def test_a_pool_whose_workers_cannot_start_says_so():
    for command in ([sys.executable, "-c", "pass"], ["/nonexistent/kvcm"]):
        pool = TemplatePool(2, Limits(1.0, 1000), command=command)
        with pytest.raises(TemplatesUnavailable, match="cannot start template workers"):
            await pool.start()
        await pool.close()
        assert pool.counters["start_failures"] == 2
