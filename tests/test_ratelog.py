"""The rate-limited log for lines a remote party can trigger."""

import logging

from kvcm.ratelog import MAX_REASONS, RateLimitedLog


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_one_line_per_reason_per_interval_then_a_count_of_the_rest(caplog):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t.rate"), interval=60, clock=clock)
    with caplog.at_level(logging.WARNING, "t.rate"):
        assert log.warning("junk", "dropped junk from %s", "a")
        for _ in range(41):
            assert not log.warning("junk", "dropped junk from %s", "b")
        assert log.warning("other", "another reason")   # reasons are independent
        clock.now += 60
        assert log.warning("junk", "dropped junk from %s", "c")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["dropped junk from a", "another reason",
                     "dropped junk from c (41 more like this in the last 60 s)"]


def test_the_table_of_reasons_is_bounded():
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t.rate.bounded"), interval=60, clock=clock)
    for i in range(MAX_REASONS * 3):
        clock.now += 0.001
        assert log.warning("reason-%d" % i, "line")
    assert len(log._last) == MAX_REASONS
    assert "reason-%d" % (MAX_REASONS * 3 - 1) in log._last
