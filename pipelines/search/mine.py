"""Hard-negative mining with FlagEmbedding ``hn_mine``'s flags, corpus searched in shards on Ray.

    python pipelines/mine_hard_negatives.py --model_name_or_path BAAI/bge-base-en-v1.5 \
        --input_file train.jsonl --output_file train_minedHN.jsonl \
        --range_for_sampling 2-200 --negative_number 15 [--candidate_pool pool.jsonl]

The corpus is the candidate pool (JSONL of ``{"text": ...}``) or, without one, every
``pos`` and ``neg`` text of the input, deduplicated; it stays in Ray datasets
(`pipelines.search.mining`), and the driver holds only ids and scores. Passages are encoded by
the shared Ray Data stage, queries by the same stage with the query instruction (the model's own, or
``--query_instruction_for_retrieval``; ``""`` for none; FlagEmbedding 1.0.x forgot it).
Each query's top ``END`` passages come from an exact sharded search; negatives are drawn
from ranks ``[START, END)`` leaving out any text equal to a positive or to the query
(`bge_core.mining`), seeded by ``--seed``. The output, written by Ray tasks to a local path
or URI, is finetuning input for ``pipelines/finetune.py`` with each example's ``neg``
replaced, other fields kept.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bge_core.mining import SampleRange, check_number, mine_one
from pipelines.common.cli import run_main
from pipelines.common.encode import encode_corpus, encode_rows, query_instruction
from pipelines.common.encode_options import Alias, EncodeOptions, SearchOptions
from pipelines.search.exact import search_corpus
from pipelines.search.mining import (
    banned_ids,
    corpus_dataset,
    examples_dataset,
    pool_dataset,
    write_mined,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MineConfig:
    """Mine hard negatives for FlagEmbedding-style training data.

    Args:
        encode: model (``--model_name_or_path`` or ``--model``), precision, actor pool and
            batch sizes (flags shared by every job).
        search: exact top-k search over corpus shards (``--use_gpu_for_searching``).
    """

    input_file: str
    output_file: str
    candidate_pool: str | None = None
    range_for_sampling: str = "10-210"
    negative_number: int = 15
    query_instruction_for_retrieval: str | None = None
    seed: int = 42
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    search: SearchOptions = field(default_factory=SearchOptions)

    # Earlier releases of this job: one flag for GPU encoding and GPU search.
    ALIASES: ClassVar[dict[str, Alias]] = {
        "use_gpu": Alias(bool, lambda on: {"gpus_per_actor": 1.0 if on else 0.0,
                                           "use_gpu_for_searching": on},
                         "same as --gpus-per-actor 1 --use_gpu_for_searching"),
    }

    def __post_init__(self) -> None:
        SampleRange.parse(self.range_for_sampling)  # fail at parse time, naming the flag
        check_number(self.negative_number)


def run(cfg: MineConfig) -> dict[str, Any]:
    """Mine, write `cfg.output_file` and return a summary (counts and seconds per stage)."""
    window = SampleRange.parse(cfg.range_for_sampling)
    opts = cfg.encode
    instruction = query_instruction(opts.model, cfg.query_instruction_for_retrieval)
    start = time.perf_counter()
    examples, count = examples_dataset(cfg.input_file)
    pool = pool_dataset(cfg.candidate_pool) if cfg.candidate_pool else None
    corpus, size = corpus_dataset(examples, pool)
    read = time.perf_counter()
    queries = encode_rows(examples, count, opts, prefix=instruction)  # (Q, D)
    encoded_queries = time.perf_counter()
    _, ranked = search_corpus(encode_corpus(corpus, opts), queries, window.end, cfg.search)
    searched = time.perf_counter()  # ranked: (Q, k') corpus ids, the driver's only corpus data
    banned = banned_ids(examples, corpus, count)
    mined = [mine_one(i, row, banned[i], window, cfg.negative_number, cfg.seed, range(size))
             for i, row in enumerate(ranked.tolist())]
    write_mined(examples, corpus, mined, cfg.output_file)
    topped_up = sum(not set(m) <= set(r[window.start:window.end])
                    for m, r in zip(mined, ranked.tolist()))
    short = sum(len(m) < cfg.negative_number for m in mined)
    if topped_up:
        log.info("%d of %d examples had fewer than %d negatives in the window %s: topped up "
                 "with random passages (never a positive or the query)", topped_up,
                 count, cfg.negative_number, cfg.range_for_sampling)
    if short:
        log.warning("%d of %d examples are short of negatives: the corpus holds too few "
                    "passages other than their positives", short, count)
    summary = {"examples": count, "corpus": size, "query_instruction": instruction,
               "topped_up": topped_up, "short_of_negatives": short,
               "read_and_deduplicate_s": read - start,
               "encode_queries_s": encoded_queries - read,
               "encode_corpus_and_search_s": searched - encoded_queries,
               "sample_and_write_s": time.perf_counter() - searched,
               "output_file": cfg.output_file}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one clear message and exit status 2 on bad input."""
    return run_main("mine_hard_negatives", MineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
