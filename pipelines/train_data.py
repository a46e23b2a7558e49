"""Training data on Ray Data, shared by both trainers (finetuning, RetroMAE).

The driver lists the files and plans their ranges (`bge_core.io`, planned in Ray tasks);
a Ray task reads each range into rows, so no file is read whole and the driver never
holds the data. Ray Train splits the dataset over the workers in a fixed order
(`data_config`: the same rows reach the same rank on every run), and each worker takes
its batches of an epoch from `epoch_batches`: shuffled within a bounded buffer seeded by
``seed + epoch``, the first `skip` batches passed over when a resumed epoch restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from bge_core.io import FileRange, list_files
from pipelines.corpus_io import plan_files

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


def data_config() -> Any:
    """Ray Train's `DataConfig` keeping the dataset's order into the split, so each rank
    gets the same rows on every run (and after a restart) — what exact resume needs."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def epoch_batches(shard: Any, *, batch_size: int, shuffle_buffer: int, seed: int, epoch: int,
                  skip: int, steps: int) -> Iterator[pa.Table]:
    """This worker's batches of `epoch`, batches [skip, steps) of its shard.

    At most ``steps - skip`` batches (fewer if the shard runs short: the trainers'
    `pipelines.train_session.run_epochs` then ends the epoch on every rank together). Rows
    are shuffled within a buffer of `shuffle_buffer` rows (0: file order), seeded by
    ``seed + epoch``.
    """
    batches = shard.iter_batches(
        batch_size=batch_size, batch_format="pyarrow", drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed + epoch)
    for index, batch in enumerate(batches):
        if index >= steps:
            return
        if index >= skip:  # resuming mid-epoch: earlier batches were trained before
            yield batch
