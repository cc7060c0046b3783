"""Progress lines with rate and time left for the pipeline's long loops.

`track(items, "sensitivity layers")` yields the items unchanged and logs, at most every
`every_s` seconds and at the end, `sensitivity layers: 12/26 (0.8/s, ~18 s left)` through the
`mode_jax` logger (main.py shows it; libraries stay quiet unless the caller configures logging).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("mode_jax.progress")


def track(items: Iterable[T], desc: str, total: int | None = None,
          every_s: float = 10.0) -> Iterator[T]:
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last = now
            log.info("%s", line(desc, done, total, now - start))


def line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else float("inf")
    if total:
        left = (total - done) / rate if rate > 0 else float("inf")
        return f"{desc}: {done}/{total} ({rate:.2f}/s, ~{left:.0f} s left)"
    return f"{desc}: {done} ({rate:.2f}/s)"
