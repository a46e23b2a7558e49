"""Score finished recipe rows on NFCorpus *dev*, so a default picked on test is checked on
queries it was not picked on.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/recipe_dev.py [--workdir out/recipe_ablation] \
        [--rows base,lr5e5_seed7,...] [--json out.json]

In process, no Ray, fp32: each row's ``<workdir>/<row>/finetuned`` model (``base``: the
starting all-MiniLM-L6-v2) encodes NFCorpus's dev queries and its corpus (as the recipe's
evaluation does: ``title + " " + text``, the model's max length) and is scored with
`bge_core.metrics` (nDCG@10, recall@100, MRR@10). Dev and test share the corpus, not the
queries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.int8_quality import nfcorpus_metrics  # noqa: E402
from bge_core import Encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/recipe_ablation")
    parser.add_argument("--rows", default="base", help="row_seed folder names, or base")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--json", default=None, help="also append the results here")
    args = parser.parse_args()
    for row in args.rows.split(","):
        model = "all-MiniLM-L6-v2" if row == "base" else str(Path(args.workdir) / row / "finetuned")
        start = time.perf_counter()
        scores = nfcorpus_metrics(Encoder.from_pretrained(model, device="cpu"), split=args.split)
        result = {"row": row, "split": args.split, **{k: round(v, 2) for k, v in scores.items()},
                  "wall_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
