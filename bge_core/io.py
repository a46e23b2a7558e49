"""One lister and one reader of JSONL / Parquet data files, at a local path or any fsspec
URI (``s3://...``), used by every job; and `open_text` for the other text files (outputs,
TSV/CSV inputs: qrels, STS).

A file is read in *ranges* a task can take on its own: runs of Parquet row groups, or
JSONL lines cut at whole lines (``\\n``), each about `rows_per_range` rows::

    for index, path in enumerate(list_files("s3://bucket/corpus/")):
        for part in plan_ranges(path, index, rows_per_range=100_000):   # small, picklable
            for row, record, error in read_range(part):                   # in a task
                ...

Planning a JSONL file reads it once as bytes (no JSON parsing) to find the line breaks;
reading a range then touches only its own bytes. Rows are numbered per file from 0: a
JSONL row is its line (blank lines take a number and yield nothing), so ``row + 1`` is
the line a message names.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bge_core.errors import InputError
from bge_core.storage import as_uris

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json")
RANGE_ROWS = 100_000  # default rows (JSONL lines) per range
SCAN_BYTES = 8 << 20  # bytes read at a time when planning a JSONL file

Format = Literal["parquet", "jsonl"]


class DataFileError(InputError):
    """A missing, empty or unreadable data location or file; the message names it."""


def list_files(uri: str, what: str = "input",
               error: type[ValueError] = DataFileError) -> list[str]:
    """JSONL/Parquet files at `uri` (a file, a folder or a glob), sorted, as URIs.

    In a folder, names starting with ``_`` or ``.`` (and what is under them) are left out.

    Args:
        what: what the location holds, for messages (``"training data"``).
        error: the exception class to raise (a job's own `ValueError` subclass).

    Raises:
        error: nothing at `uri`, or no JSONL/Parquet file there.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path)
                 if not any(part.startswith(("_", ".")) for part in p[len(path):].split("/"))]
    elif fs.isfile(path):
        found = [path]
    else:
        raise error(f"{what} not found: {uri}")
    files = sorted(p for p in found if p.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES))
    if not files:
        raise error(f"no .jsonl, .json or .parquet files found at {uri} ({what})")
    return as_uris(fs, files, uri)


def file_format(path: str) -> Format:
    return "parquet" if path.endswith(PARQUET_SUFFIXES) else "jsonl"


@dataclass(frozen=True)
class FileRange:
    """One unit of reading: rows [row_offset, row_offset + rows) of file `path`.

    Parquet: the row groups `row_groups`. JSONL: bytes [start, end), whole lines.
    """

    path: str
    file_index: int
    index: int  # range number within its file
    fmt: Format
    row_groups: tuple[int, ...]
    row_offset: int
    rows: int
    start: int = 0
    end: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_ranges(path: str, file_index: int, rows_per_range: int,
                scan_bytes: int = SCAN_BYTES) -> list[FileRange]:
    """Split one file into ranges of about `rows_per_range` rows (at least one range).

    Raises:
        DataFileError: the file cannot be read (the message names it).
    """
    try:
        if file_format(path) == "jsonl":
            return _plan_jsonl(path, file_index, rows_per_range, scan_bytes)
        with fsspec.open(path, "rb") as handle:
            meta = pq.ParquetFile(handle).metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataFileError(f"cannot read input file {path}: {err}") from err
    ranges, offset = [], 0
    for index, (groups, rows) in enumerate(_group_row_groups(sizes, rows_per_range)):
        ranges.append(FileRange(path, file_index, index, "parquet", groups, offset, rows))
        offset += rows
    return ranges


def _group_row_groups(sizes: list[int], rows_per_range: int) -> list[tuple[tuple[int, ...], int]]:
    groups, current, count = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        count += size
        if count >= rows_per_range:
            groups.append((tuple(current), count))
            current, count = [], 0
    if current or not groups:
        groups.append((tuple(current), count))
    return groups


def _plan_jsonl(path: str, file_index: int, rows_per_range: int,
                scan_bytes: int) -> list[FileRange]:
    """Cut after every `rows_per_range`-th ``\\n``; a last line without one is a row too."""
    cuts = [(0, 0)]  # (byte, line) where each range starts
    size = lines = 0
    last = b"\n"
    with fsspec.open(path, "rb") as handle:
        while block := handle.read(scan_bytes):
            found = block.count(b"\n")
            need = cuts[-1][1] + rows_per_range - lines  # line breaks until the next cut
            pos = -1
            while found >= need:  # the next cut falls in this block
                for _ in range(need):
                    pos = block.index(b"\n", pos + 1)
                lines += need
                found -= need
                cuts.append((size + pos + 1, lines))
                need = rows_per_range
            lines += found
            size += len(block)
            last = block[-1:]
    if last != b"\n":
        lines += 1  # the last line has no line break
    ends = [*cuts[1:], (size, lines)]
    ranges = [FileRange(path, file_index, i, "jsonl", (), row, end_row - row, start, end)
              for i, ((start, row), (end, end_row)) in enumerate(zip(cuts, ends))]
    return [r for r in ranges if r.rows or r.index == 0]  # no empty range after a cut at EOF


def read_range(part: FileRange, columns: list[str] | None = None
               ) -> Iterator[tuple[int, Any, str | None]]:
    """``(row, record, error)`` for each row of the range, in file order.

    JSONL: `record` is the parsed line (any JSON value) and `error` says why a line could
    not be parsed (then `record` is None); blank lines are skipped (their numbers are not
    reused). Parquet: `record` is a dict of `columns` (all when None), `error` is None.

    Raises:
        DataFileError: the file cannot be read (the message names it).
    """
    return ((row, record, error) for row, record, error in _read_rows(part, columns)
            if error != "")


def _read_rows(part: FileRange, columns: list[str] | None
               ) -> Iterator[tuple[int, Any, str | None]]:
    """`read_range` with the blank lines of a JSONL file (error ``""``)."""
    try:
        if part.fmt == "parquet":
            with fsspec.open(part.path, "rb") as handle:
                table = pq.ParquetFile(handle).read_row_groups(list(part.row_groups),
                                                               columns=columns)
            yield from ((part.row_offset + i, record, None)
                        for i, record in enumerate(table.to_pylist()))
            return
        with fsspec.open(part.path, "rb") as handle:
            handle.seek(part.start)
            data = io.BytesIO(handle.read(part.end - part.start))
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataFileError(f"cannot read input file {part.path}: {err}") from err
    for row, raw in enumerate(data, start=part.row_offset):
        yield (row, *parse_line(raw))


def parse_line(raw: bytes | str) -> tuple[Any, str | None]:
    """(value, None) for a JSON line, (None, reason) for a bad one; blank: (None, "")."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
    if not line.strip():
        return None, ""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg})"
    except ValueError as err:  # an integer past Python's 4,300-digit limit
        return None, f"not valid JSON ({str(err).split(';')[0]})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def read_columns(part: FileRange, columns: list[str]) -> tuple[list[int], dict[str, list[Any]]]:
    """The range's row numbers and values of `columns` (a JSONL key a line lacks, or a
    line that is not an object, reads as None).

    Raises:
        DataFileError: an unreadable file or a line that is not JSON (names file and line).
    """
    rows: list[int] = []
    values: dict[str, list[Any]] = {c: [] for c in columns}
    for row, record, error in read_range(part, columns):
        if error:
            raise DataFileError(f"{part.path} line {row + 1}: {error}")
        record = record if isinstance(record, dict) else {}
        rows.append(row)
        for column in columns:
            values[column].append(record.get(column))
    return rows, values


def columns_of(part: FileRange) -> set[str] | None:
    """A Parquet file's columns, or the keys of the first record of a JSONL range, read
    only up to it (None: that record is not an object, or the range has none).

    Raises:
        DataFileError: the file cannot be read (the message names it).
    """
    try:
        if part.fmt == "parquet":
            with fsspec.open(part.path, "rb") as handle:
                return set(pq.ParquetFile(handle).schema_arrow.names)
        with fsspec.open(part.path, "rb") as handle:
            handle.seek(part.start)
            position = part.start
            while position < part.end and (raw := handle.readline()):
                position += len(raw)
                record, error = parse_line(raw)
                if error != "":
                    return set(record) if isinstance(record, dict) else None
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataFileError(f"cannot read input file {part.path}: {err}") from err
    return None


def open_text(uri: str, mode: str = "r", what: str = "file") -> IO[str]:
    """Open a local path or fsspec URI as UTF-8 text; writing creates parent folders.

    Raises:
        FileNotFoundError: reading a file that is not there (the message names `what`).
    """
    uri = str(uri)
    if "r" in mode:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isfile(path):
            raise FileNotFoundError(f"{what} not found: {uri}")
    return fsspec.open(uri, mode, encoding="utf-8", newline="", auto_mkdir="w" in mode).open()
