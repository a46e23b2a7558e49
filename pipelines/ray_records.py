"""JSONL records as Ray datasets, read and written by Ray tasks, never through the driver.

`read_records` streams each file in a Ray task (`bge_core.jsonl` line reading) and yields
blocks of `block_rows` rows, every record checked by its `bge_core.records` validator; a
bad record becomes one row whose ``error`` column holds its located message, and
`raise_first_error` stops the job with it. `number_rows` numbers rows 0..n-1 in block order
(counts per block, not rows, reach the driver). `write_lines` writes a dataset of
``(order, line)`` rows as one JSONL file at a local path or URI: sorted, written in parts by
tasks, and concatenated by one task.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from bge_core.jsonl import open_text
from bge_core.records import Check, RecordError, parse_lines

ToRow = Callable[[int, int, Any], dict[str, Any]]  # (ordinal, line, record) → row
IO_CPUS = 0.25  # a read/write task waits on storage more than it computes
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def io_remote_args() -> dict[str, Any]:
    """Ray args of a task that reads or writes the job's files: few CPUs, and the driver's
    storage settings (``AWS_*``) when it has any, so workers reach the same store."""
    env = {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
    return {"num_cpus": IO_CPUS, **({"runtime_env": {"env_vars": env}} if env else {})}


def require_file(uri: str, what: str) -> None:
    """Fail on the driver, naming `what`, before any task reads a missing file."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{what} not found: {uri}")


def _read_file(item: dict[str, np.ndarray], check: Check, to_row: ToRow, schema: pa.Schema,
               what: str, block_rows: int) -> Iterator[pa.Table]:
    """Ray task: one file → blocks of checked rows (an error row ends the file)."""
    path = str(item["path"][0])
    rows: list[dict[str, Any]] = []
    with open_text(path, what=what) as handle:
        for ordinal, (line, obj, error) in enumerate(parse_lines(handle, path, check)):
            rows.append({"error": error} if error else to_row(ordinal, line, obj))
            if error or len(rows) == block_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
            if error:
                return
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def read_records(path: str, check: Check, to_row: ToRow, schema: pa.Schema, what: str,
                 block_rows: int = 4096) -> ray.data.Dataset:
    """The records of a JSONL file as a materialised dataset (in the object store), checked.

    Args:
        path: local path or fsspec URI.
        check: the record kind's validator (`bge_core.records`).
        to_row: (ordinal among the file's records, line number, record) → row of `schema`.
        schema: the rows' columns (an ``error`` string column is added).
        what: the file's role, for messages ("training data", "candidate pool").
        block_rows: rows per block.

    Raises:
        FileNotFoundError: `path` is missing. `RecordError`: a record is bad (file, line,
        field named).
    """
    require_file(path, what)
    schema = schema.append(pa.field("error", pa.string()))
    files = ray.data.from_items([{"path": path}])
    ds = files.map_batches(
        _read_file, batch_size=1, batch_format="numpy",
        fn_kwargs={"check": check, "to_row": to_row, "schema": schema, "what": what,
                   "block_rows": block_rows}, **io_remote_args()).materialize()
    raise_first_error(ds)
    return ds.drop_columns(["error"])


def raise_first_error(ds: ray.data.Dataset) -> None:
    """Raise `RecordError` with the first bad record's message (only that row is fetched)."""
    bad = ds.map_batches(lambda t: t.filter(pc.is_valid(t["error"])).select(["error"]),
                         batch_format="pyarrow", num_cpus=IO_CPUS)
    first = bad.take(1)
    if first:
        raise RecordError(first[0]["error"])


@ray.remote(num_cpus=IO_CPUS)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=IO_CPUS)
def _with_ids(table: pa.Table, start: int, column: str) -> pa.Table:
    ids = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
    return table.append_column(column, ids)


def number_rows(ds: ray.data.Dataset, column: str) -> ray.data.Dataset:
    """`ds` with an int64 `column` numbering its rows 0..n-1 in block order (a sorted
    dataset: by its sort key). The driver holds block references and counts only."""
    refs = ds.to_arrow_refs()
    counts = ray.get([_num_rows.remote(ref) for ref in refs])
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    return ray.data.from_arrow_refs(
        [_with_ids.remote(ref, int(s), column) for ref, s in zip(refs, starts)])


def _write_part(batch: pa.Table, folder: str) -> pa.Table:
    """Ray task: one sorted batch of lines → a part file named by its first `order`."""
    first = int(pc.min(batch["order"]).as_py())
    name = f"{folder}/part-{first:015d}-{uuid.uuid4().hex[:8]}.jsonl"
    with open_text(name, "w") as handle:
        for line in batch["line"].to_pylist():
            handle.write(line + "\n")
    return pa.table({"part": [name], "first": [first]})


@ray.remote
def _concatenate(parts: list[str], uri: str, folder: str) -> None:
    """Ray task: the parts, in order, streamed into one file; then the parts are deleted."""
    with fsspec.open(uri, "wb", auto_mkdir=True) as out:
        for part in parts:
            with fsspec.open(part, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    out.write(chunk)
    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_lines(ds: ray.data.Dataset, uri: str) -> None:
    """Write the ``line`` column of `ds` in ``order`` as one text file at `uri` (lines end
    with a newline); tasks write sorted parts beside it, one task joins them."""
    folder = f"{uri.rstrip('/')}.parts-{uuid.uuid4().hex[:8]}"
    written = ds.sort("order").map_batches(
        _write_part, batch_format="pyarrow", batch_size=None, fn_kwargs={"folder": folder},
        **io_remote_args())
    parts = sorted((int(r["first"]), r["part"]) for r in written.take_all())  # O(parts)
    args = io_remote_args()
    ray.get(_concatenate.options(**args).remote([p for _, p in parts], uri, folder))


def shuffle_partitions(ds: ray.data.Dataset, bytes_per_partition: int = 128 << 20) -> int:
    """Partitions for a join or group-by over materialised `ds`: ~128 MiB each, at least 2
    (Ray's default of 200 costs minutes of scheduling on small inputs)."""
    size = ds.size_bytes() or 0
    return max(2, -(-size // bytes_per_partition))
