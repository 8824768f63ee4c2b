"""Polling and lock-wait helpers of the verify suite (imported by the modules beside it)."""

from __future__ import annotations

import time
from collections.abc import Callable
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


def record_lock_wait(item, seconds: float) -> None:
    """Add `seconds` spent waiting for a controller lock to the pytest item's `lock_wait`
    property (JUnit). The wait is part of the test's JUnit time; bench/bench_stage.py
    subtracts it to show where the suite's own time goes."""
    for i, (name, value) in enumerate(item.user_properties):
        if name == "lock_wait":
            item.user_properties[i] = (name, round(float(value) + seconds, 2))
            return
    item.user_properties.append(("lock_wait", round(seconds, 2)))
