"""Training pieces that need no cluster: precision, step counters, progress, fault drills.

The Ray Train side (launch, checkpoints, reports) is `pipelines.train.common`; both
training jobs (finetuning, RetroMAE) step through these.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bge_core.config import DType
from bge_core.distributed import get_rank, get_world_size
from bge_core.errors import InputError
from bge_core.precision import autocast_context, check_dtype

log = logging.getLogger("bge.train")

FAULT_DELAY_S = 6.0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) the same on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG training draws from (torch CPU, CUDA when present, Python, NumPy), as
    tensors and plain values only, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
                  "pos": int(numpy["state"]["pos"]), "has_gauss": int(numpy["has_gauss"]),
                  "gauss": float(numpy["gauss"])},
    }


def set_rng_state(saved: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA only when both sides have GPUs)."""
    torch.set_rng_state(saved["torch_cpu"])
    if saved["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["torch_cuda"])
    py = saved["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    numpy = saved["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy["key"].numpy().astype(np.uint32),
                                   "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})


def enable_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn on activation checkpointing in the (Hugging Face) backbone(s) of `model`."""
    if not enabled:
        return
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no Hugging Face backbone to checkpoint")


def freeze_position_embeddings(model: nn.Module) -> list[str]:
    """Stop training every parameter named ``*position_embeddings*`` (FlagEmbedding's
    ``--fix_position_embedding``); returns their names."""
    frozen = [name for name, p in model.named_parameters() if "position_embeddings" in name]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def resolve_precision(fp16: bool, bf16: bool, device_type: str | None = None) -> DType:
    """The autocast dtype for the FlagEmbedding-style ``--fp16`` / ``--bf16`` flags.

    fp16 needs CUDA: on another device (`device_type` given) it falls back to fp32 with a
    warning, so a GPU command line also runs on a CPU box.
    """
    if fp16 and bf16:
        raise InputError("--fp16 and --bf16 are mutually exclusive")
    if fp16 and device_type is not None and device_type != "cuda":
        log.warning("--fp16 needs a CUDA GPU: training in fp32 on %s", device_type)
        return "fp32"
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


@dataclass
class Precision:
    """Autocast and (for fp16) loss scaling for one device."""

    dtype: DType
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, dtype: DType, device: torch.device) -> Precision:
        check_dtype(dtype, device)  # fp16 needs CUDA; bf16 on CPU warns when emulated
        scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
        return cls(dtype, device, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.dtype, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def scale_loss_fn(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap a loss so its backward is scaled (for `bge_core.grad_cache` steps)."""
        if self.scaler is None:
            return loss_fn
        return lambda *args: self.scaler.scale(loss_fn(*args))

    def unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as the model sees it (undo fp16 loss scaling, for logging)."""
        return loss / self.scaler.get_scale() if self.scaler else loss

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any,
             max_grad_norm: float | None = None) -> None:
        """Unscale, clip, step the optimizer and scheduler, zero the gradients."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainState:
    """Counters saved in every checkpoint: where training stands."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    examples: int = 0
    resumed_from: list[int] = field(default_factory=list)  # steps restarted from

    def advance(self, examples: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.examples += examples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


@dataclass
class ProgressMeter:
    """Examples/s and ETA since this (re)start, for the log and the reported metrics."""

    total_steps: int
    start_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    examples: int = 0

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def count(self, examples: int) -> None:
        """Count the examples (global batch) of one finished step."""
        self.examples += examples

    def metrics(self, step: int, **extra: Any) -> dict[str, Any]:
        """The metrics dict at `step`: rate, ETA, and `extra` (losses, epoch, lr...)."""
        elapsed = self.elapsed
        eta = (self.total_steps - step) * elapsed / max(step - self.start_step, 1)
        return {"step": step, "total_steps": self.total_steps,
                "examples_per_s": self.examples / elapsed, "eta_s": eta, **extra}

    @staticmethod
    def log_line(metrics: dict[str, Any]) -> None:
        """Log one progress line (rank 0 only)."""
        if get_rank() == 0:
            log.info("step %d/%d loss %.4f %.1f examples/s ETA %.0fs", metrics["step"],
                     metrics["total_steps"], metrics.get("loss", float("nan")),
                     metrics["examples_per_s"], metrics["eta_s"])


def even_cpu_share(node_cpus: Sequence[float], workers: int, reserve: float) -> float:
    """CPUs per training worker: the largest equal share that places every worker while
    keeping `reserve` CPUs free on every node, however Ray packs the workers.

    The candidates are ``(c - reserve) / k`` for each node's CPU total `c` and k = 1 ..
    `workers` workers on it; the largest one wins for which (a) the nodes hold `workers`
    workers within their CPUs less `reserve`, and (b) on every node, the most workers Ray
    could place there (``min(workers, floor(c / share))``) leave `reserve` free. It depends
    only on the node totals, never on what happens to be free, so it is the same on every
    run. One worker on a 2-CPU node gets 1.5; one per 2-CPU node of two gets 1.5 each.

    Args:
        node_cpus: CPU total of each alive node.
        workers: training workers to place.
        reserve: CPUs to keep free on each node (the job's read tasks).

    Raises:
        ValueError: no node has more than `reserve` CPUs.
    """
    usable = [c - reserve for c in node_cpus if c > reserve]
    for share in sorted({u / k for u in usable for k in range(1, workers + 1)}, reverse=True):
        fits = sum(math.floor(u / share + 1e-9) for u in usable) >= workers
        if fits and all(_room_left(c, share, workers) >= reserve - 1e-9 for c in node_cpus):
            return share
    raise ValueError(f"no node has more than {reserve} CPUs for {workers} training workers "
                     "(and their read tasks); pass --cpus_per_worker")


def _room_left(cpus: float, share: float, workers: int) -> float:
    """CPUs a node keeps free when Ray packs on it as many workers as it can hold."""
    placed = min(workers, math.floor(cpus / share + 1e-9))
    return cpus - placed * share if placed else math.inf


def torch_threads(cpus: float) -> int:
    """Torch threads of a CPU worker holding `cpus` CPUs: the nearest whole number, at
    least one (1.5 -> 2: the half CPU kept for read tasks is a scheduling reservation for
    short tasks, not a core to leave idle)."""
    return max(1, math.floor(cpus + 0.5))


@dataclass(frozen=True, kw_only=True)
class Fault:
    """A fault drill for tests: one rank exits abruptly after `step`, once.

    Args:
        step: the optimizer step after which the rank dies.
        marker: file recording that the fault happened (so the restarted run goes on).
        rank: the rank that dies (default: rank 1, or rank 0 when alone).
    """

    step: int
    marker: str
    rank: int | None = None

    def maybe_fail(self, step: int) -> None:
        """Exit the process after `step` on the chosen rank, the first time only."""
        victim = self.rank if self.rank is not None else int(get_world_size() > 1)
        if step != self.step or get_rank() != victim or Path(self.marker).exists():
            return
        Path(self.marker).write_text(f"rank {victim} killed after step {step}\n")
        # Ray Train's controller collects reports by polling (every 2 s): wait so the
        # checkpoints reported before the failure are registered, as in a real crash
        # that comes later than a poll after the last checkpoint.
        time.sleep(FAULT_DELAY_S)
        log.warning("fault drill: rank %d exits after step %d", victim, step)
        os._exit(1)
