"""`EmbedConfig`: the settings of the bulk embedding job (`pipelines/embed_corpus.py`).

Its own module so the CLI entry and the driver (`pipelines/embed/job.py`) both import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from bge_core.errors import InputError
from bge_core.quantize_vectors import OutputDType
from pipelines.common.encode_options import Alias, ChunkOptions, EncodeOptions

SAMPLE_CORPUS = str(Path(__file__).resolve().parents[1] / "sample_data" / "corpus.jsonl")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Embed a corpus: Parquet/JSONL in, Parquet of id + embedding out.

    Args:
        input: Parquet/JSONL file, folder or glob (local or fsspec URI).
        output: output folder (local or fsspec URI); with ``format="lance"`` the Lance
            table (`pipelines/embed/lance.py`).
        format: ``parquet`` (part files + manifest) or ``lance`` (one table, exactly one
            row per current id after every run, one commit per run).
        encode: model, precision, actor pool and batch sizes (flags shared by every job).
        id_column / text_column / title_column: input columns; a title is embedded as
            ``title + " " + text``.
        output_dtype: stored vectors (`bge_core.quantize_vectors`): float32, float16, int8
            (per-dimension ranges calibrated on the corpus, in the manifest) or binary
            (packed bits).
        calibration_rows: int8: valid rows (the corpus's first ones) encoded to calibrate
            the ranges; an incremental run reuses the previous output's ranges.
        index: ``lance`` only: build an ANN index on the table at the end of the run
            (``ivf_pq`` or ``ivf_hnsw_sq``, parameters from the table's size).
        mode / previous: ``incremental`` re-encodes only rows new or changed since the
            `previous` output (Parquet); a Lance table is updated in place (no
            `previous`: the table is its own).
        chunking: ``--chunk-tokens`` / ``--chunk-overlap`` (`ChunkOptions`, shared with
            evaluation): one output row per token window of a text. Off by default:
            longer text is truncated at the model's limit.
        chunk_rows: rows per read task (Parquet row groups are grouped up to this).
        log_every_s: seconds between progress lines.
        lease_timeout_s: a second run on this output refuses while the first one's lease
            is younger than this (store time) and, on this host, its process lives; after,
            it takes over and resumes. A run that cannot renew its lease for half this
            stops (`pipelines.common.lease`).
    """

    input: str = SAMPLE_CORPUS
    output: str = "out/embeddings"
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    id_column: str = "id"
    text_column: str = "text"
    title_column: str | None = None
    format: Literal["parquet", "lance"] = "parquet"
    output_dtype: OutputDType = "float32"
    calibration_rows: int = 1000
    index: Literal["none", "ivf_pq", "ivf_hnsw_sq"] = "none"
    mode: Literal["full", "incremental"] = "full"
    previous: str | None = None
    chunk_rows: int = 100_000
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    log_every_s: float = 10.0
    lease_timeout_s: float = 120.0

    ALIASES: ClassVar[dict[str, Alias]] = {
        "embedding_dtype": Alias(str, lambda v: {"output_dtype": v}, "same as --output-dtype"),
    }

    def __post_init__(self) -> None:
        if self.format == "lance":
            self._check_lance()
        elif self.mode == "incremental" and not self.previous:
            raise InputError("--mode incremental needs --previous (the last run's output)")
        if self.index != "none" and self.format != "lance":
            raise InputError("--index needs --format lance")
        if self.calibration_rows < 1:
            raise InputError(f"--calibration-rows must be >= 1, got {self.calibration_rows}")
        if self.previous and self.previous.rstrip("/") == self.output.rstrip("/"):
            raise InputError("--previous and --output must differ: an incremental run writes "
                             "a new complete output beside the previous one")
        if self.lease_timeout_s <= 0:
            raise InputError(f"--lease-timeout-s must be > 0, got {self.lease_timeout_s}")
        if self.chunk_rows < 1:
            raise InputError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")

    def _check_lance(self) -> None:
        if self.previous:
            raise InputError("--format lance updates --output in place: drop --previous")
        if self.index != "none" and self.output_dtype not in ("float32", "float16"):
            raise InputError(f"--index needs float vectors, not --output-dtype "
                             f"{self.output_dtype}")

    def stage_dict(self) -> dict:
        """The settings the Ray stages need, as a plain dict."""
        return asdict(self)
