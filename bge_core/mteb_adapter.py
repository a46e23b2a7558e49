"""Let `mteb` (2.x) evaluate any `Encoder`: MTEB English, C-MTEB or single tasks.

    import mteb
    from bge_core.mteb_adapter import MtebEncoder

    model = MtebEncoder.from_pretrained("bge-base-en-v1.5")
    results = mteb.evaluate(model, mteb.get_benchmark("MTEB(eng, v2)"))

As the seed prescribes, queries get the model's query instruction on retrieval and
reranking tasks only (never on STS, classification, clustering...), passages never;
corpus documents are ``title + " " + text`` (`bge_core.texts.join_title`). `mteb` is an
optional dependency (``pip install bge-ray[mteb]``) imported only when metadata is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bge_core.model import Encoder
from bge_core.texts import join_title

INSTRUCTED_TASK_TYPES = ("Retrieval", "Reranking")


class MtebEncoder:
    """An `Encoder` behind mteb's `EncoderProtocol` (encode, similarity, metadata)."""

    def __init__(self, encoder: Encoder, *, query_instruction: str | None = None,
                 instructed_task_types: Iterable[str] = INSTRUCTED_TASK_TYPES,
                 batch_size: int | None = None) -> None:
        """Wrap `encoder`; `query_instruction` defaults to the encoder's own (None: none)."""
        self.encoder = encoder
        self.query_instruction = (encoder.config.query_instruction if query_instruction is None
                                  else query_instruction) or ""
        self.instructed_task_types = frozenset(instructed_task_types)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | None = None,
                        **overrides: Any) -> MtebEncoder:
        """Load an `Encoder` (folder, preset or hub id) and wrap it."""
        return cls(Encoder.from_pretrained(name_or_path, device=device, **overrides))

    # ------------------------------------------------------------------ protocol
    def encode(self, inputs: Iterable[Mapping[str, Any]], *, task_metadata: Any,
               hf_split: str = "", hf_subset: str = "", prompt_type: Any = None,
               **kwargs: Any) -> np.ndarray:
        """Embed mteb's batches: (n, D) float32.

        Args:
            inputs: a DataLoader of mteb batches (``text``; corpus batches also carry
                ``title`` and ``body``).
            task_metadata: the task's metadata; its ``type`` decides the instruction.
            prompt_type: ``query`` or ``document`` (mteb's `PromptType`), or None.
        """
        texts = [t for batch in inputs for t in batch_texts(batch)]
        kind = getattr(prompt_type, "value", prompt_type)
        instructed = kind == "query" and getattr(task_metadata, "type", None) \
            in self.instructed_task_types
        if instructed and self.query_instruction:
            texts = [self.query_instruction + t for t in texts]
        max_length = self.encoder.config.effective_query_max_length if kind == "query" else None
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        return self.encoder.encode(texts, batch_size=self.batch_size, max_length=max_length)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity matrix (n1, n2)."""
        a, b = _unit(embeddings1), _unit(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity of corresponding rows (n,)."""
        return (_unit(embeddings1) * _unit(embeddings2)).sum(dim=-1)

    @property
    def mteb_model_meta(self) -> Any:
        """mteb `ModelMeta` naming the model (results are stored under this name)."""
        from mteb.models.model_meta import ModelMeta

        return ModelMeta.create_empty({
            "name": meta_name(str(self.encoder.name)),
            "embed_dim": self.encoder.dim,
            "max_tokens": self.encoder.config.max_length,
            "similarity_fn_name": "cosine",
            "use_instructions": bool(self.query_instruction),
            "framework": ["PyTorch"],
        })


def meta_name(name: str) -> str:
    """``org/model`` for mteb's results folder: hub ids kept, paths and presets prefixed."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if len(parts) == 2 and not name.startswith(("/", ".")) and not Path(name).exists():
        return "/".join(re.sub(r"[^A-Za-z0-9_.\-]+", "_", p) for p in parts)
    return "bge-ray/" + (re.sub(r"[^A-Za-z0-9_.\-]+", "_", parts[-1]) if parts else "model")


def batch_texts(batch: Mapping[str, Any]) -> list[str]:
    """The texts of one mteb batch; corpus rows become ``title + " " + body``."""
    if "body" in batch and "title" in batch:
        return [join_title(title or None, body) for title, body in
                zip(batch["title"], batch["body"])]
    return [str(t) for t in batch["text"]]


def _unit(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.ndim == 1:
        t = t[None]
    return torch.nn.functional.normalize(t, dim=-1)


def main(argv: list[str] | None = None) -> int:
    """``python -m bge_core.mteb_adapter --model M (--benchmark B | --tasks T ...)``."""
    import argparse

    import mteb
    from mteb.cache import ResultCache

    parser = argparse.ArgumentParser(description="Evaluate an Encoder with mteb (hub needed).")
    parser.add_argument("--model", required=True, help="folder, preset or hub id")
    parser.add_argument("--benchmark", help='e.g. "MTEB(eng, v2)" or C-MTEB "MTEB(cmn, v1)"')
    parser.add_argument("--tasks", nargs="+", help="task names, e.g. NFCorpus SciFact")
    parser.add_argument("--query_instruction_for_retrieval", default=None,
                        help='override the model\'s instruction ("" for none)')
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output_folder", default="results/mteb")
    args = parser.parse_args(argv)
    if bool(args.benchmark) == bool(args.tasks):
        parser.error("give exactly one of --benchmark or --tasks")
    tasks = mteb.get_benchmark(args.benchmark).tasks if args.benchmark \
        else mteb.get_tasks(tasks=args.tasks)
    model = MtebEncoder(Encoder.from_pretrained(args.model, device=args.device),
                        query_instruction=args.query_instruction_for_retrieval,
                        batch_size=args.batch_size)
    result = mteb.evaluate(model, tasks, cache=ResultCache(args.output_folder))
    for task_result in result.task_results:
        print(f"{task_result.task_name}: main score {100 * task_result.get_score():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
