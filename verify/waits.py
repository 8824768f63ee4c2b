"""Polling and lock-wait helpers of the verify suite (imported by the modules beside it)."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], seconds: float, step: float = 2) -> T:
    """Call `predicate` until it returns something true or `seconds` have passed; its last
    value (falsy on timeout, so the caller's assert names what did not happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@contextmanager
def controller_lock(path: str, exclusive: bool, item=None) -> Iterator[None]:
    """Hold the flock on `path` (exclusive or shared) for the block. The seconds spent waiting
    for it go to the pytest item's `lock_wait` JUnit property: the wait is part of the test's
    JUnit time, and bench/bench_stage.py subtracts it to show where the suite's own time goes."""
    with open(path, "a") as handle:
        waited = time.monotonic()
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if item is not None:
            _add_lock_wait(item, time.monotonic() - waited)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _add_lock_wait(item, seconds: float) -> None:
    for i, (name, value) in enumerate(item.user_properties):
        if name == "lock_wait":
            item.user_properties[i] = (name, round(float(value) + seconds, 2))
            return
    item.user_properties.append(("lock_wait", round(seconds, 2)))
