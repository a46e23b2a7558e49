"""AdamW with the usual no-decay groups, and Hugging Face's learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from bge_core.errors import InputError

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


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
        raise InputError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return math.ceil(total_steps * warmup_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule `transformers.get_scheduler` builds for `lr_scheduler_type` `kind`.

    ``linear``: LR factor ``step / warmup`` over the warm-up (0 at the first step), then
    linear decay to 0 at `total_steps`; ``cosine``: the same warm-up, then half a cosine
    to 0; ``constant_with_warmup``: warm-up then flat; ``constant``: flat (no warm-up).
    """
    from transformers import get_scheduler

    if kind not in SCHEDULES:
        raise InputError(f"lr_scheduler_type {kind!r} is not one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)  # "constant" ignores the warm-up
