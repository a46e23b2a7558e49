"""Finetune all-MiniLM-L6-v2 on NFCorpus train; nDCG@10 on NFCorpus test before and after.

Also times the same training steps twice: through Ray Train (`pipelines.train.finetune.run`, one
CPU worker) and as a plain single-process loop over the same bge_core pieces, to measure
Ray Train's overhead. Negatives are random corpus documents that are not relevant to the
query (the project's miner can replace them: `pipelines/mine_hard_negatives.py`).

    .venv/bin/python bench/finetune_quality.py --steps 30 --batch 16

Prints one results block (copy it into BENCHMARKS.md under "## Finetuning (issue 4)").
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from bge_core.beir import load_beir
from bge_core.data import collate, load_examples, sample_group
from bge_core.grad_cache import contrastive_step
from bge_core.losses import info_nce
from bge_core.metrics import evaluate_run
from bge_core.model import Encoder
from bge_core.optim import build_adamw, build_scheduler, warmup_steps
from bge_core.search import exact_topk
from pipelines.common.cli import NO_DASHBOARD_ENV
from pipelines.train.finetune import FinetuneConfig, run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"


def write_train_jsonl(path: Path, n: int, negatives: int, seed: int) -> int:
    """NFCorpus train queries with their top-graded documents and random negatives."""
    train = load_beir(DATA, "train")
    texts = dict(zip(train.corpus_ids, train.corpus_texts, strict=True))
    rng = random.Random(seed)
    qids = sorted(train.qrels)
    rng.shuffle(qids)
    rows = []
    for qid in qids[:n]:
        judged = train.qrels[qid]
        best = max(judged.values())
        pos = [texts[d] for d, g in judged.items() if g == best and g > 0]
        negs = [texts[d] for d in rng.sample(train.corpus_ids, negatives * 2)
                if d not in judged][:negatives]
        rows.append({"query": train.queries[qid], "pos": pos, "neg": negs})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return len(rows)


def ndcg10(model_dir: str, max_len: int) -> float:
    """nDCG@10 on NFCorpus test by exact inner-product search over the whole corpus."""
    test = load_beir(DATA, "test")
    encoder = Encoder.from_pretrained(model_dir, device="cpu")
    corpus = encoder.encode_corpus(test.corpus_texts, max_length=max_len)
    qids = list(test.queries)
    queries = encoder.encode_queries([test.queries[q] for q in qids])
    scores, idx = exact_topk(queries, corpus, k=10)
    run_ = {q: {test.corpus_ids[j]: float(s) for s, j in zip(scores[i], idx[i], strict=True)}
            for i, q in enumerate(qids)}
    return evaluate_run(run_, test.qrels, [10])[0]["ndcg@10"]


def plain_loop(cfg: FinetuneConfig) -> tuple[float, float]:
    """The same steps without Ray: (seconds from model load, seconds of the steps alone)."""
    start = time.perf_counter()
    # Ray sets one intra-op thread per CPU a worker holds: give the plain loop the same.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    encoder = Encoder.from_pretrained(cfg.model_name_or_path, device="cpu").train()
    examples, _ = load_examples(cfg.train_data, cfg.train_group_size)
    total = cfg.max_steps
    optimizer = build_adamw(encoder, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, "linear", warmup_steps(total, cfg.warmup_ratio), total)
    loss_fn = functools.partial(info_nce, group_size=cfg.train_group_size,
                                temperature=cfg.temperature)
    b = cfg.per_device_train_batch_size
    steps_start = time.perf_counter()
    for step in range(total):
        rows = examples[step * b : (step + 1) * b]
        groups = [sample_group(r, cfg.train_group_size, cfg.seed, 0) for r in rows]
        q, p = collate(encoder.tokenize, groups, cfg.query_max_len, cfg.passage_max_len,
                       encoder.tokenizer.pad_token_id)
        contrastive_step(encoder, q, p, loss_fn, cfg.gradient_cache_chunk_size)
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - start, end - steps_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval_max_len", type=int, default=256)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    n = write_train_jsonl(tmp / "train.jsonl", args.steps * args.batch, 7, seed=0)
    cfg = FinetuneConfig(
        model_name_or_path=args.model, train_data=str(tmp / "train.jsonl"),
        output_dir=str(tmp / "out"), train_group_size=args.group, query_max_len=32,
        passage_max_len=128, temperature=0.05, learning_rate=args.lr, warmup_ratio=0.1,
        per_device_train_batch_size=args.batch, max_steps=args.steps, num_workers=1,
        cpus_per_worker=1.0, save_steps=args.steps, logging_steps=5, max_failures=0)
    t0 = time.perf_counter()
    before = ndcg10(args.model, args.eval_max_len)
    print(f"nDCG@10 before: {before:.4f} ({time.perf_counter() - t0:.0f} s to evaluate)",
          flush=True)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": NO_DASHBOARD_ENV})
    t0 = time.perf_counter()
    result = run(cfg)
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    print(f"Ray Train run: {ray_s:.1f} s, metrics {result.metrics}", flush=True)
    plain_s, plain_loop_s = plain_loop(cfg)
    print(f"plain loop: {plain_s:.1f} s ({plain_loop_s:.1f} s of steps)", flush=True)
    after = ndcg10(str(result.output_dir), args.eval_max_len)
    examples = args.steps * args.batch
    print(f"train examples {n}, steps {args.steps} x batch {args.batch} x group {args.group}")
    print(f"nDCG@10 NFCorpus test: before {before:.4f}  after {after:.4f}")
    print(f"Ray Train (1 worker): {ray_s:.1f} s end to end incl. start-up, "
          f"{result.metrics['examples_per_s']:.2f} examples/s in the loop")
    ray_rate, plain_rate = result.metrics["examples_per_s"], examples / plain_loop_s
    print(f"plain loop: {plain_s:.1f} s incl. model load, {plain_rate:.2f} examples/s in the loop")
    print(f"Ray Train overhead in the training loop: {100 * (plain_rate / ray_rate - 1):+.1f}%; "
          f"end to end (start-up, data read, checkpoint, export): "
          f"{100 * (ray_s / plain_s - 1):+.1f}%")


if __name__ == "__main__":
    main()
