"""Plan pass of bulk embedding: duplicate ids and (incremental) what changed, over Ray.

A two-step map-reduce on Ray tasks (`pipelines.common.duplicates`, the one way every job
finds duplicates): each input chunk (and each previous output part) is read and its keys
``(id, text hash, row key)`` hash-partitioned by id; one task per partition then finds,
vectorised in Arrow, the exceptions:

- ``dup``: a later copy of an id (the first copy, lowest row key, wins: `split_copies`);
- ``encode`` / ``change`` (incremental): a new id, or an id whose text hash changed;
- ``drop`` (incremental): an id of the previous output no longer in the input.

Only exceptions come back to the driver; unchanged rows are never listed.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.common.corpus_io import Chunk, id_array, text_hash
from pipelines.common.duplicates import by_key, split_copies
from pipelines.embed.output import read_table
from pipelines.embed.stages import read_valid


def chunk_keys(chunk: Chunk, cfg: dict[str, Any]) -> pa.Table:
    """(id, hash, key, side=0) of the valid rows of one input chunk."""
    values, texts, reasons, keys = read_valid(chunk, cfg)
    valid = [i for i, r in enumerate(reasons) if r is None]
    ids = values[cfg["id_column"]]
    return pa.table({
        "id": id_array([ids[i] for i in valid]),
        "hash": pa.array([text_hash(texts[i]) for i in valid], type=pa.string()),
        "key": pa.array([keys[i] for i in valid], type=pa.int64()),
        "side": pa.array([0] * len(valid), type=pa.int8()),
    })


def previous_keys(path: str, id_column: str) -> pa.Table:
    """(id, hash, key=-1, side=1) of one part file of the previous output.

    One row per id even when the previous output was chunked (its chunks share a hash)."""
    table = read_table(path, columns=[id_column, "text_hash"])
    table = table.group_by([id_column, "text_hash"], use_threads=False).aggregate([])
    n = table.num_rows
    return pa.table({"id": table.column(id_column), "hash": table.column("text_hash"),
                     "key": pa.array([-1] * n, type=pa.int64()),
                     "side": pa.array([1] * n, type=pa.int8())})


def classify_keys(table: pa.Table, incremental: bool) -> pa.Table:
    """Exceptions (kind, key, id) among all rows of the ids in `table`."""
    current = table.filter(pc.equal(table.column("side"), 0))
    previous = table.filter(pc.equal(table.column("side"), 1))
    winners, losers = split_copies(current, "id", "key")  # the first copy of an id wins
    found = [_kind(losers, "dup")]
    if incremental:
        winners = winners.select(["id", "hash", "key"])
        prev = previous.select(["id", "hash"]).rename_columns(["id", "prev_hash"])
        paired = winners.join(prev, "id", join_type="left outer")
        is_new = pc.is_null(paired.column("prev_hash"))
        changed = pc.and_(pc.invert(is_new),
                          pc.not_equal(paired.column("hash"), paired.column("prev_hash")))
        found.append(_kind(paired.filter(is_new), "encode"))
        found.append(_kind(paired.filter(changed), "change"))
        gone = previous.join(winners.select(["id"]), "id", join_type="left anti")
        found.append(_kind(gone, "drop", key=-1))
    return pa.concat_tables(found, promote_options="permissive")


def _kind(rows: pa.Table, kind: str, key: int | None = None) -> pa.Table:
    n = rows.num_rows
    keys = pa.array([key] * n, type=pa.int64()) if key is not None else rows.column("key")
    return pa.table({"kind": pa.array([kind] * n, type=pa.string()), "key": keys,
                     "id": rows.column("id")})


def _chunk_keys(chunk: dict[str, Any], cfg: dict[str, Any]) -> pa.Table:
    return chunk_keys(Chunk(**chunk), cfg)


def compute_plan(chunks: list[Chunk], cfg: dict[str, Any],
                 previous: list[str] | None) -> pa.Table | None:
    """Run the map-reduce on Ray (`pipelines.common.duplicates.by_key`: every copy of an
    id, and its previous row, in one task); returns the exceptions table (None if no
    rows)."""
    total = sum(c.rows for c in chunks)
    if total == 0:
        return None
    sources = [(functools.partial(_chunk_keys, cfg=cfg), c.to_dict()) for c in chunks]
    sources += [(functools.partial(previous_keys, id_column=cfg["id_column"]), p)
                for p in previous or []]
    reduce = functools.partial(classify_keys, incremental=previous is not None)
    return pa.concat_tables(ray.get(by_key(sources, "id", reduce, rows=total)),
                            promote_options="permissive")
