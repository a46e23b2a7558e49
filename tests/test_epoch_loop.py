"""The one epoch loop both trainers share (`pipelines.train.session.run_epochs`), on two
real gloo processes whose shards hold unequal numbers of batches: every rank ends each
epoch at the same step, so no rank waits in a collective for a batch that never comes."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bge_core.train_state import TrainState
from pipelines.train.session import run_epochs

WORLD = 2


def _rank_loop(rank: int, store: str, out: str, batches_per_rank: list[int], total: int,
               steps_per_epoch: int) -> None:
    # a bounded wait: a rank stuck in a collective raises instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    state, seen = TrainState(), []

    def batches(epoch: int, skip: int) -> list[tuple[int, int]]:
        return [(epoch, i) for i in range(batches_per_rank[rank])][skip:steps_per_epoch]

    def train_step(batch: tuple[int, int]) -> None:
        dist.all_reduce(torch.ones(1))  # what DDP's backward does on every rank
        state.advance(1)
        seen.append([*batch, state.step])

    try:
        run_epochs(state, total, steps_per_epoch, batches, train_step)
        result = {"seen": seen, "step": state.step, "epoch": state.epoch}
    except RuntimeError as err:
        result = {"seen": seen, "error": str(err)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(tmp_path: Path, batches_per_rank: list[int], total: int, steps: int) -> list[dict]:
    mp.spawn(_rank_loop, args=(str(tmp_path / "store"), str(tmp_path), batches_per_rank,
                               total, steps), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.timeout(120)
def test_a_short_shard_ends_the_epoch_on_every_rank(tmp_path):
    # planned 3 steps an epoch; rank 1's shard holds only 2 batches
    ranks = _run(tmp_path, batches_per_rank=[3, 2], total=5, steps=3)
    assert ranks[0]["step"] == ranks[1]["step"] == 5
    # (epoch, batch index, step): each epoch ends after 2 steps on both ranks
    expected = [[0, 0, 1], [0, 1, 2], [1, 0, 3], [1, 1, 4], [2, 0, 5]]
    assert ranks[0]["seen"] == ranks[1]["seen"] == expected
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 2


@pytest.mark.timeout(120)
def test_full_shards_take_every_planned_step(tmp_path):
    ranks = _run(tmp_path, batches_per_rank=[4, 3], total=6, steps=3)  # a 4th is not taken
    assert ranks[0]["seen"] == ranks[1]["seen"] == [
        [0, 0, 1], [0, 1, 2], [0, 2, 3], [1, 0, 4], [1, 1, 5], [1, 2, 6]]


@pytest.mark.timeout(120)
def test_an_empty_shard_is_an_error_on_every_rank(tmp_path):
    ranks = _run(tmp_path, batches_per_rank=[3, 0], total=5, steps=3)
    for rank in ranks:
        assert rank["seen"] == [] and "holds no batch" in rank["error"]
