"""int8 encode speed by batch limits (rows, padded tokens per batch), in process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_budget.py [--rounds 3] \
        [--settings 64x2048,64x4096,128x8192,32x8192]

One int8 `Encoder` per setting (all-MiniLM-L6-v2, calibrated as `bench/int8_speed.py` does:
the first 150 STS-B test sentences and 150 NFCorpus passages), each encoding the STS-B test
sentences and the first 200 NFCorpus passages; settings interleaved and rotated per round,
rows/s per round and the median printed. For choosing `bge_core.config.DEFAULT_BATCH_LIMITS`
on a CPU kind; the first round includes OpenVINO's first use of each shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import nfcorpus_passages, stsb_test  # noqa: E402
from bge_core import Encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default="64x2048,64x4096,128x8192,32x8192",
                        help="ROWSxTOKENS, comma-separated")
    args = parser.parse_args()
    left, right, _ = stsb_test()
    sets = {"stsb": left + right, "nfcorpus": nfcorpus_passages(200)}
    calibration = sets["stsb"][:150] + sets["nfcorpus"][:150]
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    encoders = {s: Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu", dtype="int8",
                                           calibration=calibration, batch_size=s[0],
                                           max_tokens_per_batch=s[1]) for s in settings}
    rates: dict[tuple, list[float]] = {(s, k): [] for s in settings for k in sets}
    for r in range(args.rounds):
        for s in settings[r % len(settings):] + settings[:r % len(settings)]:
            for name, texts in sets.items():
                start = time.perf_counter()
                encoders[s].encode(texts)
                rates[(s, name)].append(len(texts) / (time.perf_counter() - start))
    for (s, name), values in rates.items():
        print(f"{s[0]} rows x {s[1]} tokens  {name:8s}  median {statistics.median(values):.1f}"
              f" rows/s  rounds {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
