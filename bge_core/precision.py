"""Compute precision: which dtypes a device can run, the autocast context for them, and
(for training) the ``--fp16`` / ``--bf16`` flags and loss scaling (`Precision`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bge_core.config import DType
from bge_core.errors import InputError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_dtype(dtype: DType, device: torch.device) -> None:
    """Reject fp16 on CPU and int8 on GPU; warn when bf16 on this CPU is emulated."""
    if dtype == "fp16" and device.type != "cuda":
        raise InputError("dtype 'fp16' needs a CUDA GPU; on CPU use 'bf16' or 'fp32'")
    if dtype == "int8" and device.type != "cpu":
        raise InputError(f"dtype 'int8' runs on CPU only (OpenVINO int8 kernels), not on "
                         f"{device}; on a GPU use 'fp16' or 'bf16', or load with device='cpu'")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and "
                    "usually slower than fp32 here")


def cpu_dtype(dtype: DType, device: torch.device) -> DType:
    """The dtype an encoder (or a training step) computes in on `device`: bf16 on a CPU
    without native bf16 is emulated, slower than fp32 and no more exact, so it runs in fp32
    (with one warning)."""
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("dtype bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); "
                    "running fp32 instead")
        return "fp32"
    return dtype


def autocast_context(dtype: DType, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on `device`; a no-op for fp32 and int8 (not torch's)."""
    if dtype in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


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
    """Autocast and (for fp16) loss scaling for one training device."""

    dtype: DType
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, dtype: DType, device: torch.device) -> Precision:
        """Training precision on `device`: ``--bf16`` on a CPU without native bf16 trains in
        fp32 (one warning), as the encoder does: emulated bf16 is slower and no more exact,
        so a command line written for a GPU or a bf16 CPU runs anywhere."""
        dtype = cpu_dtype(dtype, device)
        check_dtype(dtype, device)  # fp16 needs CUDA
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
