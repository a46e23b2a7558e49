"""Retrieval metrics (nDCG@k, recall@k, MRR@k, MAP@k) and Spearman correlation for STS.

Conventions are those of trec_eval / `pytrec_eval`, the implementation BEIR and MTEB use:

- A run is ``{qid: {docid: score}}``; documents are ranked by score, highest first, and
  ties are broken by document id in *descending* string order (trec_eval's rule), so
  results never depend on dict order.
- Qrels are ``{qid: {docid: grade}}``; a grade <= 0 is not relevant. nDCG uses the grade
  itself as the gain (linear, not ``2**g - 1``) and ``log2(rank + 1)`` as the discount.
- recall@k and MAP@k divide by *all* relevant documents of the query, MRR@k is the
  reciprocal rank of the first relevant document within the top k (0 if none).
- The evaluated queries are those of the qrels (a query with no relevant document scores 0,
  as in pytrec_eval); a qrels query missing from the run scores 0 on every metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from bge_core.errors import InputError

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

METRICS = ("ndcg", "recall", "mrr", "map")
DEFAULT_K = (1, 3, 5, 10, 100, 1000)


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score, highest first; ties by document id, descending (trec_eval)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def query_metrics(
    ranking: Sequence[str], judged: Mapping[str, int], k_values: Iterable[int]
) -> dict[str, float]:
    """All metrics at every cutoff for one query, from its ranked ids and its qrels."""
    relevant = {doc: grade for doc, grade in judged.items() if grade > 0}
    ideal = sorted(relevant.values(), reverse=True)
    gains = [relevant.get(doc, 0) for doc in ranking]
    out: dict[str, float] = {}
    for k in k_values:
        top = gains[:k]
        hits = [i for i, g in enumerate(top) if g > 0]  # 0-based ranks of relevant docs
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        dcg = sum(top[i] / math.log2(i + 2) for i in hits)
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / len(relevant) if relevant else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        precisions = sum((n + 1) / (i + 1) for n, i in enumerate(hits))
        out[f"map@{k}"] = precisions / len(relevant) if relevant else 0.0
    return out


def evaluate_run(
    run: Run, qrels: Qrels, k_values: Iterable[int] = DEFAULT_K
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query nDCG@k, recall@k, MRR@k and MAP@k (fractions in [0, 1]).

    Args:
        run: ``{qid: {docid: score}}``, e.g. each query's top-k search results.
        qrels: ``{qid: {docid: grade}}``; defines the evaluated queries.
        k_values: cutoffs.

    Returns:
        (``{"ndcg@10": mean, ...}``, ``{qid: {"ndcg@10": value, ...}}``).

    Raises:
        ValueError: no queries to evaluate, or a cutoff < 1.
    """
    ks = sorted(set(int(k) for k in k_values))
    if not ks or ks[0] < 1:
        raise InputError(f"k_values must be positive integers, got {list(k_values)}")
    if not qrels:
        raise InputError("no queries to evaluate: the qrels are empty")
    per_query = {
        qid: query_metrics(rank_documents(run.get(qid, {})), judged, ks)
        for qid, judged in qrels.items()
    }
    names = [f"{m}@{k}" for m in METRICS for k in ks]
    means = {name: float(np.mean([v[name] for v in per_query.values()])) for name in names}
    return means, per_query


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (as Spearman requires)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1..end
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks), as used for STS scores.

    Raises:
        ValueError: fewer than two pairs, lengths differ, or a side is constant.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {a.shape}, "
                         f"{b.shape}")
    if len(a) < 2:
        raise InputError(f"spearman needs at least 2 pairs, got {len(a)}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denom == 0.0:
        raise ValueError("spearman is undefined when one side is constant")
    return float(ra @ rb) / denom


def format_table(means: Mapping[str, float], k_values: Iterable[int]) -> str:
    """A metric × cutoff table of percentages (×100), for printing."""
    ks = sorted(set(int(k) for k in k_values))
    header = f"{'metric':<8}" + "".join(f"{'@' + str(k):>9}" for k in ks)
    lines = [header]
    for metric in METRICS:
        cells = "".join(f"{100 * means[f'{metric}@{k}']:>9.2f}" for k in ks)
        lines.append(f"{metric:<8}{cells}")
    return "\n".join(lines)
