"""bge_core: the BGE encoder, pooling, losses and training pieces (PyTorch only, no Ray).

`Encoder`, `EncoderConfig` and `FlagModel` are imported on first use, so light modules
(`bge_core.texts`, `bge_core.io`, `bge_core.config`...) load without torch or
transformers: Ray's read/plan/write tasks import them in fresh worker processes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bge_core.config import EncoderConfig
    from bge_core.flag_model import FlagModel
    from bge_core.model import Encoder

__all__ = ["Encoder", "EncoderConfig", "FlagModel"]
_HOMES = {"Encoder": "bge_core.model", "EncoderConfig": "bge_core.config",
          "FlagModel": "bge_core.flag_model"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'bge_core' has no attribute {name!r}")
