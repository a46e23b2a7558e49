"""Stored vector formats: float32, float16, int8 (per-dimension ranges) and binary bits.

    ranges = calibrate_int8(sample)              # (2, D): per-dimension low / high
    stored = quantize(vectors, "int8", ranges)   # (n, D) int8
    approx = dequantize(stored, "int8", ranges)  # (n, D) float32

- ``int8``: each dimension's calibrated range [low, high] maps linearly onto -128..127
  (values outside are clipped), as sentence-transformers' ``quantize_embeddings`` does;
  the ranges come from a sample of the corpus and are stored beside the vectors.
- ``binary``: one bit per dimension (``x > 0``), packed 8 to a byte (``np.packbits``,
  big-endian bit order); D/8 bytes per vector. Searched by Hamming distance, then the top
  candidates are rescored with the float query against the ±1 vectors (the way
  sentence-transformers and the vector stores rescore binary embeddings).

`search_stored` scores float queries against one shard of stored vectors of any kind.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

OutputDType = Literal["float32", "float16", "int8", "binary"]
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "int8", "binary")


def bytes_per_vector(dtype: str, dim: int) -> int:
    """Bytes one stored vector takes (the vector alone, without the table's overhead)."""
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim,
            "binary": (dim + 7) // 8}[dtype]


def calibrate_int8(sample: np.ndarray) -> np.ndarray:
    """Per-dimension ranges of a (n, D) sample: (2, D) float32, rows low and high."""
    if len(sample) == 0:
        raise ValueError("int8 calibration needs at least one vector")
    low, high = sample.min(axis=0), sample.max(axis=0)
    high = np.where(high > low, high, low + 1e-6)  # a constant dimension: any tiny width
    return np.stack([low, high]).astype(np.float32)


def quantize(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """(n, D) float vectors → their stored form (see the module docstring)."""
    if dtype == "float32":
        return vectors.astype(np.float32, copy=False)
    if dtype == "float16":
        return vectors.astype(np.float16)
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 needs calibrated ranges")
        low, high = ranges
        scaled = (vectors.astype(np.float32) - low) / (high - low) * 255.0 - 128.0
        return np.clip(np.rint(scaled), -128, 127).astype(np.int8)
    if dtype == "binary":
        return np.packbits(vectors > 0, axis=1)  # (n, ceil(D / 8)) uint8
    raise ValueError(f"unknown output dtype {dtype!r}; expected one of {OUTPUT_DTYPES}")


def dequantize(stored: np.ndarray, dtype: str, ranges: np.ndarray | None = None,
               dim: int | None = None) -> np.ndarray:
    """Stored vectors → (n, D) float32 (binary: ±1 per bit; `dim` drops the padding)."""
    if dtype in ("float32", "float16"):
        return stored.astype(np.float32, copy=False)
    if dtype == "int8":
        if ranges is None:
            raise ValueError("int8 needs calibrated ranges")
        low, high = ranges
        return low + (stored.astype(np.float32) + 128.0) / 255.0 * (high - low)
    if dtype == "binary":
        bits = np.unpackbits(stored, axis=1)
        bits = bits[:, :dim] if dim is not None else bits
        return bits.astype(np.float32) * 2.0 - 1.0
    raise ValueError(f"unknown output dtype {dtype!r}; expected one of {OUTPUT_DTYPES}")


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(queries: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(Q, B) and (S, B) packed bits → (Q, S) int32 Hamming distances."""
    out = np.zeros((len(queries), len(stored)), dtype=np.int32)
    for b in range(queries.shape[1]):  # one byte column at a time: (Q, S) memory only
        out += _POPCOUNT[np.bitwise_xor.outer(queries[:, b], stored[:, b])]
    return out


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k highest scores of each row, best first: (Q, k)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def search_stored(queries: np.ndarray, stored: np.ndarray, dtype: str, k: int,
                  ranges: np.ndarray | None = None, rescore_multiplier: int = 4
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of float queries over one shard of stored vectors.

    float32 / float16 / int8: the query against the (dequantized) stored vectors. binary:
    the ``k × rescore_multiplier`` nearest by Hamming distance to the query's bits, then
    rescored as ``query · (±1 bits)`` (asymmetric: the query stays float).

    Args:
        queries: (Q, D) float32.
        stored: (S, D) or, for binary, (S, D/8) packed.

    Returns:
        (scores (Q, k'), shard row indexes (Q, k')), best first, k' = min(k, S).
    """
    if len(stored) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    dim = queries.shape[1]
    if dtype != "binary":
        scores = queries @ dequantize(stored, dtype, ranges).T  # (Q, S)
        top = _top(scores, k)
        return np.take_along_axis(scores, top, axis=1), top
    distance = hamming(quantize(queries, "binary"), stored)  # (Q, S)
    candidates = _top(-distance.astype(np.float32), k * rescore_multiplier)  # (Q, C)
    signs = dequantize(stored, "binary", dim=dim)  # (S, D) ±1
    rescored = np.einsum("qd,qcd->qc", queries, signs[candidates])  # (Q, C)
    order = _top(rescored, k)
    return np.take_along_axis(rescored, order, axis=1), np.take_along_axis(candidates, order,
                                                                           axis=1)
