"""A model soup: the uniform average of the weights of models finetuned from one start.

Models finetuned from the same weights on the same data with different seeds (data order,
sampled negatives, dropout) land in one basin, and the average of their weights is
usually better than each of them (Wortsman et al., "Model soups", 2022; FlagEmbedding's
LM-Cocktail merges finetuned embedders the same way). The recipe's finetuning step
averages its seeds with `average_encoders` (`pipelines/chain/recipe.py`, ``--soup``), and
can mix a little of the model finetuning started from back in (``start``/``start_weight``:
LM-Cocktail's merge of a finetuned embedder with its base; Wortsman et al., "Robust
fine-tuning of zero-shot models", 2022, WiSE-FT), which keeps more of what the start knew.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bge_core.errors import InputError
from bge_core.model import Encoder


def average_encoders(sources: Sequence[str], start: str | None = None,
                     start_weight: float = 0.0) -> Encoder:
    """The first of `sources` (model folders or URIs) with every floating-point weight
    replaced by the mean over all of them (accumulated in float64, one model loaded at a
    time besides the first); with `start` (the model they were finetuned from) and
    `start_weight` w, by (1 - w) × that mean + w × the start's weight. The settings
    (pooling, normalisation, instruction) are the members'; the start's may differ (a
    RetroMAE encoder saved CLS-pooled, finetuned with mean pooling), its weights may not.

    Raises:
        InputError: fewer than one source, `start_weight` outside [0, 1) or without a
            start, or models that differ in weights' names or shapes, or members that
            differ in their saved settings.
    """
    if not sources:
        raise InputError("a soup needs at least one model")
    if not 0.0 <= start_weight < 1.0 or (start_weight and start is None):
        raise InputError(f"a soup's start weight must be in [0, 1) with a start model, got "
                         f"{start_weight} (start {start})")
    first = Encoder.from_pretrained(sources[0], device="cpu")
    state = first.state_dict()
    total = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    for source in sources[1:]:
        other = Encoder.from_pretrained(source, device="cpu")
        if other.config.saved_dict() != first.config.saved_dict():
            raise InputError(f"soup: {source} was saved with other settings than "
                             f"{sources[0]} ({other.config.saved_dict()} vs "
                             f"{first.config.saved_dict()})")
        weights = other.state_dict()
        if _shapes(weights) != _shapes(state):
            raise InputError(f"soup: {source} has other weights than {sources[0]}")
        for name in total:
            total[name] += weights[name].double()
        del other, weights
    mean = {k: v / len(sources) for k, v in total.items()}
    if start_weight:
        origin = Encoder.from_pretrained(start, device="cpu").state_dict()
        if _shapes(origin) != _shapes(state):
            raise InputError(f"soup: the start {start} has other weights than {sources[0]}")
        mean = {k: (1 - start_weight) * v + start_weight * origin[k].double()
                for k, v in mean.items()}
        del origin
    averaged = {k: mean[k].to(v.dtype) if k in mean else v for k, v in state.items()}
    with torch.no_grad():
        first.load_state_dict(averaged)
    return first


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Each weight's name and shape: what two models must share to be averaged."""
    return {k: v.shape for k, v in state.items()}
