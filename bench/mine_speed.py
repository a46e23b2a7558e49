"""Mining wall time of this checkout vs another (main) on the NFCorpus pool, same output.

The data is `bench/retrieval_quality.py`'s: the first --train_queries NFCorpus train queries
with their relevant documents as positives, the whole corpus as the candidate pool;
all-MiniLM-L6-v2, ranks 2-200, 15 negatives. Each run is the job's CLI in a fresh process
(its own local Ray), the two checkouts alternating; the load average is recorded since the
box may be shared. The two outputs are compared line by line.

    .venv/bin/python bench/mine_speed.py --other /work/main [--rounds 2] [--train_queries 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.retrieval_quality import MODEL, write_training_data  # noqa: E402


def mine(checkout: Path, train: Path, pool: Path, output: Path) -> dict:
    """One CLI run from `checkout`: wall seconds and the load average around it."""
    cmd = [sys.executable, "pipelines/mine_hard_negatives.py", "--model_name_or_path", MODEL,
           "--input_file", str(train), "--candidate_pool", str(pool), "--output_file",
           str(output), "--range_for_sampling", "2-200", "--negative_number", "15",
           "--seed", "42"]
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=checkout, env=env, check=True, capture_output=True)
    return {"seconds": round(time.perf_counter() - start, 1),
            "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", required=True, help="the checkout to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train_queries", type=int, default=500)
    parser.add_argument("--workdir", default="/tmp/mine_speed")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train, pool = write_training_data(work, args.train_queries)
    checkouts = {"this": ROOT, "other": Path(args.other).resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for round_ in range(args.rounds):
        order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
        for name in order:
            result = mine(checkouts[name], train, pool, work / f"mined_{name}.jsonl")
            runs[name].append(result)
            print(f"round {round_} {name}: {result}", flush=True)
    same = (work / "mined_this.jsonl").read_text() == (work / "mined_other.jsonl").read_text()
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
    print(json.dumps({"runs": runs, "best_s": best,
                      "this_over_other": round(best["this"] / best["other"], 3),
                      "identical_output": same}))


if __name__ == "__main__":
    main()
