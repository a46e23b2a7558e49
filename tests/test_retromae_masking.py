"""Whole-word masking for RetroMAE: rates, whole words, special tokens, decoder attention rows."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from bge_core.retromae_masking import IGNORE, RetroMAECollator, decoder_visibility
from tests.tiny_models import WORDS

# Made-up words the tiny WordPiece vocabulary splits into several pieces ("catdog" →
# cat ##d ##o ##g), so whole-word masking has multi-piece words to keep together.
COMPOUNDS = ["catdog", "sunfish", "bluebird", "xyz", "riverside", "heartbeat", "q9"]


def sentences(n: int, seed: int = 0, low: int = 4, high: int = 24) -> list[str]:
    rng = random.Random(seed)
    pool = list(WORDS) + COMPOUNDS * 6
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(low, high))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def encode(tokenizer, texts):
    """Body ids and the tokenizer's own word index per body token (the reference)."""
    enc = tokenizer(texts, add_special_tokens=False)
    return enc["input_ids"], [enc.word_ids(i) for i in range(len(texts))]


@pytest.fixture(scope="module")
def big_batch(tokenizer):
    texts = sentences(600)
    bodies, words = encode(tokenizer, texts)
    collator = RetroMAECollator(tokenizer, max_seq_length=128)
    assert max(len(b) for b in bodies) <= 126  # no truncation: rates count whole bodies
    batch = collator(bodies, torch.Generator().manual_seed(1234))
    return bodies, words, batch


def test_compound_words_really_split_into_pieces(tokenizer):
    bodies, words = encode(tokenizer, ["catdog sunfish the"])
    assert len(bodies[0]) > 3 and words[0].count(0) > 1


def test_encoder_mask_rate_and_bert_replacement(big_batch, tokenizer):
    bodies, _, batch = big_batch
    labels = batch["encoder_labels"]
    masked = labels != IGNORE
    rate = masked.sum().item() / sum(len(b) for b in bodies)
    assert abs(rate - 0.30) <= 0.02, rate
    inputs = batch["encoder_input_ids"][masked]
    share_mask = (inputs == tokenizer.mask_token_id).float().mean().item()
    share_kept = (inputs == labels[masked]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.03 and 0.06 < share_kept < 0.16
    # Unmasked positions carry the original token.
    same = batch["encoder_input_ids"] == batch["decoder_input_ids"]
    assert same[~masked & (batch["attention_mask"] == 1)].all()


def body_block(batch, row, length):
    """Hidden-from matrix of one text restricted to its body rows/columns, diagonal excluded."""
    visible = batch["decoder_attention_mask"][row, 1 : length + 1, 1 : length + 1]
    off_diagonal = ~torch.eye(length, dtype=torch.bool)
    return ~visible, off_diagonal


def test_decoder_mask_rate(big_batch):
    bodies, _, batch = big_batch
    hidden_total, cells = 0, 0
    for row, body in enumerate(bodies):
        hidden, off = body_block(batch, row, len(body))
        hidden_total += hidden[off].sum().item()
        cells += off.sum().item()
    assert abs(hidden_total / cells - 0.50) <= 0.02, hidden_total / cells


def test_whole_words_masked_together(big_batch):
    bodies, words, batch = big_batch
    for row, (body, word_of) in enumerate(zip(bodies, words)):
        n = len(body)
        same_word = torch.tensor(word_of)[:, None] == torch.tensor(word_of)[None, :]  # (n, n)
        enc = batch["encoder_labels"][row, 1 : n + 1] != IGNORE  # (n,)
        assert not ((enc[:, None] != enc[None, :]) & same_word).any(), row
        if row >= 100:  # the (n, n, n) decoder check on 100 texts is plenty (and fast)
            continue
        hidden, _ = body_block(batch, row, n)  # (n, n): row i, column j
        split = (hidden[:, :, None] != hidden[:, None, :]) & same_word  # (i, j, k)
        eye = torch.eye(n, dtype=torch.bool)
        split &= ~eye[:, :, None] & ~eye[:, None, :]  # row i's own piece is hidden anyway
        assert not split.any(), row


def test_special_tokens_never_masked(big_batch, tokenizer):
    bodies, _, batch = big_batch
    for row, body in enumerate(bodies):
        last = len(body) + 1
        ids = batch["encoder_input_ids"][row]
        assert ids[0] == tokenizer.cls_token_id and ids[last] == tokenizer.sep_token_id
        for key in ("encoder_labels", "decoder_labels"):
            assert batch[key][row, 0] == IGNORE and batch[key][row, last] == IGNORE
        visible = batch["decoder_attention_mask"][row]
        assert visible[:last, last].all()  # [SEP] hidden from no one but itself
    assert (batch["decoder_labels"] != IGNORE).sum() == sum(len(b) for b in bodies)


def test_decoder_attention_rows(big_batch):
    bodies, words, batch = big_batch
    distinct_rows, body_rows = 0, 0
    for row, body in enumerate(bodies):
        length = len(body) + 2
        visible = batch["decoder_attention_mask"][row, :length, :length]
        assert not visible.diagonal().any()  # no position sees itself
        assert visible[1:, 0].all()  # every position sees [CLS] (row 0 is [CLS] itself)
        assert visible.any(dim=1).all()  # no empty row: softmax stays finite
        assert not visible[:, length:].any() if length < visible.shape[1] else True
        if len(set(words[row])) >= 10:  # enough words that equal draws are rare
            distinct_rows += len({tuple(r.tolist()) for r in visible[1:-1]})
            body_rows += len(body)
    assert distinct_rows / body_rows > 0.95  # each position samples its own row
    pad = batch["attention_mask"] == 0
    assert not batch["decoder_attention_mask"][:, :, 1:][pad[:, None, 1:].expand(
        -1, pad.shape[1], -1)].any()  # nobody sees padding


def test_seeded_generator_reproduces_batches(tokenizer):
    bodies, _ = encode(tokenizer, sentences(20, seed=3))
    collator = RetroMAECollator(tokenizer, max_seq_length=32)
    a = collator(bodies, torch.Generator().manual_seed(7))
    b = collator(bodies, torch.Generator().manual_seed(7))
    c = collator(bodies, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder_labels"], c["encoder_labels"])


def test_truncation_and_short_texts(tokenizer):
    bodies, _ = encode(tokenizer, ["", "dog", sentences(1, low=60, high=60)[0]])
    batch = RetroMAECollator(tokenizer, max_seq_length=16)(
        bodies, torch.Generator().manual_seed(0))
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 16]
    assert batch["encoder_input_ids"][2, 15] == tokenizer.sep_token_id


def test_visibility_of_a_lone_cls_is_not_empty():
    visible = decoder_visibility(torch.zeros((1, 1), dtype=torch.bool))
    assert visible.tolist() == [[True]]


@pytest.mark.parametrize("kwargs", [{"encoder_mlm_probability": 0.0},
                                    {"decoder_mlm_probability": 1.0},
                                    {"max_seq_length": 2}])
def test_bad_settings_are_rejected(tokenizer, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetroMAECollator(tokenizer, **kwargs)
