"""GPU encode throughput of a bge-base-sized encoder (random weights), bf16, and MFU.

    python bench/gpu_encode.py [--seconds 10]

Builds a 12-layer, 768-wide BERT with random weights (no download), wraps it in our
`Encoder`, and measures tokens/s at 128 and 512 tokens per row in bf16 (autocast) and
fp16, against the card's measured bf16 matmul rate. Then runs the Ray Data job on a small
corpus with one GPU actor, to exercise the CUDA path end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bge_core.config import EncoderConfig  # noqa: E402
from bge_core.model import Encoder  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 8192, iters: int = 50) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def base_encoder(folder: Path, dtype: str) -> Encoder:
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer(folder)
    model = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512),
                      add_pooling_layer=False)
    return Encoder(model, tokenizer, EncoderConfig(pooling="cls", dtype=dtype,
                                                   max_tokens_per_batch=65536)).cuda().eval()


def throughput(encoder: Encoder, seq: int, rows: int, seconds: float) -> float:
    batch = [[101] + [1000 + (i % 20000) for i in range(seq - 2)] + [102]] * rows
    encoder.encode_tokenized(batch)  # warm-up
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode_tokenized(batch)
        count += 1
    torch.cuda.synchronize()
    return count * rows * seq / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    work = Path(tempfile.mkdtemp())
    results: dict = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "bf16_matmul_tflops": matmul_peak(torch.bfloat16) / 1e12, "runs": []}
    for dtype in ("bf16", "fp16"):
        encoder = base_encoder(work / dtype, dtype)
        params = sum(p.numel() for n, p in encoder.backbone.named_parameters()
                     if "embeddings" not in n)
        for seq in (128, 512):
            tps = throughput(encoder, seq, rows=65536 // seq, seconds=args.seconds)
            results["runs"].append({
                "dtype": dtype, "seq": seq, "tokens_s": tps,
                "mfu_vs_bf16_matmul": 2 * params * tps / (results["bf16_matmul_tflops"] * 1e12),
            })
        encoder.save(work / f"ckpt_{dtype}")
        del encoder
        torch.cuda.empty_cache()
    try:  # the Ray-free figures above stand on an image without Ray
        import ray  # noqa: F401
    except ImportError:
        results["ray_job"] = "skipped: ray is not installed in this image"
    else:
        results["ray_job"] = ray_job_on_gpu(work / "ckpt_bf16", work)
    print(json.dumps(results, indent=2))


def ray_job_on_gpu(model: Path, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipelines.common.cli import make_config
    from pipelines.embed.main import EmbedConfig, run

    (work / "corpus").mkdir()
    texts = [f"passage number {i} about cats dogs and fish" for i in range(4096)]
    pq.write_table(pa.table({"id": list(range(4096)), "text": texts}),
                   work / "corpus" / "c.parquet")
    ray.init(log_to_driver=False)
    start = time.perf_counter()
    manifest = run(make_config(EmbedConfig, input=str(work / "corpus"), output=str(work / "out"),
                               model=str(model), dtype="bf16", gpus_per_actor=1,
                               num_actors="1", batch_rows=1024))
    return {"rows": manifest["rows_written"], "wall_s": time.perf_counter() - start}


if __name__ == "__main__":
    main()
