"""`FlagModel`: FlagEmbedding 1.0.x's inference API over `Encoder`.

The FlagEmbedding README example runs unchanged apart from the import::

    from bge_core import FlagModel
    model = FlagModel("BAAI/bge-large-zh-v1.5",
                      query_instruction_for_retrieval="为这个句子生成表示以用于检索相关文章：",
                      use_fp16=True)
    q = model.encode_queries(["query_1"]); p = model.encode(["passage_1"]); scores = q @ p.T

Semantics are FlagEmbedding's, not the model's saved settings: CLS pooling and
normalisation unless told otherwise, and a query instruction only when one is given
(`Encoder.from_pretrained` is the self-describing API that applies the model's own).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bge_core.config import Pooling
from bge_core.model import Encoder

log = logging.getLogger(__name__)


class FlagModel:
    """FlagEmbedding-compatible wrapper; `use_fp16` falls back to fp32 on CPU.

    Args:
        model_name_or_path: folder, preset name or hub id.
        pooling_method: ``cls`` (FlagEmbedding's default) or ``mean``.
        normalize_embeddings: L2-normalise the vectors.
        query_instruction_for_retrieval: prefix for `encode_queries`; None adds none,
            whatever the model was saved with (as FlagEmbedding does).
        use_fp16: fp16 on a GPU (ignored on CPU, where it is not supported).
        use_half: FlagEmbedding 1.0.0-1.0.7's name for `use_fp16` (wins when given).
        device: ``cpu``, ``cuda``...; default CUDA when available.
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooling_method: Pooling = "cls",
        normalize_embeddings: bool = True,
        query_instruction_for_retrieval: str | None = None,
        use_fp16: bool = True,
        use_half: bool | None = None,
        device: str | None = None,
    ) -> None:
        fp16 = use_fp16 if use_half is None else use_half
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if fp16 and target.type != "cuda":
            log.info("use_fp16 ignored on %s: encoding in fp32", target)
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.model = Encoder.from_pretrained(
            model_name_or_path, device=target, pooling=pooling_method,
            normalize=normalize_embeddings, query_instruction=query_instruction_for_retrieval,
            dtype="fp16" if fp16 and target.type == "cuda" else "fp32")

    def encode(self, sentences: str | Sequence[str], batch_size: int = 256,
               max_length: int = 512, convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """(n, D) float32 embeddings ((D,) for one string); a CPU tensor unless numpy."""
        return _output(self.model.encode(sentences, batch_size=batch_size,
                                         max_length=max_length), convert_to_numpy)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int = 256,
                       max_length: int = 512,
                       convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Queries with `query_instruction_for_retrieval` prepended (when one was given)."""
        return _output(self.model.encode_queries(queries, batch_size=batch_size,
                                                 max_length=max_length), convert_to_numpy)

    def encode_corpus(self, corpus: str | Sequence[str | Mapping[str, Any]],
                      batch_size: int = 256, max_length: int = 512,
                      convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Passages, never with the instruction; dicts join ``title + " " + text``."""
        return _output(self.model.encode_corpus(corpus, batch_size=batch_size,
                                                max_length=max_length), convert_to_numpy)


def _output(vectors: np.ndarray, convert_to_numpy: bool) -> np.ndarray | torch.Tensor:
    return vectors if convert_to_numpy else torch.from_numpy(vectors)
