"""Hard-negative sampling (FlagEmbedding ``hn_mine`` semantics), on given search results.

For each training example the corpus is ranked by similarity to the (instructed) query;
the candidates at ranks ``[start, end)`` (0-based, ``--range_for_sampling start-end``) that
are neither a positive's text nor the query itself are the pool, and ``negative_number`` of
them are drawn at random (all of them when the pool is smaller). The example's ``neg`` is
replaced by the draw, as in FlagEmbedding. Each example draws from its own generator seeded
by ``(seed, example index)``, so the result does not depend on processing order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bge_core.jsonl import iter_jsonl, open_text


@dataclass(frozen=True)
class SampleRange:
    """0-based rank window ``[start, end)`` that negatives are drawn from."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> SampleRange:
        """``"2-200"`` → SampleRange(2, 200); errors name the flag."""
        parts = str(text).split("-")
        try:
            start, end = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--range_for_sampling must be 'START-END', got {text!r}") from None
        if start < 0 or end <= start:
            raise ValueError(f"--range_for_sampling needs 0 <= START < END, got {text!r}")
        return cls(start, end)


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """Read training JSONL ``{query: str, pos: [str], neg?: [str]}``; errors name the row."""
    examples = []
    with open_text(str(path), what="training data") as handle:
        for row, item in iter_jsonl(handle, str(path)):
            _check_example(item, f"{path} row {row}")
            examples.append(item)
    if not examples:
        raise ValueError(f"{path}: no training examples")
    return examples


def _check_example(item: Any, where: str) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise ValueError(f"{where}: needs a string 'query'")
    for key in ("pos", "neg"):
        value = item.get(key, [])
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ValueError(f"{where}: '{key}' must be a list of strings")
    if not item.get("pos"):
        raise ValueError(f"{where}: 'pos' must hold at least one passage")


def read_candidate_pool(path: str | Path) -> list[str]:
    """Texts of a candidate-pool JSONL (one ``{"text": str}`` per line)."""
    texts = []
    with open_text(str(path), what="candidate pool") as handle:
        for row, item in iter_jsonl(handle, str(path)):
            text = item.get("text") if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path} row {row}: needs a JSON object with a string 'text'")
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: the candidate pool is empty")
    return texts


def build_corpus(
    examples: Sequence[Mapping[str, Any]], pool: Iterable[str] | None = None
) -> list[str]:
    """Distinct corpus texts, first-seen order: the pool, else every pos and neg of the data."""
    if pool is not None:
        return list(dict.fromkeys(pool))
    texts = (t for ex in examples for t in [*ex["pos"], *ex.get("neg", [])])
    return list(dict.fromkeys(texts))


def sample_negatives(
    ranked: Sequence[str], positives: Iterable[str], query: str, window: SampleRange,
    number: int, rng: np.random.Generator,
) -> list[str]:
    """Draw up to `number` negatives from `ranked[window.start:window.end]`.

    Args:
        ranked: corpus texts by decreasing similarity to the query.
        positives: texts that must never come out (any duplicate of them included).
        query: excluded too (a corpus may hold the query's own text).
        window: rank window to draw from.
        number: how many to draw; the whole filtered window when it is smaller.
        rng: the example's generator.
    """
    banned = set(positives) | {query}
    pool = [t for t in dict.fromkeys(ranked[window.start : window.end]) if t not in banned]
    if len(pool) <= number:
        return pool
    picks = np.sort(rng.choice(len(pool), size=number, replace=False))  # keep rank order
    return [pool[i] for i in picks]


def top_up(negatives: list[str], corpus: Sequence[str], banned: set[str], number: int,
           rng: np.random.Generator) -> list[str]:
    """Fill a short list with random corpus passages, as FlagEmbedding's hn_mine does, but
    never with a banned text (a positive, the query) or one already in the list.

    FlagEmbedding 1.0.x tops up with ``random.sample(corpus, n)``, which can pick a
    positive (a false negative in training) or repeat a mined negative.
    """
    chosen = list(negatives)
    taken = banned | set(chosen)
    rounds = 0
    while len(chosen) < number and rounds < 8:  # rejection sampling: cheap on big corpora
        need = number - len(chosen)
        draws = rng.choice(len(corpus), size=min(len(corpus), 2 * need + 8), replace=False)
        for i in draws.tolist():
            if corpus[i] not in taken and len(chosen) < number:
                chosen.append(corpus[i])
                taken.add(corpus[i])
        rounds += 1
    if len(chosen) < number:  # nearly every passage is banned: a tiny corpus, scan it all
        chosen += [t for t in dict.fromkeys(corpus) if t not in taken][: number - len(chosen)]
    return chosen


def mine_negatives(
    examples: Sequence[Mapping[str, Any]], ranked: Sequence[Sequence[str]], window: SampleRange,
    number: int, seed: int, corpus: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Examples with `neg` replaced by mined negatives (other fields kept as they were).

    Args:
        examples: training examples ``{query, pos, neg?}``.
        ranked: per example, corpus texts by decreasing similarity (at least ``window.end``
            of them when the corpus is that large).
        window: rank window to draw from.
        number: negatives per example.
        seed: base seed; example ``i`` draws with ``default_rng([seed, i])``.
        corpus: when given, a list short of `number` is topped up with random passages
            from it (`top_up`), as FlagEmbedding does; None leaves it short.
    """
    if len(ranked) != len(examples):
        raise ValueError(f"{len(ranked)} rankings for {len(examples)} examples")
    if number < 1:
        raise ValueError(f"--negative_number must be >= 1, got {number}")
    out = []
    for i, (example, texts) in enumerate(zip(examples, ranked)):
        rng = np.random.default_rng([seed, i])
        negs = sample_negatives(texts, example["pos"], example["query"], window, number, rng)
        if corpus is not None and len(negs) < number:
            negs = top_up(negs, corpus, {*example["pos"], example["query"]}, number, rng)
        out.append({**example, "neg": negs})
    return out
