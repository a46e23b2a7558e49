"""Retrieval evaluation on a BEIR-layout dataset, or Spearman on STS pairs, on Ray.

    python pipelines/evaluate.py --model all-MiniLM-L6-v2 --beir_dir data/nfcorpus \
        --split test --output metrics.json --run_file run.trec
    python pipelines/evaluate.py --model bge-base-en-v1.5 --sts data/stsb/sts-test.csv

The corpus is read, checked and embedded (``title + " " + text``) by Ray tasks, never on
the driver; queries (with the model's query instruction, or
``--query_instruction_for_retrieval``; ``""`` for none) are encoded by the same Ray Data
stage; exact inner-product top-k runs in corpus shards on Ray and only each query's top
document ids and scores are merged in the driver;
nDCG / recall / MRR / MAP at ``--k_values`` follow trec_eval (`bge_core.metrics`).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from bge_core.beir import check_qrels, read_split
from bge_core.errors import InputError
from bge_core.io import open_text
from bge_core.metrics import evaluate_run, format_table, rank_documents, spearman
from bge_core.search import best_chunk_per_document
from pipelines.common.cli import run_main
from pipelines.common.encode import encode_corpus, encode_texts, query_instruction
from pipelines.common.encode_options import ChunkOptions, EncodeOptions, SearchOptions
from pipelines.search.beir import chunk_texts, document_texts, judged_documents, read_corpus
from pipelines.search.exact import search_corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Evaluate a model: BEIR retrieval (`beir_dir`) or STS Spearman (`sts`).

    Args:
        chunking: ``--chunk-tokens`` / ``--chunk-overlap`` (`ChunkOptions`, as
            `embed_corpus.py` embeds them): score documents by their best token window
            instead of truncating them.
        encode: model, precision, actor pool and batch sizes (flags shared by every job).
        search: exact top-k search over corpus shards.
        vectors: an `embed_corpus.py` output (Parquet folder or Lance table) to score
            instead of encoding the corpus (any `--output-dtype`; `evaluate_stored`).
        index: with a Lance `vectors` table: search its ANN index and report the recall
            lost against exact search and the latency per query.
        nprobes / refine_factor: index search settings (Lance's defaults when unset).
        rescore_multiplier: binary vectors: candidates per result rescored with the float
            query (k × this).
    """

    beir_dir: str | None = None
    split: str = "test"
    sts: str | None = None
    output: str | None = None
    run_file: str | None = None
    query_instruction_for_retrieval: str | None = None
    k_values: str = "1,3,5,10,100,1000"
    ignore_identical_ids: bool = True
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    vectors: str | None = None
    index: bool = False
    nprobes: int | None = None
    refine_factor: int | None = None
    rescore_multiplier: int = 4

    def __post_init__(self) -> None:
        if self.vectors and (self.sts or self.chunking.enabled):
            raise ValueError("--vectors scores stored document vectors: not with --sts or "
                             "--chunk-tokens")
        if self.index and not self.vectors:
            raise ValueError("--index searches the Lance table given as --vectors")
        if self.rescore_multiplier < 1:
            raise ValueError(f"--rescore_multiplier must be >= 1, got "
                             f"{self.rescore_multiplier}")
        if (self.beir_dir is None) == (self.sts is None):
            raise InputError("give exactly one of --beir_dir (retrieval) or --sts (STS pairs)")
        try:
            ks = [int(k) for k in self.k_values.split(",")]
        except ValueError:
            raise InputError(f"--k_values must be comma-separated integers, got "
                             f"{self.k_values!r}") from None
        if min(ks) < 1:
            raise InputError(f"--k_values must be positive, got {self.k_values!r}")

    @property
    def ks(self) -> list[int]:
        return sorted({int(k) for k in self.k_values.split(",")})


def retrieve(cfg: EvaluateConfig, corpus: ray.data.Dataset, query_texts: list[str],
             k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Encode on Ray and search a dataset of ``row`` (document id) and ``text``: (scores,
    document ids) each (Q, k'), and seconds per stage."""
    opts = cfg.encode
    timings: dict[str, float] = {}
    start = time.perf_counter()
    instruction = query_instruction(opts.model, cfg.query_instruction_for_retrieval)
    queries = encode_texts(query_texts, opts, prefix=instruction)  # (Q, D)
    timings["encode_queries_s"] = time.perf_counter() - start
    start = time.perf_counter()
    encoded = encode_corpus(corpus, opts)  # lazy: encoded while shards are searched
    scores, ids = search_corpus(encoded, queries, k, cfg.search)
    timings["encode_corpus_and_search_s"] = time.perf_counter() - start
    return scores, ids, timings


def retrieve_documents(cfg: EvaluateConfig, corpus: ray.data.Dataset, query_texts: list[str],
                       k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """`retrieve` over documents, or over their chunks with a document's best chunk as its
    score (searching ``k × most chunks per document`` chunks makes that exact)."""
    spec = cfg.chunking.spec()
    if spec is None:
        return retrieve(cfg, document_texts(corpus), query_texts, k)
    chunks, count, most = chunk_texts(corpus, cfg.encode.model, spec)
    log.info("documents as %d chunks of <= %d tokens (at most %d per document)", count,
             spec.size, most)
    scores, ids, timings = retrieve(cfg, chunks, query_texts, k * most)
    doc_scores, doc_ids = best_chunk_per_document(scores, ids, k)
    timings["chunks"] = count
    return doc_scores, doc_ids, timings


def _run_dict(qids: list[str], scores: np.ndarray, doc_ids: np.ndarray, k: int,
              ignore_identical: bool) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for qid, row_scores, row_ids in zip(qids, scores.tolist(), doc_ids.tolist()):
        hits = ((d, s) for d, s in zip(row_ids, row_scores) if d is not None)
        kept = [(d, s) for d, s in hits if not (ignore_identical and d == qid)]
        run[qid] = dict(kept[:k])
    return run


def write_trec_run(run: dict[str, dict[str, float]], path: str, tag: str = "bge-ray") -> None:
    """TREC run file: ``qid Q0 docid rank score tag``, ranks from 1."""
    with open_text(path, "w") as handle:
        for qid, docs in run.items():
            for rank, doc in enumerate(rank_documents(docs), start=1):
                handle.write(f"{qid} Q0 {doc} {rank} {docs[doc]:.6f} {tag}\n")


def evaluate_beir(cfg: EvaluateConfig) -> dict[str, Any]:
    """Retrieval metrics of `cfg.encode.model` on one split of a BEIR folder. Queries and
    qrels are read here; the corpus only by Ray tasks."""
    assert cfg.beir_dir is not None
    root = cfg.beir_dir.rstrip("/")
    queries, qrels = read_split(root, cfg.split)
    corpus, num_docs = read_corpus(f"{root}/corpus.jsonl")
    judged = {d for docs in qrels.values() for d in docs}
    check_qrels(qrels, judged_documents(corpus, judged), set(queries),
                f"{root}/qrels/{cfg.split}.tsv")
    qids = list(queries)
    k = max(cfg.ks)
    texts, want = [queries[q] for q in qids], k + int(cfg.ignore_identical_ids)
    if cfg.vectors:
        from pipelines.search.stored import retrieve_stored

        scores, doc_ids, timings = retrieve_stored(
            cfg.vectors, cfg.encode, cfg.query_instruction_for_retrieval, texts, want,
            index=cfg.index, nprobes=cfg.nprobes, refine_factor=cfg.refine_factor,
            rescore_multiplier=cfg.rescore_multiplier)
    else:
        scores, doc_ids, timings = retrieve_documents(cfg, corpus, texts, want)
    run = _run_dict(qids, scores, doc_ids, k, cfg.ignore_identical_ids)
    means, _ = evaluate_run(run, qrels, cfg.ks)
    if cfg.run_file:
        write_trec_run(run, cfg.run_file)
    print(f"{cfg.encode.model} on {cfg.beir_dir} [{cfg.split}]: {len(qids)} queries, "
          f"{num_docs} documents")
    print(format_table(means, cfg.ks))
    return {"model": cfg.encode.model, "dataset": str(cfg.beir_dir), "split": cfg.split,
            "num_queries": len(qids), "num_docs": num_docs,
            "query_instruction": query_instruction(cfg.encode.model,
                                                   cfg.query_instruction_for_retrieval),
            "chunk_tokens": cfg.chunking.chunk_tokens,
            "chunk_overlap": cfg.chunking.chunk_overlap,
            "vectors": cfg.vectors, "metrics": means, "timings": timings}


def read_sts(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B file: tab-separated, no header, no quoting; gold in column 4, texts in 5 and 6."""
    left, right, gold = [], [], []
    with open_text(path, what="STS file") as handle:
        for row, fields in enumerate(csv.reader(handle, delimiter="\t",
                                                quoting=csv.QUOTE_NONE), start=1):
            try:
                gold.append(float(fields[4]))
                left.append(fields[5])
                right.append(fields[6])
            except (IndexError, ValueError):
                raise InputError(f"{path} row {row}: expected a score in column 5 and two "
                                 f"sentences in columns 6-7 (tab-separated)") from None
    if len(gold) < 2:
        raise InputError(f"{path}: need at least 2 sentence pairs, found {len(gold)}")
    return left, right, np.asarray(gold)


def evaluate_sts(cfg: EvaluateConfig) -> dict[str, Any]:
    """Spearman × 100 between gold scores and the cosine of the two sentences' embeddings."""
    assert cfg.sts is not None
    left, right, gold = read_sts(cfg.sts)
    start = time.perf_counter()
    vectors = encode_texts(left + right, cfg.encode).astype(np.float64)  # (2n, D)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(vectors[: len(left)] * vectors[len(left):], axis=1)  # (n,)
    value = 100.0 * spearman(cosine, gold)
    print(f"{cfg.encode.model} on {cfg.sts}: {len(gold)} pairs, Spearman x100 = {value:.2f}")
    return {"model": cfg.encode.model, "dataset": cfg.sts, "num_pairs": len(gold),
            "metrics": {"spearman": value}, "timings": {"encode_s": time.perf_counter() - start}}


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate, print the table, write `cfg.output` JSON (if set) and return the result."""
    result = evaluate_beir(cfg) if cfg.beir_dir else evaluate_sts(cfg)
    if cfg.output:
        with open_text(cfg.output, "w") as handle:
            handle.write(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one clear message and exit status 2 on bad input."""
    return run_main("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
