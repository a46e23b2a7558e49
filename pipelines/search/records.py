"""JSONL records as Ray datasets, read and written by Ray tasks, never through the driver.

`read_checked_dataset` reads the files in ranges (`bge_core.io`, the reader every job
uses), one Ray task per range, every record checked by its `bge_core.records` validator; a bad
record becomes one row whose ``error`` column holds its located message, and
`raise_first_error` stops the job with the first in file order. `number_rows` numbers
rows 0..n-1 in file order (counts per block, not rows, reach the driver). `write_lines`
writes tables of lines, given in order, as one JSONL file at a local path or URI: in
parts by tasks, concatenated by one task.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
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


@ray.remote
def _write_part(lines: pa.Table, name: str) -> str:
    """Ray task: one table of lines (its ``line`` column, in order) → a part file."""
    with open_text(name, "w") as handle:
        for line in lines["line"].to_pylist():
            handle.write(line + "\n")
    return name


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


def write_lines(tables: Sequence[ray.ObjectRef], uri: str) -> None:
    """Write the ``line`` columns of `tables` (references, in file order) as one text file
    at `uri` (lines end with a newline): a task writes each as a part beside it, one task
    joins them. The driver holds only references and part names."""
    folder = f"{uri.rstrip('/')}.parts-{uuid.uuid4().hex[:8]}"
    args = io_remote_args()
    parts = ray.get([_write_part.options(**args).remote(ref, f"{folder}/part-{i:06d}.jsonl")
                     for i, ref in enumerate(tables)])
    ray.get(_concatenate.options(**args).remote(parts, uri, folder))
