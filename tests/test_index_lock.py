"""The index lock between the scoring and the ingest thread: a waiter whose spin runs out
lends its CPU to the holder, which goes back to its own CPUs when it releases the lock."""

import os
import threading

import pytest

from kvcm._core import Index, ilock_configure_spin, ilock_delay_lenders, ilock_never_lend_from_this_thread


def _cpus():
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "these tests need 2 CPUs, as kvcm's placement does"
    return cpus


def _until(predicate, what, seconds=10.0):
    done = threading.Event()
    for _ in range(int(seconds / 0.005)):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError("never: " + what)


def _state(tid):
    with open("/proc/self/task/%d/stat" % tid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class _Holder(threading.Thread):
    """Holds the index lock on `cpu` until release() (blocked meanwhile, as a preempted
    holder is: not running, and not letting go)."""

    def __init__(self, index, cpu):
        super().__init__(daemon=True)
        self.index, self.cpu = index, cpu
        self.holding, self._release = threading.Event(), threading.Event()
        self.cpus_after = None

    def run(self):
        os.sched_setaffinity(0, {self.cpu})
        self.index.while_locked(lambda: (self.holding.set(), self._release.wait()))
        self.cpus_after = os.sched_getaffinity(0)

    def release(self):
        self._release.set()
        self.join()


def _waiter(index, cpu, lends=True):
    """A thread on `cpu` that reads the index (it waits for the lock); its result."""
    out = {}

    def run():
        os.sched_setaffinity(0, {cpu})
        if not lends:
            ilock_never_lend_from_this_thread()
        out["tid"] = threading.get_native_id()
        out["stats"] = index.stats()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    _until(lambda: "tid" in out, "the waiter started")
    return t, out


@pytest.fixture
def both_cpus():
    cpus = _cpus()
    ilock_configure_spin(set(cpus))
    yield cpus
    ilock_configure_spin(os.sched_getaffinity(0))


def test_a_waiter_lends_its_cpu_to_the_holder_which_goes_back_on_release(both_cpus):
    index = Index(max_blocks=64)
    index.store("m", "pod-a", "gpu", [1, 2, 3])
    holder = _Holder(index, both_cpus[1])
    holder.start()
    holder.holding.wait()
    waiter, out = _waiter(index, both_cpus[0])
    _until(lambda: os.sched_getaffinity(holder.native_id) == {both_cpus[0]},
           "the holder moved to the waiter's CPU")
    assert "stats" not in out   # still waiting: the lock is the holder's until it lets go
    holder.release()
    waiter.join()
    assert out["stats"]["blocks"] == 3
    assert holder.cpus_after == {both_cpus[1]}
    assert index.lock_loans == 1


def test_a_holder_lent_a_cpu_again_and_again_always_goes_back(both_cpus):
    index = Index(max_blocks=64)
    for _ in range(3):
        holder = _Holder(index, both_cpus[1])
        holder.start()
        holder.holding.wait()
        waiter, _ = _waiter(index, both_cpus[0])
        _until(lambda: os.sched_getaffinity(holder.native_id) == {both_cpus[0]}, "lent")
        holder.release()
        waiter.join()
        assert holder.cpus_after == {both_cpus[1]}


def test_a_holder_that_lets_go_before_its_lender_is_back_from_the_move_goes_home(both_cpus):
    # The move is synchronous, and the lender may then wait for its CPU, where the holder
    # now runs: the holder must not stay there, holding that CPU, until the lender is back.
    index = Index(max_blocks=64)
    holder = _Holder(index, both_cpus[1])
    holder.start()
    holder.holding.wait()
    ilock_delay_lenders(1.0)
    try:
        waiter, out = _waiter(index, both_cpus[0])
        _until(lambda: os.sched_getaffinity(holder.native_id) == {both_cpus[0]}, "lent")
        holder.release()
        assert holder.cpus_after == {both_cpus[1]}
        assert "stats" not in out   # the lender is still paused after the move
        waiter.join()
    finally:
        ilock_delay_lenders(0)
    assert out["stats"]["blocks"] == 0
    assert index.lock_loans == 1


def test_a_thread_that_never_lends_sleeps_and_leaves_the_holder_where_it_is(both_cpus):
    # the ingest thread's case: it must not move the scoring thread onto its busy CPU
    index = Index(max_blocks=64)
    holder = _Holder(index, both_cpus[1])
    holder.start()
    holder.holding.wait()
    waiter, out = _waiter(index, both_cpus[0], lends=False)
    _until(lambda: _state(out["tid"]) == "S", "the waiter sleeps")
    threading.Event().wait(0.2)   # past its spin, on the lock (see the test below)
    assert os.sched_getaffinity(holder.native_id) == {both_cpus[1]}
    holder.release()
    waiter.join()
    assert index.lock_loans == 0


def test_with_one_cpu_a_waiter_sleeps_without_lending(both_cpus):
    ilock_configure_spin({both_cpus[0]})
    index = Index(max_blocks=64)
    holder = _Holder(index, both_cpus[1])
    holder.start()
    holder.holding.wait()
    waiter, out = _waiter(index, both_cpus[0])
    _until(lambda: _state(out["tid"]) == "S", "the waiter sleeps")
    threading.Event().wait(0.2)   # on the lock by now, not on the GIL (its switch interval is 5 ms)
    assert _state(out["tid"]) == "S" and "stats" not in out
    assert os.sched_getaffinity(holder.native_id) == {both_cpus[1]}
    assert index.lock_loans == 0
    holder.release()
    waiter.join()
    assert holder.cpus_after == {both_cpus[1]}


def test_a_forked_child_lends_to_its_own_threads_not_its_parents(both_cpus):
    index = Index(max_blocks=64)
    index.stats()                         # this thread takes the lock before the fork
    mine = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:                          # the child: its main thread holds, a thread waits
        code = 1
        try:
            os.sched_setaffinity(0, {both_cpus[1]})

            def hold():
                waiter, _ = _waiter(index, both_cpus[0])
                try:
                    _until(lambda: os.sched_getaffinity(0) == {both_cpus[0]}, "lent to the child's thread", 5)
                    return 0
                except AssertionError:
                    return 1
            code = index.while_locked(hold)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.sched_getaffinity(0) == mine     # not moved by the child's waiter
    assert os.waitstatus_to_exitcode(status) == 0
