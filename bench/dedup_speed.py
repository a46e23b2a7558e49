"""Finding duplicates over Ray: `pipelines.common.duplicates` vs Ray Data's groupby.

    PYTHONPATH=. python bench/dedup_speed.py --rows 100000 --distinct 0.8

Mining's corpus (first copy of each text) and the BEIR id check (any later copy) on a
materialised dataset of ``key``, ``text`` rows, each way timed after one warm-up run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import ray
from ray.data.aggregate import Count, Max, Min
from ray.data.expressions import col

from pipelines.common.duplicates import first_copies, later_copies


def shuffle_partitions(ds: ray.data.Dataset, bytes_per_partition: int = 128 << 20) -> int:
    """Ray Data's partitions for the group-by, as mining set them: ~128 MiB each, at least
    2 (Ray's default of 200 costs minutes of scheduling on small inputs)."""
    return max(2, -(-(ds.size_bytes() or 0) // bytes_per_partition))


def _data(rows: int, distinct: float, blocks: int) -> ray.data.Dataset:
    rng = np.random.default_rng(0)
    texts = [f"passage number {i} " * 4 for i in rng.integers(0, int(rows * distinct), rows)]
    table = pa.table({"key": np.arange(rows, dtype=np.int64), "text": texts})
    step = -(-rows // blocks)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, rows, step)]).materialize()


def _groupby_first(ds: ray.data.Dataset) -> int:
    return ds.groupby("text", num_partitions=shuffle_partitions(ds)).aggregate(
        Min("key", alias_name="key")).materialize().count()


def _groupby_dups(ds: ray.data.Dataset) -> int:
    counts = ds.groupby("text", num_partitions=shuffle_partitions(ds)).aggregate(
        Count(alias_name="copies"), Max("key", alias_name="key"))
    return len(counts.filter(expr=col("copies") > 1).take(1))


def _timed(fn, ds) -> tuple[float, int]:
    fn(ds)  # warm-up
    start = time.perf_counter()
    out = fn(ds)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--distinct", type=float, default=0.8)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = _data(args.rows, args.distinct, args.blocks)
    runs = {
        "first copies, duplicates.first_copies": lambda d: first_copies(
            d, on="text", order="key").materialize().count(),
        "first copies, Ray Data groupby+Min": _groupby_first,
        "later copies, duplicates.later_copies": lambda d: later_copies(
            d, on="text", order="key").num_rows,
        "any duplicate, Ray Data groupby+Count+Max": _groupby_dups,
    }
    for name, fn in runs.items():
        seconds, out = _timed(fn, ds)
        print(f"{name:45s} {seconds:6.2f} s  ({out} rows)")


if __name__ == "__main__":
    main()
