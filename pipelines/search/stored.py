"""`evaluate.py --vectors OUT`: score the vectors an `embed_corpus.py` run stored.

OUT is a Parquet output folder or a Lance table; its manifest says how the vectors are
stored (`bge_core.quantize_vectors`): float32 / float16 / int8 are scored exactly against
the float query (int8 dequantized with the manifest's ranges); binary by Hamming distance,
then the ``k × rescore_multiplier`` best rescored with the float query. Shards are scored
by Ray tasks; only each query's top k comes back. With ``--index`` the Lance table's ANN
index answers each query as a user's search would, and the result is compared with the
exact search (recall@k vs exact, latency per query).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import ray

from bge_core.errors import InputError
from bge_core.quantize_vectors import search_stored
from bge_core.search import RunningTopK
from pipelines.common.encode import arrow_to_vectors, encode_texts, query_instruction
from pipelines.common.encode_options import EncodeOptions
from pipelines.search.exact import list_column

log = logging.getLogger(__name__)


def read_manifest(uri: str) -> dict[str, Any]:
    path = f"{uri.rstrip('/')}/_manifest.json"
    fs, inner = fsspec.core.url_to_fs(path)
    if not fs.exists(inner):
        raise InputError(f"--vectors {uri}: no _manifest.json (not a finished embed_corpus "
                         "output)")
    with fs.open(inner, "r") as handle:
        return json.load(handle)


def stored_dataset(uri: str, manifest: dict[str, Any]) -> ray.data.Dataset:
    columns = [manifest["id_column"], "embedding"]
    if manifest.get("chunk_tokens"):
        raise InputError(f"--vectors {uri}: chunked outputs are not supported here")
    if manifest.get("format") == "lance":
        from pipelines.embed.lance_table import storage_options

        return ray.data.read_lance(uri, columns=columns, storage_options=storage_options(uri))
    from pipelines.embed.output import list_parts

    return ray.data.read_parquet(list_parts(uri)).select_columns(columns)


def stored_topk_task(batch: pa.Table, queries: Any, k: int, id_column: str, dtype: str,
                     ranges: list | None, rescore_multiplier: int) -> pa.Table:
    """Ray task: one shard of stored vectors → its (Q, k') scores and document ids."""
    if isinstance(queries, ray.ObjectRef):
        queries = ray.get(queries)
    stored = arrow_to_vectors(batch.column("embedding"))  # (S, D) or (S, D/8) bits
    scores, local = search_stored(queries, stored, dtype, k,
                                  None if ranges is None else np.asarray(ranges, np.float32),
                                  rescore_multiplier)
    ids = np.asarray(batch.column(id_column).to_pylist(), dtype=object)[local]
    return pa.table({"scores": list_column(scores.astype(np.float32).ravel()),
                     "rows": list_column(np.asarray(ids.ravel(), dtype=str)),
                     "width": pa.array([scores.shape[1]], type=pa.int64())})


def exact_stored(uri: str, manifest: dict[str, Any], queries: np.ndarray, k: int,
                 rescore_multiplier: int) -> tuple[np.ndarray, np.ndarray]:
    results = stored_dataset(uri, manifest).map_batches(
        stored_topk_task, batch_format="pyarrow", batch_size=50_000, num_cpus=0.5,
        fn_kwargs={"queries": ray.put(queries), "k": k, "id_column": manifest["id_column"],
                   "dtype": manifest.get("output_dtype", "float32"),
                   "ranges": manifest.get("int8_ranges"),
                   "rescore_multiplier": rescore_multiplier})
    top = RunningTopK(len(queries), k)
    for table in results.iter_batches(batch_format="pyarrow", batch_size=None):
        scores_col = table.column("scores").combine_chunks()
        rows_col = table.column("rows").combine_chunks()
        for i, width in enumerate(table.column("width").to_pylist()):
            top.add(scores_col[i].values.to_numpy().reshape(len(queries), width),
                    np.asarray(rows_col[i].values.to_pylist(), dtype=object).reshape(
                        len(queries), width))
    return top.result()


def retrieve_stored(uri: str, opts: EncodeOptions, instruction: str | None,
                    query_texts: list[str], k: int, *, index: bool = False,
                    nprobes: int | None = None, refine_factor: int | None = None,
                    rescore_multiplier: int = 4) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores (Q, k), document ids (Q, k), timings and index figures) over stored vectors."""
    manifest = read_manifest(uri)
    if manifest.get("model") != opts.model:
        log.warning("--vectors %s were embedded with %s; queries are encoded with %s",
                    uri, manifest.get("model"), opts.model)
    timings: dict[str, Any] = {"output_dtype": manifest.get("output_dtype", "float32"),
                               "bytes_per_vector": manifest.get("bytes_per_vector")}
    start = time.perf_counter()
    queries = encode_texts(query_texts, opts, prefix=query_instruction(opts.model, instruction))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    timings["encode_queries_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores, ids = exact_stored(uri, manifest, queries, k, rescore_multiplier)
    timings["search_s"] = time.perf_counter() - start
    if not index:
        return scores, ids, timings
    return _index_search(uri, manifest, queries, k, ids, timings, nprobes, refine_factor)


def _index_search(uri: str, manifest: dict[str, Any], queries: np.ndarray, k: int,
                  exact_ids: np.ndarray, timings: dict[str, Any], nprobes: int | None,
                  refine_factor: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ANN index's answers, and how many of the exact top 10 / k they keep."""
    from pipelines.embed.lance_table import has_vector_index, metric_for, open_table, search

    table = open_table(uri) if manifest.get("format") == "lance" else None
    if table is None or not has_vector_index(table):
        raise InputError(f"--index: {uri} is not a Lance table with a vector index "
                         "(embed_corpus.py --format lance --index ivf_pq)")
    metric = metric_for(bool(manifest.get("normalize", True)))
    scores, ids, seconds = search(table, queries, k, manifest["id_column"], use_index=True,
                                  metric=metric, nprobes=nprobes, refine_factor=refine_factor)
    ids = np.array([[None if d is None else str(d) for d in row] for row in ids.tolist()],
                   dtype=object)  # as the exact search names them
    _, _, flat = search(table, queries, k, manifest["id_column"], use_index=False,
                        metric=metric)
    for cut in sorted({10, k}):
        kept = [len(set(a[:cut]) & set(b[:cut])) / max(1, len(set(b[:cut])))
                for a, b in zip(ids.tolist(), exact_ids.tolist())]
        timings[f"index_recall@{cut}_vs_exact"] = float(np.mean(kept))
    timings.update(index=manifest.get("index"), nprobes=nprobes, refine_factor=refine_factor,
                   index_query_ms_p50=1e3 * float(np.median(seconds)),
                   index_query_ms_mean=1e3 * float(np.mean(seconds)),
                   flat_query_ms_p50=1e3 * float(np.median(flat)))
    return scores, ids, timings
