"""Token-window chunking: word-boundary cuts, overlap, coverage, and encoder equivalence."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from bge_core.chunking import ChunkSpec, split_texts, token_windows
from tests.tiny_models import WORDS

# pieces the tiny vocab splits into several tokens ("zebra" -> z ##e ##b ##r ##a)
LONG_WORDS = ["zebra", "quixotic", "xylophone", "b12", "kiwi"]


def _doc(rng: random.Random, words: int) -> str:
    out = []
    for _ in range(words):
        word = rng.choice(WORDS + LONG_WORDS)
        out.append(word + rng.choice(["", "", "", ",", ".", "!"]))
        out.append(rng.choice([" ", " ", "  ", "\n", "\t "]))
    return "  " + "".join(out) + "\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def test_windows_respect_size_overlap_and_word_boundaries() -> None:
    words = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6]  # word index per token
    windows = token_windows(words, ChunkSpec(size=4, overlap=1))
    assert windows[0] == (0, 3)  # (0, 4) would end inside word 2
    assert windows[-1][1] == len(words)
    for a, b in windows:
        assert 0 < b - a <= 4
        assert a == 0 or words[a] != words[a - 1]  # starts at a word start
        assert b == len(words) or words[b] != words[b - 1]  # ends at a word end
    starts = [a for a, _ in windows]
    assert starts == sorted(set(starts))  # always moves forward
    # one word longer than a window is cut inside (the only way to make progress)
    assert token_windows([0] * 5, ChunkSpec(size=2)) == [(0, 2), (2, 4), (4, 5)]
    assert token_windows([], ChunkSpec(size=3)) == [(0, 0)]


@pytest.mark.parametrize(("size", "overlap"), [(8, 0), (8, 3), (5, 4), (30, 10)])
def test_spans_cover_every_character_and_retokenise_to_at_most_size(
        tokenizer, size: int, overlap: int) -> None:
    rng = random.Random(size * 100 + overlap)
    texts = [_doc(rng, rng.randint(0, 60)) for _ in range(20)] + ["", "   ", "cat"]
    spec = ChunkSpec(size, overlap)
    for text, spans in zip(texts, split_texts(tokenizer, texts, spec)):
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        covered = np.zeros(len(text), dtype=bool)
        for (s, e), nxt in zip(spans, spans[1:] + [None]):
            covered[s:e] = True
            if nxt is not None:
                assert nxt[0] <= e and nxt[0] > s  # spans meet or overlap, moving forward
            pieces = tokenizer(text[s:e], add_special_tokens=False)["input_ids"]
            assert len(pieces) <= size
        assert covered.all()


def test_overlap_repeats_about_overlap_tokens(tokenizer) -> None:
    text = " ".join(WORDS[:40])  # one token per word: overlap is exact
    spans = split_texts(tokenizer, [text], ChunkSpec(10, 4))[0]
    chunks = [text[s:e].split() for s, e in spans]
    assert all(len(c) <= 10 for c in chunks)
    for left, right in zip(chunks, chunks[1:]):
        assert left[-4:] == right[:4]
    assert [w for c in chunks for w in c[: len(c) - 4 if c is not chunks[-1] else None]] == \
        text.split()


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="--chunk-overlap"):
        ChunkSpec(8, 8)
    with pytest.raises(ValueError, match="--chunk-tokens"):
        ChunkSpec(0)


def test_a_span_retokenises_to_its_window_of_the_whole_text(tokenizer) -> None:
    """Cuts fall between words, so a chunk's own tokens are the whole text's tokens in it."""
    rng = random.Random(5)
    text = _doc(rng, 120)
    spans = split_texts(tokenizer, [text], ChunkSpec(12, 4))[0]
    assert len(spans) > 5
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for s, e in spans:
        inside = [t for t, (a, _) in zip(whole["input_ids"], whole["offset_mapping"])
                  if s <= a < e]
        assert tokenizer(text[s:e], add_special_tokens=False)["input_ids"] == inside
