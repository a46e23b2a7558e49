"""int8 export of a [CLS]-pooled BERT: the whole last layer (recipe v3) vs its [CLS] rows only (v4).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_cls_export.py [--rounds 3] [--passages 200]

On the random bge-base-sized BERT of `bench/int8_speed.py --base` (12 × 768, here with CLS
pooling, as the BGE models pool), both graphs are built from the same weights and the same
calibration texts (the first 150 STS-B sentences and 150 NFCorpus passages), each in a cache
of its own, and timed on one thread encoding STS-B test sentences and `--passages` NFCorpus
passages, alternating which goes first each round. Prints one JSON line: seconds per set
(medians), v3 ÷ v4, and the CPU. Speed only: a random model's [CLS] vectors are nearly
equal for every text, so agreement is checked in tests (`tests/test_int8.py`), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passages", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.data import nfcorpus_passages, stsb_test
    from bench.int8_speed import BASE_DIR, cpu_description, make_base_model
    from bge_core import Encoder, int8

    torch.set_num_threads(args.threads)
    make_base_model("all-MiniLM-L6-v2")
    left, right, _ = stsb_test()
    sets = {"stsb": left + right, "nfcorpus": nfcorpus_passages(args.passages)}
    calibration = sets["stsb"][:150] + sets["nfcorpus"][:150]
    encoders = {}
    for name, cls_only in (("v3_full_last_layer", False), ("v4_cls_rows_only", True)):
        os.environ[int8.CACHE_ENV] = tempfile.mkdtemp(prefix=f"int8_{name}_")
        enc = Encoder.from_pretrained(str(BASE_DIR), device="cpu", dtype="int8",
                                      pooling="cls", calibration=calibration)
        # the graph forced; everything else as Encoder.int8_backbone builds it
        enc._int8 = int8.load_int8_backbone(enc.backbone, enc.fingerprint(),
                                            enc._calibration, args.threads, cls_only)
        enc.encode(sets["stsb"][:64])  # warm-up
        encoders[name] = enc
    times: dict = {n: {s: [] for s in sets} for n in encoders}
    names = list(encoders)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[:r % 2]:
            for key, texts in sets.items():
                start = time.perf_counter()
                encoders[name].encode(texts)
                times[name][key].append(time.perf_counter() - start)
    medians = {n: {s: round(statistics.median(v), 2) for s, v in t.items()}
               for n, t in times.items()}
    a, b = names
    print(json.dumps({
        "seconds": medians,
        "v3_over_v4": {s: round(medians[a][s] / medians[b][s], 3) for s in sets},
        "rounds": args.rounds, "threads": args.threads, "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))


if __name__ == "__main__":
    main()
