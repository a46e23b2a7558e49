"""How the embed job accounts for every input row, from read task to done marker.

One rule, declared here once: the read stage adds a single struct column, `ACCOUNT`, to
the rows it emits; the tokenise and encode stages pass it through untouched; the write
stage reads it back (`read_account`) and returns one `PartSummary` per part it writes;
the driver's `FileTracker` adds the summaries up and writes each input file's done
marker once all of the file's chunks are written.

The struct holds, per row, its row key and whether it finishes its text (chunking: the
text's last window), and, repeated on every row of one input chunk, that chunk's
`ChunkAccount` (rows emit may be re-batched with other chunks' rows on the way, so each
row carries what the driver needs to close its chunk).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common.corpus_io import file_key
from pipelines.embed.output import OutputState

ACCOUNT = "_account"  # the one column the embed stages add to the rows they pass along
_ARROW = {"int": pa.int64(), "str": pa.string(), "bool": pa.bool_(),
          "list[str]": pa.list_(pa.string())}


@dataclass
class ChunkAccount:
    """What one input chunk's read task knows of its rows.

    Args:
        file / chunk: the input chunk (`pipelines.common.corpus_io.Chunk` path and index).
        emit: output rows sent to be encoded (token windows when chunking): the chunk is
            written once this many rows are.
        marker: the chunk had nothing to encode and sent one placeholder row instead, so
            the driver still hears that it finished (its key is -1; it is never written).
        rejected / rejects_file: invalid rows and the ``_rejects/`` file they went to.
        kept: unchanged rows an incremental run copies from the previous output.
        prior_docs: texts whose rows an earlier attempt wrote (its part markers).
        prior_rows: output rows of those, and of texts partly written before.
        prior_parts: the part files of that earlier attempt.
    """

    file: str
    chunk: int
    emit: int = 0
    marker: bool = False
    rejected: int = 0
    rejects_file: str = ""
    kept: int = 0
    prior_docs: int = 0
    prior_rows: int = 0
    prior_parts: list[str] = field(default_factory=list)

    def column(self, keys: Sequence[int], last: Sequence[bool]) -> pa.StructArray:
        """The `ACCOUNT` column of rows with these row keys and last-of-text flags."""
        n = len(keys)
        arrays = [pa.array(keys, pa.int64()), pa.array(last, pa.bool_())] + [
            pa.array([getattr(self, f.name)] * n, f.type) for f in _CHUNK_FIELDS]
        return pa.StructArray.from_arrays(arrays, fields=list(ACCOUNT_TYPE))

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ChunkAccount:
        return cls(**{f.name: row[f.name] for f in _CHUNK_FIELDS})


_CHUNK_FIELDS = [pa.field(f.name, _ARROW[str(f.type)])
                 for f in dataclasses.fields(ChunkAccount)]
ACCOUNT_TYPE = pa.struct([pa.field("key", pa.int64()), pa.field("last", pa.bool_()),
                          *_CHUNK_FIELDS])


def read_account(table: pa.Table) -> pa.Table:
    """The `ACCOUNT` column of `table` as a table of its fields (``key``, ``last``, then
    those of `ChunkAccount`), row for row."""
    column = table.column(ACCOUNT)
    return pa.table({f.name: pc.struct_field(column, f.name) for f in ACCOUNT_TYPE})


@dataclass
class PartSummary:
    """What the write stage reports of one part (one input chunk's rows in one batch).

    Args:
        part: the part file's name ("" when the batch held only the chunk's marker row).
        written: output rows in the part. docs: texts it finishes. truncated: rows cut at
            the model's limit. node: the Ray node that encoded them.
        account: the chunk's `ChunkAccount` (the same in every part of the chunk).
    """

    part: str
    written: int
    docs: int
    truncated: int
    node: str
    account: ChunkAccount

    def row(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.account), "part": self.part,
                "written": self.written, "docs": self.docs, "truncated": self.truncated,
                "node": self.node}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PartSummary:
        return cls(part=row["part"], written=row["written"], docs=row["docs"],
                   truncated=row["truncated"], node=row["node"],
                   account=ChunkAccount.from_row(row))


SUMMARY_SCHEMA = pa.schema([*_CHUNK_FIELDS, ("part", pa.string()), ("written", pa.int64()),
                            ("docs", pa.int64()), ("truncated", pa.int64()),
                            ("node", pa.string())])


def summary_table(summaries: list[PartSummary]) -> pa.Table:
    return pa.Table.from_pylist([s.row() for s in summaries], schema=SUMMARY_SCHEMA)


class FileTracker:
    """Adds up part summaries per input file; writes a file's done marker (its counts and
    parts) when all its chunks are written."""

    def __init__(self, state: OutputState, chunks_of: dict[str, set[int]]) -> None:
        self.state = state
        self.waiting = {path: set(indexes) for path, indexes in chunks_of.items()}
        self.written: dict[tuple[str, int], int] = defaultdict(int)
        self.files: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"rows": 0, "written": 0, "chunks": 0, "rejected": 0, "truncated": 0,
                     "kept_rows": 0, "parts": []})
        self.seen: set[tuple[str, int]] = set()

    def add(self, summary: PartSummary) -> int:
        """Record one part summary; returns the input rows it accounts for."""
        account = summary.account
        key = (account.file, account.chunk)
        record = self.files[account.file]
        rows = summary.docs  # input texts done (several output rows each when chunked)
        if key not in self.seen:  # per-chunk counts arrive with every part: take them once
            self.seen.add(key)
            rows += self._first_of_chunk(record, account)
        record["written"] += summary.docs
        record["chunks"] += summary.written
        record["truncated"] += summary.truncated
        record["rows"] += rows
        if summary.part:
            record["parts"].append(summary.part)
        self.written[key] += summary.written  # output rows, against the rows emitted
        if self.written[key] == account.emit:
            self._chunk_done(account.file, account.chunk)
        return rows

    @staticmethod
    def _first_of_chunk(record: dict[str, Any], account: ChunkAccount) -> int:
        """Count the chunk's own numbers into its file's record; returns its input rows
        not written by this attempt (rejected, kept, written before)."""
        record["rejected"] += account.rejected
        record["kept_rows"] += account.kept
        if account.rejects_file:
            record["parts"].append(f"_rejects/{account.rejects_file}")
        # what an earlier attempt wrote of this chunk (its part markers)
        record["written"] += account.prior_docs
        record["chunks"] += account.prior_rows
        record["parts"] += account.prior_parts
        return account.rejected + account.kept + account.prior_docs

    def _chunk_done(self, path: str, index: int) -> None:
        self.waiting[path].discard(index)
        if not self.waiting[path]:
            del self.waiting[path]
            marker = {"file": path, **self.files.pop(path)}
            self.state.write_json(marker, "_state", "done", f"{file_key(path)}.json")

    def unfinished(self) -> list[str]:
        return sorted(self.waiting)
