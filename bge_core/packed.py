"""BERT inference without padding: the dense layers run on real tokens only.

A padded (B, T) batch spends most of its FLOPs in the dense layers (Q/K/V, attention
output, feed-forward: ≈ 24·H² per token and layer, against ≈ 4·T·H for attention), and
every padding position pays them in full. A served request of a few texts of mixed lengths
is padded to its longest and cannot be sorted against the rest of a corpus. Here the
tokens are packed into an (N, H) matrix for the dense layers and only attention sees the
padded (B, h, T, d) layout, with the mask. With CLS pooling the last layer computes
queries, attention output and feed-forward for the B [CLS] rows alone (their keys and
values still come from every token).

Same weights, same modules, same maths as Hugging Face's `BertModel` forward in eval mode
(`tests/test_packed.py` checks the states against it); used by `Encoder` for inference on
CPU (`packs`), never for training (no dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packs(backbone: nn.Module, device: torch.device) -> bool:
    """Whether `backbone` runs packed here: a plain BERT encoder (absolute positions, not a
    decoder) on CPU. Other architectures, and CUDA (unmeasured), keep the padded forward."""
    config = getattr(backbone, "config", None)
    return (device.type == "cpu" and type(backbone).__name__ == "BertModel"
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and not getattr(config, "is_decoder", False))


def packed_hidden(bert: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  cls_only: bool = False) -> torch.Tensor:
    """Last hidden states of a right-padded batch, computed on its real tokens.

    Args:
        bert: a `transformers` `BertModel` in eval mode.
        ids, mask: (B, T) token ids and attention mask, right-padded, no empty row.
        cls_only: the caller pools [CLS]: return (B, 1, H), the first token's states only.

    Returns:
        (B, T, H) states (zeros at padding), or (B, 1, H) with `cls_only`.
    """
    batch, width = ids.shape
    where = mask.reshape(-1).bool().nonzero().squeeze(1)  # (N,) flat positions of real tokens
    lengths = mask.sum(dim=1)
    first = torch.cumsum(lengths, dim=0) - lengths  # (B,) packed index of each row's [CLS]
    x = _embed(bert, ids.reshape(-1)[where], where % width)  # (N, H)
    keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys each row may attend to
    layers = list(bert.encoder.layer)
    for i, layer in enumerate(layers):
        cls_index = first if cls_only and i == len(layers) - 1 else None
        x = _layer(layer, x, where, keep, batch, width, cls_index)
    if cls_only:
        return x.unsqueeze(1)  # (B, 1, H)
    out = x.new_zeros(batch * width, x.shape[1])
    out[where] = x
    return out.view(batch, width, -1)


def _embed(bert: nn.Module, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    emb = bert.embeddings
    x = (emb.word_embeddings(token_ids) + emb.position_embeddings(positions)
         + emb.token_type_embeddings.weight[0])  # token type 0, as BertModel's default
    return emb.LayerNorm(x)


def _layer(layer: nn.Module, x: torch.Tensor, where: torch.Tensor, keep: torch.Tensor,
           batch: int, width: int, cls_index: torch.Tensor | None) -> torch.Tensor:
    """One BERT layer on packed tokens `x` (N, H); given `cls_index` (the packed index of
    each row's [CLS]), returns (B, H) for those rows only."""
    attn = layer.attention
    heads = attn.self.num_attention_heads
    size = x.shape[1] // heads

    def padded(t: torch.Tensor) -> torch.Tensor:  # (N, H) → (B, heads, T, size)
        full = t.new_zeros(batch * width, t.shape[1])
        full[where] = t
        return full.view(batch, width, heads, size).transpose(1, 2)

    key, value = padded(attn.self.key(x)), padded(attn.self.value(x))
    if cls_index is not None:
        x = x[cls_index]  # (B, H)
        query = attn.self.query(x).view(batch, heads, 1, size)
    else:
        query = padded(attn.self.query(x))
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=keep)
    context = context.transpose(1, 2).reshape(-1, heads * size)  # (B·T or B, H)
    if cls_index is None:
        context = context[where]
    x = attn.output.LayerNorm(attn.output.dense(context) + x)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
    return layer.output.LayerNorm(layer.output.dense(inner) + x)
