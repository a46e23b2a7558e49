"""A Lance table of embeddings: open it anywhere, index it, search it.

Lance is embedded (no server): a table is a folder, local or on an object store. For
``s3://`` the endpoint and region come from the standard AWS settings of this process's
environment (``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``); Lance's
object store reads the credentials from the same environment itself, so none are passed
around (nor put in a Ray ``runtime_env``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
VECTOR_COLUMN = "embedding"
MIN_INDEX_ROWS = 256  # PQ / SQ training needs at least one 8-bit codebook's worth of rows


def storage_options(uri: str) -> dict[str, str] | None:
    """Lance's object-store settings for `uri` from the AWS environment (no secrets)."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["aws_region"] = region
    return options


def open_table(uri: str) -> Any | None:
    """The table at `uri` (latest version), or None when there is none yet."""
    import lance

    try:
        return lance.dataset(uri, storage_options=storage_options(uri))
    except (ValueError, FileNotFoundError, OSError) as err:
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            return None
        raise


def sql_in(column: str, values: list[Any]) -> str:
    """A Lance (DataFusion SQL) filter ``column IN (...)`` with quoted literals."""
    def literal(value: Any) -> str:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        return "'" + str(value).replace("'", "''") + "'"

    return f"`{column}` IN ({', '.join(literal(v) for v in values)})"


def metric_for(normalized: bool) -> str:
    """Cosine for unit vectors (the same ranking as inner product), else dot."""
    return "cosine" if normalized else "dot"


def index_params(kind: str, rows: int, dim: int) -> dict[str, Any]:
    """Index parameters from the table's size.

    ivf_pq: ~sqrt(rows) partitions (the FAISS / Lance rule of thumb) but at least 256
    rows each (fewer leave partitions untrained), one 8-bit PQ code per 8 dimensions (D/8
    bytes per vector). ivf_hnsw_sq: an HNSW graph per partition over 8-bit scalar-quantized
    vectors; one partition per ~1M rows.
    """
    if kind == "ivf_pq":
        partitions = max(1, min(4096, round(math.sqrt(rows)), rows // MIN_INDEX_ROWS))
        return {"index_type": "IVF_PQ", "num_partitions": partitions,
                "num_sub_vectors": dim // 8 if dim % 8 == 0 else 1}
    if kind == "ivf_hnsw_sq":
        return {"index_type": "IVF_HNSW_SQ", "num_partitions": max(1, rows // 1_000_000)}
    raise ValueError(f"unknown index {kind!r}; expected ivf_pq or ivf_hnsw_sq")


def build_index(table: Any, kind: str, normalized: bool) -> dict[str, Any] | None:
    """Create (replace) the ANN index on the vector column; None if the table is too small."""
    rows = table.count_rows()
    if rows < MIN_INDEX_ROWS:
        log.warning("not indexing: %d rows is below the %d an index trains on; search is "
                    "exact", rows, MIN_INDEX_ROWS)
        return None
    dim = table.schema.field(VECTOR_COLUMN).type.list_size
    params = index_params(kind, rows, dim)
    start = time.monotonic()
    table.create_index(VECTOR_COLUMN, metric=metric_for(normalized), replace=True, **params)
    params.update(kind=kind, metric=metric_for(normalized), rows=rows,
                  seconds=round(time.monotonic() - start, 3))
    log.info("index %s built over %d rows in %.1fs", kind, rows, params["seconds"])
    return params


def has_vector_index(table: Any) -> bool:
    return any(VECTOR_COLUMN in d.field_names for d in table.describe_indices())


def search(table: Any, queries: np.ndarray, k: int, id_column: str, *, use_index: bool,
           metric: str = "cosine", nprobes: int | None = None, refine_factor: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Top-k of each query, one query at a time as a user would search: (scores (Q, k),
    ids (Q, k) object, seconds per query). `use_index=False` is Lance's exact (flat) scan.

    Scores: cosine for ``metric="cosine"`` (``1 - distance``), else ``-distance``.
    """
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), None, dtype=object)
    seconds: list[float] = []
    for q, query in enumerate(queries):
        nearest: dict[str, Any] = {"column": VECTOR_COLUMN, "q": query, "k": k,
                                   "use_index": use_index, "metric": metric}
        if nprobes:
            nearest["nprobes"] = nprobes
        if refine_factor:
            nearest["refine_factor"] = refine_factor
        start = time.perf_counter()
        hits = table.to_table(columns=[id_column, "_distance"], nearest=nearest)
        seconds.append(time.perf_counter() - start)
        distance = hits.column("_distance").to_numpy(zero_copy_only=False)
        n = len(distance)
        scores[q, :n] = 1.0 - distance if metric == "cosine" else -distance
        ids[q, :n] = hits.column(id_column).to_pylist()
    return scores, ids, seconds
