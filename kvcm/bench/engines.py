"""The simulated engines of `kvcm bench index`: one vLLM-compatible ZMQ publisher each.

In the bind topology each engine's PUB connects to the index's SUB with its own topic; in
the register topology each binds a PUB on 127.0.0.1 and the index is told where
(`Api.register`). Engines send pre-encoded batches (kvcm.publisher), interleaved one batch
per engine in turn, as N engines publishing at once would.

`connect()` solves ZMQ's slow joiner (a PUB drops what it sends before the subscription
reaches it) through the query API alone: every engine publishes one shared "hello" block
until a query of it names that engine.
"""

import threading
import time

import zmq

from kvcm.bench.workload import Query
from kvcm.publisher import Publisher

CONNECT_TIMEOUT_S = 60.0


class Engines:
    def __init__(self, workload, target):
        self.workload, self.target = workload, target
        api = target.api
        self.pubs = []
        # one libzmq I/O thread for all engines: on the target's machine, a thread per
        # engine would take CPU from the target that real engines, on their own hosts, do not
        self._ctx = zmq.Context()
        try:
            for i in range(workload.spec.engines):
                endpoint = target.zmq if api.topology == "bind" else "tcp://127.0.0.1:*"
                self.pubs.append(Publisher(endpoint, topic=api.topic(i), hwm=1_000_000, context=self._ctx))
        except BaseException:
            self.close()
            raise

    def connect(self, conn):
        """Registers the engines if the API wants it, then waits until every engine's
        events reach the index. Returns {"seconds", "rounds"}: the warm-up, not timed."""
        api = self.target.api
        t0 = time.monotonic()
        api.register(conn, {i: p.endpoint for i, p in enumerate(self.pubs)})
        hello = self.workload.hello_payload()
        request = api.query(Query(self.workload.hello.tokens, {}, self.workload.hello.text))
        missing, rounds = set(range(len(self.pubs))), 0
        while missing:
            if time.monotonic() - t0 > CONNECT_TIMEOUT_S:
                raise TimeoutError("engines %s never reached %s" % (sorted(missing)[:8], self.target.name))
            for i in missing:
                self.pubs[i].publish_raw(hello)
            rounds += 1
            time.sleep(0.02)
            status, body = conn.call(request)
            if status == 200:
                missing -= set(api.matched(body))
        return {"seconds": time.monotonic() - t0, "rounds": rounds}

    def send(self, streams):
        """Sends every stream's batches, one per engine in turn; (first, last) send times (ns)."""
        pubs = self.pubs
        order = [(pubs[s.engine], s.payloads) for s in streams]
        longest = max(len(p) for _, p in order)
        t_first = time.perf_counter_ns()
        for k in range(longest):
            for pub, payloads in order:
                if k < len(payloads):
                    pub.publish_raw(payloads[k])
        return t_first, time.perf_counter_ns()

    def send_paced(self, streams, blocks_per_s):
        """Sends the streams' batches at about blocks_per_s (each batch charged its share of
        its stream's blocks, engines interleaved); returns (blocks sent, seconds)."""
        pubs = self.pubs
        plan = []
        for s in streams:
            per_batch = s.blocks / max(1, len(s.payloads))
            plan += [(k, pubs[s.engine], p, per_batch) for k, p in enumerate(s.payloads)]
        plan.sort(key=lambda x: x[0])
        t0 = time.perf_counter()
        due = 0.0
        for _, pub, payload, blocks in plan:
            wait = t0 + due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            pub.publish_raw(payload)
            due += blocks / blocks_per_s
        return sum(s.blocks for s in streams), time.perf_counter() - t0

    def publish(self, engine, payload):
        self.pubs[engine].publish_raw(payload)

    def close(self):
        for p in self.pubs:
            p.close()
        self.pubs = []
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)


class Background(threading.Thread):
    """Runs fn(*args) in a thread; result() re-raises what it raised."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self._fn, self._args, self._result, self._error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self._result = self._fn(*self._args)
        except BaseException as exc:   # handed to the caller of result()
            self._error = exc

    def result(self, timeout=None):
        self.join(timeout)
        if self._error is not None:
            raise self._error
        return self._result

