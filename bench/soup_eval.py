"""NFCorpus test scores of finetuned models and of uniform soups of them, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soup_eval.py [--threads 1] \
        out/recipe_ablation/lr5e5_g2_ep2_seed42/finetuned \
        soup:out/recipe_ablation/lr5e5_g2_ep2_seed42/finetuned+out/recipe_ablation/lr5e5_g2_ep2_seed7/finetuned

Each argument is a model folder, or ``soup:`` and folders joined by ``+``: their weights'
average (`bge_core.soup.average_encoders`, what the recipe's soup step runs). Scores:
nDCG@10 and recall@100 on NFCorpus test (every document, title + text, the model's own max
length, fp32; exact inner-product top 100) and STS-B test Spearman × 100, as
`pipelines/evaluate.py` computes them, in this process (no Ray): the figures match the
evaluate job's to about ±0.02 (ties, summation order). One JSON line per argument.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED  # noqa: E402
from bge_core.beir import load_beir  # noqa: E402
from bge_core.metrics import evaluate_run, spearman  # noqa: E402
from bge_core.model import Encoder  # noqa: E402
from bge_core.soup import average_encoders  # noqa: E402
from pipelines.search.evaluate import read_sts  # noqa: E402


def score(encoder: Encoder, data) -> dict[str, float]:
    """nDCG@10 and recall@100 (× 100) of `encoder` on the loaded BEIR split."""
    qids = list(data.qrels)
    docs = encoder.encode(data.corpus_texts)  # (N, D)
    queries = encoder.encode_queries([data.queries[q] for q in qids])  # (Q, D)
    scores = queries @ docs.T  # (Q, N)
    run = {}
    for row, qid in enumerate(qids):
        top = np.argsort(-scores[row])[:100]
        run[qid] = {data.corpus_ids[j]: float(scores[row, j]) for j in top}
    means, _ = evaluate_run(run, data.qrels, (10, 100))
    return {"ndcg@10": round(100 * means["ndcg@10"], 2),
            "recall@100": round(100 * means["recall@100"], 2)}


def sts_spearman(encoder: Encoder, path: Path) -> float:
    """STS-B test: Spearman × 100 of the pairs' cosines against the gold scores."""
    left, right, gold = read_sts(str(path))
    vectors = encoder.encode(left + right).astype(np.float64)  # (2n, D)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(vectors[: len(left)] * vectors[len(left):], axis=1)  # (n,)
    return round(100.0 * spearman(cosine, gold), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_beir(SHARED / "nfcorpus", "test")
    for spec in args.models:
        start = time.perf_counter()
        if spec.startswith("soup:"):
            encoder = average_encoders(spec[len("soup:"):].split("+"))
        else:
            encoder = Encoder.from_pretrained(spec, device="cpu")
        result = {"model": spec, **score(encoder, data),
                  "sts": sts_spearman(encoder, SHARED / "stsb" / "sts-test.csv"),
                  "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
