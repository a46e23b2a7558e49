"""The whole recipe at bge-base size on a GPU (random 12×768 weights, a few steps each), timed.

    python bench/gpu_recipe.py [--steps 20] [--corpus 20000] [--parts plain,ray]
    python bench/gpu_recipe.py --tiny --device cpu     # a 2-layer check of this script on CPU

Part 1 (no Ray; runs first, so a GPU image without Ray still measures it): the four steps
as plain loops over the library pieces the jobs run — RetroMAE steps (`bge_core.retromae`),
encode + exact top-k + sampling for mining (`bge_core.search`, `bge_core.mining`),
contrastive steps with the gradient cache (`bge_core.grad_cache`), encode + search +
metrics for evaluation — each timed, in bf16 autocast on CUDA. Part 2, when Ray imports:
the same chain through `pipelines/recipe.py`'s `run()` (the jobs, one GPU each), end to
end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bge_core.data import collate, sample_group  # noqa: E402
from bge_core.grad_cache import contrastive_step  # noqa: E402
from bge_core.losses import info_nce  # noqa: E402
from bge_core.metrics import evaluate_run  # noqa: E402
from bge_core.mining import SampleRange, mine_negatives  # noqa: E402
from bge_core.model import Encoder  # noqa: E402
from bge_core.retromae import load_retromae, save_encoder  # noqa: E402
from bge_core.retromae_masking import RetroMAECollator  # noqa: E402
from bge_core.search import exact_topk  # noqa: E402
from tests.tiny_models import WORDS, make_tokenizer  # noqa: E402


def base_model(folder: Path, tiny: bool) -> Path:
    """A random BERT (bge-base: 12 layers × 768, 512 positions) and a word tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64) if tiny else {}
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                               **size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def domain(n_docs: int, n_queries: int) -> tuple[list[str], list[dict[str, Any]]]:
    rng = random.Random(0)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(60, 200))) for _ in range(n_docs)]
    examples = [{"query": " ".join(docs[i].split()[:8]), "pos": [docs[i]]}
                for i in range(n_queries)]
    return docs, examples


def timed(results: dict, name: str, device: str):
    """Context manager: wall seconds of the block (CUDA synchronised) into `results`."""

    @contextlib.contextmanager
    def block():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if device == "cuda":
            torch.cuda.synchronize()
        results[f"{name}_s"] = round(time.perf_counter() - start, 2)

    return block()


def autocast_for(device: str):
    if device == "cuda":
        return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def retromae(start: Path, out: Path, texts: list[str], args: argparse.Namespace) -> dict:
    model, tokenizer = load_retromae(str(start))
    model.to(args.device).train()
    collator = RetroMAECollator(tokenizer, 512, 0.3, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        rows = texts[step * args.retromae_batch:(step + 1) * args.retromae_batch]
        ids = tokenizer(rows, add_special_tokens=False, truncation=True, max_length=510)
        batch = {k: v.to(args.device) for k, v in collator(ids["input_ids"], generator).items()}
        with autocast_for(args.device)():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    save_encoder(model.cpu(), tokenizer, out, max_length=512)
    return {"steps": args.steps, "batch": args.retromae_batch, "seq": 512,
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}


def mine(model_dir: Path, docs: list[str], examples: list[dict], device: str) -> list[dict]:
    encoder = Encoder.from_pretrained(str(model_dir), device=device)
    corpus = encoder.encode_corpus(docs)  # (N, D)
    queries = encoder.encode_queries([e["query"] for e in examples])  # (Q, D)
    _, idx = exact_topk(queries, corpus, k=210, device=device)
    ranked = [[docs[j] for j in row] for row in idx]
    return mine_negatives(examples, ranked, SampleRange.parse("10-210"), 15, seed=42,
                          corpus=docs)


def finetune(model_dir: Path, out: Path, mined: list[dict], args: argparse.Namespace) -> dict:
    encoder = Encoder.from_pretrained(str(model_dir), device=args.device).train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, weight_decay=0.01)
    loss_fn = functools.partial(info_nce, group_size=8, temperature=0.02)
    b, losses = args.finetune_batch, []
    for step in range(args.steps):
        keys = [(step * b + i) % len(mined) for i in range(b)]
        groups = [sample_group({**mined[k], "key": k}, 8, 42, 0) for k in keys]
        q, p = collate(encoder.tokenize, groups, 64, 256, encoder.tokenizer.pad_token_id)
        loss = contrastive_step(encoder, q.to(args.device), p.to(args.device), loss_fn,
                                args.chunk, autocast_for(args.device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    encoder.eval().save(out)
    return {"steps": args.steps, "batch": b, "group": 8, "passage_tokens": 256,
            "gradient_cache_chunk": args.chunk,
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)]}


def evaluate(model_dir: Path, docs: list[str], examples: list[dict], device: str) -> dict:
    encoder = Encoder.from_pretrained(str(model_dir), device=device)
    corpus = encoder.encode_corpus(docs)
    queries = encoder.encode_queries([e["query"] for e in examples])
    scores, idx = exact_topk(queries, corpus, k=100, device=device)
    run = {f"q{i}": {f"d{j}": float(s) for s, j in zip(scores[i], idx[i], strict=True)}
           for i in range(len(examples))}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(examples))}
    return {k: round(v, 4) for k, v in evaluate_run(run, qrels, [10, 100])[0].items()}


def ray_chain(start: Path, work: Path, docs: list[str], examples: list[dict],
              args: argparse.Namespace) -> dict:
    """The same chain through the recipe job (Ray Train / Ray Data, one GPU per step)."""
    import ray

    from pipelines.chain.recipe import RecipeConfig, run
    from pipelines.common.cli import make_config

    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (work / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    gpu = "--use_gpu --bf16" if args.device == "cuda" else "--cpus_per_worker 1"
    actor = "--gpus_per_actor 1 --dtype bf16" if args.device == "cuda" else ""
    ray.init(address="local", log_to_driver=False)  # never join a cluster already running
    start_s = time.perf_counter()
    records = run(make_config(
        RecipeConfig, model_name_or_path=str(start), corpus=str(work / "corpus.jsonl"),
        train_data=str(work / "train.jsonl"), output_dir=str(work / "recipe"),
        steps="retromae,mine,finetune",
        soup=1,  # one finetuning, as the plain chain's (the default soup runs it twice)
        retromae_args=f"{gpu} --max_steps {args.steps} "
                      f"--per_device_train_batch_size {args.retromae_batch}",
        mine_args=actor,
        finetune_args=f"{gpu} --max_steps {args.steps} --per_device_train_batch_size "
                      f"{args.finetune_batch} --gradient_cache_chunk_size {args.chunk}"))
    ray.shutdown()
    return {"wall_s": round(time.perf_counter() - start_s, 1),
            **{f"{k}_s": r["seconds"] for k, r in records.items()}}


def plain_chain(start: Path, work: Path, docs: list[str], examples: list[dict],
                args: argparse.Namespace, plain: dict[str, Any]) -> None:
    """Part 1: the four steps as plain loops on one device, each timed into `plain`."""
    with timed(plain, "total", args.device):
        with timed(plain, "retromae", args.device):
            plain["retromae"] = retromae(start, work / "retromae", docs, args)
        with timed(plain, "mine", args.device):
            mined = mine(start, docs, examples, args.device)
        with timed(plain, "finetune", args.device):
            plain["finetune"] = finetune(work / "retromae", work / "finetuned", mined, args)
        with timed(plain, "evaluate", args.device):
            plain["evaluate"] = evaluate(work / "finetuned", docs, examples, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="RetroMAE and finetune steps")
    parser.add_argument("--corpus", type=int, default=20000, help="domain passages")
    parser.add_argument("--queries", type=int, default=2048, help="training/eval queries")
    parser.add_argument("--retromae_batch", type=int, default=32)
    parser.add_argument("--finetune_batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128, help="gradient cache chunk")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2×32 model (a CPU check)")
    parser.add_argument("--parts", default="plain,ray",
                        help="plain (no Ray), ray (the recipe job), or both")
    args = parser.parse_args()
    if args.device == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
    work = Path(tempfile.mkdtemp(prefix="gpu_recipe_"))
    start = base_model(work / "base", args.tiny)
    docs, examples = domain(args.corpus, args.queries)
    out: dict[str, Any] = {"device": (torch.cuda.get_device_name(0) if args.device == "cuda"
                                      else "cpu"), "tiny": args.tiny, "corpus": len(docs),
                           "queries": len(examples), "plain": {}}
    parts = args.parts.split(",")
    if "plain" in parts:
        plain_chain(start, work, docs, examples, args, out["plain"])
        print(json.dumps(out), flush=True)  # part 1 is on record even if part 2 fails
    if "ray" in parts:
        try:
            import ray  # noqa: F401
        except ImportError:
            out["ray"] = "skipped: ray is not installed in this image"
        else:
            out["ray"] = ray_chain(start, work, docs, examples, args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
