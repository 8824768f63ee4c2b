"""Polling helper of the verify suite (imported by the test modules beside it)."""

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
