"""What of a model trains, and how it keeps memory down: activation checkpointing in its
Hugging Face backbone(s), frozen position embeddings (FlagEmbedding's flags)."""

from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn on activation checkpointing in the (Hugging Face) backbone(s) of `model`."""
    if not enabled:
        return
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no Hugging Face backbone to checkpoint")


def freeze_position_embeddings(model: nn.Module) -> list[str]:
    """Stop training every parameter named ``*position_embeddings*`` (FlagEmbedding's
    ``--fix_position_embedding``); returns their names."""
    frozen = [name for name, p in model.named_parameters() if "position_embeddings" in name]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen
