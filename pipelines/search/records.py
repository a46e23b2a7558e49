"""JSONL records as Ray datasets, read and written by Ray tasks, never through the driver.

`read_checked_dataset` reads the files in ranges (`bge_core.io`, the reader every job
uses), one Ray task per range, every record checked by its `bge_core.records` validator; a bad
record becomes one row whose ``error`` column holds its located message, and
`raise_first_error` stops the job with the first in file order. `number_rows` numbers
rows 0..n-1 in file order (counts per block, not rows, reach the driver). `write_lines`
writes a dataset of ``(order, line)`` rows as one JSONL file at a local path or URI:
sorted, written in parts by tasks, and concatenated by one task.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from bge_core.io import RANGE_ROWS, DataFileError, FileRange, open_text, read_range
from bge_core.records import Check, RecordError, located
from bge_core.storage import storage_runtime_env
from pipelines.common.corpus_io import ROW_BITS
from pipelines.common.ranges import plan_data, range_dataset

ToRow = Callable[[int, int, Any], dict[str, Any]]  # (key, line, record) → row
ERROR_KEY = "_error_key"  # the key of an error row (the first bad record wins)
IO_CPUS = 0.25  # a read/write task waits on storage more than it computes


def io_remote_args() -> dict[str, Any]:
    """Ray args of a task that reads or writes the job's files: few CPUs, and the driver's
    store endpoint and region when it has any (never credentials: `storage_runtime_env`)."""
    return {"num_cpus": IO_CPUS, **storage_runtime_env()}


def _read_range(part: FileRange, check: Check, to_row: ToRow, schema: pa.Schema) -> pa.Table:
    """Ray task: one range (`bge_core.io`) → its checked rows; the range's first bad
    record becomes an error row (its message and key) and ends the range."""
    unit = "row" if part.fmt == "parquet" else "line"
    rows: list[dict[str, Any]] = []
    for row, obj, error in read_range(part):
        key = (part.file_index << ROW_BITS) | row
        reason = error or check(obj)
        if reason:
            rows.append({"error": located(part.path, row + 1, reason, unit), ERROR_KEY: key})
            break
        rows.append(to_row(key, row + 1, obj))
    return pa.Table.from_pylist(rows, schema=schema)


def read_checked_dataset(uri: str, check: Check, to_row: ToRow, schema: pa.Schema,
                         what: str, rows_per_range: int = RANGE_ROWS) -> ray.data.Dataset:
    """The records of the JSONL/Parquet files at `uri`, checked, as a materialised dataset.

    The one reader of `bge_core.io`: files listed (a file, a folder or a glob), each cut
    into ranges of about `rows_per_range` rows (JSONL at line breaks) in Ray tasks, and a
    Ray task reads each range, so no file is read whole in one task or on the driver.

    Args:
        uri: local path or fsspec URI.
        check: the record kind's validator (`bge_core.records`).
        to_row: (key, line, record) → row of `schema`; ``key`` = ``file_index << 40 |
            row`` orders records as the files do (`number_rows` makes them dense).
        schema: the rows' columns.
        what: the files' role, for messages ("training data", "candidate pool").

    Raises:
        DataFileError: nothing at `uri`, or an unreadable file (named). `RecordError`: a
        record is bad (the first in file order; file, line and field named).
    """
    ranges = plan_data(uri, what=what, error=DataFileError, rows_per_range=rows_per_range)
    schema = schema.append(pa.field("error", pa.string())).append(pa.field(ERROR_KEY, pa.int64()))
    ds = range_dataset(ranges, _read_range, check=check, to_row=to_row,
                       schema=schema).materialize()
    raise_first_error(ds)
    return ds.drop_columns(["error", ERROR_KEY])


def raise_first_error(ds: ray.data.Dataset) -> None:
    """Raise `RecordError` with the message of the first bad record in file order (only
    the error rows, at most one per range, are fetched)."""
    bad = ds.map_batches(lambda t: t.filter(pc.is_valid(t["error"])).select(["error", ERROR_KEY]),
                         batch_format="pyarrow", num_cpus=IO_CPUS).take_all()
    if bad:
        raise RecordError(min(bad, key=lambda r: r[ERROR_KEY])["error"])


@ray.remote(num_cpus=IO_CPUS)
def _span(table: pa.Table, by: str | None) -> tuple[int, Any, Any]:
    """(rows, first and last value of `by`) of one block."""
    if by is None or not table.num_rows:
        return table.num_rows, None, None
    return table.num_rows, pc.min(table[by]).as_py(), pc.max(table[by]).as_py()


@ray.remote(num_cpus=IO_CPUS)
def _with_ids(table: pa.Table, start: int, column: str) -> pa.Table:
    ids = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
    return table.append_column(column, ids)


def number_rows(ds: ray.data.Dataset, column: str, by: str | None = None) -> ray.data.Dataset:
    """`ds` with an int64 `column` numbering its rows 0..n-1: in block order, or with `by`
    in the order of that column, where each block holds a run of it in order (the blocks
    of `read_checked_dataset` by ``key``: one range each). The driver holds block references and
    counts only.

    Raises:
        ValueError: with `by`, two blocks' runs overlap (the rows have no such order).
    """
    refs = ds.to_arrow_refs()
    spans = ray.get([_span.remote(ref, by) for ref in refs])
    order = list(range(len(refs)))
    if by is not None:
        filled = sorted((i for i in order if spans[i][0]), key=lambda i: spans[i][1])
        for a, b in zip(filled, filled[1:]):
            if spans[a][2] >= spans[b][1]:
                raise ValueError(f"blocks overlap in {by!r}: cannot number rows in its order")
        order = filled + [i for i in order if not spans[i][0]]
    starts = np.cumsum([0, *(spans[i][0] for i in order[:-1])]).tolist()
    return ray.data.from_arrow_refs(
        [_with_ids.remote(refs[i], int(s), column) for i, s in zip(order, starts)])


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
