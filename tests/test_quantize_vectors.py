"""Stored vector formats (`bge_core.quantize_vectors`): round trips and stored search."""

from __future__ import annotations

import numpy as np
import pytest

from bge_core.quantize_vectors import (
    bytes_per_vector,
    calibrate_int8,
    dequantize,
    hamming,
    quantize,
    search_stored,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_round_trip_is_within_half_a_step_inside_the_ranges() -> None:
    x = _unit(500, 64)
    ranges = calibrate_int8(x)
    back = dequantize(quantize(x, "int8", ranges), "int8", ranges)
    step = (ranges[1] - ranges[0]) / 255.0
    assert np.all(np.abs(back - x) <= step / 2 + 1e-6)
    outside = dequantize(quantize(x * 3, "int8", ranges), "int8", ranges)  # clipped
    assert np.all(outside <= ranges[1] + 1e-6) and np.all(outside >= ranges[0] - 1e-6)


def test_binary_is_packed_sign_bits_and_hamming_counts_them() -> None:
    x = _unit(20, 20)  # 20 dims: 3 bytes, the last one padded
    bits = quantize(x, "binary")
    assert bits.shape == (20, 3) and bytes_per_vector("binary", 20) == 3
    signs = dequantize(bits, "binary", dim=20)
    assert np.array_equal(signs > 0, x > 0)
    expected = (signs[:, None, :] != signs[None, :, :]).sum(-1)
    assert np.array_equal(hamming(bits, bits), expected)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "binary"])
def test_search_stored_finds_each_vector_itself_first(dtype: str) -> None:
    corpus = _unit(300, 64)
    ranges = calibrate_int8(corpus) if dtype == "int8" else None
    stored = quantize(corpus, dtype, ranges)
    scores, top = search_stored(corpus[:50], stored, dtype, k=5, ranges=ranges)
    assert top.shape == (50, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)
    assert np.array_equal(top[:, 0], np.arange(50))


def test_binary_rescoring_recovers_float_neighbours_better_than_hamming_alone() -> None:
    corpus = _unit(2000, 64, seed=1)
    queries = _unit(100, 64, seed=2)
    exact = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    bits = quantize(corpus, "binary")
    _, plain = search_stored(queries, bits, "binary", k=10, rescore_multiplier=1)
    _, rescored = search_stored(queries, bits, "binary", k=10, rescore_multiplier=10)

    def recall(found: np.ndarray) -> float:
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])

    assert recall(rescored) > recall(plain)
