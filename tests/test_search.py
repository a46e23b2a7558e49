"""Sharded exact top-k equals brute force over the full score matrix."""

from __future__ import annotations

import numpy as np
import pytest

from bge_core.search import RunningTopK, exact_topk, merge_topk, search_shards


def _brute_force(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T  # (Q, N), full matrix
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def _vectors(seed: int, n: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("shard_size", [1, 7, 64, 250, 1000])
@pytest.mark.parametrize("query_batch", [None, 3])
def test_sharded_equals_brute_force(shard_size: int, query_batch: int | None) -> None:
    queries, corpus = _vectors(0, 20), _vectors(1, 250)
    k = 10
    scores, ids = exact_topk(queries, corpus, k, shard_size=shard_size, query_batch=query_batch)
    ref_scores, ref_ids = _brute_force(queries, corpus, k)
    assert ids.shape == (20, k) and ids.dtype == np.int64
    # Random Gaussian vectors have no exact ties, so the ids must match exactly.
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_k_larger_than_corpus_returns_every_row_sorted() -> None:
    queries, corpus = _vectors(2, 4), _vectors(3, 5)
    scores, ids = exact_topk(queries, corpus, k=50, shard_size=2)
    assert ids.shape == (4, 5)
    assert all(sorted(row) == list(range(5)) for row in ids.tolist())
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_uneven_shards_from_a_stream() -> None:
    queries, corpus = _vectors(4, 6), _vectors(5, 100)
    cuts = [0, 3, 40, 41, 99, 100]
    shards = (corpus[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    _, ids = search_shards(queries, shards, k=8)
    np.testing.assert_array_equal(ids, _brute_force(queries, corpus, 8)[1])


def test_merge_carries_string_ids() -> None:
    scores_a = np.array([[0.9, 0.1]], dtype=np.float32)
    scores_b = np.array([[0.5, 0.95]], dtype=np.float32)
    ids_a = np.array([["a", "b"]], dtype=object)
    ids_b = np.array([["c", "d"]], dtype=object)
    scores, ids = merge_topk(scores_a, ids_a, scores_b, ids_b, k=3)
    assert ids.tolist() == [["d", "a", "c"]]
    np.testing.assert_allclose(scores, [[0.95, 0.9, 0.5]])


def test_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        search_shards(_vectors(0, 2), iter([]), k=3)
    with pytest.raises(ValueError, match="dim"):
        exact_topk(_vectors(0, 2, dim=8), _vectors(1, 5, dim=4), k=3)
    with pytest.raises(ValueError, match="k must be"):
        RunningTopK(3, 0)
    with pytest.raises(ValueError, match="shard_size"):
        exact_topk(_vectors(0, 2), _vectors(1, 5), k=3, shard_size=0)


def test_torch_path_equals_numpy_path() -> None:
    """The torch scorer (the CUDA path, run here on the CPU) gives the numpy scorer's result."""
    queries, corpus = _vectors(6, 9), _vectors(7, 120)
    ref_scores, ref_ids = exact_topk(queries, corpus, k=11, shard_size=50)
    scores, ids = exact_topk(queries, corpus, k=11, shard_size=50, device="cpu")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_best_chunk_per_document_keeps_each_documents_best_chunk() -> None:
    from bge_core.search import best_chunk_per_document

    doc_ids = np.array([["d2", "d0", "d2", "d0", "d1", "d2"], ["d1"] * 6], dtype=object)
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1], [0.4, 0.3, 0.2, 0.1, 0, 0]],
                      dtype=np.float32)
    doc_scores, top = best_chunk_per_document(scores, doc_ids, k=3)
    assert top.tolist() == [["d2", "d0", "d1"], ["d1", None, None]]
    np.testing.assert_allclose(doc_scores[0], [0.9, 0.8, 0.5])
    assert doc_scores[1, 0] == np.float32(0.4) and np.isneginf(doc_scores[1, 1:]).all()
