"""`FlagModel`: FlagEmbedding 1.0.x's inference API over `Encoder`.

The FlagEmbedding README example runs unchanged apart from the import::

    from bge_core import FlagModel
    model = FlagModel("BAAI/bge-large-zh-v1.5",
                      query_instruction_for_retrieval="为这个句子生成表示以用于检索相关文章：",
                      use_fp16=True)
    q = model.encode_queries(["query_1"]); p = model.encode(["passage_1"]); scores = q @ p.T
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
    """FlagEmbedding-compatible wrapper; `use_fp16` falls back to fp32 on CPU (as there)."""

    def __init__(
        self,
        model_name_or_path: str,
        pooling_method: Pooling | None = None,
        normalize_embeddings: bool | None = None,
        query_instruction_for_retrieval: str | None = None,
        use_fp16: bool = True,
        device: str | None = None,
    ) -> None:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if use_fp16 and target.type != "cuda":
            log.info("use_fp16 ignored on %s: encoding in fp32", target)
        overrides: dict[str, Any] = {"dtype": "fp16" if use_fp16 and target.type == "cuda"
                                     else "fp32"}
        if pooling_method is not None:
            overrides["pooling"] = pooling_method
        if normalize_embeddings is not None:
            overrides["normalize"] = normalize_embeddings
        if query_instruction_for_retrieval is not None:
            overrides["query_instruction"] = query_instruction_for_retrieval
        self.model = Encoder.from_pretrained(model_name_or_path, device=target, **overrides)

    def encode(self, sentences: str | Sequence[str], batch_size: int = 256,
               max_length: int = 512, convert_to_numpy: bool = True) -> np.ndarray:
        return self.model.encode(sentences, batch_size=batch_size, max_length=max_length)

    def encode_queries(self, queries: str | Sequence[str], batch_size: int = 256,
                       max_length: int = 512, convert_to_numpy: bool = True) -> np.ndarray:
        return self.model.encode_queries(queries, batch_size=batch_size, max_length=max_length)

    def encode_corpus(self, corpus: str | Sequence[str | Mapping[str, Any]],
                      batch_size: int = 256, max_length: int = 512,
                      convert_to_numpy: bool = True) -> np.ndarray:
        return self.model.encode_corpus(corpus, batch_size=batch_size, max_length=max_length)
