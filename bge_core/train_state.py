"""Where training stands, as a checkpoint holds it: the step counters (`TrainState`) and
every random number generator training draws from (`rng_state` / `set_rng_state`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


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
