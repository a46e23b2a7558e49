"""Driver peak RSS of a job for a corpus 1x and 8x: the driver must not grow with the data.

Writes a random-text JSONL corpus under /tmp (`--mb` MB at 1x; 8x is eight such files),
runs the job once per scale in a process of its own that starts its own local Ray, and
prints that process's peak RSS (``getrusage(RUSAGE_SELF)``: the driver alone, not Ray's
raylet, workers or object store) and the growth 8x / 1x (the target: <= 1.25).

    .venv/bin/python bench/driver_rss.py retromae --mb 40 --scales 1 8
    .venv/bin/python bench/driver_rss.py retromae --repo ../main   # another checkout's job

Modes: ``retromae`` (a tiny random BERT, 2 steps on 1 worker: this measures the driver,
not the model). A ``mine`` mode (hard-negative mining over the same corpus) goes in `MODES`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import WORDS, make_tiny_bert  # noqa: E402

# Runs in the measured process: the job's own CLI entry, then that process's peak RSS.
CHILD = """
import json, resource, sys, time
start = time.monotonic()
from {module} import main
code = main(sys.argv[1:])
print("RESULT " + json.dumps({{"code": code, "seconds": round(time.monotonic() - start, 1),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_corpus(folder: Path, mb: int, files: int, seed: int = 0) -> int:
    """`files` JSONL files of about `mb` MB of random text each; returns the total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "part-000.jsonl"
    if not first.exists():
        rng = random.Random(seed)
        with first.open("w") as handle:
            written = 0
            while written < mb << 20:
                text = " ".join(rng.choices(WORDS, k=rng.randint(50, 250)))
                line = json.dumps({"text": text}) + "\n"
                handle.write(line)
                written += len(line)
    for i in range(1, files):  # copies: the driver's work does not depend on the words
        if not (folder / f"part-{i:03d}.jsonl").exists():
            shutil.copyfile(first, folder / f"part-{i:03d}.jsonl")
    return sum(p.stat().st_size for p in folder.glob("*.jsonl"))


def measure(module: str, argv: list[str], repo: Path) -> dict:
    """Run `module`'s `main(argv)` from checkout `repo` in a fresh process (own local Ray)."""
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(module=module), *argv],
                          env=env, cwd=repo, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None or json.loads(line[7:])["code"]:
        raise RuntimeError(f"{module} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def retromae(corpus: Path, work: Path, repo: Path) -> dict:
    model = work / "tiny_bert"
    if not model.exists():
        make_tiny_bert(model)
    out = work / f"out-{corpus.name}"
    shutil.rmtree(out, ignore_errors=True)
    return measure("pipelines.train.retromae", [
        "--model_name_or_path", str(model), "--train_data", str(corpus),
        "--output_dir", str(out), "--num_workers", "1", "--cpus_per_worker", "0.5",
        "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "4",
        "--max_seq_length", "64"], repo)


# mode -> run(corpus folder, work folder, checkout) -> {"peak_rss_mb", "seconds", ...}
MODES: dict[str, Callable[[Path, Path, Path], dict]] = {"retromae": retromae}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--mb", type=int, default=40, help="MB of text at 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--work", default="/tmp/bge_driver_rss")
    parser.add_argument("--repo", default=str(ROOT),
                        help="checkout whose job runs (another one measures its version)")
    args = parser.parse_args()
    work = Path(args.work)
    results = {}
    for scale in args.scales:
        corpus = work / f"corpus-{args.mb}mb-x{scale}"
        size = write_corpus(corpus, args.mb, scale)
        started = time.monotonic()
        result = MODES[args.mode](corpus, work, Path(args.repo))
        results[scale] = {**result, "corpus_mb": round(size / 2**20, 1),
                          "wall_s": round(time.monotonic() - started, 1)}
        print(json.dumps({"mode": args.mode, "repo": args.repo, "scale": scale,
                          **results[scale]}), flush=True)
    low, high = min(results), max(results)
    growth = results[high]["peak_rss_mb"] / results[low]["peak_rss_mb"]
    print(f"{args.mode}: driver peak RSS {results[low]['peak_rss_mb']:.0f} MB at {low}x, "
          f"{results[high]['peak_rss_mb']:.0f} MB at {high}x: growth {growth:.2f}x "
          f"(target <= 1.25)")


if __name__ == "__main__":
    main()
