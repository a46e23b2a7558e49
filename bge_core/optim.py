"""AdamW with the usual no-decay groups, and warm-up schedules (Hugging Face's names)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D tensors) get no weight decay (BERT practice)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length for `warmup_ratio` of `total_steps` (rounded up, as HF does)."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rising linearly 0 → 1 over `warmup` steps, then falling linearly to 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A schedule by Hugging Face's `lr_scheduler_type` name.

    ``linear``: warm-up then linear decay to 0; ``cosine``: warm-up then half a cosine to 0;
    ``constant_with_warmup``: warm-up then flat; ``constant``: flat (no warm-up).
    """
    if kind == "linear":
        return linear_warmup_decay(optimizer, warmup, total_steps)
    if kind not in ("cosine", "constant", "constant_with_warmup"):
        raise ValueError(f"lr_scheduler_type {kind!r} is not one of linear, cosine, "
                         "constant, constant_with_warmup")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    ramp = 0 if kind == "constant" else warmup

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / (ramp + 1)
        if kind != "cosine":
            return 1.0
        progress = (step - ramp) / max(1, total_steps - ramp)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
