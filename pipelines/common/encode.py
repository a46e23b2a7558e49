"""The Ray Data encoding stages shared by every job that embeds text.

Stages by resource (STYLE 7): tokenise in CPU tasks → encode on an actor pool (model loaded
once per actor, forward only, GPU when asked) → the caller writes. `encode_dataset` wires
them onto any dataset with a text column::

    ds = encode_dataset(ray.data.read_parquet(uri), EncodeOptions(model="bge-base-en-v1.5"))
    # (EncodeOptions: pipelines/common/encode_options.py)
    # adds columns: embedding (fixed-size list of float32/float16), truncated (bool),
    # _node (id of the Ray node whose actor encoded the row)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from bge_core.errors import InputError
from bge_core.loading import resolve_model, token_limit
from bge_core.presets import resolve_instruction
from bge_core.tokenization import TextTokenizer
from pipelines.common.encode_options import EncodeOptions

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

TOKENS_COLUMN = "_tokens"
NODE_COLUMN = "_node"  # the Ray node that encoded each row (for accounting)
TOKENIZE_CPUS = 0.5  # CPUs per tokenise task


@lru_cache(maxsize=4)
def tokenizer_for(model: str, max_length: int | None = None) -> TextTokenizer:
    """One tokenizer per worker process and model (CPU tasks reuse their process)."""
    resolved = resolve_model(model)
    limit = token_limit(resolved.folder, int(resolved.settings.get("max_length", 512)))
    return TextTokenizer.from_folder(resolved.folder, min(max_length or limit, limit))


def tokenize_batch(batch: pa.Table, model: str, max_length: int | None,
                   text_column: str, prefix: str) -> pa.Table:
    """CPU stage: add token ids (list<int32>) and a `truncated` flag for `text_column`."""
    texts = [prefix + t for t in batch.column(text_column).to_pylist()]
    ids, truncated = tokenizer_for(model, max_length)(texts)
    batch = batch.append_column(TOKENS_COLUMN, pa.array(ids, type=pa.list_(pa.int32())))
    return batch.append_column("truncated", pa.array(truncated, type=pa.bool_()))


class EncodeActor:
    """Actor stage: holds one `Encoder`; turns token ids into an `embedding` column."""

    def __init__(self, options: dict[str, Any],
                 embedding_dtype: Literal["float32", "float16"] = "float32",
                 threads: int = 1, calibration: list[str] | None = None) -> None:
        import torch

        from bge_core.model import Encoder

        self.options = EncodeOptions(**options)
        self.embedding_dtype = embedding_dtype
        cuda = self.options.gpus_per_actor > 0
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("gpus_per_actor > 0 but this actor sees no CUDA device")
        overrides: dict[str, Any] = {"dtype": self.options.dtype,
                                     "max_tokens_per_batch": self.options.max_tokens_per_batch}
        if self.options.max_length:
            overrides["max_length"] = self.options.max_length
        if not cuda:  # the threads `EncodeOptions.cpu_plan` gives this actor, not torch's guess
            torch.set_num_threads(threads)
        self.encoder = Encoder.from_pretrained(
            self.options.model, device="cuda" if cuda else "cpu", calibration=calibration,
            **overrides)
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        log.info("encode actor pid %d: %s on %s", os.getpid(), self.options.model,
                 self.encoder.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.column(TOKENS_COLUMN).to_pylist()
        vectors = self.encoder.encode_tokenized(rows)  # (n, D) float32
        vectors = vectors.astype(self.embedding_dtype, copy=False)
        batch = batch.drop_columns([TOKENS_COLUMN])
        batch = batch.append_column("embedding", vectors_to_arrow(vectors))
        return batch.append_column(NODE_COLUMN, pa.array([self.node] * batch.num_rows,
                                                         type=pa.string()))


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, D) array → Arrow fixed-size list column (zero-copy)."""
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow fixed-size list column → (n, D) numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _actor_pool(size: int | tuple[int, int]) -> Any:
    import ray.data

    if isinstance(size, int):
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])


def largest_node_cpus() -> float:
    """CPUs of the cluster's largest alive node (what a default CPU actor is sized to)."""
    import ray

    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]),
               default=1.0)


def actor_resources(opts: EncodeOptions, node_cpus: float) -> dict[str, Any]:
    """What each encode actor asks Ray for (GPUs, CPUs, GPU type)."""
    cpus, _ = opts.cpu_plan(node_cpus)
    return {"num_gpus": opts.gpus_per_actor or None, "num_cpus": cpus,
            "accelerator_type": opts.accelerator_type}


def calibration_texts(ds: Any, opts: EncodeOptions, text_column: str = "text",
                      prefix: str = "") -> list[str] | None:
    """The texts that calibrate int8 on every actor (None unless ``dtype="int8"``): those
    of ``--calibration``, else the first `CALIBRATION_TEXTS` of `ds` as they are encoded."""
    from bge_core.int8 import CALIBRATION_TEXTS, read_calibration

    if opts.dtype != "int8":
        return None
    if opts.calibration:
        return read_calibration(opts.calibration)
    rows = ds.select_columns([text_column]).limit(CALIBRATION_TEXTS).take_all()
    return [prefix + row[text_column] for row in rows]


def encode_dataset(ds: Any, opts: EncodeOptions, *, text_column: str = "text",
                   prefix: str = "",
                   embedding_dtype: Literal["float32", "float16"] = "float32",
                   calibration: list[str] | None = None) -> Any:
    """Add `embedding` and `truncated` columns to a Ray Dataset with a text column.

    Args:
        ds: a `ray.data.Dataset` whose `text_column` holds strings (validated upstream).
        opts: model, precision, pool size and batch sizes.
        text_column: column to embed.
        prefix: prepended to every text (a query instruction); ``""`` for passages.
        embedding_dtype: stored precision of the vectors.
        calibration: int8 calibration texts (default `calibration_texts` of `ds`).
    """
    if calibration is None:
        calibration = calibration_texts(ds, opts, text_column, prefix)
    # Ray Data fuses a task stage into the actor stage only when their remote args match;
    # GPU actors ask for GPUs and the tokeniser does not, so GPU actors never tokenise
    # between forward passes (tests check the optimized plan). A CPU actor with
    # cpus_per_actor == TOKENIZE_CPUS may absorb it, which costs no accelerator time.
    tokenized = ds.map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=opts.batch_rows,
        fn_kwargs={"model": opts.model, "max_length": opts.max_length,
                   "text_column": text_column, "prefix": prefix},
        num_cpus=TOKENIZE_CPUS,
    )
    node_cpus = largest_node_cpus()
    _, threads = opts.cpu_plan(node_cpus)
    return tokenized.map_batches(
        EncodeActor, batch_format="pyarrow", batch_size=opts.batch_rows,
        fn_constructor_kwargs={"options": asdict(opts), "embedding_dtype": embedding_dtype,
                               "threads": threads, "calibration": calibration},
        compute=_actor_pool(opts.pool_size()), **actor_resources(opts, node_cpus),
    )


def query_instruction(model: str, override: str | None) -> str:
    """The instruction queries get: `bge_core.presets.resolve_instruction`'s rule (flag left
    out: the model's own; ``""``: none), as finetuning trains with; ``""`` for none."""
    own = resolve_model(model).settings.get("query_instruction")
    return resolve_instruction(own, override) or ""


def text_dataset(texts: Sequence[str], block_rows: int) -> ray.data.Dataset:
    """A dataset of (row, text) in blocks of `block_rows`, so the encode pool gets parallelism."""
    import ray.data

    table = pa.table({"row": pa.array(np.arange(len(texts), dtype=np.int64)),
                      "text": pa.array(list(texts), type=pa.string())})
    blocks = [table.slice(i, block_rows) for i in range(0, len(texts), block_rows)]
    return ray.data.from_arrow(blocks or [table])


def encode_corpus(corpus: ray.data.Dataset, opts: EncodeOptions) -> ray.data.Dataset:
    """Lazily encoded corpus: columns ``row`` and ``embedding`` (passages: no prefix).

    Args:
        corpus: a dataset with ``row`` (its id: int64 or string) and ``text`` columns.
    """
    ds = encode_dataset(corpus.select_columns(["row", "text"]), opts)
    return ds.select_columns(["row", "embedding"])


def encode_rows(ds: ray.data.Dataset, n: int, opts: EncodeOptions, prefix: str = "") -> np.ndarray:
    """Encode a dataset of ``row`` (0..n-1) and ``text`` on Ray: (n, D) float32 by row."""
    encoded = encode_dataset(ds.select_columns(["row", "text"]), opts, prefix=prefix)
    out: np.ndarray | None = None
    for batch in encoded.select_columns(["row", "embedding"]).iter_batches(
            batch_format="pyarrow", batch_size=None):
        vectors = arrow_to_vectors(batch.column("embedding")).astype(np.float32)  # (b, D)
        if out is None:
            out = np.zeros((n, vectors.shape[1]), dtype=np.float32)
        out[batch.column("row").to_numpy()] = vectors
    if out is None:
        raise InputError("nothing to encode: no texts")
    return out


def encode_texts(texts: Sequence[str], opts: EncodeOptions, prefix: str = "") -> np.ndarray:
    """Encode a small list (queries, STS sentences) on Ray: (n, D) float32 in input order."""
    if not texts:
        raise InputError("nothing to encode: the list of texts is empty")
    return encode_rows(text_dataset(texts, opts.batch_rows), len(texts), opts, prefix)
