"""Hard-negative sampling on given embeddings: FlagEmbedding hn_mine semantics, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from bge_core.mining import SampleRange, distinct_texts, mine_negatives, mine_one, sample_negatives
from bge_core.search import exact_topk

N_DOCS = 60


def _ranked_by_search(examples: list[dict], corpus: list[str], k: int) -> list[list[str]]:
    """Rank a corpus whose doc i scores 1 - i/N against every query (rank i = doc i)."""
    dim = 4
    corpus_vecs = np.zeros((len(corpus), dim), dtype=np.float32)
    corpus_vecs[:, 0] = 1.0 - np.arange(len(corpus)) / len(corpus)
    query_vecs = np.tile(np.eye(dim, dtype=np.float32)[0], (len(examples), 1))
    _, ids = exact_topk(query_vecs, corpus_vecs, k, shard_size=7)
    return [[corpus[i] for i in row] for row in ids.tolist()]


def _examples() -> list[dict]:
    return [
        {"query": f"query {q}", "pos": [f"doc {q}", f"doc {q + 10}"], "neg": ["old"], "id": q}
        for q in range(5)
    ]


def test_negatives_come_from_the_window_and_are_never_positives() -> None:
    examples = _examples()
    corpus = [f"doc {i}" for i in range(N_DOCS)]
    window = SampleRange.parse("2-30")
    ranked = _ranked_by_search(examples, corpus, window.end)
    mined = mine_negatives(examples, ranked, window, number=8, seed=0)
    for example, out in zip(examples, mined):
        assert len(out["neg"]) == 8
        assert len(set(out["neg"])) == 8
        ranks = [corpus.index(t) for t in out["neg"]]
        assert all(2 <= r < 30 for r in ranks)
        assert ranks == sorted(ranks)
        assert not set(out["neg"]) & set(example["pos"])
        assert out["id"] == example["id"] and out["pos"] == example["pos"]  # fields kept


def test_duplicates_of_a_positive_and_the_query_are_excluded() -> None:
    # The ranking holds a positive's text twice (a pool with duplicates) and the query.
    ranked = ["top", "p", "q", "p", "a", "b", "c"]
    negs = sample_negatives(ranked, {"p", "q"}, SampleRange(0, 7), 10, np.random.default_rng(0))
    assert negs == ["top", "a", "b", "c"]


def test_seeded_and_reproducible() -> None:
    examples = _examples()
    corpus = [f"doc {i}" for i in range(N_DOCS)]
    window = SampleRange(2, 50)
    ranked = _ranked_by_search(examples, corpus, window.end)
    first = mine_negatives(examples, ranked, window, 5, seed=3)
    again = mine_negatives(examples, ranked, window, 5, seed=3)
    other = mine_negatives(examples, ranked, window, 5, seed=4)
    assert first == again
    assert first != other
    # Per-example generators: mining a subset gives the same draws for those examples.
    assert mine_negatives(examples[:2], ranked[:2], window, 5, seed=3) == first[:2]


def test_small_window_returns_all_candidates() -> None:
    negs = sample_negatives(["a", "b", "c"], {"b", "q"}, SampleRange(0, 200), 15,
                            np.random.default_rng(0))
    assert negs == ["a", "c"]


def test_short_lists_are_topped_up_never_with_a_positive_or_the_query() -> None:
    examples = [{"query": "q", "pos": ["p1", "p2"]}, {"query": "r", "pos": ["a"]}]
    corpus = ["p1", "p2", "q", "a", "b", "c", "d", "e"]
    ranked = [["p1", "a", "b"], ["a", "b", "c"]]  # windows hold 1 and 2 usable negatives
    for seed in range(20):
        mined = mine_negatives(examples, ranked, SampleRange(0, 3), 4, seed, corpus=corpus)
        for example, out in zip(examples, mined):
            assert len(out["neg"]) == len(set(out["neg"])) == 4
            assert not set(out["neg"]) & {*example["pos"], example["query"]}
        assert mined[1]["neg"][:2] == ["b", "c"]  # mined ones first, in rank order
    # a corpus with too few usable passages gives all it has, never a banned one
    short = mine_negatives(examples[:1], ranked[:1], SampleRange(0, 3), 10, 0,
                           corpus=["p1", "q", "a", "b"])
    assert sorted(short[0]["neg"]) == ["a", "b"]
    # without a corpus the list stays short (the mined ones only)
    assert mine_negatives(examples[:1], ranked[:1], SampleRange(0, 3), 4, 0)[0]["neg"] == \
        ["a", "b"]


def test_corpus_is_pool_or_all_pos_and_neg_deduplicated() -> None:
    examples = [{"query": "q1", "pos": ["a", "b"], "neg": ["c"]},
                {"query": "q2", "pos": ["b"], "neg": ["d", "a"]}]
    assert distinct_texts(examples) == ["a", "b", "c", "d"]
    assert distinct_texts(examples, ["x", "y", "x"]) == ["x", "y"]


def test_range_parsing() -> None:
    assert SampleRange.parse("2-200") == SampleRange(2, 200)
    for bad in ("200", "5-2", "a-b", "-1-3"):
        with pytest.raises(ValueError, match="range_for_sampling"):
            SampleRange.parse(bad)


def test_mining_ids_of_a_deduplicated_corpus_equals_mining_its_texts() -> None:
    """What the job does (ids 0..n-1 in first-seen order, banned ids, top-up from range(n))
    equals the in-process reference on texts, top-ups included."""
    rng = np.random.default_rng(5)
    pool = [f"doc {i}" for i in rng.integers(0, 30, size=50)]  # duplicates
    corpus = distinct_texts([], pool)
    ids = {text: i for i, text in enumerate(corpus)}
    examples = [{"query": corpus[q], "pos": [corpus[q + 1], "unknown"], "k": q}
                for q in range(0, 12, 2)]
    window = SampleRange(1, 6)  # windows too small for 6 negatives: every list is topped up
    ranked = [[corpus[(q + j) % len(corpus)] for j in range(8)] for q in range(len(examples))]
    reference = mine_negatives(examples, ranked, window, 6, seed=9, corpus=corpus)
    for i, (example, row) in enumerate(zip(examples, ranked)):
        banned = {ids[t] for t in [example["query"], *example["pos"]] if t in ids}
        mined = mine_one(i, [ids[t] for t in row], banned, window, 6, 9, range(len(corpus)))
        assert [corpus[m] for m in mined] == reference[i]["neg"]
        assert len(mined) == 6


def test_negative_number_must_be_positive() -> None:
    with pytest.raises(ValueError, match="negative_number"):
        mine_negatives([{"query": "q", "pos": ["p"]}], [["a"]], SampleRange(0, 2), 0, seed=0)
