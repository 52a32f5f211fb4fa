"""The ZMQ ingest on a thread of its own (DESIGN.md §4).

`kvcm.ingest.Ingest` is written for one asyncio loop. IngestThread runs it, unchanged, on a
second loop in a dedicated thread, so that receiving, decoding and applying batches use the
second core while the main loop serves HTTP. Sequence tracking, replays, restart detection
and every counter are Ingest's own. The thread holds the GIL only for Python work (stream
logic, the rare messages and events the core hands to Python): waiting for messages, and
receiving, checking, decoding and applying the common batches (Ingest's native lane,
kvcm/_ingest_lane.pxi) release it, and the index lock (kvcm/_index.pxi) keeps
lookups and applies apart an event at a time. What a lookup sees: every
event applied whole or not at all, and a stream's events in order, so a chain stored across
events is seen as a prefix of itself, never with a hole.

Calls from the main loop (engines added or removed over the admin API, pods forgotten, the
counters and streams /metrics and the status page read) are carried to the ingest loop and
waited for: one ingest loop turn at most, which Ingest bounds (batch_budget, turn_seconds,
slice_bytes).

An exception in the ingest's callbacks is counted and logged by Ingest and the loop goes
on; should the thread itself end (an exception no callback could catch), it is logged and
`on_fatal` is called on the main loop, so that `kvcm serve` exits non-zero rather than
serving an index nobody feeds.
"""

import asyncio
import concurrent.futures
import logging
import threading

from kvcm._core import ilock_never_lend_from_this_thread
from kvcm.ingest import Ingest
from kvcm.placement import name_this_thread, pin_this_thread, set_scheduler_slice

log = logging.getLogger("kvcm.ingest")

CALL_TIMEOUT = 10.0   # a call the ingest loop has not run by then: the thread is stuck or gone


class IngestUnavailable(RuntimeError):
    """The ingest thread is not running (it failed, or was stopped)."""


class IngestThread:
    """Ingest's interface, with the Ingest running on a thread of its own."""

    def __init__(self, sink, cpus=None, **options):
        self._ingest = Ingest(sink, **options)
        self._cpus = cpus        # where the thread runs (--ingest-cpus); None: anywhere
        self._loop = None
        self._thread = None
        self._main = None
        self.on_fatal = None     # on_fatal(exc), called on the main loop if the thread ends
        self.failure = None      # what ended it

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self):
        """Starts the thread and Ingest.start() on its loop; raises what that raised."""
        if self._thread is not None:
            raise RuntimeError("ingest already started")
        self._main = asyncio.get_running_loop()
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="kvcm-ingest", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            await self._main.run_in_executor(None, self._thread.join)
            self._thread = None
            raise

    def _run(self, started):
        # before the loop and libzmq's I/O thread exist, so that they inherit the CPUs
        name_this_thread("kvcm-ingest")
        # a throughput thread: the kernel's default slice, not the scoring loop's it inherits
        set_scheduler_slice(0)
        ilock_never_lend_from_this_thread()
        if self._cpus is not None:
            try:
                pin_this_thread(self._cpus, "--ingest-cpus")
            except ValueError as exc:
                started.set_exception(exc)
                return
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._ingest.start())
        except BaseException as exc:
            loop.close()
            self._loop = None
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        except BaseException as exc:
            self._died(exc)
        finally:
            try:
                loop.run_until_complete(self._ingest.stop())
            finally:
                self._loop = None
                loop.close()

    def _died(self, exc):
        self.failure = exc
        log.critical("ingest: the ingest thread stopped: %r; kvcm no longer receives KV events",
                     exc, exc_info=exc)
        if self.on_fatal is not None and not self._main.is_closed():
            self._main.call_soon_threadsafe(self.on_fatal, exc)

    async def stop(self):
        """Stops the loop after the callback in progress (a batch slice being applied ends
        first), then Ingest.stop() closes its sockets and cancels its tasks there.
        Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:   # closed meanwhile: the thread ended
                pass
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    # -- calls into the ingest loop --------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        loop = self._loop
        if loop is None or self._thread is None:
            if self._thread is None and self.failure is None:
                return fn(*args, **kwargs)   # not started (or stopped): nothing runs concurrently
            raise IngestUnavailable("the ingest thread is not running")
        if threading.get_ident() == self._thread.ident:
            return fn(*args, **kwargs)
        done = concurrent.futures.Future()

        def run():
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            raise IngestUnavailable("the ingest thread is not running") from None
        try:
            return done.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise IngestUnavailable("the ingest thread did not answer within %gs" % CALL_TIMEOUT) from None

    @property
    def bound(self):
        return list(self._ingest.bound)

    @property
    def engines(self):
        return self._call(lambda: self._ingest.engines)

    def add_engine(self, name, endpoint, replay=None, model=None):
        return self._call(self._ingest.add_engine, name, endpoint, replay=replay, model=model)

    def remove_engine(self, name):
        return self._call(self._ingest.remove_engine, name)

    def forget_pod(self, pod):
        return self._call(self._ingest.forget_pod, pod)

    def clear_pod(self, pod, clear):
        return self._call(self._ingest.clear_pod, pod, clear)

    def cut(self, start):
        return self._call(self._ingest.cut, start)

    def positions(self):
        return self._call(self._ingest.positions)

    def restore_streams(self, positions):
        return self._call(self._ingest.restore_streams, positions)

    def resync_namespace(self, namespace):
        return self._call(self._ingest.resync_namespace, namespace)

    def streams(self):
        return self._call(self._ingest.streams)

    def tables(self):
        return self._call(self._ingest.tables)

    @property
    def counters(self):
        """A copy, taken on the ingest loop."""
        return self._call(lambda: {name: dict(value) if isinstance(value, dict) else value
                                   for name, value in self._ingest.counters.items()})


def _new_loop():
    """uvloop when it is installed (kvcm serve runs on it), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
