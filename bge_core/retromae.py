"""RetroMAE pretraining model: a masked-LM encoder and a one-layer enhanced decoder.

RetroMAE (Xiao et al., 2022, https://arxiv.org/abs/2205.12035), BGE's first stage. The
encoder (the BERT being pretrained, with its MLM head) reads the text with 30% of words
masked and predicts them; its [CLS] state is the sentence embedding. A single transformer
layer then reconstructs *every* token from that embedding: its query stream is the
sentence embedding plus position embeddings, its keys/values (content stream) are
``[sentence embedding, token embeddings...]``, and each position sees only its own sampled
half of the text (`retromae_masking`). Loss = encoder MLM loss + decoder reconstruction
loss, both mean cross-entropy over their targets (0 when a batch has none).

Only the encoder survives pretraining: `save_encoder` writes it as a CLS-pooled
`bge_core.model.Encoder` checkpoint that finetuning loads directly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import ACT2FN
from transformers.utils import logging as hf_logging

from bge_core.config import EncoderConfig
from bge_core.errors import InputError
from bge_core.loading import resolve_model
from bge_core.model import Encoder
from bge_core.retromae_masking import IGNORE

log = logging.getLogger(__name__)

HEADS_FILE = "retromae_heads.pt"  # MLM head + decoder layer, beside the encoder checkpoint


class RetroMAEOutput(NamedTuple):
    """Total loss (for backward) and its two parts (detached, for logging)."""

    loss: torch.Tensor
    encoder_loss: torch.Tensor
    decoder_loss: torch.Tensor


class EnhancedDecoderLayer(nn.Module):
    """A post-LayerNorm transformer layer whose queries and keys/values come from two streams.

    Args:
        hidden: model width H.
        heads: attention heads (H must divide evenly).
        intermediate: feed-forward width.
        dropout: dropout on attention probabilities and residual branches.
        eps: LayerNorm epsilon.
        activation: feed-forward activation name (``gelu``...).
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float = 0.1,
                 eps: float = 1e-12, activation: str = "gelu") -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.act = ACT2FN[activation]
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        return x.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # (B, nh, T, hd)

    def forward(
        self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, H) query stream, (B, T, H) content stream, (B, T, T) bool → (B, T, H)."""
        q, k, v = self._split(self.query(query)), self._split(self.key(content)), self._split(
            self.value(content))  # (B, nh, T, hd)
        p = self.dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], dropout_p=p)
        mixed = mixed.transpose(1, 2).reshape(query.shape)  # (B, T, H)
        x = self.attn_norm(query + F.dropout(self.attn_out(mixed), p, self.training))
        ffn = self.ffn_out(self.act(self.ffn_in(x)))  # (B, T, H)
        return self.ffn_norm(x + F.dropout(ffn, p, self.training))


def _mlm_head(lm: PreTrainedModel) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (BERT's `cls`, RoBERTa's `lm_head`)."""
    for name in ("cls", "lm_head"):
        head = getattr(lm, name, None)
        if isinstance(head, nn.Module):
            return head
    raise InputError(f"{type(lm).__name__} has no MLM head (cls / lm_head) RetroMAE can use")


def masked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module
) -> torch.Tensor:
    """Mean cross-entropy over labelled positions; exactly 0 (with a graph) when none are.

    Only labelled positions go through the vocabulary head, which keeps the (N, V) logits
    small. `hidden` (B, T, H), `labels` (B, T) with -100 for no target.
    """
    selected = labels != IGNORE  # (B, T)
    logits = head(hidden[selected])  # (N, V)
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0  # keeps the graph; a mean of nothing is NaN
    return F.cross_entropy(logits.float(), labels[selected])


class RetroMAE(nn.Module):
    """Encoder (masked LM) + enhanced decoder; `forward(**batch)` → `RetroMAEOutput`.

    Args:
        lm: a masked-LM model (``BertForMaskedLM``); its base model is the encoder kept.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        cfg = lm.config
        self.decoder = EnhancedDecoderLayer(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.hidden_dropout_prob, cfg.layer_norm_eps, cfg.hidden_act)
        self.decoder.apply(lm._init_weights)

    @property
    def backbone(self) -> PreTrainedModel:
        """The transformer being pretrained (what `save_encoder` writes)."""
        return self.lm.base_model

    def forward(
        self,
        encoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_labels: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor,
        decoder_labels: torch.Tensor,
    ) -> RetroMAEOutput:
        """One RetroMAE pass over a batch from `RetroMAECollator` (shapes there)."""
        head = _mlm_head(self.lm)
        hidden = self.backbone(input_ids=encoder_input_ids,
                               attention_mask=attention_mask)[0]  # (B, T, H)
        encoder_loss = masked_cross_entropy(hidden, encoder_labels, head)

        sentence = hidden[:, :1]  # (B, 1, H): the [CLS] embedding
        embeddings = self.backbone.embeddings
        query = embeddings(inputs_embeds=sentence.expand_as(hidden))  # (B, T, H) h_X + p_i
        tokens = embeddings(input_ids=decoder_input_ids)  # (B, T, H) e_i + p_i
        content = torch.cat([sentence, tokens[:, 1:]], dim=1)  # (B, T, H)
        decoded = self.decoder(query, content, decoder_attention_mask)  # (B, T, H)
        decoder_loss = masked_cross_entropy(decoded, decoder_labels, head)
        return RetroMAEOutput(encoder_loss + decoder_loss, encoder_loss.detach(),
                              decoder_loss.detach())


def load_retromae(name_or_path: str) -> tuple[RetroMAE, PreTrainedTokenizerBase]:
    """Build RetroMAE from a folder, preset or hub id holding a BERT-style model.

    A plain encoder folder (``BertModel``, a sentence-transformers model, our checkpoints)
    gets a freshly initialised MLM head; a ``BertForMaskedLM`` folder keeps its own.
    """
    folder = resolve_model(str(name_or_path)).folder
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        lm, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(previous)
    missing = sorted(info.get("missing_keys", []))
    head_keys = [k for k in missing if k.startswith(("cls.", "lm_head."))]
    if head_keys:
        log.info("%s has no MLM head weights: initialised %d head tensors fresh",
                 name_or_path, len(head_keys))
    body_keys = [k for k in missing if k not in head_keys]
    if body_keys:
        raise InputError(f"{name_or_path}: encoder weights missing from the checkpoint: "
                         f"{body_keys[:5]}{'...' if len(body_keys) > 5 else ''}")
    return RetroMAE(lm), AutoTokenizer.from_pretrained(folder)


def save_encoder(
    model: RetroMAE, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
    max_length: int | None = None,
) -> Path:
    """Write the pretrained encoder as a self-describing CLS-pooled `Encoder` checkpoint."""
    positions = int(model.lm.config.max_position_embeddings)
    config = EncoderConfig(pooling="cls", normalize=True, query_instruction=None,
                           max_length=min(max_length or positions, positions))
    return Encoder(model.backbone, tokenizer, config).save(directory)


def save_checkpoint(
    model: RetroMAE, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> Path:
    """The encoder as a loadable `Encoder` checkpoint, plus the heads needed to resume.

    The folder loads in `Encoder.from_pretrained` as is; `load_checkpoint` restores all of
    RetroMAE (backbone from the encoder weights, MLM head and decoder from `HEADS_FILE`).
    """
    folder = save_encoder(model, tokenizer, directory)
    backbone = f"lm.{model.lm.base_model_prefix}."
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith(backbone)}
    torch.save(heads, folder / HEADS_FILE)
    return folder


def load_checkpoint(model: RetroMAE, directory: str | Path) -> None:
    """Restore every RetroMAE weight from a `save_checkpoint` folder (strict)."""
    folder = Path(directory)
    backbone = f"lm.{model.lm.base_model_prefix}."
    shards = sorted(folder.glob("model*.safetensors"))  # one file, or shards of a big model
    weights = {backbone + k: v for shard in shards for k, v in load_file(shard).items()}
    weights.update(torch.load(folder / HEADS_FILE, map_location="cpu", weights_only=True))
    model.load_state_dict(weights, strict=True)
