"""Long documents on NFCorpus: 128-token chunks (document = best chunk) vs truncation.

Runs `pipelines.search.evaluate.run` on the NFCorpus test split three ways with all-MiniLM-L6-v2
on a local Ray, and prints nDCG@10 / recall@100 / MRR@10 with each run's seconds:

- ``trunc128``: every document truncated at 128 tokens (``--max_length 128``);
- ``chunk128``: every document as 128-token windows overlapping by 32 (``--chunk_tokens
  128 --chunk_overlap 32``), scored by its best window;
- ``trunc256``: the model's own limit (256 tokens), for reference.

    .venv/bin/python bench/chunking_quality.py [--runs trunc128,chunk128,trunc256] \\
        [--workdir out/chunking_quality]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"
MODEL = "all-MiniLM-L6-v2"
RUNS = {
    "trunc128": {"max_length": 128},
    "chunk128": {"chunk_tokens": 128, "chunk_overlap": 32},
    "trunc256": {},
}


def evaluate(name: str, workdir: Path) -> dict:
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig, run

    cfg = make_config(EvaluateConfig, model=MODEL, beir_dir=str(DATA), split="test",
                      k_values="1,10,100", output=str(workdir / f"metrics_{name}.json"),
                      **RUNS[name])  # encode pool at its default: the cores tasks leave
    start = time.perf_counter()
    result = run(cfg)
    return {"run": name, "settings": RUNS[name], "seconds": round(time.perf_counter() - start),
            "ndcg@10": result["metrics"]["ndcg@10"], "recall@100": result["metrics"]["recall@100"],
            "mrr@10": result["metrics"]["mrr@10"], "chunks": result["timings"].get("chunks")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--workdir", default="out/chunking_quality")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", log_to_driver=False)  # never join a cluster left running
    rows = [evaluate(name, workdir) for name in args.runs.split(",")]
    for row in rows:
        print(json.dumps(row))
    (workdir / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
