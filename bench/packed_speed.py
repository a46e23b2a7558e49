"""CPU encode speed with and without packing (`bge_core.packed`), one run, rotated order.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/packed_speed.py [--threads 1] [--rounds 3]

all-MiniLM-L6-v2 (mean pooling) and a bge-base-sized random BERT with CLS pooling
(`bench/int8_speed.py --base` builds it), fp32 and bf16 (where native), on STS-B test
sentences and NFCorpus passages, two ways: one `encode` call over the whole set (length
sorted: little padding left to skip) and requests of 8 texts one at a time (what a served
request is). Prints texts/s and the packed ÷ padded ratio per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bge_core.model as model_module  # noqa: E402
from bench.data import nfcorpus_passages, stsb_test  # noqa: E402
from bench.int8_speed import BASE_DIR, make_base_model  # noqa: E402
from bge_core import Encoder  # noqa: E402
from bge_core.loading import resolve_model  # noqa: E402

PACKS = model_module.packs


def timed(encoder: Encoder, texts: list[str], packed: bool, per: int | None) -> float:
    """Seconds to embed `texts` (in requests of `per`, or one call) with packing on/off."""
    model_module.packs = PACKS if packed else (lambda *_: False)  # type: ignore[assignment]
    start = time.perf_counter()
    for i in range(0, len(texts), per or len(texts)):
        encoder.encode(texts[i:i + (per or len(texts))])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--passages", type=int, default=96)
    parser.add_argument("--base", action="store_true", help="also the bge-base-sized model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    first, second, _ = stsb_test()
    sets = {"stsb": (first + second)[: args.sentences],
            "nfcorpus": nfcorpus_passages(args.passages)}
    models = {"minilm": "all-MiniLM-L6-v2"}
    if args.base:
        make_base_model(str(resolve_model("all-MiniLM-L6-v2").folder))
        models["base"] = str(BASE_DIR)
    for model, path in models.items():
        for dtype in ("fp32", "bf16"):
            pooling = "cls" if model == "base" else "mean"  # base: BGE's pooling
            encoder = Encoder.from_pretrained(path, device="cpu", dtype=dtype, pooling=pooling)
            if encoder.config.dtype != dtype:
                continue  # bf16 not native here: it runs fp32, already measured
            for name, texts in sets.items():
                for per in (8, None):
                    cells = [True, False]
                    times: dict[bool, list[float]] = {True: [], False: []}
                    for r in range(args.rounds):
                        for packed in cells[r % 2:] + cells[: r % 2]:
                            timed(encoder, texts[:16], packed, per)  # warm-up
                            times[packed].append(timed(encoder, texts, packed, per))
                    on, off = statistics.median(times[True]), statistics.median(times[False])
                    print(json.dumps({"model": model, "dtype": dtype, "set": name,
                                      "request": per or "whole set", "threads": args.threads,
                                      "padded_per_s": round(len(texts) / off, 1),
                                      "packed_per_s": round(len(texts) / on, 1),
                                      "x": round(off / on, 3)}), flush=True)


if __name__ == "__main__":
    main()
