"""How often a query's in-batch negatives are passages listed among its own positives.

    .venv/bin/python bench/inbatch_false_negatives.py \
        --train out/recipe_ablation/lr5e5_g2_ep2_seed42/mined.jsonl \
        [--judged out/recipe_ablation/train_all.jsonl] [--batch 32] [--group 2] [--batches 300]

Draws `--batches` random batches of `--batch` examples from a FlagEmbedding training file,
samples each example's group as finetuning does (`bge_core.data.sample_group`, seed 0) and
counts, with the loss's own mask (`bge_core.losses.listed_positive_mask`), the candidates
other than its target that each query has listed in its ``pos``: what
`--mask_listed_positives` takes out of its softmax. With `--judged` (the same queries with
every judged document as ``pos``) it also counts the candidates judged relevant at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bge_core.data import listed_keys, load_examples, sample_group, text_key  # noqa: E402
from bge_core.losses import listed_positive_mask  # noqa: E402


def masked_counts(examples: list[dict], batch: int, group: int, batches: int,
                  judged: dict[str, set[int]] | None) -> dict[str, float]:
    """Mean masked candidates per query, and the share of queries with at least one."""
    rng = np.random.default_rng(0)
    listed, any_judged = [], []
    for draw in range(batches):
        rows = [examples[i] for i in rng.choice(len(examples), size=batch, replace=False)]
        groups = [sample_group(row, group, seed=0, epoch=draw) for row in rows]
        keys = listed_keys(groups)
        labels = torch.arange(batch) * group
        listed.append(listed_positive_mask(keys["positive_keys"], keys["passage_keys"],
                                           labels).sum(dim=1))
        if judged is not None:
            width = max(len(judged[r["query"]]) for r in rows)
            rows_keys = [sorted(judged[r["query"]]) for r in rows]
            padded = torch.tensor([k + [k[0]] * (width - len(k)) for k in rows_keys])
            any_judged.append(listed_positive_mask(padded, keys["passage_keys"],
                                                   labels).sum(dim=1))
    out = {"queries": batch * batches, "listed_per_query": _mean(listed),
           "queries_with_listed": _share(listed)}
    if judged is not None:
        out |= {"judged_per_query": _mean(any_judged), "queries_with_judged": _share(any_judged)}
    return out


def _mean(counts: list[torch.Tensor]) -> float:
    return round(float(torch.cat(counts).float().mean()), 3)


def _share(counts: list[torch.Tensor]) -> float:
    return round(float((torch.cat(counts) > 0).float().mean()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--judged", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    examples, _ = load_examples(args.train, group_size=args.group)
    examples = [{**row, "key": i} for i, row in enumerate(examples)]
    judged = None
    if args.judged:
        judged = {}
        for line in Path(args.judged).read_text().splitlines():
            row = json.loads(line)
            judged[row["query"]] = {text_key(t) for t in row["pos"]}
    result = masked_counts(examples, args.batch, args.group, args.batches, judged)
    print(json.dumps({"train": args.train, "batch": args.batch, "group": args.group, **result}))


if __name__ == "__main__":
    main()
