"""Run the fault drills (the `long` tests that print a ``FAULTS`` line) and tabulate them.

Each drill is a test in `tests/` that asserts the outcome (exactly-once output, same
weights, loadable checkpoints) and prints what it measured; this script runs them one
after another and prints a Markdown table for BENCHMARKS.md.

Usage: python bench/fault_drills.py [-k PYTEST_EXPRESSION]
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
DRILLS = [  # (test id, fault in words)
    ("tests/test_node_loss.py::test_embed_job_survives_losing_a_node",
     "embed: worker raylet SIGKILLed mid-job"),
    ("tests/test_node_loss.py::test_training_resumes_on_a_replacement_node_with_the_same_weights",
     "RetroMAE: raylet of one Train worker SIGKILLed, replacement joins"),
    ("tests/test_s3_faults.py::test_embed_job_s3_to_s3_through_a_flaky_store",
     "embed S3→S3: 20% 503 SlowDown, 10% resets mid-body"),
    ("tests/test_s3_faults.py::test_finetune_checkpoints_and_model_on_a_flaky_store",
     "finetune to S3: 20% 503 SlowDown, 10% resets mid-body"),
    ("tests/test_s3_faults.py::test_a_store_that_dies_mid_run_ends_the_job_and_the_rerun_resumes",
     "S3 goes down mid-run (every answer 503), comes back, rerun"),
    ("tests/test_s3_faults.py::test_a_store_that_stays_down_ends_the_embed_job_naming_the_uri",
     "S3 stays down (every answer 503)"),
    ("tests/test_disk_faults.py::test_a_part_without_its_marker_is_redone_exactly_once",
     "local disk full between a part and its marker (ENOSPC injected), then freed"),
]


def run_drill(test: str) -> tuple[bool, dict, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", test],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("FAULTS "):
            name, payload = line[len("FAULTS "):].split(" ", 1)
            found = {"drill": name, **json.loads(payload)}
    return proc.returncode == 0, found, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only drills whose test id contains this")
    args = parser.parse_args()
    rows = []
    for test, fault in DRILLS:
        if args.k not in test:
            continue
        ok, found, seconds = run_drill(test)
        print(json.dumps({"test": test, "passed": ok, "test_s": round(seconds, 1), **found}),
              flush=True)
        rows.append((fault, ok, found))
    print("\n| fault | outcome (asserted) | measured |\n|---|---|---|")
    for fault, ok, found in rows:
        measured = ", ".join(f"{k} {v}" for k, v in found.items() if k != "drill")
        print(f"| {fault} | {'passed' if ok else 'FAILED'} | {measured} |")


if __name__ == "__main__":
    main()
