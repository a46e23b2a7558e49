"""Whole-word masking for RetroMAE: the encoder's MLM input and the decoder's attention masks.

RetroMAE (Xiao et al., 2022, https://arxiv.org/abs/2205.12035) masks the encoder input
moderately (30%) and hides far more (50%) from the decoder. With *enhanced decoding* the
decoder's text is not replaced by [MASK]: each position i gets its own sampled set of
visible context tokens instead (its row of the attention mask), so every token is a target.

Masks are sampled per word (a WordPiece word is its first piece and the ``##`` pieces after
it; for SentencePiece vocabularies a word starts at a ``▁`` piece): a word is masked with
probability p, all its pieces together, so the expected share of masked tokens is exactly p.
Special tokens ([CLS], [SEP]) are never masked. All randomness comes from a caller-owned,
seeded `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from bge_core.errors import InputError

IGNORE = -100  # label of positions without a target (CrossEntropyLoss's ignore_index)


def continuation_table(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """(V,) bool: True for vocabulary pieces that continue the previous piece's word."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    sentencepiece = sum(tok.startswith("▁") for tok in vocab) > len(vocab) // 10
    for token, index in vocab.items():
        table[index] = not token.startswith("▁") if sentencepiece else token.startswith("##")
    table[list(tokenizer.all_special_ids)] = False
    return table


def word_ids(body: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Word index of each body token (no special tokens): (n,) ids → (n,) 0..n_words-1.

    A leading continuation piece (left over from truncation) starts a word of its own.
    """
    starts = ~continuation[body]  # (n,)
    if len(body):
        starts[0] = True
    return torch.cumsum(starts.long(), 0) - 1  # (n,)


def sample_word_masks(
    words: torch.Tensor, rows: int, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """`rows` independent whole-word masks: each word hidden with `probability`.

    Args:
        words: (n,) word index per token, as from `word_ids`.
        rows: how many masks to draw.
        probability: chance that one word (all its pieces) is masked.
        generator: the seeded source of randomness.

    Returns:
        (rows, n) bool, True where the token is masked.
    """
    n_words = int(words.max()) + 1 if len(words) else 0
    draws = torch.rand((rows, n_words), generator=generator) < probability  # (rows, W)
    return draws[:, words]  # (rows, n)


def decoder_visibility(hidden: torch.Tensor) -> torch.Tensor:
    """Attention rows of one text for enhanced decoding, from its sampled hidden sets.

    Args:
        hidden: (L, L) bool, row i the tokens hidden from position i over the full
            sequence ``[CLS] body [SEP]`` (special columns never hidden).

    Returns:
        (L, L) bool, True where position i may attend to position j: never itself, always
        [CLS] (column 0, the encoder's sentence embedding) for i >= 1; row 0 ([CLS], which
        has no target) sees the unhidden tokens, at least [SEP].
    """
    length = hidden.shape[0]
    visible = ~hidden  # (L, L)
    visible[:, 0] = True
    visible.fill_diagonal_(False)
    if length == 1:  # degenerate: a lone [CLS] may only see itself (it has no target)
        visible[0, 0] = True
    return visible


class RetroMAECollator:
    """Turns token id lists (no special tokens) into a padded RetroMAE batch.

    Args:
        tokenizer: the encoder's tokenizer (specials, [MASK] id, vocabulary).
        max_seq_length: longest sequence including [CLS] and [SEP]; longer bodies are cut.
        encoder_mlm_probability: share of tokens the encoder must predict (0.3 in BGE).
        decoder_mlm_probability: share of tokens hidden from each decoder position (0.5).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int = 512,
        encoder_mlm_probability: float = 0.3,
        decoder_mlm_probability: float = 0.5,
    ) -> None:
        for name, p in (("encoder_mlm_probability", encoder_mlm_probability),
                        ("decoder_mlm_probability", decoder_mlm_probability)):
            if not 0.0 < p < 1.0:
                raise InputError(f"{name} must be in (0, 1), got {p}")
        if max_seq_length < 3:
            raise InputError(f"max_seq_length must be >= 3, got {max_seq_length}")
        self.max_seq_length = max_seq_length
        self.encoder_p = encoder_mlm_probability
        self.decoder_p = decoder_mlm_probability
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id or 0
        if None in (self.cls_id, self.sep_id, self.mask_id):
            raise InputError("RetroMAE needs a tokenizer with [CLS], [SEP] and [MASK] tokens")
        self.continuation = continuation_table(tokenizer)
        special = torch.zeros(len(self.continuation), dtype=torch.bool)
        special[list(tokenizer.all_special_ids)] = True
        self.replaceable = (~special).nonzero().squeeze(1)  # ids random replacement draws from

    def __call__(
        self, bodies: Sequence[Sequence[int]], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Mask and pad a batch.

        Returns:
            encoder_input_ids (B, T) with 80% [MASK] / 10% random / 10% kept at the
            masked positions; attention_mask (B, T); encoder_labels (B, T) original ids
            at masked positions, else -100; decoder_input_ids (B, T) the unmasked text;
            decoder_attention_mask (B, T, T) bool visibility; decoder_labels (B, T)
            every body token (specials and padding -100).
        """
        if not bodies:
            raise ValueError("cannot collate an empty batch")
        limit = self.max_seq_length - 2
        rows = [torch.as_tensor(list(b)[:limit], dtype=torch.long) for b in bodies]
        width = max(len(r) for r in rows) + 2
        out = {
            "encoder_input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "encoder_labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
            "decoder_input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
            "decoder_attention_mask": torch.zeros((len(rows), width, width), dtype=torch.bool),
            "decoder_labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
        }
        out["decoder_attention_mask"][:, :, 0] = True  # padding rows: keep softmax finite
        for i, body in enumerate(rows):
            self._fill_row(out, i, body, generator)
        return out

    def _fill_row(
        self, out: dict[str, torch.Tensor], i: int, body: torch.Tensor, gen: torch.Generator
    ) -> None:
        n = len(body)
        length = n + 2
        full = torch.cat([torch.tensor([self.cls_id]), body, torch.tensor([self.sep_id])])
        words = word_ids(body, self.continuation)  # (n,)
        out["attention_mask"][i, :length] = 1
        out["decoder_input_ids"][i, :length] = full
        out["decoder_labels"][i, 1 : n + 1] = body

        enc_mask = sample_word_masks(words, 1, self.encoder_p, gen)[0]  # (n,)
        enc_ids = body.clone()
        action = torch.rand(n, generator=gen)  # BERT's 80/10/10 rule
        randoms = self.replaceable[
            torch.randint(len(self.replaceable), (n,), generator=gen)
        ]
        enc_ids = torch.where(enc_mask & (action < 0.8), self.mask_id, enc_ids)
        enc_ids = torch.where(enc_mask & (action >= 0.8) & (action < 0.9), randoms, enc_ids)
        out["encoder_input_ids"][i, :length] = torch.cat([full[:1], enc_ids, full[-1:]])
        out["encoder_labels"][i, 1 : n + 1] = torch.where(enc_mask, body, IGNORE)

        hidden = torch.zeros((length, length), dtype=torch.bool)  # (L, L)
        hidden[:, 1 : n + 1] = sample_word_masks(words, length, self.decoder_p, gen)
        out["decoder_attention_mask"][i, :length, :length] = decoder_visibility(hidden)
