"""One rule for duplicates, and one way to find them over Ray without the driver holding rows.

The rule: among rows sharing a key (an id, a text), the *first copy* (the lowest ``order``
value: the row key ``file_index << 40 | row``, so file order) is kept and every later copy
is a duplicate. The embedding job rejects later copies of an id (`pipelines.embed.plan`),
mining keeps the first copy of each text as its corpus (`pipelines.search.mining`), and
evaluation refuses a corpus with a repeated ``_id`` (`pipelines.search.beir`).

The way: a two-step map-reduce on Ray tasks. Each map task reads (or is given) one block
and hash-partitions its rows by key (crc32 of the key's text: stable across processes);
one reduce task per partition then sees every copy of its keys and applies the rule in
Arrow. The driver holds only object references and what a caller asks back:

    dups = later_copies(ds, on="_id", order="key")       # a pa.Table of duplicates only
    kept = first_copies(ds, on="text", order="key")      # a dataset; rows stay in the store

Measured against Ray Data's ``groupby`` (what mining and evaluation used) in
BENCHMARKS.md "Finding duplicates": not slower, and one pass for the embedding job's
incremental plan, which needs every copy of an id and the previous output side by side.
Mining's joins (texts to corpus ids, ids back to texts, pieces to records) are the same
map-reduce (`by_key`), so no job starts Ray Data's shuffle actors.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

Read = Callable[[Any], pa.Table]  # a map task's input → its rows
Reduce = Callable[[pa.Table], pa.Table]  # every row of some keys → the result for them
Split = Callable[[pa.Table, str, int], list[pa.Table]]  # rows → one table per partition
ROWS_PER_PARTITION = 2_000_000  # keys per reduce task
MAX_PARTITIONS = 64
TASK_CPUS = 0.5


def split_copies(table: pa.Table, on: str, order: str) -> tuple[pa.Table, pa.Table]:
    """(first copies, later copies) of the rows in `table`, which holds every copy of its
    keys: the row with the lowest `order` per `on` value, and all the others."""
    first = table.group_by(on, use_threads=False).aggregate([(order, "min")])
    ranked = table.join(first, on)  # + f"{order}_min"
    is_first = pc.equal(ranked.column(order), ranked.column(f"{order}_min"))
    ranked = ranked.drop_columns([f"{order}_min"])
    return ranked.filter(is_first), ranked.filter(pc.invert(is_first))


def split_by_key(table: pa.Table, on: str, partitions: int) -> list[pa.Table]:
    """Hash-partition rows by `on` (crc32 of its text: the same in every process)."""
    if partitions == 1:
        return [table]
    buckets = pa.array([zlib.crc32(str(k).encode()) % partitions
                        for k in table.column(on).to_pylist()], type=pa.int64())
    return [table.filter(pc.equal(buckets, p)) for p in range(partitions)]


def split_by_range(size: int) -> Split:
    """Partition rows by an integer key in ``[0, size)`` into contiguous ranges: partition
    ``p`` holds keys ``[p * size / P, (p + 1) * size / P)``, so the reduce results, taken in
    partition order, are in key order (no sort needed to write them in that order)."""
    def split(table: pa.Table, on: str, partitions: int) -> list[pa.Table]:
        keys = table.column(on).to_numpy(zero_copy_only=False)
        buckets = pa.array(keys * partitions // max(size, 1))
        return [table.filter(pc.equal(buckets, p)) for p in range(partitions)]
    return split


def partitions_for(rows: int) -> int:
    """Reduce tasks for `rows` rows: one per `ROWS_PER_PARTITION`, at most 64."""
    return min(MAX_PARTITIONS, 1 + rows // ROWS_PER_PARTITION)


def identity(table: pa.Table) -> pa.Table:
    """The `Read` of a source that is a table (or a reference to one) already."""
    return table


@ray.remote(num_cpus=TASK_CPUS)
def _split(read: Read, item: Any, on: str, partitions: int, split: Split) -> Any:
    table = read(item)
    if partitions == 1:  # num_returns=1 wants the bare object; nothing to cut
        return table
    return split(table, on, partitions)


@ray.remote(num_cpus=TASK_CPUS)
def _reduce(reduce: Reduce, *tables: pa.Table) -> pa.Table:
    return reduce(pa.concat_tables(tables, promote_options="permissive"))


def by_key(sources: Sequence[tuple[Read, Any]], on: str, reduce: Reduce,
           rows: int, split: Split = split_by_key) -> list[ray.ObjectRef]:
    """Run `reduce` on every row of each key, over Ray; references to its results.

    Args:
        sources: ``(read, item)`` per map task: ``read(item)`` gives that task's rows (an
            item may be an object reference to a block: Ray resolves it first).
        on: the key column (every source has it).
        reduce: runs in one task per partition on all rows of the partition's keys.
        rows: about how many rows the sources hold (sets the number of partitions).
        split: how a map task cuts its rows into partitions (by hash of the key unless
            given; `split_by_range` keeps the partitions in key order).

    Returns:
        One reference per partition, in partition order.
    """
    if not sources:
        return []
    partitions = partitions_for(rows)
    mapped = [_split.options(num_returns=partitions).remote(read, item, on, partitions, split)
              for read, item in sources]
    if partitions == 1:
        mapped = [[ref] for ref in mapped]
    return [_reduce.remote(reduce, *[m[p] for m in mapped]) for p in range(partitions)]


def blocks(ds: ray.data.Dataset) -> tuple[list[tuple[Read, Any]], int]:
    """One source per block of `ds` (materialised once), and its row count."""
    ds = ds.materialize()
    return [(identity, ref) for ref in ds.to_arrow_refs()], ds.count()


def _later(table: pa.Table, on: str, order: str) -> pa.Table:
    return split_copies(table, on, order)[1]


def _first(table: pa.Table, on: str, order: str) -> pa.Table:
    return split_copies(table, on, order)[0]


def later_copies(ds: ray.data.Dataset, on: str, order: str) -> pa.Table:
    """The duplicates of `ds` (every row but the first copy of its `on` value), in
    `order`; only they reach the driver."""
    sources, rows = blocks(ds)
    tables = ray.get(by_key(sources, on, lambda t: _later(t, on, order), rows))
    if not tables:
        return ds.schema().base_schema.empty_table()
    return pa.concat_tables(tables).sort_by(order)


def first_copies(ds: ray.data.Dataset, on: str, order: str) -> ray.data.Dataset:
    """`ds` without its duplicates: the first copy of each `on` value, its rows left in
    the object store (in no particular order)."""
    sources, rows = blocks(ds)
    refs = by_key(sources, on, lambda t: _first(t, on, order), rows)
    return ray.data.from_arrow_refs(refs) if refs else ds
