"""Encoder throughput vs sentence-transformers on the same texts, model and machine.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encode_speed.py [--passages 2000] \
        [--bf16-passages N] [--json out.json]

Texts: the first N NFCorpus passages and the STS-B test sentences. Reports rows/s and
tokens/s of sentence-transformers fp32, ours fp32 and ours bf16; our padding fraction; the
MFU (2 × non-embedding params × real tokens / s) against fp32 and bf16 matmul peaks
measured here; and STS-B Spearman of fp32 and bf16. `--bf16-passages` times bf16 on the
first N passages only (rates are per row and token; emulated bf16 on CPUs without native
support is slow).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import nfcorpus_passages, stsb_test  # noqa: E402
from bge_core import Encoder  # noqa: E402
from bge_core.batching import padding_fraction, plan_batches  # noqa: E402
from bge_core.metrics import spearman  # noqa: E402
from bge_core.presets import offline_minilm_dir  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 3.0) -> float:
    """Measured FLOP/s of square matmuls in `dtype` on this CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def timed(fn, texts: list[str]) -> tuple[np.ndarray, float]:
    fn(texts[:64])  # warm-up
    start = time.perf_counter()
    out = fn(texts)
    return np.asarray(out, dtype=np.float32), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--bf16-passages", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    left, right, gold = stsb_test()
    sets = {"nfcorpus": nfcorpus_passages(args.passages), "stsb": left + right}
    ours = {"fp32": Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu"),
            "bf16": Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu", dtype="bf16")}
    st = SentenceTransformer(str(offline_minilm_dir()), device="cpu")
    body = ours["fp32"].backbone
    params = sum(p.numel() for n, p in body.named_parameters() if "embeddings" not in n)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads", "torch": torch.__version__,
                     "peaks_tflops": {k: v / 1e12 for k, v in peaks.items()}, "sets": {}}
    for name, texts in sets.items():
        ids, _ = ours["fp32"].tokenize(texts)
        lengths = [len(i) for i in ids]
        cfg = ours["fp32"].config
        max_rows, max_tokens = cfg.batch_limits("cpu")
        plan = plan_batches(lengths, max_tokens, max_rows)
        tokens = sum(lengths)
        row: dict = {"rows": len(texts), "tokens": tokens,
                     "padding_fraction": padding_fraction(lengths, plan)}
        vecs = {}
        vecs["st_fp32"], t = timed(lambda x: st.encode(x, batch_size=32), texts)
        row["st_fp32"] = {"s": t, "rows_s": len(texts) / t, "tokens_s": tokens / t}
        for dtype, enc in ours.items():
            n = len(texts)
            if dtype == "bf16" and name == "nfcorpus" and args.bf16_passages:
                n = min(n, args.bf16_passages)
            vecs[dtype], t = timed(enc.encode, texts[:n])
            n_tokens = sum(lengths[:n])
            rate = n_tokens / t  # tokens/s: fair also when bf16 times a subset
            row[f"ours_{dtype}"] = {"rows": n, "s": t, "rows_s": n / t, "tokens_s": rate,
                                    "speedup_vs_st_fp32": rate / row["st_fp32"]["tokens_s"],
                                    "mfu": 2 * params * n_tokens / t / peaks[dtype]}
        cos = (vecs["fp32"] * vecs["st_fp32"]).sum(1) / np.linalg.norm(vecs["st_fp32"], axis=1)
        row["min_cosine_fp32_vs_st"] = float(cos.min())
        if name == "stsb":
            n = len(left)
            for key in ("fp32", "bf16", "st_fp32"):
                v = vecs[key]
                row[f"spearman_{key}"] = 100 * spearman((v[:n] * v[n:]).sum(1), gold)
        results["sets"][name] = row
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
