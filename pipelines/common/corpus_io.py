"""Input side of bulk embedding: list files, plan chunks, read and validate one chunk.

A *chunk* is a `bge_core.io.FileRange` (a run of Parquet row groups, or of JSONL lines cut
at line breaks) that a Ray task reads on its own. Every row gets a deterministic key
``file_index << 40 | row`` (a JSONL row is its line) so duplicate handling and resume do
not depend on the order Ray runs things in.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from bge_core.errors import InputError  # the jobs' one bad-input type, re-exported
from bge_core.io import (
    DataFileError,
    FileRange,
    columns_of,
    list_files,
    plan_ranges,
    read_columns,
)
from bge_core.records import check_document
from bge_core.texts import join_title

ROW_BITS = 40  # rows per file < 2**40

Chunk = FileRange  # the embedding job's unit of reading, resume and accounting


def file_key(path: str) -> str:
    """Short stable name for an input file, used in output part names and markers."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def list_input_files(uri: str) -> list[str]:
    """Parquet/JSONL files under `uri` (a file, a directory or a glob), sorted, as URIs."""
    return list_files(uri, "input", InputError)


def plan_file(path: str, file_index: int, chunk_rows: int,
              required: list[str]) -> list[Chunk]:
    """Split one file into chunks of about `chunk_rows` rows (Parquet row groups grouped,
    JSONL cut at line breaks); check the required columns are there (JSONL: in the
    first record, a missing key in a later one reads as a null).

    Raises:
        InputError: an unreadable file, or a required column missing (names both).
    """
    try:
        chunks = plan_ranges(path, file_index, chunk_rows)
        columns = columns_of(chunks[0])
    except DataFileError as err:
        raise InputError(str(err)) from err
    missing = [c for c in required if columns is not None and c not in columns]
    if missing:
        raise InputError(f"{path}: column(s) {missing} not found; columns present: "
                         f"{sorted(columns or ())}")
    return chunks


def plan_files(files: list[str], chunk_rows: int, required: list[str],
               error: type[ValueError] = InputError) -> list[Chunk]:
    """`plan_file` for every file, in Ray tasks (one per file: the driver reads no data).

    Raises:
        error: an unreadable file or a missing column (the task's message, not its trace).
    """
    import ray

    from bge_core.storage import storage_runtime_env

    plan = ray.remote(num_cpus=0.25)(_plan_task).options(**storage_runtime_env())
    planned = ray.get([plan.remote(f, i, chunk_rows, required) for i, f in enumerate(files)])
    problem = next((p for _, p in planned if p), None)
    if problem:
        raise error(problem)
    return [c for chunks, _ in planned for c in chunks]


def _plan_task(path: str, index: int, chunk_rows: int,
               required: list[str]) -> tuple[list[Chunk], str | None]:
    try:
        return plan_file(path, index, chunk_rows, required), None
    except InputError as err:
        return [], str(err)


def read_chunk_rows(chunk: Chunk, columns: list[str]) -> tuple[list[int], dict[str, list[Any]]]:
    """The chunk's row numbers and values of `columns` (missing JSONL keys read as None)."""
    try:
        return read_columns(chunk, columns)
    except DataFileError as err:
        raise InputError(str(err)) from err


def text_hash(text: str) -> str:
    """Content hash of the text as embedded (title joined), for incremental re-runs."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def validate_rows(values: dict[str, list[Any]], id_column: str, text_column: str,
                  title_column: str | None) -> tuple[list[str | None], list[str | None]]:
    """Per row: the text to embed (or None) and the reason it cannot be embedded (or None),
    by `bge_core.records.check_document` (the BEIR corpus's rule, under these columns)."""
    texts: list[str | None] = []
    reasons: list[str | None] = []
    titles = values[title_column] if title_column else [None] * len(values[text_column])
    for row_id, text, title in zip(values[id_column], values[text_column], titles):
        record = {id_column: row_id, text_column: text}
        if title_column:
            record[title_column] = title
        reason = check_document(record, id_column, text_column, title_column)
        texts.append(None if reason else join_title(title, text))
        reasons.append(reason)
    return texts, reasons


def id_array(ids: list[Any]) -> pa.Array:
    """Arrow array of ids keeping their type; mixed JSON types fall back to strings."""
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if i is None else str(i) for i in ids], type=pa.string())
