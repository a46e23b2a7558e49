"""Cost of one finetuning step on this CPU: fp32 vs bf16 autocast, passage length, group.

    PYTHONPATH=. nice -n 5 .venv/bin/python bench/step_cost.py --threads 2 --steps 3 \
        --settings fp32:128:4,bf16:128:4,bf16:256:4,bf16:128:8

The same step the finetuning job runs (`contrastive_step` under the job's autocast, AdamW),
without Ray, on all-MiniLM-L6-v2 and NFCorpus train queries with their top-graded documents
as passages (every passage is a real document, so lengths are the data's). Each setting
(dtype:passage_max_len:train_group_size) runs one warm-up step, then `--steps` timed ones;
prints CPU seconds per step (the process's own, so the shared box's load does not count)
and per query, wall seconds per step, and the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED  # noqa: E402
from bge_core.beir import load_beir  # noqa: E402
from bge_core.data import Group, collate  # noqa: E402
from bge_core.grad_cache import contrastive_step  # noqa: E402
from bge_core.losses import info_nce  # noqa: E402
from bge_core.model import Encoder  # noqa: E402
from bge_core.optim import build_adamw  # noqa: E402
from bge_core.precision import Precision  # noqa: E402


def batches(batch: int, group: int, count: int) -> list[list[Group]]:
    """`count` batches of (query, `group` documents): real NFCorpus train text."""
    split = load_beir(SHARED / "nfcorpus", "train")
    texts = dict(zip(split.corpus_ids, split.corpus_texts, strict=True))
    rows = [Group(query=split.queries[q], passages=[texts[d] for d in list(g)[:group]])
            for q, g in sorted(split.qrels.items()) if len(g) >= group]
    return [rows[i * batch:(i + 1) * batch] for i in range(count)]


def time_setting(dtype: str, max_len: int, group: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu").train()
    optimizer = build_adamw(encoder, 2e-5, 0.01)
    amp = Precision.create(dtype, torch.device("cpu"))
    loss_fn = functools.partial(info_nce, group_size=group, temperature=0.05)
    cpu, wall = [], []
    for rows in batches(args.batch, group, args.steps + 1):
        q, p = collate(encoder.tokenize, rows, 32, max_len, encoder.tokenizer.pad_token_id)
        c0, w0 = time.process_time(), time.perf_counter()
        contrastive_step(encoder, q, p, loss_fn, None, amp.autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    cpu_s, wall_s = sum(cpu[1:]) / args.steps, sum(wall[1:]) / args.steps  # warm-up left out
    return {"setting": f"{dtype}:{max_len}:{group}", "cpu_s_per_step": round(cpu_s, 2),
            "cpu_s_per_query": round(cpu_s / args.batch, 3), "wall_s_per_step": round(wall_s, 2),
            "load": [round(x, 1) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="fp32:128:4,bf16:128:4")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setting in args.settings.split(","):
        dtype, max_len, group = setting.split(":")
        print(time_setting(dtype, int(max_len), int(group), args), flush=True)


if __name__ == "__main__":
    main()
