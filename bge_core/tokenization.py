"""Tokenising for encoding: special tokens, truncation at a limit, truncation counts.

Kept apart from the model so a CPU stage of a pipeline can tokenise without loading weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bge_core.errors import InputError

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built, not on import
    from transformers import PreTrainedTokenizerBase


class TextTokenizer:
    """Wraps a Hugging Face tokenizer: ids with special tokens, truncated at `max_length`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix, self.suffix = _special_tokens(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int) -> TextTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(folder), max_length)

    def __call__(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per text and a bool array marking texts cut at the limit.

        Args:
            texts: strings to tokenise (checked by the caller).
            max_length: limit including special tokens; capped at the model's limit.
        """
        limit = min(max_length or self.max_length, self.max_length)
        budget = limit - len(self.prefix) - len(self.suffix)
        if budget < 0:
            raise InputError(f"max_length {limit} leaves no room for special tokens")
        if not texts:
            return [], np.zeros(0, dtype=bool)
        # One token past the budget tells truncated texts from those exactly at the limit.
        bodies = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=True, max_length=budget + 1,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
        truncated = np.fromiter((len(b) > budget for b in bodies), dtype=bool, count=len(bodies))
        ids = [self.prefix + b[:budget] + self.suffix for b in bodies]
        return ids, truncated


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (e.g. [CLS] / [SEP])."""
    template = tokenizer("", add_special_tokens=True)["input_ids"]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(probe)) if probe[i : i + len(body)] == body)
    return list(template[:start]), list(template[start:])
