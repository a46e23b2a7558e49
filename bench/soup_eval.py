"""NFCorpus test scores of finetuned models and of uniform soups of them, in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soup_eval.py [--threads 1] \
        out/recipe_ablation/lr5e5_g2_ep2_seed42/finetuned \
        soup:out/recipe_ablation/lr5e5_g2_ep2_seed42/finetuned+out/recipe_ablation/lr5e5_g2_ep2_seed7/finetuned

Each argument is a model folder, or ``soup:`` and folders joined by ``+``: their weights'
average (`bge_core.soup.average_encoders`, what the recipe's soup step runs), with
``--start_weight W`` of ``--start`` (default all-MiniLM-L6-v2) mixed in as the recipe's
``--start_weight`` does. Scores:
NFCorpus nDCG@10, recall@100, MRR@10 and STS-B Spearman × 100, on test (or ``--split dev``)
(`bench/int8_quality.py`'s `nfcorpus_metrics` / `stsb_spearman`: fp32, the model's own max
length, exact top 100), in this process (no Ray): the figures match the evaluate job's to
about ±0.02 (ties, summation order). One JSON line per argument.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.int8_quality import nfcorpus_metrics, stsb_spearman  # noqa: E402
from bge_core.model import Encoder  # noqa: E402
from bge_core.soup import average_encoders  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start", default="all-MiniLM-L6-v2",
                        help="the model the soups' members were finetuned from")
    parser.add_argument("--start_weight", type=float, default=0.0,
                        help="its share in each soup (the recipe's --start_weight)")
    parser.add_argument("--split", default="test", choices=("test", "dev"),
                        help="NFCorpus's and STS-B's split")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for spec in args.models:
        start = time.perf_counter()
        if spec.startswith("soup:"):
            encoder = average_encoders(spec[len("soup:"):].split("+"), args.start,
                                       args.start_weight)
        else:
            encoder = Encoder.from_pretrained(spec, device="cpu")
        scores = nfcorpus_metrics(encoder, split=args.split)
        scores["sts"] = stsb_spearman(encoder, split=args.split)
        mix = {"start_weight": args.start_weight} if spec.startswith("soup:") else {}
        result = {"model": spec, "split": args.split, **mix,
                  **{k: round(v, 2) for k, v in scores.items()},
                  "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
