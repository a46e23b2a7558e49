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


# (batches per rank, total steps, planned steps an epoch) of each scenario below
SCENARIOS = {"short": ([3, 2], 5, 3), "full": ([4, 3], 6, 3), "empty": ([3, 0], 5, 3)}


def _rank_loop(rank: int, out: str) -> None:
    """Every scenario in turn, each in a process group of its own (one spawn for all:
    starting the two processes costs more than the loops)."""
    for name, (batches_per_rank, total, steps_per_epoch) in SCENARIOS.items():
        # a bounded wait: a rank stuck in a collective raises instead of hanging the suite
        dist.init_process_group("gloo", init_method=f"file://{out}/store-{name}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=30))
        result = _scenario(rank, batches_per_rank, total, steps_per_epoch)
        Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()


def _scenario(rank: int, batches_per_rank: list[int], total: int,
              steps_per_epoch: int) -> dict:
    state, seen = TrainState(), []

    def batches(epoch: int, skip: int) -> list[tuple[int, int]]:
        return [(epoch, i) for i in range(batches_per_rank[rank])][skip:steps_per_epoch]

    def train_step(batch: tuple[int, int]) -> None:
        dist.all_reduce(torch.ones(1))  # what DDP's backward does on every rank
        state.advance(1)
        seen.append([*batch, state.step])

    try:
        run_epochs(state, total, steps_per_epoch, batches, train_step)
        return {"seen": seen, "step": state.step, "epoch": state.epoch}
    except RuntimeError as err:
        return {"seen": seen, "error": str(err)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Each scenario's per-rank result, from one run of two real gloo processes."""
    out = tmp_path_factory.mktemp("epoch_loop")
    mp.spawn(_rank_loop, args=(str(out),), nprocs=WORLD, join=True)
    return {name: [json.loads((out / f"{name}-rank{r}.json").read_text())
                   for r in range(WORLD)] for name in SCENARIOS}


@pytest.mark.timeout(120)
def test_a_short_shard_ends_the_epoch_on_every_rank(ranks):
    # planned 3 steps an epoch; rank 1's shard holds only 2 batches
    short = ranks["short"]
    assert short[0]["step"] == short[1]["step"] == 5
    # (epoch, batch index, step): each epoch ends after 2 steps on both ranks
    expected = [[0, 0, 1], [0, 1, 2], [1, 0, 3], [1, 1, 4], [2, 0, 5]]
    assert short[0]["seen"] == short[1]["seen"] == expected
    assert short[0]["epoch"] == short[1]["epoch"] == 2


@pytest.mark.timeout(120)
def test_full_shards_take_every_planned_step(ranks):
    full = ranks["full"]  # 4 and 3 batches, 3 planned an epoch: a 4th is not taken
    assert full[0]["seen"] == full[1]["seen"] == [
        [0, 0, 1], [0, 1, 2], [0, 2, 3], [1, 0, 4], [1, 1, 5], [1, 2, 6]]


@pytest.mark.timeout(120)
def test_an_empty_shard_is_an_error_on_every_rank(ranks):
    for rank in ranks["empty"]:
        assert rank["seen"] == [] and "holds no batch" in rank["error"]
