"""Chat templates from requests, rendered in worker processes that can be killed.

A template a request brings is code a stranger wrote. The metered sandbox
(kvcm/template_sandbox.py) stops loops and oversized operators, but a single expensive call
into C cannot be interrupted from inside the thread running it, and a Python thread cannot
be killed. So request templates render in a small pool of worker processes:

- each worker is this program started again (`kvcm _template-worker`, or
  `python -m kvcm _template-worker`), with an address-space limit (RLIMIT_AS) so that an
  allocation past it fails inside the worker instead of growing kvcm;
- a worker renders one job at a time, metered by the same limits as any render;
- a worker that has not answered `timeout + GRACE` seconds after it got its job, or that
  died, is killed (SIGKILL) and replaced, and the request is answered with
  TemplateLimitExceeded: the runaway really stops;
- workers die with kvcm (PR_SET_PDEATHSIG) and exit when their input closes.

Jobs and replies are JSON (never pickle: a reply comes from a process running a stranger's
template) in frames of a 4-byte big-endian length and the document.
"""

import asyncio
import ctypes
import logging
import os
import resource
import signal
import struct
import sys

import orjson

from kvcm import chat
from kvcm.ratelog import RateLimitedLog

__all__ = ["WORKER_COMMAND", "TemplatePool", "TemplatesUnavailable", "worker_main"]

log = logging.getLogger("kvcm.templates")

WORKER_COMMAND = "_template-worker"   # the hidden `kvcm` sub-command a worker runs (kvcm/cli.py)

GRACE = 0.5            # seconds a worker gets beyond the template timeout before it is killed
START_TIMEOUT = 60.0   # a new worker must be ready within this (a frozen binary starts slower)
ACQUIRE_TIMEOUT = 30.0 # a request waits at most this long for a free worker (then 503)
RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 5.0)   # between failed starts of a worker
_FRAME = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class TemplatesUnavailable(Exception):
    """No template worker is available (they keep failing to start, or all stay busy)."""


class _WorkerLost(Exception):
    """The worker died, broke the protocol or did not answer in time."""


def worker_command():
    """The command line that starts a worker: the frozen binary runs itself again."""
    if getattr(sys, "frozen", False):
        return [sys.executable, WORKER_COMMAND]
    return [sys.executable, "-m", "kvcm", WORKER_COMMAND]


def memory_limit_for(max_output):
    """The address-space limit of a worker that may render `max_output` characters: room
    for the interpreter and its libraries, the job and its parsed form, and the rendered
    text in pieces, joined and serialised (up to 4 bytes a character each)."""
    return 256 * 2**20 + 16 * max_output


# --------------------------------------------------------------------------------------------
# The worker


def _read_exactly(fd, n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _send(fd, document):
    body = orjson.dumps(document)
    _write_all(fd, _FRAME.pack(len(body)) + body)


def _limit_memory(limit):
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return True
    except (OSError, ValueError):
        return False


def _die_with_parent():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # the closed pipe still ends an idle worker


def _render(job):
    limits = chat.Limits(job["timeout"], job["max_output"])
    try:
        text = chat.render_chat(
            job["source"], job["messages"], add_generation_prompt=job["add_generation_prompt"],
            tools=job["tools"], documents=job["documents"],
            continue_final_message=job["continue_final_message"],
            special_tokens=job["special_tokens"], chat_template_kwargs=job["chat_template_kwargs"],
            limits=limits)
    except chat.TemplateLimitExceeded as exc:
        return {"error": exc.message, "limit": exc.limit}
    except chat.TemplateError as exc:
        return {"error": exc.message, "raised": exc.raised_by_template}
    except MemoryError:
        raise
    except Exception as exc:      # a job kvcm did not shape right: answer it, keep serving
        return {"error": "chat template rendering failed: %s: %s" % (type(exc).__name__, exc)}
    return {"text": text}


def worker_main(argv):
    """`kvcm _template-worker MEMORY_LIMIT`: renders jobs from stdin until it closes."""
    _die_with_parent()
    limited = _limit_memory(int(argv[0])) if argv else False
    # Frames go to the original stdout; anything else printed goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _send(out, {"ready": True, "pid": os.getpid(), "memory_limited": limited})
    while True:
        head = _read_exactly(0, _FRAME.size)
        if head is None:
            return 0
        body = _read_exactly(0, _FRAME.unpack(head)[0])
        if body is None:
            return 0
        try:
            reply = _render(orjson.loads(body))
        except MemoryError:
            reply = {"error": "chat template rendering ran out of memory", "limit": "memory"}
        _send(out, reply)
        if reply.get("limit") == "memory":
            return 1    # the heap is in an unknown state: kvcm starts a fresh worker


# --------------------------------------------------------------------------------------------
# The pool


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, command, memory_limit):
        proc = await asyncio.create_subprocess_exec(
            *command, str(memory_limit), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=None)
        worker = cls(proc)
        try:
            hello = await asyncio.wait_for(worker._receive(4096), START_TIMEOUT)
        except BaseException:
            worker.kill()
            raise
        if not (isinstance(hello, dict) and hello.get("ready")):
            worker.kill()
            raise _WorkerLost("the template worker did not start")
        worker.memory_limited = bool(hello.get("memory_limited"))
        return worker

    async def _receive(self, max_size):
        try:
            head = await self.proc.stdout.readexactly(_FRAME.size)
            size = _FRAME.unpack(head)[0]
            if size > max_size:
                raise _WorkerLost("the template worker sent a reply of %d bytes" % size)
            document = orjson.loads(await self.proc.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, orjson.JSONDecodeError, ConnectionError) as exc:
            raise _WorkerLost("the template worker stopped answering (%s)" % type(exc).__name__) from None
        if not isinstance(document, dict):
            raise _WorkerLost("the template worker sent %s, not an object" % type(document).__name__)
        return document

    async def call(self, frame, timeout, max_reply):
        try:
            self.proc.stdin.write(frame)
            await self.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise _WorkerLost("the template worker is gone (%s)" % type(exc).__name__) from None
        try:
            return await asyncio.wait_for(self._receive(max_reply), timeout)
        except asyncio.TimeoutError:
            raise _WorkerLost("timeout") from None

    def kill(self):
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        asyncio.ensure_future(self.proc.wait())


class TemplatePool:
    """`size` template workers; render() runs one job on a free one.

    `limits` (chat.Limits) bound every render. Counters: `renders`, `killed` (workers
    killed for running past their time or dying), `starts` and `start_failures`.
    """

    def __init__(self, size, limits, *, command=None, memory_limit=None):
        if size < 1:
            raise ValueError("a template pool needs at least one worker")
        self.size = size
        self.limits = limits
        self.command = worker_command() if command is None else list(command)
        self.memory_limit = memory_limit_for(limits.max_output) if memory_limit is None else memory_limit
        self.max_reply = 6 * limits.max_output + 4096    # JSON escapes a control character in 6 bytes
        self.counters = {"renders": 0, "killed": 0, "starts": 0, "start_failures": 0}
        self._idle = None
        self._workers = set()
        self._starting = set()
        self._closed = False
        self._rate_log = RateLimitedLog(log)

    @property
    def pids(self):
        """The process ids of the live workers."""
        return sorted(w.pid for w in self._workers)

    async def start(self):
        """Starts the workers and waits until each is ready (raises if none can start)."""
        self._idle = asyncio.Queue()
        results = await asyncio.gather(*(self._start_one() for _ in range(self.size)), return_exceptions=True)
        if not self._workers:
            error = next(r for r in results if isinstance(r, BaseException))
            raise TemplatesUnavailable("cannot start template workers: %s" % error)
        for result in results:
            if isinstance(result, BaseException):
                self._replace()

    async def _start_one(self):
        try:
            worker = await _Worker.start(self.command, self.memory_limit)
        except (OSError, asyncio.TimeoutError, _WorkerLost) as exc:
            self.counters["start_failures"] += 1
            self._rate_log.error("start", "cannot start a template worker (%s): %s", " ".join(self.command), exc)
            raise
        self.counters["starts"] += 1
        if not worker.memory_limited:
            self._rate_log.warning("rlimit", "template workers run without a memory limit: "
                                   "setrlimit(RLIMIT_AS) is not permitted here")
        if self._closed:
            worker.kill()
            return
        self._workers.add(worker)
        self._idle.put_nowait(worker)

    def _replace(self):
        """Starts a worker in place of a lost one, retrying with growing delays."""
        if self._closed:
            return
        task = asyncio.ensure_future(self._restart())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _restart(self):
        for delay in RESTART_DELAYS + (RESTART_DELAYS[-1],) * 1000:
            if self._closed:
                return
            await asyncio.sleep(delay)
            try:
                await self._start_one()
                return
            except (OSError, asyncio.TimeoutError, _WorkerLost):
                continue

    def _lose(self, worker):
        self._workers.discard(worker)
        worker.kill()
        self.counters["killed"] += 1
        self._replace()

    async def render(self, source, messages, *, special_tokens, add_generation_prompt=True,
                     tools=None, documents=None, continue_final_message=False,
                     chat_template_kwargs=None):
        """chat.render_chat in a worker: the rendered text, or chat.TemplateError
        (TemplateLimitExceeded for time, output or memory), or TemplatesUnavailable."""
        frame = orjson.dumps({
            "source": source, "messages": messages, "add_generation_prompt": add_generation_prompt,
            "tools": tools, "documents": documents, "continue_final_message": continue_final_message,
            "special_tokens": special_tokens, "chat_template_kwargs": chat_template_kwargs,
            "timeout": self.limits.timeout, "max_output": self.limits.max_output})
        frame = _FRAME.pack(len(frame)) + frame
        try:
            worker = await asyncio.wait_for(self._idle.get(), ACQUIRE_TIMEOUT)
        except asyncio.TimeoutError:
            raise TemplatesUnavailable("no template worker became free within %g s" % ACQUIRE_TIMEOUT) from None
        self.counters["renders"] += 1
        try:
            reply = await worker.call(frame, self.limits.timeout + GRACE, self.max_reply)
        except _WorkerLost as exc:
            self._lose(worker)
            self._rate_log.warning("killed", "template worker %d killed: %s", worker.pid,
                                   "its render ran past the time limit" if str(exc) == "timeout" else exc)
            if str(exc) == "timeout":
                raise chat.TemplateLimitExceeded(
                    "chat template rendering took longer than %g s and was stopped" % self.limits.timeout,
                    "time") from None
            raise chat.TemplateLimitExceeded("chat template rendering failed in its worker process (it "
                                             "died or ran out of its memory)", "memory") from None
        except BaseException:
            self._lose(worker)    # cancelled while the worker still owes a reply
            raise
        if reply.get("limit") == "memory":
            self._lose(worker)    # the worker exits after a MemoryError
        else:
            self._idle.put_nowait(worker)
        if "text" in reply and isinstance(reply["text"], str):
            return reply["text"]
        message = str(reply.get("error", "chat template rendering failed"))
        if reply.get("limit"):
            limit = reply["limit"] if reply["limit"] in ("time", "output", "memory") else "output"
            raise chat.TemplateLimitExceeded(message, limit)
        raise chat.TemplateError(message, raised_by_template=bool(reply.get("raised")))

    async def close(self):
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        workers = list(self._workers)
        self._workers.clear()
        for worker in workers:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()     # an idle worker exits at the end of its input
            worker.kill()
        await asyncio.gather(*(w.proc.wait() for w in workers), return_exceptions=True)
