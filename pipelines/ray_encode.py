"""The Ray Data encoding stages shared by every job that embeds text.

Stages by resource (STYLE 7): tokenise in CPU tasks → encode on an actor pool (model loaded
once per actor, forward only, GPU when asked) → the caller writes. `encode_dataset` wires
them onto any dataset with a text column::

    ds = encode_dataset(ray.data.read_parquet(uri), EncodeOptions(model="bge-base-en-v1.5"))
    # adds columns: embedding (fixed-size list of float32/float16), truncated (bool),
    # _node (id of the Ray node whose actor encoded the row)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from bge_core.config import DType
from bge_core.loading import resolve_model
from bge_core.tokenization import TextTokenizer

log = logging.getLogger(__name__)

TOKENS_COLUMN = "_tokens"
NODE_COLUMN = "_node"  # the Ray node that encoded each row (for accounting)


@dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    """How to encode on Ray.

    Args:
        model: preset name, local folder or hub id (`Encoder.from_pretrained`).
        dtype: compute precision on the actors (fp16 needs GPUs).
        max_length: token limit (default: the model's).
        num_actors: actor pool size, ``"N"`` or autoscaling ``"MIN,MAX"``.
        gpus_per_actor: GPUs per actor; > 0 places the model on CUDA.
        accelerator_type: Ray accelerator type the actors need (e.g. ``"L4"``, ``"A100"``;
            Ray's `accelerator_type:<type>` node resource); None runs on any node.
        cpus_per_actor: CPUs per actor (fractions allowed).
        batch_rows: rows per Ray Data batch sent to an actor.
        max_tokens_per_batch: padded-token budget of one forward pass (default: the
            encoder's, 2,048 on CPU and 16,384 on GPU).
        embedding_dtype: stored precision of the vectors.
    """

    model: str
    dtype: DType = "fp32"
    max_length: int | None = None
    num_actors: str = "1"
    gpus_per_actor: float = 0.0
    accelerator_type: str | None = None
    cpus_per_actor: float = 1.0
    batch_rows: int = 1024
    max_tokens_per_batch: int | None = None
    embedding_dtype: Literal["float32", "float16"] = "float32"

    def pool_size(self) -> int | tuple[int, int]:
        """`concurrency` for Ray Data: a fixed size or a (min, max) autoscaling range."""
        parts = [p.strip() for p in str(self.num_actors).split(",")]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"num_actors must be 'N' or 'MIN,MAX', got {self.num_actors!r}") \
                from None
        if len(sizes) not in (1, 2) or min(sizes) < 1 or sizes[0] > sizes[-1]:
            raise ValueError(f"num_actors must be 'N' or 'MIN,MAX' with 1 <= MIN <= MAX, "
                             f"got {self.num_actors!r}")
        return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


@lru_cache(maxsize=4)
def _tokenizer(model: str, max_length: int | None) -> TextTokenizer:
    """One tokenizer per worker process and model (CPU tasks reuse their process)."""
    resolved = resolve_model(model)
    limit = int(resolved.settings.get("max_length", 512))
    return TextTokenizer.from_folder(resolved.folder, min(max_length or limit, limit))


def tokenize_batch(batch: pa.Table, model: str, max_length: int | None,
                   text_column: str, prefix: str) -> pa.Table:
    """CPU stage: add token ids (list<int32>) and a `truncated` flag for `text_column`."""
    texts = [prefix + t for t in batch.column(text_column).to_pylist()]
    ids, truncated = _tokenizer(model, max_length)(texts)
    batch = batch.append_column(TOKENS_COLUMN, pa.array(ids, type=pa.list_(pa.int32())))
    return batch.append_column("truncated", pa.array(truncated, type=pa.bool_()))


class EncodeActor:
    """Actor stage: holds one `Encoder`; turns token ids into an `embedding` column."""

    def __init__(self, options: dict[str, Any]) -> None:
        import torch

        from bge_core.model import Encoder

        self.options = EncodeOptions(**options)
        cuda = self.options.gpus_per_actor > 0
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("gpus_per_actor > 0 but this actor sees no CUDA device")
        overrides: dict[str, Any] = {"dtype": self.options.dtype,
                                     "max_tokens_per_batch": self.options.max_tokens_per_batch}
        if self.options.max_length:
            overrides["max_length"] = self.options.max_length
        if not cuda:  # share the actor's CPUs, not the whole node's, between torch threads
            torch.set_num_threads(max(1, int(self.options.cpus_per_actor)))
        self.encoder = Encoder.from_pretrained(
            self.options.model, device="cuda" if cuda else "cpu", **overrides)
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        log.info("encode actor pid %d: %s on %s", os.getpid(), self.options.model,
                 self.encoder.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.column(TOKENS_COLUMN).to_pylist()
        vectors = self.encoder.encode_tokenized(rows)  # (n, D) float32
        vectors = vectors.astype(self.options.embedding_dtype, copy=False)
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


def _separate_stage() -> dict[str, Any]:
    """No extra remote args; its presence stops Ray Data from fusing the CPU stage into the
    actor stage, which would make GPU actors read and tokenise between forward passes."""
    return {}


def _actor_pool(size: int | tuple[int, int]) -> Any:
    import ray.data

    if isinstance(size, int):
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])


def encode_dataset(ds: Any, opts: EncodeOptions, *, text_column: str = "text",
                   prefix: str = "") -> Any:
    """Add `embedding` and `truncated` columns to a Ray Dataset with a text column.

    Args:
        ds: a `ray.data.Dataset` whose `text_column` holds strings (validated upstream).
        opts: model, precision, pool size and batch sizes.
        text_column: column to embed.
        prefix: prepended to every text (a query instruction); ``""`` for passages.
    """
    tokenized = ds.map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=opts.batch_rows,
        fn_kwargs={"model": opts.model, "max_length": opts.max_length,
                   "text_column": text_column, "prefix": prefix},
        num_cpus=0.5, ray_remote_args_fn=_separate_stage,
    )
    return tokenized.map_batches(
        EncodeActor, batch_format="pyarrow", batch_size=opts.batch_rows,
        fn_constructor_kwargs={"options": asdict(opts)}, compute=_actor_pool(opts.pool_size()),
        num_gpus=opts.gpus_per_actor or None, num_cpus=opts.cpus_per_actor,
        accelerator_type=opts.accelerator_type,
    )
