"""Progress of long work, one rule for every job: done / total, rate, ETA.

`eta_s` is the one estimate and `progress_line` the one line
(``1,234/10,000 rows (12.3%), 45.6 rows/s, ETA 193s``). `Progress` logs that line every
few seconds for a count of rows (the embedding job); `ProgressMeter` gives the trainers
the same numbers per optimizer step (done and ETA in steps, the rate in examples), for
their log line and the metrics they report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any


def eta_s(done: float, left: float, elapsed: float) -> float:
    """Seconds to do `left` more at the pace of `done` in `elapsed` seconds (0 when nothing
    is left, inf while nothing is done)."""
    if left <= 0:
        return 0.0
    return left * elapsed / done if done > 0 else math.inf


def progress_line(done: int, total: int, unit: str, rate: float, rate_unit: str,
                  eta: float) -> str:
    """``done/total unit (pct%), rate rate_unit/s, ETA eta s``: the one progress line."""
    pct = 100.0 * done / total if total else 100.0
    return (f"{done:,}/{total:,} {unit} ({pct:.1f}%), {rate:,.1f} {rate_unit}/s, "
            f"ETA {eta:,.0f}s")


class Progress:
    """Log `progress_line` of a count (rows) at most every `every_s` seconds."""

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
        return progress_line(self.done, self.total, self.unit, self.done / elapsed, self.unit,
                             eta_s(self.done, self.total - self.done, elapsed))

    def finish(self) -> None:
        self.log.info("finished: %s in %.1fs", self.line(), time.monotonic() - self.start)


@dataclass
class ProgressMeter:
    """A trainer's examples/s and ETA since this (re)start, for its log and its metrics."""

    total_steps: int
    start_step: int = 0
    started: float = field(default_factory=time.monotonic)
    examples: int = 0

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def count(self, examples: int) -> None:
        """Count the examples (global batch) of one finished step."""
        self.examples += examples

    def metrics(self, step: int, **extra: Any) -> dict[str, Any]:
        """The metrics dict at `step`: rate, ETA, and `extra` (losses, epoch, lr...)."""
        elapsed = self.elapsed
        eta = eta_s(step - self.start_step, self.total_steps - step, elapsed)
        return {"step": step, "total_steps": self.total_steps,
                "examples_per_s": self.examples / elapsed, "eta_s": eta, **extra}

    @staticmethod
    def line(metrics: dict[str, Any]) -> str:
        """The progress line of `metrics` (as `metrics` returned it), with the loss."""
        text = progress_line(metrics["step"], metrics["total_steps"], "steps",
                             metrics["examples_per_s"], "examples", metrics["eta_s"])
        return f"{text}, loss {metrics.get('loss', math.nan):.4f}"
