"""Padding of length-sorted micro-batches vs the window they are sorted in (`--batch-rows`).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/batch_padding.py [--rows 20000] [--files 8]

Tokenises the `bench/embed_speed.py` corpus (NFCorpus 64-word windows in `--files` Parquet
files) with all-MiniLM-L6-v2 and plans micro-batches with the encoder's CPU limits, as the
embed job's actor does per Ray batch (batches never span input files here, a slight
overestimate), and as in-process `Encoder.encode` does over all rows at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embed_speed import build_passages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=8)
    args = parser.parse_args()
    from bge_core import Encoder
    from bge_core.batching import padding_fraction, plan_batches

    encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu")
    max_rows, max_tokens = encoder.config.batch_limits("cpu")
    ids, _ = encoder.tokenize(build_passages(args.rows))
    lengths = np.array([len(r) for r in ids])
    print(f"{args.rows} rows, mean {lengths.mean():.1f} tokens; micro-batches of <= {max_rows}"
          f" rows / {max_tokens} tokens")
    whole = padding_fraction(lengths, plan_batches(lengths, max_tokens, max_rows))
    print(f"one sort over all rows (in process): {whole:.2%} padding")
    per_file = -(-args.rows // args.files)
    for window in (512, 1024, 2048, 4096, 8192):
        batches = []  # index arrays into `lengths`, sorted within each window of each file
        for file_start in range(0, args.rows, per_file):
            file_end = min(file_start + per_file, args.rows)
            for start in range(file_start, file_end, window):
                part = lengths[start:min(start + window, file_end)]
                batches += [b + start for b in plan_batches(part, max_tokens, max_rows)]
        print(f"sorted per {window}-row batch: {padding_fraction(lengths, batches):.2%} padding")


if __name__ == "__main__":
    main()
