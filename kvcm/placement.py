"""Which CPUs kvcm's threads run on (`--http-cpus`, `--ingest-cpus`), their scheduler
slices, and their names.

On a host where kvcm shares CPUs with other work, or where the ingest runs flat out, the
scoring loop answers fastest on CPUs of its own: the ingest thread and libzmq's I/O thread
then never take its core, and the scheduler never moves it. A thread's CPUs are set by the
thread itself (Linux's sched_setaffinity applies to the calling thread), and the threads it
starts afterwards inherit them.
"""

import ctypes
import os
import platform
import sys

_PR_SET_NAME = 15   # prctl: the calling thread's name, as ps -L and top -H show it
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())
_SCHED_OTHER = 0


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
                ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32)]


def available_cpus():
    """The CPUs this process may run on, or None where the platform cannot tell."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def parse_cpus(text):
    """'0-3,8' -> (0, 1, 2, 3, 8). ValueError with the reason for anything else, and for
    CPUs this process may not use."""
    cpus = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        first, sep, last = (s.strip() for s in item.partition("-"))
        if not first.isdigit() or sep and not last.isdigit():
            raise ValueError("expected a CPU list such as 0-3,8, got %r" % text)
        low, high = int(first), int(last) if sep else int(first)
        if low > high:
            raise ValueError("%r: a range must go up, as in %d-%d" % (item, high, low))
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("expected a CPU list such as 0-3,8, got %r" % text)
    allowed = available_cpus()
    if allowed is None:
        raise ValueError("CPU placement needs Linux (sched_setaffinity); this is %s" % sys.platform)
    missing = cpus - allowed
    if missing:
        raise ValueError("CPU %s not available to kvcm, which may run on %s"
                         % (format_cpus(missing), format_cpus(allowed)))
    return tuple(sorted(cpus))


def format_cpus(cpus):
    """(0, 1, 2, 3, 8) -> '0-3,8'."""
    out, run = [], []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            out.append(_span(run))
            run = []
        run.append(cpu)
    if run:
        out.append(_span(run))
    return ",".join(out)


def _span(run):
    return str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1])


def pin_this_thread(cpus, what):
    """Runs the calling thread, and the threads it starts from now on, on `cpus` only;
    ValueError naming `what` (the option) when the system refuses."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ValueError("%s %s: %s" % (what, format_cpus(cpus), exc.strerror or exc)) from None


def name_this_thread(name):
    """Names the calling thread for ps -L and top -H (Linux; at most 15 bytes kept)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):   # a libc without prctl: the name is a nicety
        pass


def set_scheduler_slice(seconds):
    """Asks the scheduler to run the calling thread, and the threads it starts from now on,
    in slices of `seconds` (0: the kernel's default), keeping its nice value, so its share of
    the CPU is unchanged (Linux 6.12 and later: a normal thread's sched_attr.sched_runtime;
    earlier kernels take it and ignore it). A thread whose slice is shorter than the running
    one's preempts it when it wakes: the scoring thread, woken by a request or at the end of
    a wait for the index lock, runs at once rather than after the other thread's slice, which
    the scheduler ends only at a timer tick (4 ms on a 250 Hz kernel). True when the kernel
    took it."""
    if _SYS_SCHED_SETATTR is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = _SchedAttr(size=ctypes.sizeof(_SchedAttr), policy=_SCHED_OTHER,
                          nice=os.getpriority(os.PRIO_PROCESS, 0), runtime=int(seconds * 1e9))
        return libc.syscall(_SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0
    except (OSError, AttributeError):
        return False
