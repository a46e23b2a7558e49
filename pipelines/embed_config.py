"""`EmbedConfig`: the settings of the bulk embedding job (`pipelines/embed_corpus.py`).

Its own module so the CLI entry and the driver (`pipelines/embed_job.py`) both import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from bge_core.chunking import ChunkSpec
from bge_core.errors import InputError
from pipelines.encode_options import EncodeOptions

SAMPLE_CORPUS = str(Path(__file__).resolve().parent / "sample_data" / "corpus.jsonl")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Embed a corpus: Parquet/JSONL in, Parquet of id + embedding out.

    Args:
        input: Parquet/JSONL file, folder or glob (local or fsspec URI).
        output: output folder (local or fsspec URI).
        encode: model, precision, actor pool and batch sizes (flags shared by every job).
        id_column / text_column / title_column: input columns; a title is embedded as
            ``title + " " + text``.
        embedding_dtype: stored precision of the vectors.
        mode / previous: ``incremental`` re-encodes only rows new or changed since the
            `previous` output.
        chunk_tokens / chunk_overlap: split each text into windows of at most this many
            tokens (special tokens excluded) overlapping by about `chunk_overlap`, cut
            between words; one output row per window (`bge_core.chunking`). Off by default:
            longer text is truncated at the model's limit.
        chunk_rows: rows per read task (Parquet row groups are grouped up to this).
        log_every_s: seconds between progress lines.
        lease_timeout_s: a second run on this output refuses while the first one's lease
            is younger than this (store time) and, on this host, its process lives; after,
            it takes over and resumes. A run that cannot renew its lease for half this
            stops (`pipelines.lease`).
    """

    input: str = SAMPLE_CORPUS
    output: str = "out/embeddings"
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    id_column: str = "id"
    text_column: str = "text"
    title_column: str | None = None
    embedding_dtype: Literal["float32", "float16"] = "float32"
    mode: Literal["full", "incremental"] = "full"
    previous: str | None = None
    chunk_rows: int = 100_000
    chunk_tokens: int | None = None
    chunk_overlap: int = 0
    log_every_s: float = 10.0
    lease_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.mode == "incremental" and not self.previous:
            raise InputError("--mode incremental needs --previous (the last run's output)")
        if self.previous and self.previous.rstrip("/") == self.output.rstrip("/"):
            raise InputError("--previous and --output must differ: an incremental run writes "
                             "a new complete output beside the previous one")
        if self.lease_timeout_s <= 0:
            raise InputError(f"--lease-timeout-s must be > 0, got {self.lease_timeout_s}")
        if self.chunk_rows < 1:
            raise InputError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if self.chunk_tokens is None and self.chunk_overlap:
            raise InputError("--chunk-overlap needs --chunk-tokens")
        self.chunk_spec()  # checks size and overlap

    def chunk_spec(self) -> ChunkSpec | None:
        """The token windows to split texts into, or None (no chunking)."""
        if self.chunk_tokens is None:
            return None
        return ChunkSpec(self.chunk_tokens, self.chunk_overlap)

    def stage_dict(self) -> dict:
        """The settings the Ray stages need, as a plain dict."""
        return asdict(self)
