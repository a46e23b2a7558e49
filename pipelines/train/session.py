"""One worker's training session: optimizer, schedule, precision, the restored state, the
log / report / checkpoint schedule, the per-step hook (`StepHook`), and the epoch loop both
training jobs share."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from bge_core.distributed import all_ranks, get_rank, get_world_size
from bge_core.optim import build_adamw, build_scheduler, warmup_steps
from bge_core.precision import Precision, resolve_precision
from bge_core.progress import ProgressMeter
from bge_core.train_state import TrainState
from pipelines.train.worker import ModelIO, report, restore_checkpoint, save_and_report

if TYPE_CHECKING:
    from pipelines.train.args import TrainArgs

log = logging.getLogger("bge.train")
T = TypeVar("T")


@dataclass(frozen=True)
class StepInfo:
    """Where one worker stands after an optimizer step: what a `StepHook` is given.

    Args:
        rank / world_size: this worker and the group's size.
        step: optimizer steps done (1 after the first; counted across restarts).
        epoch: the epoch the step belongs to (from 0).
    """

    rank: int
    world_size: int
    step: int
    epoch: int


StepHook = Callable[[StepInfo], None]
"""Called on every worker after each optimizer step, before that step's log, report and
checkpoint (so a hook that ends the process loses the step's checkpoint). It travels to
the workers pickled: give a module-level function or an instance of a module-level class
that the workers can import (cloudpickle stores those by reference); a lambda or closure
defined in ``__main__`` is copied by value instead. Tests use it for fault drills
(`tests/fault_hooks.py`); production runs pass none."""


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
    on_step: StepHook | None = None
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
        if self.on_step is not None:
            self.on_step(StepInfo(get_rank(), get_world_size(), self.state.step,
                                  self.state.epoch))
        step = self.state.step
        save = step >= self.total or step % self.args.save_steps == 0
        if not (save or step % self.args.logging_steps == 0):
            return
        metrics = self.meter.metrics(
            step, epoch=self.state.epoch, lr=self.scheduler.get_last_lr()[0],
            resumed_from=list(self.state.resumed_from), **self.constants, **losses())
        if get_rank() == 0:
            log.info("%s", ProgressMeter.line(metrics))
        if save:
            save_and_report(metrics, self.state, self.model, self.optimizer, self.scheduler,
                            self.amp, self.io)
        else:
            report(metrics)


def open_session(model: nn.Module, args: TrainArgs, total: int, device: torch.device,
                 io: ModelIO, on_step: StepHook | None = None) -> Session:
    """AdamW, warm-up schedule and precision for `model`; restored from the latest
    checkpoint when there is one (the returned `state` says where training stands);
    `on_step` is called after every step (`StepHook`)."""
    optimizer = build_adamw(model, args.learning_rate, args.weight_decay)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type,
                                warmup_steps(total, args.warmup_ratio), total)
    amp = Precision.create(resolve_precision(args.fp16, args.bf16, device.type), device)
    state = restore_checkpoint(model, optimizer, scheduler, amp, io)
    meter = ProgressMeter(total, start_step=state.step)
    return Session(model, optimizer, scheduler, amp, io, state, meter, args, on_step,
                   constants={"cpu_threads": torch.get_num_threads()})


def run_epochs(state: TrainState, total: int, steps_per_epoch: int,
               batches: Callable[[int, int], Iterable[T]],
               train_step: Callable[[T], None]) -> None:
    """The epoch loop of both trainers: `train_step` on every batch until `total` steps.

    `batches(epoch, skip)` is this rank's batches of `epoch` after its first `skip` (a run
    resumed mid-epoch skips the steps trained before); `train_step` trains one and ends
    with `Session.finish_step` (which advances `state`). One rule ends an epoch, on every
    rank at the same step: after `steps_per_epoch` steps, or at the first step for which
    some rank has no batch left (a shard shorter than planned: one all-reduce of a flag per
    step decides, so no rank waits in a collective for a batch that never comes). An
    epoch cut short logs a warning and the next one starts; one that yields no step at
    all raises on every rank.

    Raises:
        RuntimeError: some rank's shard has no batch for an epoch.
    """
    while state.step < total:
        if state.step_in_epoch >= steps_per_epoch:
            state.next_epoch()
        start = state.step_in_epoch
        for batch in _while_every_rank_has(batches(state.epoch, start)):
            train_step(batch)
            if state.step >= total:
                return
        if state.step_in_epoch == 0:
            raise RuntimeError(f"epoch {state.epoch}: a worker's data shard holds no batch "
                               f"(planned {steps_per_epoch} steps per epoch)")
        if state.step_in_epoch < steps_per_epoch:
            if get_rank() == 0:
                log.warning("epoch %d ended after %d of %d planned steps: a worker's shard "
                            "ran out", state.epoch, state.step_in_epoch, steps_per_epoch)
            state.next_epoch()


def _while_every_rank_has(batches: Iterable[T]) -> Iterator[T]:
    """`batches` while every rank still has one (a collective per batch)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not all_ranks(batch is not None):
            return
        yield batch
