"""Training data on Ray Data, shared by both trainers (finetuning, RetroMAE).

The driver plans the files' ranges and reads them as a Ray Dataset
(`pipelines.common.ranges`), so no file is read whole and the driver never holds the
data. Ray Train splits the dataset over the workers in a fixed order
(`data_config`: the same rows reach the same rank on every run), and each worker takes
its batches of an epoch from `epoch_batches`: shuffled within a bounded buffer seeded by
``seed + epoch``, the first `skip` batches passed over when a resumed epoch restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa


def data_config() -> Any:
    """Ray Train's `DataConfig` keeping the dataset's order into the split, so each rank
    gets the same rows on every run (and after a restart) — what exact resume needs."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def epoch_steps(rows: int, workers: int, batch_size: int) -> int:
    """Steps an epoch of both trainers: whole global batches of `rows` (`workers` ×
    `batch_size` rows a step, every rank the same steps; the last partial one dropped)."""
    return rows // (workers * batch_size)


def epoch_batches(shard: Any, *, batch_size: int, shuffle_buffer: int, seed: int, epoch: int,
                  skip: int, steps: int) -> Iterator[pa.Table]:
    """This worker's batches of `epoch`, batches [skip, steps) of its shard.

    At most ``steps - skip`` batches (fewer if the shard runs short: the trainers'
    `pipelines.train.session.run_epochs` then ends the epoch on every rank together). Rows
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
