"""Resolve `--model` (local folder, fsspec URI of a saved checkpoint, preset name or hub id)
to a local folder and its settings.

Settings are merged, later wins: defaults < sentence-transformers metadata in the folder <
preset < this project's ``bge_config.json`` < explicit overrides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bge_core.presets import find_preset, resolve_source
from bge_core.remote import fetch_folder
from bge_core.st_format import read_st_settings
from bge_core.storage import is_local, local_path

log = logging.getLogger(__name__)

BGE_CONFIG_FILE = "bge_config.json"
FORMAT_VERSION = "bge-ray/1"


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are and which encoder settings the sources agree on."""

    folder: Path
    name: str
    settings: dict[str, Any]


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; re-raise one
        raise FileNotFoundError(
            f"model {hub_id!r} is not a local folder or a known preset, and fetching it from "
            f"the Hugging Face hub failed ({type(err).__name__}: {err}). Offline? Pass a local "
            "folder, or the offline preset 'all-MiniLM-L6-v2'."
        ) from err


def read_bge_config(folder: Path) -> dict[str, Any]:
    """Settings saved by `Encoder.save` ({} when the folder has none)."""
    path = folder / BGE_CONFIG_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    data.pop("format", None)
    return data


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Find the weights folder for `name_or_path` and the settings that describe it."""
    if not is_local(name_or_path):  # a checkpoint at s3://... : a cached local copy
        resolved = resolve_model(str(fetch_folder(name_or_path)))
        return ResolvedModel(folder=resolved.folder, name=name_or_path,
                             settings=resolved.settings)
    path = Path(local_path(name_or_path)).expanduser()
    preset = None if path.is_dir() else find_preset(name_or_path)
    if path.is_dir():
        folder = path
    else:
        source = resolve_source(preset) if preset else name_or_path
        folder = Path(source) if Path(source).is_dir() else _download(source)
    st_settings = read_st_settings(folder)
    bge_settings = read_bge_config(folder)
    settings = {**st_settings, **(preset.settings if preset else {}), **bge_settings}
    if not (st_settings or preset or bge_settings):
        log.warning(
            "%s does not say how to pool (no bge_config.json, modules.json or preset): "
            "using CLS pooling + L2 normalisation, as BGE does", name_or_path
        )
    name = preset.name if preset else name_or_path
    return ResolvedModel(folder=folder, name=name, settings=settings)


def token_limit(folder: str | Path, max_length: int) -> int:
    """The most tokens the model in `folder` takes: `max_length`, within its position table
    (a checkpoint may configure more than its ``max_position_embeddings``). The one rule for
    the in-process `Encoder` and the jobs' tokenise stage alike."""
    path = Path(folder) / "config.json"
    positions = json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() \
        else None
    return min(max_length, int(positions)) if positions else max_length
