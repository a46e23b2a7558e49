"""sentence-transformers folder metadata: read it from, and write it beside, a model.

A folder with ``modules.json`` + ``1_Pooling/config.json`` (+ ``2_Normalize``) loads in
sentence-transformers; we write the same files so our checkpoints load there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bge_core.config import EncoderConfig
from bge_core.errors import InputError

_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last_token": "pooling_mode_lasttoken",
}
_ALL_POOLING_MODES = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def read_st_settings(folder: Path) -> dict[str, Any]:
    """Encoder settings implied by a sentence-transformers folder ({} if it is not one)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    settings: dict[str, Any] = {"normalize": any(m["type"].endswith("Normalize") for m in modules)}
    for module in modules:
        if module["type"].endswith("Pooling"):
            pooling_cfg = json.loads((folder / module["path"] / "config.json").read_text())
            modes = [m for m, key in _POOLING_KEYS.items() if pooling_cfg.get(key)]
            others = [k for k in _ALL_POOLING_MODES if pooling_cfg.get(k)]
            if len(modes) != 1 or len(others) != 1:
                raise InputError(
                    f"{folder}: pooling {others} is not supported; supported: cls, mean, last_token"
                )
            settings["pooling"] = modes[0]
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file() and json.loads(st_config.read_text()).get("max_seq_length"):
        settings["max_length"] = int(json.loads(st_config.read_text())["max_seq_length"])
    prompts_file = folder / "config_sentence_transformers.json"
    if prompts_file.is_file():
        query_prompt = (json.loads(prompts_file.read_text()).get("prompts") or {}).get("query")
        if query_prompt:
            settings["query_instruction"] = query_prompt
    return settings


def write_st_files(folder: Path, config: EncoderConfig, dim: int) -> None:
    """Write modules.json, pooling config, Normalize and length/prompt files into `folder`."""
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if config.normalize:
        kinds.append(("2_Normalize", "Normalize"))
        (folder / "2_Normalize").mkdir(exist_ok=True)
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling_cfg: dict[str, Any] = {"word_embedding_dimension": dim}
    pooling_cfg.update({key: False for key in _ALL_POOLING_MODES})
    pooling_cfg[_POOLING_KEYS[config.pooling]] = True
    pooling_cfg["include_prompt"] = True
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": config.max_length, "do_lower_case": False}, indent=2)
    )
    prompts = {"query": config.query_instruction} if config.query_instruction else {}
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts, "default_prompt_name": None,
                    "similarity_fn_name": "cosine"}, indent=2)
    )
