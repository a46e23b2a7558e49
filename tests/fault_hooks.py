"""Fault drills for the training jobs, passed in as their `on_step` hook
(`pipelines.train.session.StepHook`): the library never sleeps or exits on its own.

A drill is a frozen dataclass defined here, at module level, so cloudpickle sends it to the
Ray Train workers by reference (``tests.fault_hooks.ExitAfterStep`` plus its fields): the
workers import this module, which they can (the repository root is on their path, as for
`pipelines` itself).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.train.session import StepInfo

log = logging.getLogger("bge.train")

# Ray Train's controller collects reports by polling (every 2 s): wait so the checkpoints
# reported before the failure are registered, as in a real crash that comes later than a
# poll after the last checkpoint.
REGISTER_S = 6.0


@dataclass(frozen=True, kw_only=True)
class ExitAfterStep:
    """One rank exits abruptly (``os._exit(1)``) after `step`, the first time only.

    Args:
        step: the optimizer step after which the rank dies.
        marker: file recording that the fault happened (so the restarted run goes on).
        rank: the rank that dies (default: rank 1, or rank 0 when alone).
        delay_s: seconds to wait before exiting (see `REGISTER_S`).
    """

    step: int
    marker: str
    rank: int | None = None
    delay_s: float = REGISTER_S

    def __call__(self, info: StepInfo) -> None:
        victim = self.rank if self.rank is not None else int(info.world_size > 1)
        if info.step != self.step or info.rank != victim or Path(self.marker).exists():
            return
        Path(self.marker).write_text(f"rank {victim} killed after step {info.step}\n")
        time.sleep(self.delay_s)
        log.warning("fault drill: rank %d exits after step %d", victim, info.step)
        os._exit(1)
