"""Where kvcm's threads run: `--http-cpus` and `--ingest-cpus` on a real `kvcm serve` (read
back from /proc), their parsing and errors, and the placements of `kvcm bench index`: the
threads `split` gives its own engines, the client and target threads `colocate` pins."""

import ctypes
import os
import platform
import subprocess
import sys
import textwrap
import threading

import pytest

from kvcm.bench.placement import Placement, PlacementError
from kvcm.config import ConfigError, load_config
from kvcm.placement import _SchedAttr, available_cpus, format_cpus, parse_cpus
from kvcm.serve import SCORING_SLICE_S
from serving import Serve, run_serve

CPUS = sorted(available_cpus())
# two different CPUs where the machine has them (CI's has 2); else both sides share one
HTTP_CPU, INGEST_CPU = CPUS[0], CPUS[-1]


def allowed(pid, tid):
    with open("/proc/%d/task/%d/status" % (pid, tid)) as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list for thread %d" % tid)


def threads(pid):
    """{thread name: [tids]} of a process."""
    out = {}
    for tid in map(int, os.listdir("/proc/%d/task" % pid)):
        try:
            with open("/proc/%d/task/%d/comm" % (pid, tid)) as f:
                out.setdefault(f.read().strip(), []).append(tid)
        except FileNotFoundError:   # a thread that just ended
            pass
    return out


@pytest.mark.parametrize("text, cpus", [("0", (0,)), ("0-1", (0, 1)), (" 1 , 0 ", (0, 1)), ("0,0-1", (0, 1))])
def test_cpu_lists_parse_in_order_without_repeats(text, cpus):
    if not set(cpus) <= set(CPUS):
        pytest.skip("needs CPUs %s" % format_cpus(cpus))
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text, message", [
    ("", "expected a CPU list"), ("x", "expected a CPU list"), ("1-", "expected a CPU list"),
    ("-1", "expected a CPU list"), ("1-0", "a range must go up"), ("0,,", None),
])
def test_bad_cpu_lists_are_refused_with_the_reason(text, message):
    if message is None:      # empty items are ignored: "0,," is CPU 0
        assert parse_cpus(text) == (0,)
        return
    with pytest.raises(ValueError, match=message):
        parse_cpus(text)


def test_cpus_kvcm_may_not_use_are_named():
    missing = max(CPUS) + 1000
    with pytest.raises(ValueError, match=r"CPU %d not available to kvcm, which may run on %s"
                       % (missing, format_cpus(CPUS))):
        parse_cpus("%d" % missing)


@pytest.mark.parametrize("cpus, text", [((0,), "0"), ((0, 1, 2, 3, 8), "0-3,8"), ((1, 3, 4), "1,3-4")])
def test_cpu_lists_format_as_ranges(cpus, text):
    assert format_cpus(cpus) == text


def test_the_options_come_from_flags_environment_and_toml(tmp_path):
    toml = tmp_path / "kvcm.toml"
    toml.write_text("http_cpus = %d\ningest_cpus = \"%d\"\n" % (HTTP_CPU, INGEST_CPU))
    config = load_config(["--config", str(toml)], environ={})
    assert (config.http_cpus, config.ingest_cpus) == ((HTTP_CPU,), (INGEST_CPU,))
    config = load_config([], environ={"KVCM_INGEST_CPUS": str(HTTP_CPU)})
    assert (config.http_cpus, config.ingest_cpus) == (None, (HTTP_CPU,))
    with pytest.raises(ConfigError, match="--http-cpus: .*not available"):
        load_config(["--http-cpus", str(max(CPUS) + 1000)], environ={})


def test_serve_runs_the_loop_and_the_ingest_on_their_cpus():
    server = Serve.standard("--http-cpus", str(HTTP_CPU), "--ingest-cpus", str(INGEST_CPU))
    try:
        server.wait_ready()
        pid = server.proc.pid
        names = threads(pid)
        assert allowed(pid, pid) == str(HTTP_CPU)                      # the event loop
        assert [allowed(pid, t) for t in names["kvcm-ingest"]] == [str(INGEST_CPU)]
        # libzmq's I/O thread, started from the ingest thread, follows it
        assert [allowed(pid, t) for t in names["ZMQbg/IO/0"]] == [str(INGEST_CPU)]
        assert server.client.ok("GET", "/health")
        assert server.stop() == 0
    finally:
        server.close()


def scheduler_slice(tid):
    """A thread's scheduler slice in ns (sched_getattr's sched_runtime)."""
    attr = _SchedAttr()
    number = {"x86_64": 315, "aarch64": 275}[platform.machine()]
    assert ctypes.CDLL(None, use_errno=True).syscall(number, tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) == 0
    return attr.runtime


@pytest.mark.parametrize("busy_poll", [False, True])
def test_a_busy_polling_event_loop_runs_in_short_slices_and_the_ingest_in_the_kernels(busy_poll):
    # a fresh thread of this process has the kernel's default (0 before Linux 6.12, which
    # takes the short slice and ignores it)
    box = []
    fresh = threading.Thread(target=lambda: box.append(scheduler_slice(0)))
    fresh.start()
    fresh.join()
    default = box[0]
    server = Serve.standard(*(["--busy-poll-us", "1000"] if busy_poll else []))
    try:
        server.wait_ready()
        pid = server.proc.pid
        names = threads(pid)
        short = int(SCORING_SLICE_S * 1e9) if default else 0
        assert scheduler_slice(pid) == (short if busy_poll else default)
        assert [scheduler_slice(t) for t in names["kvcm-ingest"] + names["ZMQbg/IO/0"]] == [default, default]
        assert server.stop() == 0
    finally:
        server.close()


def test_serve_without_placement_leaves_every_thread_where_the_system_puts_it():
    server = Serve.standard()
    try:
        server.wait_ready()
        pid = server.proc.pid
        names = threads(pid)
        everywhere = format_cpus(CPUS)
        assert allowed(pid, pid) == everywhere
        assert [allowed(pid, t) for t in names["kvcm-ingest"]] == [everywhere]
        assert server.stop() == 0
    finally:
        server.close()


def test_serve_refuses_cpus_it_may_not_use_and_ingest_cpus_with_a_shared_index():
    status, _, err = run_serve("--http-cpus", str(max(CPUS) + 1000))
    assert status == 2 and "--http-cpus: CPU %d not available to kvcm" % (max(CPUS) + 1000) in err, err
    status, _, err = run_serve("--ingest-cpus", str(CPUS[0]), "--index", "redis://127.0.0.1:1")
    assert status == 2 and "--ingest-cpus places the in-memory index's ingest thread" in err, err


@pytest.mark.skipif(len(CPUS) < 2, reason="a split needs 2 CPUs")
def test_bench_split_gives_the_engines_the_ingest_cpus_for_a_while():
    placement = Placement.named("split")
    half = len(CPUS) // 2
    assert (placement.http, placement.ingest) == (tuple(CPUS[:half]), tuple(CPUS[half:]))
    assert placement.serve_args() == ["--http-cpus", format_cpus(CPUS[:half]),
                                      "--ingest-cpus", format_cpus(CPUS[half:])]
    before = os.sched_getaffinity(0)
    seen = {}

    def started_inside():
        seen["thread"] = os.sched_getaffinity(0)
    with placement.engines_side():
        seen["main"] = os.sched_getaffinity(0)
        thread = threading.Thread(target=started_inside)
        thread.start()
        thread.join()
    assert seen == {"main": set(CPUS[half:]), "thread": set(CPUS[half:])}
    assert os.sched_getaffinity(0) == before


def test_bench_placements():
    none = Placement.named("none")
    assert none.to_json() is None and none.serve_args() == [] and none.swi_client_cpus is None
    with none.querying([]), none.engines_side():
        pass
    assert Placement.named("colocate").to_json() == {"name": "colocate", "cpu": str(CPUS[-1])}
    if len(CPUS) < 2:
        with pytest.raises(PlacementError, match="at least 2 CPUs"):
            Placement.named("split")


def test_bench_colocate_pins_the_client_and_every_thread_of_the_target_for_a_while():
    """A real target: a child process with a few threads, one started inside the block."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, threading, time
        for _ in range(3):
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        print("up", flush=True)
        sys.stdin.readline()
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        print("more", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        tids = lambda: sorted(int(t) for t in os.listdir("/proc/%d/task" % child.pid))
        before_child, before_me = os.sched_getaffinity(child.pid), os.sched_getaffinity(0)
        placement = Placement.named("colocate")
        with placement.querying([child.pid]):
            assert os.sched_getaffinity(0) == {CPUS[-1]}
            assert len(tids()) == 4 and all(os.sched_getaffinity(t) == {CPUS[-1]} for t in tids())
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline() == "more\n"
        assert len(tids()) == 5 and all(os.sched_getaffinity(t) == before_child for t in tids())
        assert os.sched_getaffinity(0) == before_me
        with pytest.raises(PlacementError, match="needs a target bench starts"):
            placement.querying([])
    finally:
        child.kill()
        child.wait()
