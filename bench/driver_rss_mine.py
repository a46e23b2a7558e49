"""Driver peak RSS of hard-negative mining for a candidate pool 1x and 8x as large.

Each run is a fresh driver process (`pipelines/mine_hard_negatives.py`'s `run` on a local
Ray with 2 CPUs); it reports its own peak RSS (`ru_maxrss`: Ray's workers are other
processes) and its RSS once Ray has started, before the job. The pool is random text
generated under --workdir; the model a tiny random BERT at a short max length, since this
measures the driver, not encoding. The queries (and so the driver's O(queries x k) ids)
stay the same at every scale: only the corpus grows.

    .venv/bin/python bench/driver_rss_mine.py [--scales 1,8] [--mb 40] [--queries 500] \
        [--workdir /tmp/driver_rss_mine]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import WORDS, make_tiny_bert  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_data(folder: Path, megabytes: float, queries: int, seed: int = 0) -> tuple[Path, Path]:
    """pool.jsonl of ~`megabytes` MB of distinct random passages (~1 kB each), and
    train.jsonl of `queries` examples whose positive is one of the first passages."""
    folder.mkdir(parents=True, exist_ok=True)
    pool, train = folder / "pool.jsonl", folder / "train.jsonl"
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    written, n = 0, 0
    with pool.open("w") as handle:
        while written < megabytes * 1e6:
            line = json.dumps({"text": f"passage {n} " + " ".join(rng.choice(words, 180))})
            handle.write(line + "\n")
            written += len(line) + 1
            n += 1
    with pool.open() as handle:
        firsts = [json.loads(next(handle))["text"] for _ in range(queries)]
    with train.open("w") as handle:
        for text in firsts:
            query = " ".join(rng.choice(words, 6))
            handle.write(json.dumps({"query": query, "pos": [text]}) + "\n")
    return train, pool


def child(args: argparse.Namespace) -> None:
    """One mining run in this process; prints a JSON line with its RSS figures."""
    import ray

    from pipelines.common.cli import make_config
    from pipelines.search.mine import MineConfig, run

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    before = current_rss_mb()
    start = time.perf_counter()
    summary = run(make_config(MineConfig, model_name_or_path=args.model,
                              input_file=args.train, candidate_pool=args.pool,
                              output_file=args.output, range_for_sampling="2-50",
                              negative_number=8, max_length=16, batch_rows=2048,
                              max_tokens_per_batch=16384))
    print("RESULT " + json.dumps({"corpus": summary["corpus"], "examples": summary["examples"],
                                  "rss_after_ray_init_mb": round(before, 1),
                                  "peak_rss_mb": round(peak_rss_mb(), 1),
                                  "seconds": round(time.perf_counter() - start, 1)}))
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="1,8")
    parser.add_argument("--mb", type=float, default=40.0, help="pool size at scale 1 (MB)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--workdir", default="/tmp/driver_rss_mine")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "train", "pool", "output"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.workdir)
    model = work / "tiny_bert"
    if not (model / "config.json").exists():
        make_tiny_bert(model)
    results = {}
    for scale in [int(s) for s in args.scales.split(",")]:
        train, pool = write_data(work / f"x{scale}", args.mb * scale, args.queries)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--model", str(model), "--train", str(train),
             "--pool", str(pool), "--output", str(work / f"x{scale}" / "mined.jsonl")],
            env=env, check=True, capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results[scale] = {"pool_mb": round(pool.stat().st_size / 1e6, 1),
                          **json.loads(line[len("RESULT "):])}
        print(f"x{scale}: {results[scale]}", flush=True)
    scales = sorted(results)
    growth = results[scales[-1]]["peak_rss_mb"] / results[scales[0]]["peak_rss_mb"]
    print(json.dumps({"results": results, "peak_rss_growth": round(growth, 3)}))


if __name__ == "__main__":
    main()
