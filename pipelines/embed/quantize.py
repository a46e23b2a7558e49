"""Stored vector formats in the embed job: int8 calibration on the corpus, the write stage's
conversion, and how the output describes its vectors (`bge_core.quantize_vectors`).

The actors always return float32 (float16 when that is the output); the write stage turns
them into the stored form. For int8 the driver first encodes the corpus's first
``calibration_rows`` valid rows on the same actor pool settings and takes each dimension's
range; the ranges are kept in ``_state/int8_ranges.json`` (a resumed run uses the same
ones), written to the manifest, and reused by incremental runs, so every stored vector of
an output shares one scale.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from bge_core.errors import InputError
from bge_core.quantize_vectors import calibrate_int8, quantize
from pipelines.common.corpus_io import Chunk
from pipelines.common.encode import arrow_to_vectors, vectors_to_arrow
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import OutputState

log = logging.getLogger("embed_corpus")
RANGES_FILE = "int8_ranges.json"


def actor_dtype(output_dtype: str) -> str:
    """What the encode actors emit for an output dtype (float16 stays float16)."""
    return "float16" if output_dtype == "float16" else "float32"


def vector_spec(cfg: EmbedConfig, state: OutputState, chunks: list[Chunk],
                previous: dict[str, Any] | None) -> dict[str, Any]:
    """The stored form of this run's vectors: ``{"dtype": ..., "int8_ranges": [[..], [..]]}``.

    Args:
        previous: the previous output's manifest in an incremental run (its ranges win).
    """
    spec: dict[str, Any] = {"dtype": cfg.output_dtype}
    if cfg.output_dtype != "int8":
        return spec
    saved = state.read_json("_state", RANGES_FILE)
    if saved is None and previous and previous.get("int8_ranges"):
        saved = {"int8_ranges": previous["int8_ranges"], "source": "previous output"}
    if saved is None:
        sample = _calibration_texts(cfg, chunks)
        from pipelines.common.encode import encode_texts

        vectors = encode_texts(sample, cfg.encode)  # (n, D) float32, on Ray
        saved = {"int8_ranges": calibrate_int8(vectors).tolist(),
                 "source": f"first {len(sample)} valid rows"}
        log.info("int8: per-dimension ranges calibrated on the first %d valid rows",
                 len(sample))
    state.write_json(saved, "_state", RANGES_FILE)
    spec["int8_ranges"] = saved["int8_ranges"]
    spec["int8_ranges_source"] = saved["source"]
    return spec


def _calibration_texts(cfg: EmbedConfig, chunks: list[Chunk]) -> list[str]:
    """The first `cfg.calibration_rows` valid texts (title joined), read chunk by chunk."""
    from pipelines.embed.stages import read_valid

    stage = cfg.stage_dict()
    texts: list[str] = []
    for chunk in chunks:
        _, valid, reasons, _ = read_valid(chunk, stage)
        texts += [t for t, r in zip(valid, reasons) if r is None and t]
        if len(texts) >= cfg.calibration_rows:
            break
    if not texts:
        raise InputError(f"{cfg.input}: no valid row to calibrate the int8 ranges on")
    return texts[: cfg.calibration_rows]


def stored_column(column: pa.ChunkedArray | pa.Array, spec: dict[str, Any] | None) -> pa.Array:
    """The write stage's conversion: a float embedding column → its stored form."""
    if spec is None or spec["dtype"] in ("float32", "float16"):
        return column
    ranges = np.asarray(spec["int8_ranges"], np.float32) if spec["dtype"] == "int8" else None
    return vectors_to_arrow(quantize(arrow_to_vectors(column), spec["dtype"], ranges))


def describe(spec: dict[str, Any], dim: int) -> dict[str, Any]:
    """Manifest fields describing the stored vectors."""
    from bge_core.quantize_vectors import bytes_per_vector

    return {"output_dtype": spec["dtype"], "bytes_per_vector": bytes_per_vector(spec["dtype"],
                                                                               dim),
            **{k: spec[k] for k in ("int8_ranges", "int8_ranges_source") if k in spec}}
