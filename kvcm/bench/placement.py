"""`kvcm bench index --placement`: which CPUs the client, the engines and the target use.

- `none`: where the system puts them.
- `split` (scoring while ingesting): on a machine where bench's stand-in engines, its client
  and the target share a few CPUs, scoring latency under ingest mostly measures who waits
  for a CPU. `split` lays the CPUs out as a deployment with a core for scoring would: the
  first half for the scoring side (the client, and kvcm's event loop through `--http-cpus`),
  the rest for the ingest side (the engines' publishing threads while they publish in that
  phase, and kvcm's ingest thread through `--ingest-cpus`). A target bench cannot place
  (Dynamo's indexer has no such setting) runs where the system puts it.
- `colocate` (the floor and the queries): the client and every thread of the target's
  process on one CPU while they run. On a VM whose idle vCPUs halt at once, a client
  sleeping on one CPU for an answer made on the other is woken through the hypervisor for
  every answer; on one CPU the answer hands the CPU straight back to it. That is a router
  pinned beside its index on one host. Every target is placed alike.
"""

import contextlib
import os

from kvcm.placement import available_cpus, format_cpus

PLACEMENTS = ("none", "split", "colocate")


class PlacementError(ValueError):
    """The placement cannot be had on this machine."""


class Placement:
    """`none`: nothing is placed."""
    name = "none"
    swi_client_cpus = None          # where the score-while-ingesting client runs

    @staticmethod
    def named(name):
        """The placement `--placement NAME` asks for."""
        if name == "none":
            return Placement()
        cpus = sorted(available_cpus() or ())
        if name == "colocate":
            if not cpus:
                raise PlacementError("--placement colocate needs CPU affinity (Linux)")
            return Colocate(cpus[-1])
        if len(cpus) < 2:
            raise PlacementError("--placement split needs at least 2 CPUs (Linux), this process may use %s"
                                 % (format_cpus(cpus) or "an unknown set"))
        half = len(cpus) // 2
        return Split(cpus[:half], cpus[half:])

    def serve_args(self):
        """What `kvcm serve` is told."""
        return []

    def engines_side(self):
        """The block in which the engines publish while scoring is measured."""
        return contextlib.nullcontext()

    def querying(self, pids):
        """The block in which the floor and the queries are measured; `pids`: the target's
        processes."""
        return contextlib.nullcontext()

    def to_json(self):
        return None


class Split(Placement):
    name = "split"

    def __init__(self, http, ingest):
        self.http, self.ingest = tuple(http), tuple(ingest)
        self.swi_client_cpus = self.http

    def serve_args(self):
        return ["--http-cpus", format_cpus(self.http), "--ingest-cpus", format_cpus(self.ingest)]

    def engines_side(self):
        """Every thread of this process (the engines' pacer, libzmq's I/O thread) on the
        ingest CPUs for the block; each thread's own CPUs again after it."""
        return _pinned([os.getpid()], self.ingest)

    def to_json(self):
        return {"name": self.name, "scoring_cpus": format_cpus(self.http), "ingest_cpus": format_cpus(self.ingest)}


class Colocate(Placement):
    name = "colocate"

    def __init__(self, cpu):
        self.cpu = cpu

    def querying(self, pids):
        """This thread (the client) and every thread of `pids` on the one CPU for the block."""
        if not pids:
            raise PlacementError("--placement colocate places the target's process: it needs a target bench starts")
        return _colocated(pids, (self.cpu,))

    def to_json(self):
        return {"name": self.name, "cpu": format_cpus([self.cpu])}


@contextlib.contextmanager
def _colocated(pids, cpus):
    saved = os.sched_getaffinity(0)
    with _pinned(pids, cpus):
        os.sched_setaffinity(0, cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)


@contextlib.contextmanager
def _pinned(pids, cpus):
    """Every thread of `pids` on `cpus` for the block. After it, each thread gets its own
    CPUs again; a thread started inside the block, its process's first thread's."""
    saved = {}
    for pid in pids:
        for tid in _threads(pid):
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except OSError:   # a thread that just ended
                saved.pop(tid, None)
    try:
        yield
    finally:
        for pid in pids:
            home = saved.get(pid)
            for tid in _threads(pid):
                mask = saved.get(tid, home)
                if mask is None:
                    continue
                try:
                    os.sched_setaffinity(tid, mask)
                except OSError:
                    pass


def _threads(pid):
    try:
        return [int(tid) for tid in os.listdir("/proc/%d/task" % pid)]
    except OSError:   # the process ended
        return []
