"""Hard-negative mining with FlagEmbedding ``hn_mine``'s flags, corpus searched in shards on Ray.

    python pipelines/mine_hard_negatives.py --model_name_or_path BAAI/bge-base-en-v1.5 \
        --input_file train.jsonl --output_file train_minedHN.jsonl \
        --range_for_sampling 2-200 --negative_number 15 [--candidate_pool pool.jsonl]

The corpus is the candidate pool (JSONL of ``{"text": ...}``) or, without one, every
``pos`` and ``neg`` text of the input, deduplicated. Passages are encoded by the shared Ray
Data stage, queries by the same stage with the query instruction (the model's own, or
``--query_instruction_for_retrieval``; ``""`` for none; FlagEmbedding 1.0.x forgot it).
Each query's top ``END`` passages come from an exact sharded search; negatives are drawn
from ranks ``[START, END)`` leaving out any text equal to a positive or to the query
(`bge_core.mining`), seeded by ``--seed``. The output is finetuning input for
``pipelines/finetune.py`` with each example's ``neg`` replaced, other fields kept.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from bge_core.config import DType
from bge_core.mining import (
    SampleRange,
    build_corpus,
    mine_negatives,
    read_candidate_pool,
    read_examples,
)
from pipelines.cli import run_main
from pipelines.ray_encode import EncodeOptions
from pipelines.ray_search import encode_corpus, encode_texts, query_instruction, search_corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MineConfig:
    """Mine hard negatives for FlagEmbedding-style training data."""

    model_name_or_path: str
    input_file: str
    output_file: str
    candidate_pool: str | None = None
    range_for_sampling: str = "10-210"
    negative_number: int = 15
    query_instruction_for_retrieval: str | None = None
    use_gpu: bool = False
    seed: int = 42
    dtype: DType = "fp32"
    max_length: int | None = None
    num_actors: str = "1"
    cpus_per_actor: float = 1.0
    batch_rows: int = 1024
    max_tokens_per_batch: int | None = None
    search_shard_rows: int = 65536
    search_cpus: float = 1.0

    def __post_init__(self) -> None:
        SampleRange.parse(self.range_for_sampling)  # fail at parse time, naming the flag
        if self.negative_number < 1:
            raise ValueError(f"--negative_number must be >= 1, got {self.negative_number}")

    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(
            model=self.model_name_or_path, dtype=self.dtype, max_length=self.max_length,
            num_actors=self.num_actors, gpus_per_actor=1.0 if self.use_gpu else 0.0,
            cpus_per_actor=self.cpus_per_actor, batch_rows=self.batch_rows,
            max_tokens_per_batch=self.max_tokens_per_batch)


def run(cfg: MineConfig) -> dict[str, Any]:
    """Mine, write `cfg.output_file` and return a summary (counts and seconds per stage)."""
    if not ray.is_initialized():
        ray.init()
    window = SampleRange.parse(cfg.range_for_sampling)
    examples = read_examples(cfg.input_file)
    pool = read_candidate_pool(cfg.candidate_pool) if cfg.candidate_pool else None
    corpus = build_corpus(examples, pool)
    opts = cfg.encode_options()
    instruction = query_instruction(cfg.model_name_or_path, cfg.query_instruction_for_retrieval)

    start = time.perf_counter()
    queries = encode_texts([ex["query"] for ex in examples], opts, prefix=instruction)  # (Q, D)
    encoded_queries = time.perf_counter()
    scores, rows = search_corpus(encode_corpus(corpus, opts), queries, window.end,
                                 shard_rows=cfg.search_shard_rows, num_cpus=cfg.search_cpus,
                                 use_gpu=cfg.use_gpu)
    searched = time.perf_counter()
    ranked = [[corpus[r] for r in row] for row in rows.tolist()]
    mined = mine_negatives(examples, ranked, window, cfg.negative_number, cfg.seed)

    Path(cfg.output_file).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.output_file, "w", encoding="utf-8") as handle:
        for example in mined:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    short = sum(len(ex["neg"]) < cfg.negative_number for ex in mined)
    empty = sum(not ex["neg"] for ex in mined)
    if empty:
        log.warning("%d of %d examples got no negative: the window %s holds only positives "
                    "(a larger corpus or range helps)", empty, len(mined), cfg.range_for_sampling)
    summary = {"examples": len(mined), "corpus": len(corpus), "query_instruction": instruction,
               "short_of_negatives": short, "without_negatives": empty,
               "encode_queries_s": encoded_queries - start,
               "encode_corpus_and_search_s": searched - encoded_queries,
               "output_file": cfg.output_file}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one clear message and exit status 2 on bad input."""
    return run_main("mine_hard_negatives", MineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
