"""The loop around finetuning on NFCorpus: evaluate → mine hard negatives → finetune → evaluate.

Every stage goes through the project's jobs (`pipelines.evaluate.run`,
`pipelines.mine_hard_negatives.run`, `pipelines.finetune.run`) on a local Ray; prints test
nDCG@10 / recall@100 before and after, and the wall time of each stage.

    .venv/bin/python bench/retrieval_quality.py [--stages before,mine,finetune,after] \
        [--train_queries 500] [--steps 30] [--workdir out/retrieval_quality]

Training data: NFCorpus train queries (the first `--train_queries`), every relevant document
as a positive (so none of them can be mined as a negative); negatives mined from the whole
corpus at ranks 2-200, 15 per query.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from bge_core.beir import load_beir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"
MODEL = "all-MiniLM-L6-v2"


def evaluate(model: str, workdir: Path, tag: str) -> dict:
    from pipelines.cli import make_config
    from pipelines.evaluate import EvaluateConfig, run

    cfg = make_config(EvaluateConfig, model=model, beir_dir=str(DATA), split="test",
                      k_values="1,10,100", output=str(workdir / f"metrics_{tag}.json"),
                      run_file=str(workdir / f"run_{tag}.trec"))
    return run(cfg)["metrics"]


def write_training_data(workdir: Path, n_queries: int) -> tuple[Path, Path]:
    """train.jsonl ({query, pos}) from the train qrels and pool.jsonl of the corpus texts."""
    train = load_beir(DATA, "train")
    texts = dict(zip(train.corpus_ids, train.corpus_texts))
    train_file, pool_file = workdir / "train.jsonl", workdir / "pool.jsonl"
    with train_file.open("w") as handle:
        for qid in list(train.qrels)[:n_queries]:
            pos = [texts[d] for d, grade in train.qrels[qid].items() if grade > 0]
            handle.write(json.dumps({"query": train.queries[qid], "pos": pos}) + "\n")
    with pool_file.open("w") as handle:
        for text in train.corpus_texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return train_file, pool_file


def mine(workdir: Path, n_queries: int) -> dict:
    from pipelines.cli import make_config
    from pipelines.mine_hard_negatives import MineConfig, run

    train_file, pool_file = write_training_data(workdir, n_queries)
    return run(make_config(MineConfig, model_name_or_path=MODEL, input_file=str(train_file),
                          candidate_pool=str(pool_file), output_file=str(workdir / "mined.jsonl"),
                          range_for_sampling="2-200", negative_number=15, seed=42))


def finetune(workdir: Path, steps: int, batch: int, group: int) -> dict:
    from pipelines.finetune import FinetuneConfig, run

    result = run(FinetuneConfig(
        model_name_or_path=MODEL, train_data=str(workdir / "mined.jsonl"),
        output_dir=str(workdir / "finetuned"), train_group_size=group,
        per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-5,
        temperature=0.05, passage_max_len=128, query_max_len=32, num_workers=1,
        cpus_per_worker=1.0, save_steps=steps, max_failures=0))
    return {"metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            "examples": result.examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="before,mine,finetune,after")
    parser.add_argument("--train_queries", type=int, default=500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--workdir", default="out/retrieval_quality")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict = {}
    for stage in args.stages.split(","):
        start = time.perf_counter()
        if stage == "before":
            results[stage] = evaluate(MODEL, workdir, "before")
        elif stage == "mine":
            results[stage] = mine(workdir, args.train_queries)
        elif stage == "finetune":
            results[stage] = finetune(workdir, args.steps, args.batch, args.group)
        elif stage == "after":
            results[stage] = evaluate(str(workdir / "finetuned"), workdir, "after")
        else:
            raise SystemExit(f"unknown stage {stage!r}")
        results[f"{stage}_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({stage: results[stage], "wall_s": results[f"{stage}_wall_s"]}),
              flush=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    for tag in ("before", "after"):
        if tag in results:
            m = results[tag]
            print(f"{tag:>6}: nDCG@10 {100 * m['ndcg@10']:.2f}  recall@100 "
                  f"{100 * m['recall@100']:.2f}  MRR@10 {100 * m['mrr@10']:.2f}")


if __name__ == "__main__":
    main()
