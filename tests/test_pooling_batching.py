"""Pooling functions and the token-budget batch planner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bge_core.batching import pad_batch, padding_fraction, plan_batches
from bge_core.pooling import embed_from_hidden, pool


def _hidden_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    return hidden, mask


def test_cls_takes_first_token() -> None:
    hidden, mask = _hidden_and_mask()
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_mean_ignores_padding() -> None:
    hidden, mask = _hidden_and_mask()
    out = pool(hidden, mask, "mean")
    assert torch.allclose(out[0], hidden[0, :3].mean(0))
    assert torch.allclose(out[1], hidden[1].mean(0))
    assert torch.allclose(out[2], hidden[2, 0])


def test_last_token_right_and_left_padding() -> None:
    hidden, mask = _hidden_and_mask()
    right = pool(hidden, mask, "last_token")
    assert torch.equal(right, torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 0]]))
    left_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert torch.equal(pool(hidden, left_mask, "last_token"), hidden[:, -1])


def test_normalised_output_is_unit_float32() -> None:
    hidden, mask = _hidden_and_mask()
    out = embed_from_hidden(hidden.to(torch.bfloat16), mask, "mean", normalize=True)
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_unknown_pooling_is_an_error() -> None:
    hidden, mask = _hidden_and_mask()
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]


def test_plan_covers_every_row_once_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1000).tolist()
    batches = plan_batches(lengths, max_tokens=2048, max_rows=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    for batch in batches:
        assert len(batch) <= 64
        assert len(batch) * max(lengths[i] for i in batch) <= 2048
    # sorting by length keeps padding far below that of batches in input order
    naive = [np.arange(i, min(i + 8, 1000)) for i in range(0, 1000, 8)]
    assert padding_fraction(lengths, batches) < 0.05 < padding_fraction(lengths, naive)


def test_plan_gives_oversized_row_its_own_batch() -> None:
    batches = plan_batches([10, 5000, 10], max_tokens=100, max_rows=8)
    assert [b.tolist() for b in batches][0] == [1]


def test_pad_batch() -> None:
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
