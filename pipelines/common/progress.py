"""Progress lines for long jobs: done / total, rate, ETA, every few seconds."""

from __future__ import annotations

import logging
import time


class Progress:
    """Log ``done/total unit (pct) rate/s ETA`` at most every `every_s` seconds."""

    def __init__(self, total: int, unit: str, every_s: float, logger: logging.Logger) -> None:
        self.total, self.unit, self.every_s, self.log = total, unit, every_s, logger
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%), {rate:,.1f} "
                f"{self.unit}/s, ETA {eta:,.0f}s")

    def finish(self) -> None:
        self.log.info("finished: %s in %.1fs", self.line(), time.monotonic() - self.start)
