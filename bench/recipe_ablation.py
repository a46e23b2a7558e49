"""The recipe's ablation on NFCorpus: base, finetune only, + RetroMAE, + each changed default.

    nice -n 15 .venv/bin/python bench/recipe_ablation.py --rows base,finetune,retromae \
        --seeds 42,7 [--workdir out/recipe_ablation] [--row NAME='{"finetune_args": "..."}']

Each (row, seed) runs `pipelines/recipe.py` (its `run()`, on a local Ray in a child
process) with the row's recipe flags, and is scored on NFCorpus test (nDCG@10, recall@100,
MRR@10, the model's own max length) and STS-B test. Time is **CPU seconds** of the child
and every process under it (Ray's raylet, workers, Train workers), polled each second: the
box is shared, so wall time says little. Results append to `<workdir>/rows.jsonl`; the
table (markdown, one line per row and seed) is printed from it, so a row that finished is
never run again (delete its line to redo it).

Training data: NFCorpus train queries. Mining sees every judged document of a query as a
positive (so none is mined as a negative); finetuning then trains on each query's
highest-graded documents, as the +1.68 / +2.10 baseline did (BENCHMARKS.md, issue 13).
The corpus (RetroMAE's text and the mining pool) is every NFCorpus document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED  # noqa: E402

DATA, STS = SHARED / "nfcorpus", SHARED / "stsb" / "sts-test.csv"
USER = "--num_train_epochs 1 --per_device_train_batch_size 32 --train_group_size 4"
FT_ONLY = "mine,finetune,evaluate"
# name → the recipe settings the row gives (model, data and paths come from the script)
ROWS: dict[str, dict[str, str]] = {
    "base": {},  # the starting model, scored as is
    "finetune": {"steps": FT_ONLY, "finetune_args": USER},
    "retromae": {"finetune_args": USER},
    "retromae_mean": {"finetune_args": f"{USER} --sentence_pooling_method mean"},
    "epochs2": {"steps": FT_ONLY, "finetune_args": f"{USER} --num_train_epochs 2"},
}


def prepare(workdir: Path) -> dict[str, str]:
    """corpus.jsonl (every document), train_all.jsonl (every judged document as `pos`)."""
    from bge_core.beir import load_beir

    corpus, train = workdir / "corpus.jsonl", workdir / "train_all.jsonl"
    if train.exists():
        return {"corpus": str(corpus), "train": str(train)}
    split = load_beir(DATA, "train")
    texts = dict(zip(split.corpus_ids, split.corpus_texts, strict=True))
    with corpus.open("w") as handle:
        handle.writelines(json.dumps({"text": t}) + "\n" for t in split.corpus_texts)
    with train.open("w") as handle:
        for qid, grades in split.qrels.items():
            pos = [texts[d] for d, g in grades.items() if g > 0]
            if pos:
                handle.write(json.dumps({"query": split.queries[qid], "pos": pos}) + "\n")
    return {"corpus": str(corpus), "train": str(train)}


def keep_top_positives(mined: Path) -> None:
    """Rewrite `mined` with ``pos`` = each query's highest-graded documents (in place, once)."""
    from bge_core.beir import load_beir

    flag = mined.with_suffix(".top")
    if flag.exists():
        return
    split = load_beir(DATA, "train")
    texts = dict(zip(split.corpus_ids, split.corpus_texts, strict=True))
    grades = {split.queries[q]: g for q, g in split.qrels.items()}
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    for row in rows:
        judged = grades[row["query"]]
        best = max(judged.values())
        row["pos"] = [texts[d] for d, g in judged.items() if g == best]
    mined.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flag.touch()


def run_row(name: str, seed: int, workdir: Path) -> dict:
    """In the child: the recipe for one row and seed, then NFCorpus + STS-B scores."""
    import ray

    from pipelines.chain.recipe import STEPS, RecipeConfig, run
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig
    from pipelines.search.evaluate import run as evaluate

    data = prepare(workdir)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    if name == "base":
        model = "all-MiniLM-L6-v2"
        retrieval = evaluate(make_config(EvaluateConfig, model=model, beir_dir=str(DATA)))
        sts = evaluate(make_config(EvaluateConfig, model=model, sts=str(STS)))["metrics"]
        scores = {**retrieval["metrics"], "sts": sts["spearman"]}
    else:
        settings = {"corpus": data["corpus"], "train_data": data["train"],
                    "output_dir": str(workdir / f"{name}_seed{seed}"), "beir_dir": str(DATA),
                    "sts": str(STS), **ROWS[name]}
        settings["finetune_args"] = f"{settings.get('finetune_args', '')} --seed {seed}"
        steps = settings.get("steps", ",".join(STEPS)).split(",")
        mining = ",".join(s for s in steps if s in ("retromae", "mine"))
        run(make_config(RecipeConfig, **{**settings, "steps": mining}))
        keep_top_positives(Path(settings["output_dir"]) / "mined.jsonl")
        summary = run(make_config(RecipeConfig, **settings))["evaluate"]["summary"]
        scores = {**summary["retrieval"], "sts": summary["sts"]["spearman"]}
    ray.shutdown()
    return {k: scores[k] for k in ("ndcg@10", "recall@100", "mrr@10", "sts")}


def cpu_seconds_of(cmd: list[str]) -> tuple[int, float, float]:
    """Run `cmd`; (exit status, CPU seconds of it and all its descendants, wall seconds)."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                seen[p.pid] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass  # gone between listing and reading: its last reading stands
        time.sleep(1.0)
    return proc.returncode, sum(seen.values()), time.perf_counter() - start


def table(rows_file: Path) -> str:
    lines = ["| row | seed | nDCG@10 | Δ vs base | recall@100 | MRR@10 | STS-B | CPU min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.exists() else []
    base = next((r["ndcg@10"] for r in rows if r["row"] == "base"), None)
    for r in rows:
        delta = f"{100 * (r['ndcg@10'] - base):+.2f}" if base is not None else ""
        lines.append(f"| {r['row']} | {r['seed']} | {100 * r['ndcg@10']:.2f} | {delta} | "
                     f"{100 * r['recall@100']:.2f} | {100 * r['mrr@10']:.2f} | "
                     f"{r['sts']:.2f} | {r['cpu_s'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="base,finetune,retromae")
    parser.add_argument("--seeds", default="42,7")
    parser.add_argument("--workdir", default="out/recipe_ablation")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=JSON",
                        help="an extra row: its recipe settings, e.g. retromae_256="
                             "'{\"retromae_args\": \"--max_seq_length 256\"}'")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for extra in args.row:
        key, _, settings = extra.partition("=")
        ROWS[key] = json.loads(settings)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child:  # one (row, seed), in its own process tree
        name, seed = args.child[0], int(args.child[1])
        result = run_row(name, seed, workdir)
        (workdir / f"{name}_seed{seed}.json").write_text(json.dumps(result))
        return
    rows_file = workdir / "rows.jsonl"
    done = {(r["row"], r["seed"]) for r in map(json.loads, rows_file.read_text().splitlines())
            } if rows_file.exists() else set()
    for name in args.rows.split(","):
        for seed in [int(s) for s in args.seeds.split(",")][: 1 if name == "base" else None]:
            if (name, seed) in done:
                continue
            cmd = [sys.executable, __file__, "--workdir", str(workdir), "--child", name,
                   str(seed), *[f"--row={r}" for r in args.row]]
            status, cpu_s, wall_s = cpu_seconds_of(cmd)
            if status != 0:
                print(f"{name} seed {seed}: failed (exit {status})", flush=True)
                continue
            result = json.loads((workdir / f"{name}_seed{seed}.json").read_text())
            record = {"row": name, "seed": seed, **result, "cpu_s": round(cpu_s, 1),
                      "wall_s": round(wall_s, 1), "flags": ROWS[name]}
            with rows_file.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print(table(rows_file))


if __name__ == "__main__":
    main()
