"""One worker's training session: optimizer, schedule, precision, the restored state, and
the log / report / checkpoint schedule both training loops share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bge_core.optim import build_adamw, build_scheduler, warmup_steps
from bge_core.training import Fault, Precision, ProgressMeter, TrainState, resolve_precision
from pipelines.train_common import ModelIO, report, restore_checkpoint, save_and_report

if TYPE_CHECKING:
    from pipelines.train_args import TrainArgs


@dataclass
class Session:
    """One worker's optimisation state and its log / report / checkpoint schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: Precision
    io: ModelIO
    state: TrainState
    meter: ProgressMeter
    args: TrainArgs
    fault: Fault | None = None
    constants: dict[str, Any] = field(default_factory=dict)  # reported with every metric

    @property
    def total(self) -> int:
        return self.meter.total_steps

    def step(self) -> None:
        """Clip, step the optimizer and the schedule, zero the gradients."""
        self.amp.step(self.optimizer, self.scheduler, self.args.max_grad_norm)

    def finish_step(self, examples: int, losses: Callable[[], dict[str, Any]]) -> None:
        """Count a finished step; log, report and checkpoint when one is due.

        Args:
            examples: examples of the step over all ranks.
            losses: the losses to report (mean over ranks): called on every rank at
                logging and saving steps only, so it may hold collectives.
        """
        self.state.advance(examples)
        self.meter.count(examples)
        if self.fault:
            self.fault.maybe_fail(self.state.step)
        step = self.state.step
        save = step >= self.total or step % self.args.save_steps == 0
        if not (save or step % self.args.logging_steps == 0):
            return
        metrics = self.meter.metrics(
            step, epoch=self.state.epoch, lr=self.scheduler.get_last_lr()[0],
            resumed_from=list(self.state.resumed_from), **self.constants, **losses())
        ProgressMeter.log_line(metrics)
        if save:
            save_and_report(metrics, self.state, self.model, self.optimizer, self.scheduler,
                            self.amp, self.io)
        else:
            report(metrics)


def open_session(model: nn.Module, args: TrainArgs, total: int, device: torch.device,
                 io: ModelIO, fault: Fault | None = None) -> Session:
    """AdamW, warm-up schedule and precision for `model`; restored from the latest
    checkpoint when there is one (the returned `state` says where training stands)."""
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type,
                                warmup_steps(total, args.warmup_ratio), total)
    amp = Precision.create(resolve_precision(args.fp16, args.bf16, device.type), device)
    state = restore_checkpoint(model, optimizer, scheduler, amp, io)
    meter = ProgressMeter(total, start_step=state.step)
    return Session(model, optimizer, scheduler, amp, io, state, meter, args, fault,
                   constants={"cpu_threads": torch.get_num_threads()})
