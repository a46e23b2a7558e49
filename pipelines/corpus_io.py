"""Input side of bulk embedding: list files, plan chunks, read and validate one chunk.

A *chunk* is a run of Parquet row groups (or one JSONL file) that a Ray task reads on its
own. Every row gets a deterministic key ``file_index << 40 | row`` so duplicate handling and
resume do not depend on the order Ray runs things in.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bge_core.jsonl import iter_jsonl
from bge_core.texts import join_title

ROW_BITS = 40  # rows per file < 2**40
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json")


class InputError(ValueError):
    """Bad input (missing file or column, unreadable file); the message names it."""


@dataclass(frozen=True)
class Chunk:
    """One unit of reading: rows [row_offset, row_offset + rows) of file `path`."""

    path: str
    file_index: int
    index: int  # chunk number within its file
    fmt: Literal["parquet", "jsonl"]
    row_groups: tuple[int, ...]
    row_offset: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def file_key(path: str) -> str:
    """Short stable name for an input file, used in output part names and markers."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def list_input_files(uri: str) -> list[str]:
    """Parquet/JSONL files under `uri` (a file, a directory or a glob), sorted, as URIs."""
    fs, path = fsspec.core.url_to_fs(uri)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path)
                 if not any(part.startswith(("_", ".")) for part in p[len(path):].split("/"))]
    elif fs.isfile(path):
        found = [path]
    else:
        raise InputError(f"input not found: {uri}")
    files = sorted(p for p in found if p.endswith(PARQUET_SUFFIXES + JSONL_SUFFIXES))
    if not files:
        raise InputError(f"no .parquet or .jsonl files found at {uri}")
    return [fs.unstrip_protocol(p) if "://" in uri else p for p in files]


def _fmt(path: str) -> Literal["parquet", "jsonl"]:
    return "parquet" if path.endswith(PARQUET_SUFFIXES) else "jsonl"


def plan_file(path: str, file_index: int, chunk_rows: int,
              required: list[str]) -> list[Chunk]:
    """Split one file into chunks of about `chunk_rows` rows; check required columns."""
    try:
        if _fmt(path) == "jsonl":
            columns, rows = _scan_jsonl(path)
            groups: list[tuple[tuple[int, ...], int]] = [((), rows)]
        else:
            with fsspec.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
                columns = set(meta.schema.to_arrow_schema().names)
                sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            groups = _group_row_groups(sizes, chunk_rows)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise InputError(f"cannot read input file {path}: {err}") from err
    missing = [c for c in required if c not in columns]
    if missing and (columns or _fmt(path) == "parquet"):
        raise InputError(f"{path}: column(s) {missing} not found; columns present: "
                         f"{sorted(columns)}")
    chunks, offset = [], 0
    for index, (group_ids, rows) in enumerate(groups):
        chunks.append(Chunk(path, file_index, index, _fmt(path), group_ids, offset, rows))
        offset += rows
    return chunks


def _group_row_groups(sizes: list[int], chunk_rows: int) -> list[tuple[tuple[int, ...], int]]:
    groups, current, count = [], [], 0
    for i, size in enumerate(sizes):
        current.append(i)
        count += size
        if count >= chunk_rows:
            groups.append((tuple(current), count))
            current, count = [], 0
    if current or not groups:
        groups.append((tuple(current), count))
    return groups


def _scan_jsonl(path: str) -> tuple[set[str], int]:
    columns: set[str] = set()
    rows = 0
    with fsspec.open(path, "r", encoding="utf-8") as handle:
        for _, record in iter_jsonl(handle, path):
            if isinstance(record, dict):
                columns.update(record)
            rows += 1
    return columns, rows


def read_chunk_rows(chunk: Chunk, columns: list[str]) -> dict[str, list[Any]]:
    """The chunk's values of `columns` as Python lists (missing JSONL keys read as None)."""
    try:
        if chunk.fmt == "jsonl":
            with fsspec.open(chunk.path, "r", encoding="utf-8") as handle:
                records = [r for _, r in iter_jsonl(handle, chunk.path)]
            records = [r if isinstance(r, dict) else {} for r in records]
            return {c: [r.get(c) for r in records] for c in columns}
        with fsspec.open(chunk.path, "rb") as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(chunk.row_groups),
                                                           columns=columns)
        return {c: table.column(c).to_pylist() for c in columns}
    except (OSError, ValueError, pa.ArrowException) as err:
        raise InputError(f"cannot read input file {chunk.path}: {err}") from err


def text_hash(text: str) -> str:
    """Content hash of the text as embedded (title joined), for incremental re-runs."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def validate_rows(values: dict[str, list[Any]], id_column: str, text_column: str,
                  title_column: str | None) -> tuple[list[str | None], list[str | None]]:
    """Per row: the text to embed (or None) and the reason it cannot be embedded (or None)."""
    texts: list[str | None] = []
    reasons: list[str | None] = []
    titles = values[title_column] if title_column else [None] * len(values[text_column])
    for row_id, text, title in zip(values[id_column], values[text_column], titles):
        reason = None
        if row_id is None:
            reason = f"null id in column {id_column!r}"
        elif text is None:
            reason = f"null text in column {text_column!r}"
        elif not isinstance(text, str):
            reason = f"text is {type(text).__name__}, not a string"
        elif title is not None and not isinstance(title, str):
            reason = f"title is {type(title).__name__}, not a string"
        texts.append(None if reason else join_title(title, text))
        reasons.append(reason)
    return texts, reasons


def id_array(ids: list[Any]) -> pa.Array:
    """Arrow array of ids keeping their type; mixed JSON types fall back to strings."""
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if i is None else str(i) for i in ids], type=pa.string())
