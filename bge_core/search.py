"""Exact top-k search by inner product, one corpus shard at a time.

The score matrix of all queries against the whole corpus is never built: each shard gives a
``(queries × shard)`` block, reduced at once to its top k, and merged into a running
``(queries × k)`` result. Peak working memory is about ``12 × query_batch × shard_size``
bytes (the float32 block plus argpartition's int64 indices) on top of the inputs, so the
shard size is the knob that bounds it. With normalised embeddings the
inner product is cosine similarity.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bge_core.errors import InputError


def shard_topk(
    queries: np.ndarray, shard: np.ndarray, k: int, device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one shard: (scores, shard-local indices), each (Q, min(k, S)), best first.

    `device` (``"cuda"``, ``"cpu"``) scores with torch on that device; None uses numpy.
    """
    if device is not None:
        return _shard_topk_torch(queries, shard, k, device)
    scores = queries @ shard.T  # (Q, S)
    kk = min(k, scores.shape[1])
    if kk == scores.shape[1]:
        return _sorted(scores, np.broadcast_to(np.arange(kk), scores.shape).copy())
    np.negative(scores, out=scores)  # in place: argpartition finds the smallest
    part = np.argpartition(scores, kk - 1, axis=1)[:, :kk]  # (Q, kk), unordered
    return _sorted(-np.take_along_axis(scores, part, axis=1), part)


def _shard_topk_torch(
    queries: np.ndarray, shard: np.ndarray, k: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries)).to(device)  # (Q, D)
    s = torch.from_numpy(np.ascontiguousarray(shard)).to(device)  # (S, D)
    top = torch.topk(q @ s.T, min(k, s.shape[0]), dim=1)  # values/indices (Q, k'), sorted
    return top.values.float().cpu().numpy(), top.indices.cpu().numpy()


def merge_topk(
    scores_a: np.ndarray, ids_a: np.ndarray, scores_b: np.ndarray, ids_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-query candidate lists (Q, a) and (Q, b) into the best (Q, ≤k), sorted.

    Ids may be any dtype (row numbers or document-id strings); they are only carried along.
    """
    scores = np.concatenate([scores_a, scores_b], axis=1)  # (Q, a + b)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    kk = min(k, scores.shape[1])
    if kk < scores.shape[1]:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # (Q, kk)
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    return _sorted(scores, ids)


def _sorted(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score, highest first (stable, so equal scores keep their order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class RunningTopK:
    """Keeps each query's best k (score, id) pairs while candidate blocks stream in."""

    def __init__(self, n_queries: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.scores = np.empty((n_queries, 0), dtype=np.float32)
        self.ids: np.ndarray | None = None

    def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Merge a (Q, m) block of candidate scores with their (Q, m) ids."""
        if self.ids is None:
            self.ids = np.empty((scores.shape[0], 0), dtype=ids.dtype)
        self.scores, self.ids = merge_topk(self.scores, self.ids, scores, ids, self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, min(k, candidates seen)), best first."""
        if self.ids is None:
            raise InputError("no corpus shard was searched: the corpus is empty")
        return self.scores, self.ids


def search_shards(
    queries: np.ndarray, shards: Iterable[np.ndarray], k: int, query_batch: int | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a corpus given as a stream of (S_i, D) shards.

    Args:
        queries: (Q, D) float32 query embeddings.
        shards: corpus blocks in corpus order; ids are global row numbers.
        k: results per query.
        query_batch: queries scored at once (default all); with the shard size it bounds
            the score block, ``query_batch × shard_size`` floats.
        device: score with torch on this device (``"cuda"``); None: numpy on the CPU.

    Returns:
        (scores (Q, k') float32, row numbers (Q, k') int64), best first, k' = min(k, N).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    step = query_batch or max(len(queries), 1)
    top = RunningTopK(len(queries), k)
    offset = 0
    for shard in shards:
        shard = np.ascontiguousarray(shard, dtype=np.float32)
        if shard.shape[1] != queries.shape[1]:
            raise ValueError(f"corpus dim {shard.shape[1]} != query dim {queries.shape[1]}")
        blocks = [shard_topk(queries[i : i + step], shard, k, device)
                  for i in range(0, len(queries), step)]
        scores = np.concatenate([b[0] for b in blocks])  # (Q, min(k, S))
        local = np.concatenate([b[1] for b in blocks])
        top.add(scores, local.astype(np.int64) + offset)
        offset += len(shard)
    return top.result()


def exact_topk(
    queries: np.ndarray, corpus: np.ndarray, k: int, shard_size: int = 65536,
    query_batch: int | None = None, device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of an in-memory (N, D) corpus, scored `shard_size` rows at a time."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards = (corpus[i : i + shard_size] for i in range(0, len(corpus), shard_size))
    return search_shards(queries, shards, k, query_batch, device)


def best_chunk_per_document(scores: np.ndarray, doc_ids: np.ndarray,
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Document ranking from a chunk ranking: a document scores its best chunk.

    Exact when the hits hold each query's top ``k × max chunks per document`` chunks: fewer
    than that many chunks can outscore the best chunk of a top-k document.

    Args:
        scores: (Q, K) chunk scores, best first.
        doc_ids: (Q, K) the document id of each chunk hit.
        k: documents per query.

    Returns:
        (Q, k) scores (-inf padded) and document ids (object array, None padded), best first.
    """
    out_scores = np.full((len(doc_ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(doc_ids), k), None, dtype=object)
    for q, (row_scores, row_ids) in enumerate(zip(scores.tolist(), doc_ids.tolist())):
        seen: set = set()
        for score, doc in zip(row_scores, row_ids):
            if doc not in seen:  # chunks come best first: the first seen is the best
                out_scores[q, len(seen)], out_ids[q, len(seen)] = score, doc
                seen.add(doc)
                if len(seen) == k:
                    break
    return out_scores, out_ids
