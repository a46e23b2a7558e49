"""The encoder: a transformer backbone + pooling + optional L2 normalisation.

`Encoder` is an `nn.Module` (its `forward` gives embeddings with gradients, for training)
with FlagEmbedding-style `encode`, `encode_queries` and `encode_corpus` for inference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from bge_core.batching import pad_batch, plan_batches
from bge_core.config import DType, EncoderConfig
from bge_core.int8 import (
    CALIBRATION_TEXTS,
    Int8Backbone,
    calibration_digest,
    load_int8_backbone,
    read_calibration,
)
from bge_core.int8 import PRECISION as INT8_PRECISION
from bge_core.loading import BGE_CONFIG_FILE, FORMAT_VERSION, resolve_model, token_limit
from bge_core.packed import packed_hidden, packs
from bge_core.pooling import embed_from_hidden
from bge_core.precision import autocast_context, check_dtype, cpu_dtype
from bge_core.st_format import write_st_files
from bge_core.texts import check_texts, corpus_texts
from bge_core.tokenization import TextTokenizer

log = logging.getLogger(__name__)


class Encoder(nn.Module):
    """Text encoder: `forward(input_ids, attention_mask)` → (B, D) float32 embeddings."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EncoderConfig,
        name: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        self.name = name or getattr(backbone, "name_or_path", "")
        self._int8: Int8Backbone | None = None
        self._calibration: list[list[int]] | None = None  # token ids that calibrate int8

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, device: str | torch.device | None = None,
        calibration: str | Path | Sequence[str] | None = None, **overrides: Any
    ) -> Encoder:
        """Load from a local folder, a preset name or a hub id.

        Args:
            name_or_path: folder (ours, sentence-transformers' or plain HF), preset
                (``bge-base-en-v1.5``, ``all-MiniLM-L6-v2``) or hub id.
            device: ``cpu``, ``cuda``, ``cuda:1``...; default CUDA when available
                (``dtype="int8"`` is CPU only, so it defaults to ``cpu`` there).
            calibration: for ``dtype="int8"``: texts (or a file of them, one per line) whose
                activations calibrate the static int8 scales; the first
                `bge_core.int8.CALIBRATION_TEXTS` are used. Default: the first texts this
                encoder is asked to encode.
            **overrides: `EncoderConfig` fields (pooling, normalize, query_instruction,
                max_length, query_max_length, dtype, batch_size, max_tokens_per_batch).
        """
        resolved = resolve_model(str(name_or_path))
        config = EncoderConfig.from_dict({**resolved.settings, **overrides})
        tokenizer = AutoTokenizer.from_pretrained(resolved.folder)
        backbone = _load_backbone(resolved.folder)
        limit = token_limit(resolved.folder, config.max_length)
        if config.max_length > limit:
            log.warning("max_length %d exceeds the model's %d positions; using %d",
                        config.max_length, limit, limit)
            config = config.replace(max_length=limit)
        gpu = torch.cuda.is_available() and config.dtype != "int8"
        target = torch.device(device or ("cuda" if gpu else "cpu"))
        config = config.replace(dtype=cpu_dtype(config.dtype, target))  # bf16 → fp32 if emulated
        check_dtype(config.dtype, target)
        encoder = cls(backbone, tokenizer, config, name=resolved.name).to(target).eval()
        if config.dtype == "int8" and calibration is not None:
            encoder.set_calibration(calibration)
            encoder.int8_backbone()  # build or load the quantised model now, not mid-stream
        return encoder

    # ----------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def precision(self) -> str:
        """What the vectors are computed in, as a manifest records it: ``fp32``, ``bf16``,
        ``fp16``, or the int8 recipe (`bge_core.int8.PRECISION`)."""
        return INT8_PRECISION if self.config.dtype == "int8" else self.config.dtype

    @property
    def calibration_digest(self) -> str | None:
        """Digest of the int8 calibration token ids (None until they are set)."""
        return None if self._calibration is None else calibration_digest(self._calibration)

    # ------------------------------------------------------------------ training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a padded batch: (B, T) ids and mask → (B, D) float32, with gradients."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B,T,H)
        return embed_from_hidden(hidden, attention_mask, self.config.pooling, self.config.normalize)

    # ----------------------------------------------------------------- tokenising
    @property
    def text_tokenizer(self) -> TextTokenizer:
        """Tokeniser bound to this model's length limit (built once)."""
        if getattr(self, "_text_tokenizer", None) is None:
            self._text_tokenizer = TextTokenizer(self.tokenizer, self.config.max_length)
        return self._text_tokenizer

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[list[list[int]], np.ndarray]:
        """Token ids with special tokens, truncated at `max_length` (default the model's).

        Returns:
            (ids per text, bool array marking the texts that were truncated).
        """
        return self.text_tokenizer(texts, max_length)

    # ------------------------------------------------------------------ inference
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        # eval() and train() walk every module; on every call (each served request) that
        # walk is pure overhead, so it runs only when some module is in training mode
        training = next((m for m in (self, self.backbone) if m.training), None)
        if training is not None:
            self.eval()
        try:
            with torch.inference_mode(), autocast_context(self.config.dtype, self.device):
                yield
        finally:
            if training is not None:
                training.train()

    def set_calibration(self, texts: str | Path | Sequence[str]) -> None:
        """Calibrate int8 on `texts` (or a file of texts, one per line): the first
        `CALIBRATION_TEXTS` non-empty ones, tokenised as this encoder tokenises."""
        items = read_calibration(texts) if isinstance(texts, (str, Path)) else list(texts)
        items = [t for t in check_texts(items) if t.strip()][:CALIBRATION_TEXTS]
        if not items:
            raise ValueError("int8 calibration: no non-empty texts given")
        self.set_calibration_rows(self.tokenize(items)[0])

    def set_calibration_rows(self, rows: Sequence[Sequence[int]]) -> None:
        """Calibrate int8 on token id rows (the first `CALIBRATION_TEXTS`)."""
        self._calibration = [list(map(int, r)) for r in rows[:CALIBRATION_TEXTS]]
        self._int8 = None

    def int8_backbone(self) -> Int8Backbone:
        """The int8 OpenVINO model of these weights (built or loaded on first use).

        It is built from the weights and calibration as they are at that moment and kept;
        after changing the weights in place (training), call `reset_int8` before encoding in
        int8 again.
        """
        if self._int8 is None:
            check_dtype("int8", self.device)
            if self._calibration is None:
                raise ValueError("int8 needs calibration texts: pass calibration= to "
                                 "Encoder.from_pretrained, call set_calibration, or encode")
            self._int8 = load_int8_backbone(self.backbone, self.fingerprint(),
                                            self._calibration, torch.get_num_threads())
        return self._int8

    def reset_int8(self) -> None:
        """Forget the int8 model, so the next int8 encode uses the current weights."""
        self._int8 = None

    def _embed_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask → (B, D) embeddings in the configured precision."""
        if self.config.dtype == "int8":
            hidden = self.int8_backbone()(ids, mask)  # (B, T, H) float32 from int8 matmuls
        elif packs(self.backbone, self.device) and bool(mask[:, 0].all()):
            # dense layers on real tokens only (bge_core.packed): padding costs nothing
            hidden = packed_hidden(self.backbone, ids, mask, self.config.pooling == "cls")
        else:
            device = self.device
            return self(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        return embed_from_hidden(hidden, mask, self.config.pooling, self.config.normalize)

    def encode_tokenized(
        self, rows: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> np.ndarray:
        """Embed pre-tokenised rows in length-sorted token-budget micro-batches: (n, D)."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        pad_id = self.text_tokenizer.pad_id
        max_rows, max_tokens = self.config.batch_limits(self.device.type)
        if self.config.dtype == "int8" and self._calibration is None and rows:
            log.info("int8: calibrating on the first %d texts encoded",
                     min(len(rows), CALIBRATION_TEXTS))
            self.set_calibration_rows(rows)
        batches = plan_batches([len(r) for r in rows], max_tokens, batch_size or max_rows)
        with self._inference():
            for idx in batches:
                ids, mask = pad_batch([rows[i] for i in idx], pad_id)
                out[idx] = self._embed_batch(ids, mask).float().cpu().numpy()
        return out

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        output_dtype: str = "float32",
    ) -> np.ndarray:
        """Embed texts as given: (n, D) float32 (a single string gives a (D,) vector).

        Raises:
            TypeError: an item is not a string (the message names its index).
        """
        single = isinstance(texts, str)
        items = check_texts([texts] if single else texts)
        ids, _ = self.tokenize(items, max_length)
        out = self.encode_tokenized(ids, batch_size).astype(output_dtype, copy=False)
        return out[0] if single else out

    def encode_queries(
        self, queries: str | Sequence[str], batch_size: int | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """Embed queries with the query instruction (if the model has one) prepended."""
        single = isinstance(queries, str)
        items = check_texts([queries] if single else queries)
        prefix = self.config.query_instruction or ""
        out = self.encode([prefix + q for q in items], batch_size,
                          max_length or self.config.effective_query_max_length)
        return out[0] if single else out

    def encode_corpus(
        self, corpus: str | Sequence[str | Mapping[str, Any]], batch_size: int | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """Embed passages (never with the instruction); dicts join ``title + " " + text``."""
        single = isinstance(corpus, (str, Mapping))
        out = self.encode(corpus_texts([corpus] if single else corpus), batch_size, max_length)
        return out[0] if single else out

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> Path:
        """Write a self-describing checkpoint that `from_pretrained` and ST both load."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        record = {"format": FORMAT_VERSION, **self.config.saved_dict()}
        (folder / BGE_CONFIG_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False))
        write_st_files(folder, self.config, self.dim)
        return folder

    def fingerprint(self, dtype: DType | None = None) -> str:
        """sha256 of weights, vocabulary, saved settings and precision (unless fp32, so fp32
        fingerprints stay what they were): equal iff the vectors are.

        Args:
            dtype: the precision the vectors are computed in (default: this encoder's); a
                driver that runs on CPU names its GPU actors' fp16 this way.
        """
        precision = self.precision if dtype is None else (
            INT8_PRECISION if dtype == "int8" else dtype)
        if precision == INT8_PRECISION:  # the int8 scales depend on the calibration texts
            if self._calibration is None:
                raise ValueError("the int8 fingerprint depends on the calibration texts: "
                                 "set them first (calibration=, set_calibration)")
            precision = f"{precision}/calibration-{self.calibration_digest}"
        digest = hashlib.sha256()
        for key, tensor in sorted(self.backbone.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest.update(json.dumps(vocab, ensure_ascii=False).encode())
        described = self.config.saved_dict()
        described.pop("temperature")  # training metadata: the same vectors either way
        digest.update(json.dumps(described, sort_keys=True).encode())
        if precision != "fp32":
            digest.update(f"precision:{precision}".encode())
        return digest.hexdigest()[:16]


def _load_backbone(folder: Path) -> PreTrainedModel:
    """The bare transformer (no task head), loaded quietly: we never use BERT's pooler."""
    kwargs = {"add_pooling_layer": False} if _is_bert_like(folder) else {}
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(folder, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)


def _is_bert_like(folder: Path) -> bool:
    """BERT-family configs take `add_pooling_layer`; we never use the pooler head."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return False
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    return model_type in {"bert", "roberta", "xlm-roberta", "ernie"}
