"""RetroMAE benchmark: a few hundred steps from all-MiniLM-L6-v2 on NFCorpus text.

Runs the library's RetroMAE step in one process (no Ray: this measures the model, not the
launcher) and prints the encoder and decoder losses on a fixed held-out batch before and
after training, the mean training losses of the first and last 10% of steps, and tokens/s
(real, unpadded tokens through the encoder per second of training).

    .venv/bin/python bench/retromae.py --data ../shared/data/nfcorpus/corpus.jsonl \\
        --steps 200 --batch_size 8 --max_seq_length 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import torch

from bge_core.presets import offline_minilm_dir
from bge_core.retromae import load_retromae
from bge_core.retromae_masking import RetroMAECollator


def read_texts(path: Path) -> list[str]:
    """Non-empty ``text`` fields of a JSONL corpus (title prepended when present)."""
    texts = []
    with path.open() as handle:
        for line in handle:
            row = json.loads(line)
            text = " ".join(p for p in (row.get("title"), row.get("text")) if p).strip()
            if text:
                texts.append(text)
    return texts


@torch.no_grad()
def held_out_losses(model, batch) -> tuple[float, float]:
    model.eval()
    out = model(**batch)
    model.train()
    return out.encoder_loss.item(), out.decoder_loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/nfcorpus/corpus.jsonl")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--eval_texts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    texts = read_texts(Path(args.data))
    random.Random(args.seed).shuffle(texts)
    held_out, train = texts[: args.eval_texts], texts[args.eval_texts :]
    model, tokenizer = load_retromae(str(offline_minilm_dir()))
    collator = RetroMAECollator(tokenizer, args.max_seq_length, 0.3, 0.5)

    def tokenize(batch_texts: list[str]) -> list[list[int]]:
        return tokenizer(batch_texts, add_special_tokens=False, truncation=True,
                         max_length=args.max_seq_length - 2)["input_ids"]

    eval_batch = collator(tokenize(held_out), torch.Generator().manual_seed(0))
    before = held_out_losses(model, eval_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    history, tokens, train_seconds = [], 0, 0.0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop early, still report
    try:
        for step in range(args.steps):
            start = (step * args.batch_size) % max(len(train) - args.batch_size, 1)
            batch = collator(tokenize(train[start : start + args.batch_size]), generator)
            began = time.perf_counter()
            out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - began
            tokens += int(batch["attention_mask"].sum())
            history.append((out.encoder_loss.item(), out.decoder_loss.item()))
            if (step + 1) % 10 == 0:
                window = history[-10:]
                logging.info("step %d  last 10: enc %.3f dec %.3f  %.0f tokens/s  %.2f s/step",
                             step + 1, sum(h[0] for h in window) / 10,
                             sum(h[1] for h in window) / 10, tokens / train_seconds,
                             train_seconds / (step + 1))
    except KeyboardInterrupt:
        logging.info("stopped after %d steps; reporting those", len(history))
    after = held_out_losses(model, eval_batch)
    steps = len(history)
    tenth = max(1, steps // 10)

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    result = {
        "steps": steps, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "learning_rate": args.learning_rate,
        "threads": args.threads,
        "held_out_encoder_loss": [round(before[0], 3), round(after[0], 3)],
        "held_out_decoder_loss": [round(before[1], 3), round(after[1], 3)],
        "train_encoder_loss_first_last_10pct": [round(mean(history[:tenth], 0), 3),
                                                round(mean(history[-tenth:], 0), 3)],
        "train_decoder_loss_first_last_10pct": [round(mean(history[:tenth], 1), 3),
                                                round(mean(history[-tenth:], 1), 3)],
        "tokens_per_s": round(tokens / train_seconds, 1),
        "seconds_per_step": round(train_seconds / steps, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
