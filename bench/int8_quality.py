"""int8 vs fp32 quality of one model: STS-B test Spearman and NFCorpus test nDCG@10.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_quality.py [--dtypes int8,fp32] \
        [--model all-MiniLM-L6-v2] [--json out.json]

In process, no Ray: `Encoder.encode` (STS-B pairs: cosine vs gold), `encode_corpus` /
`encode_queries` and exact search (`bge_core.search.exact_topk`) for NFCorpus (323 test
queries, 3,395 documents as ``title + " " + text``), scored with `bge_core.metrics`. Each
task loads its own encoder, so int8 calibrates, as `Encoder` does by default, on the first
300 texts that task encodes (STS-B: its first sentences; NFCorpus: its first documents).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED, stsb_test  # noqa: E402
from bge_core import Encoder  # noqa: E402
from bge_core.beir import load_beir  # noqa: E402
from bge_core.metrics import evaluate_run, spearman  # noqa: E402
from bge_core.search import exact_topk  # noqa: E402


def stsb_spearman(encoder: Encoder, split: str = "test") -> float:
    left, right, gold = stsb_test(split=split)
    vectors = encoder.encode(left + right)  # (2n, D), normalised
    return 100 * spearman((vectors[: len(left)] * vectors[len(left):]).sum(1), gold)


def nfcorpus_metrics(encoder: Encoder, k: int = 100, split: str = "test") -> dict[str, float]:
    data = load_beir(SHARED / "nfcorpus", split)
    qids = list(data.qrels)
    corpus = encoder.encode_corpus(data.corpus_texts)  # (N, D)
    queries = encoder.encode_queries([data.queries[q] for q in qids])  # (Q, D)
    scores, rows = exact_topk(queries, corpus, k)
    run = {q: {data.corpus_ids[r]: float(s) for s, r in zip(scores[i], rows[i])}
           for i, q in enumerate(qids)}
    means, _ = evaluate_run(run, data.qrels, (10, 100))
    return {name: 100 * means[name] for name in ("ndcg@10", "recall@100", "mrr@10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="int8,fp32")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results: dict = {"model": args.model}
    for dtype in args.dtypes.split(","):
        start = time.perf_counter()
        encoder = Encoder.from_pretrained(args.model, device="cpu", dtype=dtype)
        row = {"precision": encoder.precision, "load_s": time.perf_counter() - start,
               "stsb_spearman": stsb_spearman(encoder)}
        print(json.dumps({dtype: row}), flush=True)
        encoder = Encoder.from_pretrained(args.model, device="cpu", dtype=dtype)
        row["nfcorpus"] = nfcorpus_metrics(encoder)
        row["wall_s"] = time.perf_counter() - start
        results[dtype] = row
        print(json.dumps({dtype: row}), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if "int8" in results and "fp32" in results:
        a, b = results["int8"], results["fp32"]
        print(f"int8 - fp32: STS-B {a['stsb_spearman'] - b['stsb_spearman']:+.2f}, NFCorpus "
              f"nDCG@10 {a['nfcorpus']['ndcg@10'] - b['nfcorpus']['ndcg@10']:+.2f}")


if __name__ == "__main__":
    main()
