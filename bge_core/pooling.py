"""Pooling: token states (B, T, H) and attention mask (B, T) → one vector per row (B, H).

One implementation serves training and bulk encoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bge_core.config import Pooling
from bge_core.errors import InputError


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first token ([CLS]), as BGE does."""
    return hidden[:, 0]  # (B, H)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real (unmasked) tokens, as sentence-transformers' Pooling does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, H)
    counts = weights.sum(dim=1).clamp(min=1e-9)  # (B, 1); empty rows give 0, not NaN
    return summed / counts


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token; works with left or right padding."""
    if bool(mask[:, -1].all()):  # left padding (or no padding): last column is real
        return hidden[:, -1]
    last = mask.long().sum(dim=1) - 1  # (B,) index of last real token under right padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]


_POOLERS = {"cls": cls_pool, "mean": mean_pool, "last_token": last_token_pool}


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: Pooling) -> torch.Tensor:
    """Pool `hidden` (B, T, H) with `mask` (B, T) by `method`; returns (B, H)."""
    try:
        return _POOLERS[method](hidden, mask)
    except KeyError:
        raise InputError(f"unknown pooling {method!r}; choose one of {sorted(_POOLERS)}") from None


def embed_from_hidden(
    hidden: torch.Tensor, mask: torch.Tensor, method: Pooling, normalize: bool
) -> torch.Tensor:
    """Pool, cast to float32, and L2-normalise when asked: (B, T, H) → (B, H) float32."""
    emb = pool(hidden, mask, method).float()
    return F.normalize(emb, p=2, dim=-1) if normalize else emb
