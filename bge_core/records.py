"""One validator per kind of input record, shared by every job and reader.

Each ``check_*`` function returns why a parsed record is unusable (naming the field), or
None when it is fine; `located` puts the file and line in front, so the same bad record
gives the same message in finetuning, mining and evaluation, read in one process or in a
Ray task::

    /data/train.jsonl line 7: missing or empty 'query' (a string is required)

Kinds: a training example (``{"query", "pos", "neg"}``, FlagEmbedding's format), a
candidate text (``{"text"}``, mining's pool), a pretraining text (RetroMAE's corpus), a
document to embed (the embedding job's rows under its column names, and BEIR's corpus
``{"_id", "title", "text"}``), and BEIR's query (``{"_id", "text"}``) and qrels line
(``query-id<TAB>corpus-id<TAB>score``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np

from bge_core.errors import InputError
from bge_core.io import RANGE_ROWS, plan_ranges, read_range

Check = Callable[[Any], "str | None"]
_LISTS = (list, tuple, np.ndarray)  # Parquet rows can hold arrays


class RecordError(InputError):
    """An unusable input record; the message names the file, line and field."""


def located(source: str, line: int, reason: str, unit: str = "line") -> str:
    """``"<source> line <n>: <reason>"``: the one way every reader names a bad record."""
    return f"{source} {unit} {line}: {reason}"


def _object(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    return None


def check_training_example(obj: Any, group_size: int = 1) -> str | None:
    """A training example ``{"query": str, "pos": [str, ...], "neg"?: [str, ...]}``.

    The query must be non-blank and ``pos`` must hold a non-blank passage; with
    ``group_size > 1`` (finetuning's ``train_group_size``) ``neg`` must hold a passage
    that is not also a positive.
    """
    if (error := _object(obj)) is not None:
        return error
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        return "missing or empty 'query' (a string is required)"
    for key in ("pos", "neg"):
        value = obj.get(key)
        if value is None and key == "neg":
            continue
        if not isinstance(value, _LISTS):
            return f"'{key}' must be a list of strings, got {type(value).__name__}"
        if any(not isinstance(v, str) for v in value):
            return f"'{key}' must hold only strings"
    if not any(p.strip() for p in obj["pos"]):
        return "'pos' is empty (at least one positive passage is required)"
    positives = set(obj["pos"])
    usable = [n for n in obj.get("neg") or [] if n.strip() and n not in positives]
    if group_size > 1 and not usable:
        return (f"'neg' has no passage other than the positives, but "
                f"train_group_size={group_size} needs negatives")
    return None


def check_candidate(obj: Any) -> str | None:
    """A candidate-pool line ``{"text": str}`` (other fields are ignored)."""
    if (error := _object(obj)) is not None:
        return error
    if not isinstance(obj.get("text"), str):
        return _not_string(obj, "text")
    return None


def check_beir_query(obj: Any) -> str | None:
    """A BEIR query ``{"_id", "text": str}``."""
    if (error := _object(obj)) is not None:
        return error
    if obj.get("_id") is None:
        return "missing '_id'"
    if not isinstance(obj.get("text"), str):
        return _not_string(obj, "text")
    return None


def check_document(obj: Any, id_key: str = "_id", text_key: str = "text",
                   title_key: str | None = "title") -> str | None:
    """A document to embed ``{id_key, title_key?: str | null, text_key: str}``: a BEIR
    corpus line, or a row of the embedding job's input under its column names."""
    if (error := _object(obj)) is not None:
        return error
    if obj.get(id_key) is None:
        return f"missing '{id_key}'"
    if not isinstance(obj.get(text_key), str):
        return _not_string(obj, text_key)
    title = obj.get(title_key) if title_key else None
    if title_key and title is not None and not isinstance(title, str):
        return _not_string(obj, title_key)
    return None


def check_beir_doc(obj: Any) -> str | None:
    """A BEIR corpus document ``{"_id", "title"?: str | null, "text": str}``."""
    return check_document(obj)


def check_text(obj: Any, key: str = "text") -> str | None:
    """A pretraining text ``{key: str | null}``: a value that is not a string (empty and
    null texts are the reader's to skip and count)."""
    if (error := _object(obj)) is not None:
        return error
    value = obj.get(key)
    return None if value is None or isinstance(value, str) else _not_string(obj, key)


def _not_string(obj: dict, key: str) -> str:
    if obj.get(key) is None:
        return f"missing '{key}' (a string is required)"
    return f"'{key}' is {type(obj[key]).__name__}, not a string"


def parse_qrel(fields: list[str]) -> tuple[str, str, int] | str:
    """One qrels line split at tabs → (query id, corpus id, grade), or why it is unusable."""
    try:
        return fields[0], fields[1], int(float(fields[2]))
    except (IndexError, ValueError):
        return f"expected 'query-id<TAB>corpus-id<TAB>score', got {fields!r}"


def read_checked(path: str, check: Check, what: str) -> Iterator[tuple[int, Any]]:
    """(line, record) of a JSONL file read in this process (queries, small inputs) by the
    one reader of `bge_core.io` (line ranges), each record checked by `check`; the first
    bad one raises `RecordError` with its located message.

    Raises:
        FileNotFoundError: no file at `path` (the message names `what`).
    """
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.isfile(local):
        raise FileNotFoundError(f"{what} not found: {path}")
    for part in plan_ranges(path, 0, RANGE_ROWS):
        for row, obj, error in read_range(part):
            if (reason := error or check(obj)) is not None:
                raise RecordError(located(path, row + 1, reason))
            yield row + 1, obj
