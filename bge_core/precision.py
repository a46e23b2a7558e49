"""Compute precision: which dtypes a device can run, and the autocast context for them."""

from __future__ import annotations

import contextlib
import logging

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
    """The dtype an encoder computes in on `device`: bf16 on a CPU without native bf16 is
    emulated, slower than fp32 and no more exact, so it runs in fp32 (with one warning)."""
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("dtype bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); "
                    "encoding in fp32 instead")
        return "fp32"
    return dtype


def autocast_context(dtype: DType, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on `device`; a no-op for fp32 and int8 (not torch's)."""
    if dtype in ("fp32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])
