"""Hard-negative sampling (FlagEmbedding ``hn_mine`` semantics), on given search results.

For each training example the corpus is ranked by similarity to the (instructed) query;
the candidates at ranks ``[start, end)`` (0-based, ``--range_for_sampling start-end``) that
are neither a positive's text nor the query itself are the pool, and ``negative_number`` of
them are drawn at random (all of them when the pool is smaller). The example's ``neg`` is
replaced by the draw, as in FlagEmbedding. Each example draws from its own generator seeded
by ``(seed, example index)``, so the result does not depend on processing order.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import numpy as np

from bge_core.errors import InputError

T = TypeVar("T", bound=Hashable)


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
            raise InputError(f"--range_for_sampling must be 'START-END', got {text!r}") from None
        if start < 0 or end <= start:
            raise InputError(f"--range_for_sampling needs 0 <= START < END, got {text!r}")
        return cls(start, end)


def distinct_texts(
    examples: Sequence[Mapping[str, Any]], pool: Iterable[str] | None = None
) -> list[str]:
    """Distinct corpus texts, first-seen order: the pool, else every pos and neg of the data."""
    if pool is not None:
        return list(dict.fromkeys(pool))
    texts = (t for ex in examples for t in [*ex["pos"], *ex.get("neg", [])])
    return list(dict.fromkeys(texts))


def sample_negatives(
    ranked: Sequence[T], banned: Iterable[T], window: SampleRange, number: int,
    rng: np.random.Generator,
) -> list[T]:
    """Draw up to `number` negatives from `ranked[window.start:window.end]`.

    Args:
        ranked: corpus passages (texts, or ids of a deduplicated corpus) by decreasing
            similarity to the query.
        banned: passages that must never come out: the positives (any duplicate of them
            included) and the query (a corpus may hold the query's own text).
        window: rank window to draw from.
        number: how many to draw; the whole filtered window when it is smaller.
        rng: the example's generator.
    """
    banned = set(banned)
    pool = [t for t in dict.fromkeys(ranked[window.start : window.end]) if t not in banned]
    if len(pool) <= number:
        return pool
    picks = np.sort(rng.choice(len(pool), size=number, replace=False))  # keep rank order
    return [pool[i] for i in picks]


def top_up(negatives: list[T], corpus: Sequence[T], banned: set[T], number: int,
           rng: np.random.Generator) -> list[T]:
    """Fill a short list with random corpus passages, as FlagEmbedding's hn_mine does, but
    never with a banned passage (a positive, the query) or one already in the list.

    `corpus` is indexed, never copied: ``range(n)`` stands for a deduplicated corpus of n
    passages known by their ids. FlagEmbedding 1.0.x tops up with
    ``random.sample(corpus, n)``, which can pick a positive (a false negative in training)
    or repeat a mined negative.
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
    if len(chosen) < number:  # nearly every passage is banned: a tiny corpus, scan it
        chosen += islice(_unseen(corpus, taken), number - len(chosen))
    return chosen


def _unseen(corpus: Iterable[T], taken: set[T]) -> Iterable[T]:
    """Corpus passages in order, each once, leaving out `taken`."""
    seen = set(taken)
    for item in corpus:
        if item not in seen:
            seen.add(item)
            yield item


def mine_one(index: int, ranked: Sequence[T], banned: set[T], window: SampleRange,
             number: int, seed: int, corpus: Sequence[T] | None = None) -> list[T]:
    """The negatives of example `index`: `sample_negatives`, then `top_up` from `corpus`
    (when given) if short. Draws with ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    negs = sample_negatives(ranked, banned, window, number, rng)
    if corpus is not None and len(negs) < number:
        negs = top_up(negs, corpus, banned, number, rng)
    return negs


def mine_negatives(
    examples: Sequence[Mapping[str, Any]], ranked: Sequence[Sequence[str]], window: SampleRange,
    number: int, seed: int, corpus: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Examples with `neg` replaced by mined negatives (other fields kept as they were): the
    in-process reference of `pipelines/mine_hard_negatives.py`, on texts.

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
    check_number(number)
    return [{**example, "neg": mine_one(i, texts, {*example["pos"], example["query"]}, window,
                                        number, seed, corpus)}
            for i, (example, texts) in enumerate(zip(examples, ranked))]


def check_number(number: int) -> None:
    """``--negative_number`` must be positive."""
    if number < 1:
        raise InputError(f"--negative_number must be >= 1, got {number}")
