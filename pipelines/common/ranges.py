"""File ranges as Ray datasets: the reading rule of every job that streams records.

The driver lists the files and plans their ranges (`bge_core.io`, one Ray task per file);
a Ray task reads each range into rows, so no file is read whole and the driver never holds
the data. The dataset keeps the ranges' order, through `filter` and `materialize` too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from bge_core.io import FileRange, list_files
from pipelines.common.corpus_io import plan_files

ReadRange = Callable[..., pa.Table]  # (FileRange, **kwargs) -> rows of the range
# CPUs of one read task; the default CPU share of the training workers keeps this much
# free on every node, so the tasks that feed the workers always find a CPU
READ_TASK_CPUS = 0.5


def plan_data(uri: str, *, what: str, error: type[ValueError], rows_per_range: int,
              required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The ranges of every file at `uri` (planned in Ray tasks, one per file), as dicts.

    Raises:
        error: no data at `uri`, an unreadable file, or a `required` column missing (the
            message names the file).
    """
    files = list_files(uri, what, error)
    return [c.to_dict() for c in plan_files(files, rows_per_range, list(required), error)]


def range_dataset(ranges: list[dict[str, Any]], read: ReadRange, **kwargs: Any) -> Any:
    """A lazy Ray Dataset of ``read(range, **kwargs)`` over `ranges` (`plan_data`), one
    block per range, in the order given (also through `filter` and `materialize`)."""
    import ray

    from bge_core.storage import storage_runtime_env

    items = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))
    # every dataset derived from `items` shares its context: its reads and any
    # `materialize` of it keep the ranges' order, whichever read task ends first (without
    # this a busy box reorders the blocks, and a resumed run trains on other batches)
    items.context.execution_options.preserve_order = True
    return items.map_batches(
        _read_one, batch_size=1, batch_format="pyarrow", num_cpus=READ_TASK_CPUS,
        fn_kwargs={"read": read, "kwargs": kwargs}, **storage_runtime_env())


def _read_one(batch: pa.Table, read: ReadRange, kwargs: dict[str, Any]) -> pa.Table:
    (spec,) = batch.to_pylist()
    part = FileRange(**{**spec, "row_groups": tuple(spec["row_groups"] or ())})
    return read(part, **kwargs)
