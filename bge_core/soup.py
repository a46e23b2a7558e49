"""A model soup: the uniform average of the weights of models finetuned from one start.

Models finetuned from the same weights on the same data with different seeds (data order,
sampled negatives, dropout) land in one basin, and the average of their weights is
usually better than each of them (Wortsman et al., "Model soups", 2022; FlagEmbedding's
LM-Cocktail merges finetuned embedders the same way). The recipe's finetuning step
averages its seeds with `average_encoders` (`pipelines/chain/recipe.py`, ``--soup``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bge_core.errors import InputError
from bge_core.model import Encoder


def average_encoders(sources: Sequence[str]) -> Encoder:
    """The first of `sources` (model folders or URIs) with every floating-point weight
    replaced by the mean over all of them (accumulated in float64, one model loaded at a
    time besides the first).

    Raises:
        InputError: fewer than one source, or models that differ in weights' names or
            shapes, or in their saved settings (pooling, normalisation, instruction).
    """
    if not sources:
        raise InputError("a soup needs at least one model")
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
        if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in state.items()}:
            raise InputError(f"soup: {source} has other weights than {sources[0]}")
        for name in total:
            total[name] += weights[name].double()
        del other, weights
    averaged = {k: (total[k] / len(sources)).to(v.dtype) if k in total else v
                for k, v in state.items()}
    with torch.no_grad():
        first.load_state_dict(averaged)
    return first
