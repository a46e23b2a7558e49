"""Training data on Ray Data: the ranges' order survives a slow task and `materialize`."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest


def _read(part) -> pa.Table:
    return pa.table({"file": [part.file_index] * 3})


def _slow_on_first_file(row: dict) -> bool:
    if row["file"] == 0:
        time.sleep(1.5)  # the first block's filter task ends last
    return True


@pytest.mark.timeout(120)
def test_filtered_rows_keep_the_ranges_order_when_the_first_task_ends_last(
        ray_session, tmp_path):
    from pipelines.common.ranges import plan_data, range_dataset

    for index in range(4):
        (tmp_path / f"part{index}.jsonl").write_text('{"text": "a"}\n' * 3)
    ranges = plan_data(str(tmp_path), what="data", error=ValueError, rows_per_range=100)
    assert [r["file_index"] for r in ranges] == [0, 1, 2, 3]
    # materialize, filter, materialize: what the finetuning driver does with its examples
    parsed = range_dataset(ranges, _read).materialize()
    kept = parsed.filter(_slow_on_first_file).materialize()
    assert [row["file"] for row in kept.iter_rows()] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
