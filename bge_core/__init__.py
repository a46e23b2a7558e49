"""bge_core: the BGE encoder, pooling, losses and training pieces (PyTorch only, no Ray)."""

from bge_core.config import EncoderConfig
from bge_core.flag_model import FlagModel
from bge_core.model import Encoder

__all__ = ["Encoder", "EncoderConfig", "FlagModel"]
