"""Which batch widths the int8 engine gets wrong on this CPU: state error against fp32 per width.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_widths.py [--widths 3-256] [--rows 8]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_widths.py --timing 24,31,47,129,250,255

all-MiniLM-L6-v2 int8 (calibrated as `bench/int8_speed.py` does), `--rows` NFCorpus passages
cut to each width (every token real), run three ways: the compiled model as is in bf16 (where
the CPU has it) and in f32, and through `OpenVINOBackbone` (which runs a width listed in
`bge_core.int8.BAD_BF16_WIDTHS` one masked column wider). Prints the mean |state - fp32
state| per width and the widths where the raw bf16 error is over 3x the f32 one: a new
OpenVINO or CPU kind is checked with this before `BAD_BF16_WIDTHS` is trusted or changed.

``--timing W,...`` instead times, per width W, a batch of the CPU budget (2,048 tokens: 2048 // W
rows) run at W and padded (masked) to the next multiple of 16, the raw engine alike, 8 calls
each after 2 warm-up calls, interleaved: what `bge_core.int8.aligned_width` is chosen from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import nfcorpus_passages, stsb_test  # noqa: E402
from bge_core import Encoder, int8  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="3-256", help="FIRST-LAST")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--timing", help="W,...: time these widths unaligned vs aligned")
    args = parser.parse_args()
    first, last = (int(x) for x in args.widths.split("-"))
    left, right, _ = stsb_test()
    passages = nfcorpus_passages(200)
    fp32 = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu")
    q8 = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu", dtype="int8",
                                 calibration=(left + right)[:150] + passages[:150])
    path = str(q8.int8_backbone().path)
    if args.timing:
        time_widths(path, [int(w) for w in args.timing.split(",")],
                    [r for r in fp32.tokenize(passages, 256)[0] if len(r) == 256])
        return
    rows = [r for r in fp32.tokenize(passages, last)[0] if len(r) == last][: args.rows]
    engines = {"raw " + p: int8.OpenVINOBackbone(path, precision=p, width_multiple=1)
               for p in dict.fromkeys((int8.float_precision(), "f32"))}
    engines["OpenVINOBackbone"] = int8.OpenVINOBackbone(path)
    raw = "raw " + int8.float_precision()
    errors: dict[str, dict[int, float]] = {name: {} for name in engines}
    for width in range(first, last + 1):
        ids = torch.tensor([r[: width - 1] + [r[-1]] for r in rows])  # ends in [SEP]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ref = fp32.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        for name, engine in engines.items():
            if name.startswith("raw"):
                # the compiled request at this exact width (no batch_width)
                feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                with int8.denormals_flushed():
                    states = torch.from_numpy(np.array(engine.request.infer(feeds)[0]))
            else:
                states = engine(ids, mask)
            errors[name][width] = float((states - ref).abs().mean())
        print(f"width {width:3d}  " + "  ".join(f"{n} {e[width]:.4f}"
                                                for n, e in errors.items()), flush=True)
    f32 = errors["raw f32"]
    bad = [w for w, e in errors[raw].items() if e > 3 * f32[w]]
    print(f"{raw}: median error {statistics.median(errors[raw].values()):.4f}; widths over 3x "
          f"the f32 error at that width: {bad or 'none'}")
    fixed = [w for w in bad if errors["OpenVINOBackbone"][w] <= 3 * f32[w]]
    print(f"OpenVINOBackbone avoids: {fixed or 'none'}; BAD_BF16_WIDTHS = "
          f"{sorted(int8.BAD_BF16_WIDTHS)}")


def time_widths(path: str, widths: list[int], rows: list[list[int]]) -> None:
    """Milliseconds per call of a 2,048-token batch at each width, unaligned and aligned."""
    request = int8.OpenVINOBackbone(path, width_multiple=1).request

    def feeds(width: int, padded: int) -> dict[str, np.ndarray]:
        count = max(1, 2048 // width)
        ids = np.zeros((count, padded), np.int64)
        mask = np.zeros_like(ids)
        for i in range(count):
            row = rows[i % len(rows)]
            ids[i, :width], mask[i, :width] = row[: width - 1] + [row[-1]], 1
        return {"input_ids": ids, "attention_mask": mask}

    def ms(batch: dict[str, np.ndarray]) -> float:
        with int8.denormals_flushed():
            for _ in range(2):
                request.infer(batch)
            start = time.perf_counter()
            for _ in range(8):
                request.infer(batch)
        return (time.perf_counter() - start) / 8 * 1e3

    multiple = int8.AMX_WIDTH_MULTIPLE
    for width in widths:
        up = int8.aligned_width(width, multiple, slack=float("inf"))  # the next multiple
        plain, aligned = ms(feeds(width, width)), ms(feeds(width, up))
        print(f"width {width:3d} rows {max(1, 2048 // width):3d}  {plain:6.2f} ms  padded to "
              f"{up:3d}: {aligned:6.2f} ms  speedup {plain / aligned:.2f}  (aligned_width "
              f"picks {int8.aligned_width(width, multiple)})", flush=True)


if __name__ == "__main__":
    main()
