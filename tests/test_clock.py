"""gateway.observe.clock.per_second: a value recomputed at most once per wall-clock second."""
from __future__ import annotations

import time

from gateway.observe import logs
from gateway.observe.clock import per_second


def test_computed_once_per_second():
    calls = []

    def compute(second):
        calls.append(second)
        return f"text {second}"

    get = per_second(compute)
    assert get(100) == "text 100"
    assert get(100) == "text 100"
    assert calls == [100]
    assert get(101) == "text 101"
    assert get(101) == "text 101"
    assert calls == [100, 101]
    assert get(100) == "text 100"           # the clock stepped back: a new value, not the kept one
    assert calls == [100, 101, 100]


def test_each_cache_is_its_own():
    a = per_second(lambda s: ("a", s))
    b = per_second(lambda s: ("b", s))
    assert a(5) == ("a", 5) and b(5) == ("b", 5) and a(5) == ("a", 5)


def test_a_failing_compute_keeps_nothing():
    state = {"fail": True}

    def compute(second):
        if state["fail"]:
            raise RuntimeError("no")
        return second * 2

    get = per_second(compute)
    try:
        get(7)
    except RuntimeError:
        pass
    else:
        raise AssertionError("compute's error was swallowed")
    state["fail"] = False
    assert get(7) == 14


def test_log_timestamps_are_unchanged():
    assert logs.timestamp(1735732800.25) == "2025-01-01T12:00:00.250Z"
    assert logs.timestamp(1735732800.9999) == "2025-01-01T12:00:00.999Z"
    assert logs.timestamp(1735732801.0) == "2025-01-01T12:00:01.000Z"
    now = time.time()
    assert logs.timestamp(now)[:19] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
