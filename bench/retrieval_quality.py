"""The loop around finetuning on NFCorpus: evaluate → mine hard negatives → finetune → evaluate.

Every stage goes through the project's jobs (`pipelines.search.evaluate.run`,
`pipelines.search.mine.run`, `pipelines.train.finetune.run`) on a local Ray, at the jobs'
defaults except what a user always gives (model, data, output, epochs, batch, group size)
and what `--mine` / `--train` override (``key=value``, flag names); prints test nDCG@10 /
recall@100 / MRR@10 before and after, STS-B test Spearman before and after, and the wall
time of each stage.

    .venv/bin/python bench/retrieval_quality.py [--stages before,mine,finetune,after] \
        [--train_queries 0] [--epochs 1] [--batch 32] [--group 4] [--positives top] \
        [--train temperature=0.05 --train learning_rate=2e-5] [--workdir out/retrieval_quality]

Training data: NFCorpus train queries (all, or the first `--train_queries`). Mining sees
every judged document of a query as a positive, so none of them can be mined as a
negative; negatives come from the whole corpus (`pool.jsonl`: every corpus text) at the
mining job's default ranks. Finetuning then takes as positives only each query's
highest-graded documents (`--positives top`, the default: NFCorpus grade 2 = the article
cites the document directly, 1 = an indirect link) or all of them (`--positives all`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from bench.data import SHARED
from bge_core.beir import load_beir

DATA = SHARED / "nfcorpus"
STS = SHARED / "stsb" / "sts-test.csv"
MODEL = "all-MiniLM-L6-v2"


def evaluate(model: str, workdir: Path, tag: str) -> dict:
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig, run

    cfg = make_config(EvaluateConfig, model=model, beir_dir=str(DATA), split="test",
                      k_values="1,10,100", output=str(workdir / f"metrics_{tag}.json"),
                      run_file=str(workdir / f"run_{tag}.trec"))
    metrics = run(cfg)["metrics"]
    sts = make_config(EvaluateConfig, model=model, sts=str(STS),
                      output=str(workdir / f"sts_{tag}.json"))
    metrics["sts_spearman"] = run(sts)["metrics"]["spearman"]
    return metrics


def write_training_data(workdir: Path, n_queries: int) -> tuple[Path, Path]:
    """train.jsonl ({query, pos}) from the train qrels and pool.jsonl of the corpus texts."""
    train = load_beir(DATA, "train")
    texts = dict(zip(train.corpus_ids, train.corpus_texts))
    train_file, pool_file = workdir / "train.jsonl", workdir / "pool.jsonl"
    qids = list(train.qrels)[:n_queries] if n_queries > 0 else list(train.qrels)
    with train_file.open("w") as handle:
        for qid in qids:
            pos = [texts[d] for d, grade in train.qrels[qid].items() if grade > 0]
            if pos:
                handle.write(json.dumps({"query": train.queries[qid], "pos": pos}) + "\n")
    with pool_file.open("w") as handle:
        for text in train.corpus_texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return train_file, pool_file


def keep_positives(workdir: Path, which: str) -> Path:
    """finetune.jsonl: mined.jsonl with ``pos`` = each query's highest-graded documents
    (``top``) or every judged one (``all``); ``neg`` as mined."""
    train = load_beir(DATA, "train")
    texts = dict(zip(train.corpus_ids, train.corpus_texts))
    qrels = {train.queries[qid]: grades for qid, grades in train.qrels.items()}
    out = workdir / "finetune.jsonl"
    with (workdir / "mined.jsonl").open() as src, out.open("w") as dst:
        for line in src:
            record = json.loads(line)
            if which == "top":
                grades = qrels[record["query"]]
                best = max(grades.values())
                record["pos"] = [texts[d] for d, g in grades.items() if g == best]
            dst.write(json.dumps(record) + "\n")
    return out


def overrides(pairs: list[str]) -> dict[str, str]:
    """``key=value`` flags as a dict (values parsed by the job's own flag types)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        out[key.lstrip("-")] = value
    return out


def mine(workdir: Path, n_queries: int, extra: dict[str, str]) -> dict:
    from pipelines.search.mine import MineConfig, run

    train_file, pool_file = write_training_data(workdir, n_queries)
    argv = ["--model_name_or_path", MODEL, "--input_file", str(train_file),
            "--candidate_pool", str(pool_file), "--output_file", str(workdir / "mined.jsonl")]
    return run(parse(MineConfig, argv, extra))


def finetune(workdir: Path, epochs: int, batch: int, group: int, positives: str,
             extra: dict[str, str]) -> dict:
    from pipelines.train.finetune import FinetuneConfig, run

    data = keep_positives(workdir, positives)
    argv = ["--model_name_or_path", MODEL, "--train_data", str(data),
            "--output_dir", str(workdir / "finetuned"), "--num_train_epochs", str(epochs),
            "--per_device_train_batch_size", str(batch), "--train_group_size", str(group)]
    cfg = parse(FinetuneConfig, argv, extra)
    print(f"finetune config: {cfg}", flush=True)
    result = run(cfg)
    return {"metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            "examples": result.examples}


def parse(cls: type, argv: list[str], extra: dict[str, str]) -> object:
    """The job's config from its own command-line parser, as a user's flags would give it."""
    from pipelines.common.cli import parse_config

    for key, value in extra.items():
        argv += [f"--{key}", value]
    return parse_config(cls, argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="before,mine,finetune,after")
    parser.add_argument("--train_queries", type=int, default=0, help="0: every train query")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--positives", choices=["top", "all"], default="top",
                        help="finetune on each query's highest-graded documents, or all")
    parser.add_argument("--mine", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default="out/retrieval_quality")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from pipelines.common.cli import NO_DASHBOARD_ENV

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": NO_DASHBOARD_ENV})
    results: dict = {"args": vars(args)}
    for stage in args.stages.split(","):
        start = time.perf_counter()
        if stage == "before":
            results[stage] = evaluate(MODEL, workdir, "before")
        elif stage == "mine":
            results[stage] = mine(workdir, args.train_queries, overrides(args.mine))
        elif stage == "finetune":
            results[stage] = finetune(workdir, args.epochs, args.batch, args.group,
                                      args.positives, overrides(args.train))
        elif stage == "after":
            results[stage] = evaluate(str(workdir / "finetuned"), workdir, "after")
        else:
            raise SystemExit(f"unknown stage {stage!r}")
        results[f"{stage}_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({stage: results[stage], "wall_s": results[f"{stage}_wall_s"]}),
              flush=True)
    (workdir / f"results_{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    for tag in ("before", "after"):
        if tag in results:
            m = results[tag]
            print(f"{tag:>6}: nDCG@10 {100 * m['ndcg@10']:.2f}  recall@100 "
                  f"{100 * m['recall@100']:.2f}  MRR@10 {100 * m['mrr@10']:.2f}  "
                  f"STS-B {m['sts_spearman']:.2f}")


if __name__ == "__main__":
    main()
