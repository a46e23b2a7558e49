"""What the embed job records of its model: fingerprint, pooling, limits, int8 calibration.

The record goes into ``_state/run.json`` (a resumed run must use the same model) and the
manifest; the fingerprint decides whether an incremental run may keep earlier vectors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bge_core.int8 import PRECISION as INT8_PRECISION
from bge_core.precision import cpu_dtype
from pipelines.common.corpus_io import Chunk, InputError
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import MANIFEST, OutputState
from pipelines.embed.stages import first_texts

log = logging.getLogger("embed_corpus")


def calibration_texts(cfg: EmbedConfig, chunks: list[Chunk]) -> list[str] | None:
    """int8's calibration texts: ``--calibration``'s, else the input's first ones (in plan
    order, so a resumed run calibrates, and fingerprints, as the first did)."""
    from bge_core.int8 import CALIBRATION_TEXTS, read_calibration

    if cfg.encode.dtype != "int8":
        return None
    if cfg.encode.calibration:
        return read_calibration(cfg.encode.calibration)
    if cfg.mode == "incremental" and cfg.previous:
        # a scheduled refresh calibrates as the run before it did, so unchanged rows keep
        # their vectors and the model fingerprint (the input's first texts may change)
        previous = OutputState(cfg.previous).read_json(MANIFEST) or {}
        sample = (previous.get("int8_calibration") or {}).get("sample")
        if sample:
            log.info("int8: calibrating on the previous run's %d texts", len(sample))
            return list(sample)
    return first_texts(chunks, cfg.stage_dict(), CALIBRATION_TEXTS) or None


def describe_model(cfg: EmbedConfig, calibration: list[str] | None) -> dict[str, Any]:
    """Load the model on the driver (CPU) once and describe it; check the chunk size."""
    from bge_core.model import Encoder

    enc = cfg.encode
    overrides = {"max_length": enc.max_length} if enc.max_length else {}
    encoder = Encoder.from_pretrained(enc.model, device="cpu", **overrides)
    if calibration:  # int8: the calibration texts are part of the fingerprint
        encoder.set_calibration(calibration)
    # the actors' precision is part of the fingerprint: vectors differ with it (bf16 on
    # CPU actors without native bf16 runs in fp32, as the actors will)
    dtype = cpu_dtype(enc.dtype, torch.device("cuda" if enc.gpus_per_actor else "cpu"))
    info = {"model": enc.model, "model_fingerprint": encoder.fingerprint(dtype),
            "pooling": encoder.config.pooling, "normalize": encoder.config.normalize,
            "max_length": encoder.config.max_length, "dim": encoder.dim}
    check_chunk_size(cfg, encoder)
    log.info("model %s (fingerprint %s): %s pooling, normalize=%s, max %d tokens, dim %d",
             *info.values())
    info["precision"] = INT8_PRECISION if dtype == "int8" else dtype
    if calibration:
        info["int8_calibration"] = {"texts": len(encoder._calibration or ()),
                                    "digest": encoder.calibration_digest,
                                    "source": enc.calibration or "input",
                                    "sample": calibration}
    return info


def check_chunk_size(cfg: EmbedConfig, encoder: Any) -> None:
    """A window plus the special tokens (and the title) must fit the model's limit."""
    size = cfg.chunking.chunk_tokens
    if size is None:
        return
    specials = len(encoder.tokenizer("", add_special_tokens=True)["input_ids"])
    room = encoder.config.max_length - specials
    if size > room:
        raise InputError(f"--chunk-tokens {size} does not fit the model: "
                         f"{encoder.config.max_length} tokens less {specials} special "
                         f"ones leave {room}")
    if cfg.title_column:
        log.info("chunking: the title prefixes every chunk; a chunk longer than %d tokens "
                 "with its title is truncated (counted in rows_truncated)", room)
