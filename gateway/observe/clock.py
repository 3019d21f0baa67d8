"""A value recomputed at most once per wall-clock second (timestamps in logs, headers).

    _stamp = per_second(lambda s: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
    text = _stamp(int(time.time()))        # strftime only when the second changed

`per_second(compute)` returns `get(second)`: `compute(second)` for a new whole second, the
value kept from the last call otherwise. The caller passes the second (it usually has the
time already, and adds the fraction itself, e.g. milliseconds). The last (second, value) is
replaced as one tuple, so a thread sees either the old pair or the new one, never a mix.
"""
from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["per_second"]

T = TypeVar("T")


def per_second(compute: Callable[[int], T]) -> Callable[[int], T]:
    """`get(second)`: compute(second), recomputed only when *second* differs from the last."""
    last: tuple = (None, None)

    def get(second: int) -> T:
        nonlocal last
        cached = last
        if cached[0] == second:
            return cached[1]
        value = compute(second)
        last = (second, value)
        return value

    return get
