"""Encoder settings: how a backbone's hidden states become one embedding per text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from bge_core.errors import InputError

Pooling = Literal["cls", "mean", "last_token"]
DType = Literal["fp32", "bf16", "fp16", "int8"]

# Fields that describe the model (written beside the weights by `Encoder.save`). The rest
# are run-time knobs (precision, batch sizes) that a checkpoint should not pin.
SAVED_FIELDS = ("pooling", "normalize", "query_instruction", "max_length", "query_max_length",
                "temperature")  # temperature: how it was trained, not how it encodes
# Micro-batch limits (rows, padded tokens) when not set: measured on a 2-core Zen 3 CPU,
# 64 rows / 2,048 tokens encoded STS-B 1.3x and NFCorpus 1.08x faster than 256 / 16,384
# (BENCHMARKS.md); GPUs want big batches.
DEFAULT_BATCH_LIMITS = {"cpu": (64, 2048), "gpu": (256, 16384)}


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Model settings for an `Encoder`.

    Args:
        pooling: how token states become one vector: ``cls`` (BGE), ``mean``
            (sentence-transformers models), ``last_token`` (decoder-style models).
        normalize: L2-normalise embeddings, so inner product is cosine similarity.
        query_instruction: prefix added to queries by `encode_queries` (BGE's
            short-query→passage retrieval instruction); never added to passages.
        max_length: token limit for passages and plain `encode` (truncated beyond).
        query_max_length: token limit for queries; ``None`` means ``max_length``.
        temperature: the contrastive-loss temperature the model was trained at (None:
            unknown); finetuning continues at it unless ``--temperature`` is given, and
            saves the one it used. Not used for encoding.
        dtype: compute precision for encoding: ``fp32``, ``bf16``, ``fp16`` (GPU only) or
            ``int8`` (CPU only: ONNX Runtime with per-channel int8 weights, `bge_core.int8`).
        batch_size: most rows in one micro-batch (default: 64 on CPU, 256 on GPU).
        max_tokens_per_batch: most padded tokens (rows × longest row) in one micro-batch
            (default: 2,048 on CPU, where smaller batches stay in cache and measured
            faster, 16,384 on GPU).
    """

    pooling: Pooling = "cls"
    normalize: bool = True
    query_instruction: str | None = None
    max_length: int = 512
    query_max_length: int | None = None
    temperature: float | None = None
    dtype: DType = "fp32"
    batch_size: int | None = None
    max_tokens_per_batch: int | None = None

    def __post_init__(self) -> None:
        if self.pooling not in get_args(Pooling):
            raise InputError(f"pooling must be one of {get_args(Pooling)}, got {self.pooling!r}")
        if self.dtype not in get_args(DType):
            raise InputError(f"dtype must be one of {get_args(DType)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "max_tokens_per_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.query_max_length is not None and self.query_max_length < 1:
            raise InputError(f"query_max_length must be >= 1, got {self.query_max_length}")
        if self.temperature is not None and self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")

    @property
    def effective_query_max_length(self) -> int:
        return self.query_max_length or self.max_length

    def batch_limits(self, device_type: str) -> tuple[int, int]:
        """(rows, padded tokens) per micro-batch on a ``cpu`` or ``cuda`` device."""
        rows, tokens = DEFAULT_BATCH_LIMITS["cpu" if device_type == "cpu" else "gpu"]
        return self.batch_size or rows, self.max_tokens_per_batch or tokens

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with `changes` applied; unknown names raise `TypeError`."""
        return dataclasses.replace(self, **changes)

    def saved_dict(self) -> dict[str, Any]:
        """The model-describing fields, as stored beside a checkpoint's weights."""
        return {name: getattr(self, name) for name in SAVED_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        """Build from a dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown encoder config keys {unknown}; known: {sorted(known)}")
        return cls(**values)
