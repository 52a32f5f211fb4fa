"""`kvcm bench index --placement split`: the CPUs of a score-while-ingesting measurement.

On a machine where bench's stand-in engines, its client and the target share a few CPUs,
scoring latency under ingest mostly measures who waits for a CPU. `split` lays the CPUs
out as a deployment with a core for scoring would: the first half for the scoring side (the
client, and kvcm's event loop through `--http-cpus`), the rest for the ingest side (the
engines' publishing threads while they publish in that phase, and kvcm's ingest thread
through `--ingest-cpus`). A target bench cannot place (Dynamo's indexer has no such
setting) runs where the system puts it; the client and engines are placed alike for every
target.
"""

import contextlib
import os

from kvcm.placement import available_cpus, format_cpus

PLACEMENTS = ("none", "split")


class PlacementError(ValueError):
    """The placement cannot be had on this machine."""


class Placement:
    def __init__(self, http, ingest):
        self.http, self.ingest = tuple(http), tuple(ingest)

    @classmethod
    def named(cls, name):
        """The placement `--placement NAME` asks for: None for 'none'."""
        if name == "none":
            return None
        cpus = sorted(available_cpus() or ())
        if len(cpus) < 2:
            raise PlacementError("--placement split needs at least 2 CPUs (Linux), this process may use %s"
                                 % (format_cpus(cpus) or "an unknown set"))
        half = len(cpus) // 2
        return cls(cpus[:half], cpus[half:])

    def serve_args(self):
        """What `kvcm serve` is told."""
        return ["--http-cpus", format_cpus(self.http), "--ingest-cpus", format_cpus(self.ingest)]

    def to_json(self):
        return {"scoring_cpus": format_cpus(self.http), "ingest_cpus": format_cpus(self.ingest)}

    @contextlib.contextmanager
    def engines_side(self):
        """Every thread of this process (the engines' pacer, libzmq's I/O thread) on the
        ingest CPUs for the block; each thread's own CPUs again after it."""
        saved = {}
        try:
            for tid in _threads():
                try:
                    saved[tid] = os.sched_getaffinity(tid)
                    os.sched_setaffinity(tid, self.ingest)
                except OSError:   # a thread that just ended
                    saved.pop(tid, None)
            yield
        finally:
            for tid, cpus in saved.items():
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:
                    pass


def _threads():
    return [int(tid) for tid in os.listdir("/proc/self/task")]
