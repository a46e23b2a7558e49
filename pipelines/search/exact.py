"""Exact top-k over corpus shards on Ray, shared by evaluation and mining.

The corpus is encoded with the shared Ray Data stage (`pipelines.common.encode`) and never
gathered: each corpus shard (``shard_rows`` embeddings) is scored against all queries in a
Ray task that keeps only its top k, and the driver merges the per-shard results
(`bge_core.search.RunningTopK`). Rows carry their id (``row``: a number or a document id),
so the driver gets ids and scores, O(queries × k), and never the corpus.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray

from bge_core.search import RunningTopK, search_shards
from pipelines.common.encode import arrow_to_vectors
from pipelines.common.encode_options import SearchOptions


def list_column(flat: np.ndarray) -> pa.LargeListArray:
    """One list cell holding the whole flat array (int64 offsets: no 2 GiB limit)."""
    offsets = pa.array([0, len(flat)], type=pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pa.array(flat))


def shard_topk_task(batch: pa.Table, queries: Any, k: int, query_batch: int | None,
                    device: str | None) -> pa.Table:
    """Ray task: one corpus shard → a one-row table with its (Q, k') scores and corpus rows.

    `queries` is the (Q, D) array or an object ref to it (shared, not pickled per task).
    """
    if isinstance(queries, ray.ObjectRef):
        queries = ray.get(queries)  # zero-copy numpy view from the object store
    vectors = arrow_to_vectors(batch.column("embedding")).astype(np.float32)  # (S, D)
    scores, local = search_shards(queries, [vectors], k, query_batch, device)  # (Q, k')
    rows = batch.column("row").to_numpy(zero_copy_only=False)[local]  # (Q, k') corpus ids
    return pa.table({"scores": list_column(scores.ravel()),
                     "rows": list_column(rows.ravel()),
                     "width": pa.array([scores.shape[1]], type=pa.int64())})


def search_corpus(
    corpus: ray.data.Dataset, queries: np.ndarray, k: int, opts: SearchOptions,
    query_batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over an encoded corpus dataset.

    Args:
        corpus: dataset with ``row`` (int64 or string ids) and ``embedding`` columns.
        queries: (Q, D) float32.
        k: results per query.
        opts: corpus rows scored per task (bounds a task's memory:
            ``search_shard_rows × (D + 3 × Q) × 4`` bytes, or ``× query_batch``), CPUs
            per task, and whether a task scores on a GPU (torch) instead of numpy.
        query_batch: queries scored at once inside a task (default all).

    Returns:
        (scores (Q, k') float32, corpus ids (Q, k') of the ``row`` column), best first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    use_gpu = opts.use_gpu_for_searching
    remote: dict[str, Any] = {"num_cpus": opts.search_cpus}
    if use_gpu:
        remote["num_gpus"] = 1
    results = corpus.map_batches(
        shard_topk_task, batch_format="pyarrow", batch_size=opts.search_shard_rows,
        fn_kwargs={"queries": ray.put(queries), "k": k, "query_batch": query_batch,
                   "device": "cuda" if use_gpu else None},
        **remote,
    )
    top = RunningTopK(len(queries), k)
    for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
        scores_col = table.column("scores").combine_chunks()
        rows_col = table.column("rows").combine_chunks()
        for i, width in enumerate(table.column("width").to_pylist()):
            scores = scores_col[i].values.to_numpy().reshape(len(queries), width)
            rows = rows_col[i].values.to_numpy(zero_copy_only=False).reshape(len(queries),
                                                                             width)
            top.add(scores, rows)
    return top.result()
