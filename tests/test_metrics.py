"""Metrics equal pytrec_eval (what BEIR and MTEB use) and scipy's Spearman."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from bge_core.metrics import evaluate_run, format_table, rank_documents, spearman

K_VALUES = (1, 3, 5, 10, 20)


def _random_case(seed: int, graded: bool) -> tuple[dict, dict]:
    """Random run + qrels: tied scores, unjudged docs, grades <= 0, queries without hits."""
    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(60)]
    run, qrels = {}, {}
    for q in range(40):
        qid = f"q{q}"
        retrieved = rng.choice(docs, size=int(rng.integers(1, 40)), replace=False)
        # Few distinct values → many ties, so the tie-breaking rule matters.
        run[qid] = {d: float(rng.integers(0, 8)) / 4.0 for d in retrieved}
        judged = rng.choice(docs, size=int(rng.integers(1, 15)), replace=False)
        low, high = (-1, 4) if graded else (0, 2)
        grades = rng.integers(low, high, size=len(judged))
        qrels[qid] = {d: int(g) for d, g in zip(judged, grades)}
    return run, qrels


def _reference(run: dict, qrels: dict, k: int) -> dict[str, dict[str, float]]:
    measures = {f"ndcg_cut.{k}", f"recall.{k}", f"map_cut.{k}"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    # MRR@k (BEIR's definition) is trec_eval's recip_rank on the run cut to its top k.
    cut = {q: {d: run[q][d] for d in rank_documents(docs)[:k]} for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    return {
        q: {
            f"ndcg@{k}": v[f"ndcg_cut_{k}"],
            f"recall@{k}": v[f"recall_{k}"],
            f"map@{k}": v[f"map_cut_{k}"],
            f"mrr@{k}": rr[q]["recip_rank"],
        }
        for q, v in full.items()
    }


@pytest.mark.parametrize("graded", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_pytrec_eval(seed: int, graded: bool) -> None:
    run, qrels = _random_case(seed, graded)
    means, per_query = evaluate_run(run, qrels, K_VALUES)
    for k in K_VALUES:
        reference = _reference(run, qrels, k)
        assert set(reference) == set(per_query)
        for qid, values in reference.items():
            for name, expected in values.items():
                assert per_query[qid][name] == pytest.approx(expected, abs=1e-6), (qid, name)
        for name in (f"ndcg@{k}", f"recall@{k}", f"map@{k}", f"mrr@{k}"):
            mean_ref = np.mean([v[name] for v in reference.values()])
            assert means[name] == pytest.approx(mean_ref, abs=1e-6)


def test_ties_break_by_docid_descending() -> None:
    assert rank_documents({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]
    # "a" is relevant but loses the tie to "c": MRR@1 is 0, MRR@2 is 1/2.
    means, _ = evaluate_run({"q": {"a": 1.0, "c": 1.0}}, {"q": {"a": 1}}, [1, 2])
    assert means["mrr@1"] == 0.0
    assert means["mrr@2"] == 0.5


def test_graded_gain_is_linear_and_nonpositive_grades_are_not_relevant() -> None:
    run = {"q": {"x": 3.0, "y": 2.0, "z": 1.0}}
    qrels = {"q": {"x": -1, "y": 0, "z": 2, "w": 1}}
    means, _ = evaluate_run(run, qrels, [3])
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert means["ndcg@3"] == pytest.approx((2 / np.log2(4)) / idcg)
    assert means["recall@3"] == pytest.approx(0.5)
    assert means["map@3"] == pytest.approx((1 / 3) / 2)


def test_query_missing_from_run_scores_zero() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    means, per_query = evaluate_run({"q1": {"a": 1.0}}, qrels, [10])
    assert per_query["q2"]["ndcg@10"] == 0.0
    assert means["ndcg@10"] == pytest.approx(0.5)


def test_empty_qrels_is_an_error_not_nan() -> None:
    with pytest.raises(ValueError, match="no queries"):
        evaluate_run({"q": {"a": 1.0}}, {}, [10])
    with pytest.raises(ValueError, match="k_values"):
        evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 1}}, [0])


def test_format_table_shows_percentages() -> None:
    means, _ = evaluate_run({"q": {"a": 1.0}}, {"q": {"a": 1}}, [1, 10])
    table = format_table(means, [1, 10])
    assert "ndcg" in table and "100.00" in table


def test_spearman_equals_scipy_with_ties() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=200).astype(float)  # many ties, like STS gold scores
    y = x + rng.normal(scale=2.0, size=200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="constant"):
        spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="equal length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])
