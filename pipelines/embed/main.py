"""Bulk embedding of a Parquet/JSONL corpus on Ray Data: resumable and incremental.

    ray job submit --working-dir . -- python pipelines/embed_corpus.py \\
        --input s3://bucket/corpus/ --output s3://bucket/emb/ --model BAAI/bge-base-en-v1.5 \\
        --num-actors 1,8 --gpus-per-actor 1 --dtype fp16

With no arguments it embeds the bundled sample corpus into ./out/embeddings with the
offline all-MiniLM-L6-v2. Rerun the same command after a failure: finished input files
are skipped. ``--mode incremental --previous URI`` re-encodes only new and changed rows.
"""

from __future__ import annotations

import logging
import sys

from bge_core.storage import StorageError, check_reachable, naming
from pipelines.common.cli import run_main
from pipelines.common.corpus_io import InputError
from pipelines.common.encode_options import EncodeOptions
from pipelines.common.lease import LeaseHeld, LeaseLost, OutputLease
from pipelines.embed.config import SAMPLE_CORPUS, EmbedConfig

__all__ = ["EmbedConfig", "EncodeOptions", "main", "run"]
log = logging.getLogger("embed_corpus")


def run(cfg: EmbedConfig) -> dict:
    """Run the job; returns the manifest it wrote."""
    if cfg.format == "lance":
        from pipelines.embed.lance import LanceEmbedJob

        return LanceEmbedJob(cfg).run()
    from pipelines.embed.job import EmbedJob

    return EmbedJob(cfg).run()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 2 with one clear line on bad flags, config or input."""
    return run_main("embed_corpus", EmbedConfig, _announce_and_run, argv,
                    errors=(InputError, LeaseHeld, LeaseLost, StorageError),
                    preflight=_preflight)


def _preflight(cfg: EmbedConfig) -> None:
    """Before Ray starts: the stores answer, and no other live run holds the output (a
    run killed on this host is seen dead at once, so its rerun goes straight on)."""
    for uri in (cfg.input, cfg.output, cfg.previous):
        if uri:
            check_reachable(uri)
    with naming(cfg.output, "check the lease on"):
        OutputLease(cfg.output, stale_after_s=cfg.lease_timeout_s).check_free()


def _announce_and_run(cfg: EmbedConfig) -> None:
    import ray.data

    # This process runs only this job: its own progress lines replace Ray Data's bars.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if cfg.input == SAMPLE_CORPUS:
        log.info("no --input given: embedding the bundled sample corpus %s into %s",
                 SAMPLE_CORPUS, cfg.output)
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
