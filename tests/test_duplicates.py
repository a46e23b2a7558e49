"""The one duplicate rule (`pipelines.common.duplicates`): the first copy of a key wins."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.common.duplicates import split_by_key, split_by_range, split_copies


def test_the_lowest_order_is_the_first_copy_whatever_the_row_order() -> None:
    table = pa.table({"id": ["b", "a", "b", "c", "a", "b"], "key": [5, 9, 2, 4, 1, 7]})
    first, later = split_copies(table, "id", "key")
    assert sorted(zip(first["id"].to_pylist(), first["key"].to_pylist())) == [
        ("a", 1), ("b", 2), ("c", 4)]
    assert sorted(zip(later["id"].to_pylist(), later["key"].to_pylist())) == [
        ("a", 9), ("b", 5), ("b", 7)]
    assert first.column_names == later.column_names == ["id", "key"]


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_every_copy_of_a_key_lands_in_one_partition(partitions: int) -> None:
    ids = [f"d{i % 13}" for i in range(100)] + [7, 7]  # ints by their text, as ids may be
    table = pa.table({"id": pa.array([str(i) for i in ids]), "key": list(range(102))})
    parts = split_by_key(table, "id", partitions)
    assert len(parts) == partitions and sum(p.num_rows for p in parts) == 102
    homes = [{k for k in p["id"].to_pylist()} for p in parts]
    assert all(not (a & b) for i, a in enumerate(homes) for b in homes[i + 1:])
    assert split_by_key(table, "id", partitions)[0].equals(parts[0])  # stable: crc32


@pytest.mark.parametrize("partitions", [2, 3, 7])
def test_range_partitions_are_contiguous_and_in_key_order(partitions: int) -> None:
    """Mining writes the reduce results in partition order: partition p must hold a run of
    keys, every key of it below every key of p + 1, and no key lost."""
    keys = [5, 0, 9, 3, 3, 8, 1, 6, 2, 7, 4, 9]
    table = pa.table({"example": pa.array(keys, pa.int64()), "slot": list(range(len(keys)))})
    parts = split_by_range(10)(table, "example", partitions)
    assert len(parts) == partitions
    assert sorted(k for p in parts for k in p["example"].to_pylist()) == sorted(keys)
    runs = [sorted(set(p["example"].to_pylist())) for p in parts]
    filled = [r for r in runs if r]
    assert all(a[-1] < b[0] for a, b in zip(filled, filled[1:]))
    assert len(filled) == partitions  # 10 keys over at most 7 ranges: none empty
