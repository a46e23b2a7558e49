"""Plan pass of bulk embedding: duplicate ids and (incremental) what changed, over Ray.

A two-step map-reduce on Ray tasks: each input chunk (and each previous output part) is
read and its keys ``(id, text hash, row key)`` hash-partitioned by id; one task per
partition then finds, vectorised in Arrow, the exceptions:

- ``dup``: a later row with an id already seen (the lowest row key wins);
- ``encode`` / ``change`` (incremental): a new id, or an id whose text hash changed;
- ``drop`` (incremental): an id of the previous output no longer in the input.

Only exceptions come back to the driver; unchanged rows are never listed.
"""

from __future__ import annotations

import zlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common.corpus_io import Chunk, id_array, text_hash
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


def split_by_id(table: pa.Table, partitions: int) -> list[pa.Table]:
    """Hash-partition rows by id (crc32 of its text: stable across processes)."""
    buckets = pa.array([zlib.crc32(str(i).encode()) % partitions
                        for i in table.column("id").to_pylist()], type=pa.int64())
    return [table.filter(pc.equal(buckets, p)) for p in range(partitions)]


def classify_keys(table: pa.Table, incremental: bool) -> pa.Table:
    """Exceptions (kind, key, id) among all rows of the ids in `table`."""
    current = table.filter(pc.equal(table.column("side"), 0))
    previous = table.filter(pc.equal(table.column("side"), 1))
    first = current.group_by("id").aggregate([("key", "min")])  # id, key_min
    ranked = current.join(first, "id")
    losers = ranked.filter(pc.not_equal(ranked.column("key"), ranked.column("key_min")))
    found = [_kind(losers, "dup")]
    if incremental:
        winners = ranked.filter(pc.equal(ranked.column("key"), ranked.column("key_min")))
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


def compute_plan(chunks: list[Chunk], cfg: dict[str, Any],
                 previous: list[str] | None) -> pa.Table | None:
    """Run the map-reduce on Ray; returns the exceptions table (None if no rows)."""
    import ray

    total = sum(c.rows for c in chunks)
    if total == 0:
        return None
    partitions = min(64, 1 + total // 2_000_000)  # ~2M ids per reduce task

    def returns(tables: list[pa.Table]) -> Any:  # num_returns=1 wants the bare object
        return tables if partitions > 1 else tables[0]

    @ray.remote(num_cpus=0.5)
    def split_chunk(chunk: dict[str, Any]) -> Any:
        return returns(split_by_id(chunk_keys(Chunk(**chunk), cfg), partitions))

    @ray.remote(num_cpus=0.5)
    def split_previous(path: str) -> Any:
        return returns(split_by_id(previous_keys(path, cfg["id_column"]), partitions))

    @ray.remote(num_cpus=0.5)
    def reduce(*tables: pa.Table) -> pa.Table:
        merged = pa.concat_tables(tables, promote_options="permissive")
        return classify_keys(merged, incremental=previous is not None)

    def refs(task: Any, item: Any) -> list[Any]:
        out = task.options(num_returns=partitions).remote(item)
        return out if partitions > 1 else [out]

    mapped = [refs(split_chunk, c.to_dict()) for c in chunks]
    mapped += [refs(split_previous, p) for p in previous or []]
    reduced = ray.get([reduce.remote(*[m[p] for m in mapped]) for p in range(partitions)])
    return pa.concat_tables(reduced, promote_options="permissive")
