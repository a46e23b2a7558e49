"""Long documents as overlapping token windows, cut on word boundaries.

A text is tokenised once (no special tokens) with the tokenizer's offset mapping; windows of
at most `size` tokens are cut where a word ends (never between two pieces of one word,
unless a single word is longer than a window), and each next window starts about `overlap`
tokens before the previous one ended, at a word start. Each window becomes a character span
``[start_char, end_char)`` of the original string (Python indices); consecutive spans meet
or overlap and the first starts at 0 and the last ends at ``len(text)``, so every character
of the text is in at least one chunk. Embedding ``text[start_char:end_char]`` re-tokenises
to the window's tokens, since cuts fall between words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bge_core.errors import InputError


@dataclass(frozen=True)
class ChunkSpec:
    """Window size and overlap in tokens (special tokens excluded)."""

    size: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InputError(f"--chunk-tokens must be >= 1, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise InputError(f"--chunk-overlap must be >= 0 and < --chunk-tokens ({self.size}), "
                             f"got {self.overlap}")


def _word_start(words: Sequence[int | None], i: int) -> bool:
    """Token `i` begins a word (or is past the end): a window may start or end before it."""
    return i <= 0 or i >= len(words) or words[i] is None or words[i] != words[i - 1]


def token_windows(words: Sequence[int | None], spec: ChunkSpec) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` of the windows, given each token's word index.

    Args:
        words: word index per token (a fast tokenizer's ``word_ids()``); None for tokens
            outside any word.
        spec: window size and overlap.
    """
    n = len(words)
    if n == 0:
        return [(0, 0)]
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + spec.size, n)
        if end < n:
            cut = end
            while cut > start and not _word_start(words, cut):
                cut -= 1
            end = cut if cut > start else end  # one word longer than a window: cut inside
        windows.append((start, end))
        if end >= n:
            return windows
        nxt = max(end - spec.overlap, start + 1)
        back = nxt
        while back > start + 1 and not _word_start(words, back):
            back -= 1
        if _word_start(words, back) and back > start:
            nxt = back
        else:  # no word start behind: go forward to one (at most to `end`)
            while nxt < end and not _word_start(words, nxt):
                nxt += 1
        start = nxt


def char_spans(text: str, offsets: Sequence[tuple[int, int]],
               windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character spans of token windows; gaps between windows go to the earlier span."""
    if not offsets:
        return [(0, len(text))]
    spans = []
    for k, (a, b) in enumerate(windows):
        start = 0 if k == 0 else offsets[a][0]
        end = len(text) if k == len(windows) - 1 else max(offsets[b - 1][1],
                                                          offsets[windows[k + 1][0]][0])
        spans.append((start, end))
    return spans


def split_texts(tokenizer: Any, texts: Sequence[str], spec: ChunkSpec
                ) -> list[list[tuple[int, int]]]:
    """Character spans of the chunks of each text (one span for a short or empty text).

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets and word ids).
        texts: the strings to split.
        spec: window size and overlap in tokens.
    """
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)
    out = []
    for i, text in enumerate(texts):
        offsets = encoded["offset_mapping"][i]
        windows = token_windows(encoded.word_ids(i), spec)
        out.append(char_spans(text, offsets, windows))
    return out
