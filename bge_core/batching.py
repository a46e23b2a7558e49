"""Length-sorted, token-budget micro-batches, and padding.

Sorting by length before cutting batches keeps padding low; every batch holds at most
`max_rows` rows and at most `max_tokens` padded tokens (rows × its longest row). Callers
scatter results back with the returned indices, so output order is input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def plan_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Group row indices into micro-batches, longest rows first.

    Args:
        lengths: token count of each row.
        max_tokens: budget of padded tokens per batch; a single row longer than the
            budget still gets a batch of its own.
        max_rows: most rows per batch.

    Returns:
        A list of index arrays into `lengths`; together they cover every index once.
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)  # sorted descending: first is longest
        rows = max(1, min(max_rows, max_tokens // longest))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to a (B, T) `input_ids` tensor and its attention mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def padding_fraction(lengths: Sequence[int], batches: Sequence[np.ndarray]) -> float:
    """Share of padded positions that are padding, for a batch plan (0 = none wasted)."""
    lengths = np.asarray(lengths)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 1.0 - float(lengths.sum()) / padded if padded else 0.0
