"""Waiting for something to converge: poll a condition until a deadline, never sleep a guess."""

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout: float = 10.0, every: float = 0.01) -> None:
    """Poll condition until it holds; an assertion error once timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout} s"
        time.sleep(every)
