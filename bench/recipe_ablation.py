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

Mining is deterministic for a given model and `mine_args`, so it runs once per mining
setting (its own child, its CPU time in `<workdir>/mining.jsonl`) into
`<workdir>/mined/<setting>/`, and every row and seed with that setting starts from a copy:
a row's CPU time is then RetroMAE (if any) + finetuning + evaluation, and the table's
"chain CPU" adds the mining it used. A row's `positives` setting (not a recipe flag) picks
what finetuning sees as positives: ``top`` (default: each query's highest-graded documents)
or ``all`` (every judged document; one is sampled per query and epoch). A row's
`train_queries` (not a recipe flag either) trains on that many of the mined queries, the
same subset for every seed and row (drawn with `SUBSET_SEED`): how long to train as a
function of the training set's size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED  # noqa: E402
from pipelines.chain.recipe import MINE_DEFAULTS, SOUP_DEFAULT, START_WEIGHT_DEFAULT  # noqa: E402

DATA, STS = SHARED / "nfcorpus", SHARED / "stsb" / "sts-test.csv"
# The chain finetunes at its FINETUNE_DEFAULTS (pipelines/chain/recipe.py), which come before
# a row's flags; the rows measured before those defaults ran at the finetuning job's lr 1e-5
# in fp32, so USER states both and each row reads as it did.
USER = ("--num_train_epochs 1 --per_device_train_batch_size 32 --train_group_size 4 "
        "--learning_rate 1e-5 --bf16 false")
FT_ONLY = "mine,finetune,evaluate"
# rows without mine_args were measured at the mining job's own window, from before the chain
# had its own (MINE_DEFAULTS): they state it, so each row reads as it did
JOB_WINDOW = "--range_for_sampling 10-210"
# bf16 (the cost lever) and the first lr row; a checkpoint every 20 steps so a row stopped
# at a session's end resumes (the recipe's resume) instead of starting again
BF16 = f"{USER} --bf16 --save_steps 20"
FAST = f"{BF16} --learning_rate 5e-5"
SHORT_RETROMAE = "--max_seq_length 128 --max_steps 150 --bf16"
# the chain's window before its mining encoded in bf16 (MINE_DEFAULTS since 2026-12-06): the
# rows measured then name it, so each row reads as it did
WINDOW_30 = "--range_for_sampling 30-230"
SUBSET_SEED = 0  # which queries a `train_queries` row keeps: the same whatever the row's seed
CHAIN_FT = f"{FAST} --train_group_size 2"  # the chain's finetuning, epochs apart
# name → the recipe settings the row gives (model, data and paths come from the script)
ROWS: dict[str, dict[str, Any]] = {
    "base": {},  # the starting model, scored as is
    # its defaults, without RetroMAE (its mining window named so the shared mining is found)
    "chain": {"steps": FT_ONLY, "soup": SOUP_DEFAULT, "mine_args": MINE_DEFAULTS,
              "start_weight": START_WEIGHT_DEFAULT},
    # the chain's default before 2026-12-06: 3 epochs at 128 passage tokens, no start mixed in
    "chain_p128": {"steps": FT_ONLY, "soup": 2, "mine_args": WINDOW_30,
                   "finetune_args": "--num_train_epochs 3 --passage_max_len 128"},
    # passages trained at 96 tokens (-28% CPU a step), 3 and 4 epochs, soups of two
    "p96": {"steps": FT_ONLY, "soup": 2, "mine_args": WINDOW_30,
            "finetune_args": "--num_train_epochs 3 --passage_max_len 96"},
    "p96_ep4": {"steps": FT_ONLY, "soup": 2, "mine_args": WINDOW_30,
                "finetune_args": "--num_train_epochs 4 --passage_max_len 96"},
    # the chain as it was before three epochs and ranks 30-230: a soup of two seeds (s, s + 1)
    "chain_soup2": {"steps": FT_ONLY, "soup": 2, "finetune_args": "--num_train_epochs 2"},
    "finetune": {"steps": FT_ONLY, "finetune_args": USER},
    "retromae": {"finetune_args": USER},
    "retromae_mean": {"finetune_args": f"{USER} --sentence_pooling_method mean"},
    "epochs2": {"steps": FT_ONLY, "finetune_args": f"{USER} --num_train_epochs 2"},
    "lr5e5": {"steps": FT_ONLY, "finetune_args": FAST},
    "lr1e4": {"steps": FT_ONLY, "finetune_args": f"{BF16} --learning_rate 1e-4"},
    "lr5e5_ep2": {"steps": FT_ONLY, "finetune_args": f"{FAST} --num_train_epochs 2"},
    # the same passages per query spread over more epochs: fewer mined negatives per group
    "lr5e5_g2_ep2": {"steps": FT_ONLY,
                     "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"},
    "lr5e5_g2_ep3": {"steps": FT_ONLY,
                     "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 3"},
    # passages trained at the length the model is evaluated at (its max_length, 256)
    "g2_ep2_p256": {"steps": FT_ONLY,
                    "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"
                                     " --passage_max_len 256"},
    # a softer loss than the model's own 0.05 (BGE's 0.02 lost 1.9 points here)
    "g2_ep2_t01": {"steps": FT_ONLY,
                   "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"
                                    " --temperature 0.1"},
    # the chain's settings with negatives drawn further down the ranking: g4 < g2 < g1 (by
    # STS-B) hints that the mined window 10-210 holds unjudged relevant passages
    "g2_ep2_r30": {"steps": FT_ONLY, "mine_args": WINDOW_30,
                   "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"},
    "g2_ep2_r100": {"steps": FT_ONLY, "mine_args": "--range_for_sampling 100-300",
                    "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"},
    "g2_ep3_r30": {"steps": FT_ONLY, "mine_args": WINDOW_30,
                   "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 3"},
    # the chain's settings, and the best measured row, with every passage listed in a
    # query's `pos` kept out of its negatives (in a batch of 32 × group 2 on NFCorpus train,
    # 26% of the queries meet one of their own top-graded positives among their negatives)
    "g2_ep2_mask": {"steps": FT_ONLY,
                    "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"
                                     " --mask_listed_positives"},
    "g2_ep3_r30_mask": {"steps": FT_ONLY, "mine_args": WINDOW_30,
                        "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 3"
                                         " --mask_listed_positives"},
    # the chain's settings with BGE's query instruction (the model learns which side is the
    # short query; saved with the model, so evaluation instructs its queries the same way)
    "g2_ep2_instr": {"steps": FT_ONLY,
                     "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"
                                      " --query_instruction_for_retrieval"
                                      " 'Represent this sentence for searching relevant"
                                      " passages: '"},
    # twice the in-batch negatives on the same memory (the gradient cache, chunks of 32),
    # the learning rate scaled with the batch (half the steps)
    "g2_ep2_b64": {"steps": FT_ONLY,
                   "finetune_args": f"{BF16} --learning_rate 1e-4 --train_group_size 2"
                                    " --num_train_epochs 2 --per_device_train_batch_size 64"
                                    " --gradient_cache_chunk_size 32"},
    "lr5e5_g1_ep3": {"steps": FT_ONLY,
                     "finetune_args": f"{FAST} --train_group_size 1 --num_train_epochs 3"},
    "lr5e5_t002": {"steps": FT_ONLY, "finetune_args": f"{FAST} --temperature 0.02"},
    "lr5e5_allpos": {"steps": FT_ONLY, "finetune_args": FAST, "positives": "all"},
    "lr5e5_retromae150": {"retromae_args": SHORT_RETROMAE,
                          "finetune_args": f"{FAST} --sentence_pooling_method mean"},
    # half the training queries (1,281 of 2,563), a soup of two: as many epochs as the chain
    # (3) against as many steps as the chain takes on all of them (6 epochs, 240 steps)
    "half_ep3": {"steps": FT_ONLY, "mine_args": WINDOW_30, "soup": 2, "train_queries": 1281,
                 "finetune_args": f"{CHAIN_FT} --num_train_epochs 3"},
    "half_ep6": {"steps": FT_ONLY, "mine_args": WINDOW_30, "soup": 2, "train_queries": 1281,
                 "finetune_args": f"{CHAIN_FT} --num_train_epochs 6"},
    # the chain's finetuning settings (pipelines/chain/recipe.py) after a short RetroMAE
    "g2_ep2_retromae150": {"retromae_args": SHORT_RETROMAE,
                           "finetune_args": f"{FAST} --train_group_size 2 --num_train_epochs 2"
                                            " --sentence_pooling_method mean"},
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


def mine_args_of(settings: dict[str, Any]) -> str:
    """The mining flags a row gives: its own, or the mining job's window (`JOB_WINDOW`)."""
    return settings.get("mine_args", JOB_WINDOW)


def mining_slug(settings: dict[str, str]) -> str | None:
    """The shared mining folder's name for a row (None: the row mines itself)."""
    steps = settings.get("steps", "retromae,mine,finetune,evaluate").split(",")
    if "mine" not in steps or settings.get("mine_with") == "retromae":
        return None  # nothing to mine, or mined with this row's own RetroMAE encoder
    args = mine_args_of(settings)
    return "default" if args == JOB_WINDOW else hashlib.sha1(args.encode()).hexdigest()[:10]


def keep_top_positives(mined: Path) -> None:
    """Rewrite `mined` with ``pos`` = each query's highest-graded documents (in place;
    running it again gives the same file)."""
    from bge_core.beir import load_beir

    split = load_beir(DATA, "train")
    texts = dict(zip(split.corpus_ids, split.corpus_texts, strict=True))
    grades = {split.queries[q]: g for q, g in split.qrels.items()}
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    for row in rows:
        judged = grades[row["query"]]
        best = max(judged.values())
        row["pos"] = [texts[d] for d, g in judged.items() if g == best]
    mined.write_text("".join(json.dumps(r) + "\n" for r in rows))


def keep_queries(mined: Path, count: int) -> None:
    """Rewrite `mined` with `count` of its queries, drawn with `SUBSET_SEED` (in place; the
    draw is from the full mining's order, so running it again keeps the same queries)."""
    rows = mined.read_text().splitlines()
    keep = sorted(random.Random(SUBSET_SEED).sample(range(len(rows)), count))
    mined.write_text("".join(rows[i] + "\n" for i in keep))


def mine_once(mine_args: str, workdir: Path) -> None:
    """In the child: the recipe's mine step alone, into `<workdir>/mined/<slug>/`."""
    import ray

    from pipelines.chain.recipe import RecipeConfig, run
    from pipelines.common.cli import NO_DASHBOARD_ENV, make_config

    data = prepare(workdir)
    out = workdir / "mined" / mining_slug({"mine_args": mine_args})
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": NO_DASHBOARD_ENV})
    run(make_config(RecipeConfig, corpus=data["corpus"], train_data=data["train"],
                    output_dir=str(out), steps="mine", mine_args=mine_args))
    ray.shutdown()


def run_row(name: str, seed: int, workdir: Path) -> dict:
    """In the child: the recipe for one row and seed, then NFCorpus + STS-B scores."""
    import ray

    from pipelines.chain.recipe import STEPS, RecipeConfig, run
    from pipelines.common.cli import NO_DASHBOARD_ENV, make_config
    from pipelines.search.evaluate import EvaluateConfig
    from pipelines.search.evaluate import run as evaluate

    data = prepare(workdir)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": NO_DASHBOARD_ENV})
    if name == "base":
        model = "all-MiniLM-L6-v2"
        retrieval = evaluate(make_config(EvaluateConfig, model=model, beir_dir=str(DATA)))
        sts = evaluate(make_config(EvaluateConfig, model=model, sts=str(STS)))["metrics"]
        scores = {**retrieval["metrics"], "sts": sts["spearman"]}
    else:
        row = {**ROWS[name], "mine_args": mine_args_of(ROWS[name])}
        positives = row.pop("positives", "top")
        train_queries = row.pop("train_queries", None)
        # one finetuning run unless the row names a soup, and no start mixed in unless it
        # names a weight: every row before the chain's soup (and its start weight) ran so,
        # and so keeps meaning what it did
        settings = {"corpus": data["corpus"], "train_data": data["train"],
                    "output_dir": str(workdir / f"{name}_seed{seed}"), "beir_dir": str(DATA),
                    "sts": str(STS), "soup": 1, "start_weight": 0.0, **row}
        settings["finetune_args"] = f"{settings.get('finetune_args', '')} --seed {seed}"
        # rows name their steps; one without names the whole chain (the recipe's `auto`
        # would leave RetroMAE out for this model, an embedder already)
        settings.setdefault("steps", ",".join(STEPS))
        steps = settings["steps"].split(",")
        mined = Path(settings["output_dir"]) / "mined.jsonl"
        slug = mining_slug(row)
        if slug is not None:  # a copy of the shared mining; the recipe skips its own
            mined.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(workdir / "mined" / slug / "mined.jsonl", mined)
            steps = [s for s in steps if s != "mine"]
        else:
            mining = ",".join(s for s in steps if s in ("retromae", "mine"))
            run(make_config(RecipeConfig, **{**settings, "steps": mining}))
        if positives == "top":  # idempotent: pos is rebuilt from the qrels
            keep_top_positives(mined)
        if train_queries is not None:
            keep_queries(mined, train_queries)
        settings["steps"] = ",".join(steps)
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def table(workdir: Path) -> str:
    """Markdown: one line per row and seed; chain CPU = the row's + the mining it used."""
    mining = {m["slug"]: m["cpu_s"] for m in read_jsonl(workdir / "mining.jsonl")}
    lines = ["| row | seed | nDCG@10 | Δ vs base | recall@100 | MRR@10 | STS-B | row CPU min "
             "| chain CPU min | wall min | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = read_jsonl(workdir / "rows.jsonl")
    base = next((r["ndcg@10"] for r in rows if r["row"] == "base"), None)
    for r in rows:
        delta = f"{100 * (r['ndcg@10'] - base):+.2f}" if base is not None else ""
        chain = r["cpu_s"] + mining.get(r.get("mining"), 0.0)
        load = "–".join(f"{x:.1f}" for x in r.get("load", []))
        lines.append(f"| {r['row']} | {r['seed']} | {100 * r['ndcg@10']:.2f} | {delta} | "
                     f"{100 * r['recall@100']:.2f} | {100 * r['mrr@10']:.2f} | "
                     f"{r['sts']:.2f} | {r['cpu_s'] / 60:.1f} | {chain / 60:.1f} | "
                     f"{r['wall_s'] / 60:.1f} | {load} |")
    return "\n".join(lines)


def measured(cmd: list[str]) -> dict | None:
    """Run `cmd` in its own process tree: CPU and wall seconds and the load, or None."""
    load0 = os.getloadavg()[0]
    status, cpu_s, wall_s = cpu_seconds_of(cmd)
    if status != 0:
        return None
    return {"cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1),
            "load": [round(load0, 1), round(os.getloadavg()[0], 1)],
            "ended": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def ensure_mined(slug: str, mine_args: str, workdir: Path, extra: list[str]) -> bool:
    """Mine once for `slug` (in a child, measured) unless `mining.jsonl` has it."""
    if any(m["slug"] == slug for m in read_jsonl(workdir / "mining.jsonl")):
        return True
    cmd = [sys.executable, __file__, "--workdir", str(workdir), "--mine", mine_args, *extra]
    record = measured(cmd)
    if record is None:
        print(f"mining {slug} ({mine_args!r}): failed", flush=True)
        return False
    with (workdir / "mining.jsonl").open("a") as handle:
        handle.write(json.dumps({"slug": slug, "mine_args": mine_args, **record}) + "\n")
    print(f"mining {slug}: {record}", flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="base,finetune,retromae")
    parser.add_argument("--seeds", default="42,7")
    parser.add_argument("--workdir", default="out/recipe_ablation")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=JSON",
                        help="an extra row: its recipe settings, e.g. retromae_256="
                             "'{\"retromae_args\": \"--max_seq_length 256\"}'")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--mine", metavar="MINE_ARGS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for extra in args.row:
        key, _, settings = extra.partition("=")
        ROWS[key] = json.loads(settings)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.mine is not None:  # one mining setting, in its own process tree
        return mine_once(args.mine, workdir)
    if args.child:  # one (row, seed), in its own process tree
        name, seed = args.child[0], int(args.child[1])
        result = run_row(name, seed, workdir)
        (workdir / f"{name}_seed{seed}.json").write_text(json.dumps(result))
        return
    extra = [f"--row={r}" for r in args.row]
    done = {(r["row"], r["seed"]) for r in read_jsonl(workdir / "rows.jsonl")}
    for name in args.rows.split(","):
        slug = None if name == "base" else mining_slug(ROWS[name])
        for seed in [int(s) for s in args.seeds.split(",")][: 1 if name == "base" else None]:
            if (name, seed) in done:
                continue
            if slug and not ensure_mined(slug, mine_args_of(ROWS[name]), workdir, extra):
                break
            cmd = [sys.executable, __file__, "--workdir", str(workdir), "--child", name,
                   str(seed), *extra]
            record = measured(cmd)
            if record is None:
                print(f"{name} seed {seed}: failed", flush=True)
                continue
            result = json.loads((workdir / f"{name}_seed{seed}.json").read_text())
            record = {"row": name, "seed": seed, **result, **record, "mining": slug,
                      "flags": ROWS[name]}
            with (workdir / "rows.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print(table(workdir))


if __name__ == "__main__":
    main()
