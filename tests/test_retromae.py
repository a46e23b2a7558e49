"""RetroMAE model: no information leaks, finite losses on short texts, learning, saving."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForMaskedLM

from bge_core.model import Encoder
from bge_core.retromae import (
    load_checkpoint,
    load_retromae,
    masked_cross_entropy,
    save_checkpoint,
    save_encoder,
)
from bge_core.retromae_masking import IGNORE, RetroMAECollator
from tests.test_retromae_masking import sentences


@pytest.fixture()
def model_and_tokenizer(tiny_bert_dir):
    torch.manual_seed(0)
    return load_retromae(str(tiny_bert_dir))


def make_batch(tokenizer, texts, seed=0, max_seq_length=64):
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    collator = RetroMAECollator(tokenizer, max_seq_length=max_seq_length)
    return collator(bodies, torch.Generator().manual_seed(seed))


def test_masked_cross_entropy_matches_reference_and_is_zero_when_empty():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE, IGNORE], [1, IGNORE, 10, 0, IGNORE]])
    reference = F.cross_entropy(head(hidden).reshape(-1, 11), labels.reshape(-1),
                                ignore_index=IGNORE)
    assert torch.allclose(masked_cross_entropy(hidden, labels, head), reference, atol=1e-6)
    empty = masked_cross_entropy(hidden, torch.full_like(labels, IGNORE), head)
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(hidden.grad).all()


def test_short_texts_give_finite_losses_and_gradients(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for texts in (["", "a"], ["dog"], ["", ""]):
        out = model(**make_batch(tokenizer, texts))
        out.loss.backward()
        assert math.isfinite(out.loss.item()), texts
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), texts
        model.zero_grad()


def test_decoder_position_never_sees_its_own_token(model_and_tokenizer):
    """Changing token i leaves decoder row i's output alone, and moves rows that see it."""
    model, tokenizer = model_and_tokenizer
    model.eval()
    batch = make_batch(tokenizer, sentences(1, seed=5, low=12, high=12))
    captured = []
    hook = model.decoder.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**batch)
        i = 4
        changed = dict(batch, decoder_input_ids=batch["decoder_input_ids"].clone())
        changed["decoder_input_ids"][0, i] = tokenizer.convert_tokens_to_ids("moon")
        assert changed["decoder_input_ids"][0, i] != batch["decoder_input_ids"][0, i]
        model(**changed)
    hook.remove()
    before, after = captured[0][0], captured[1][0]  # (T, H)
    moved = (before - after).abs().amax(dim=1) > 1e-6  # (T,)
    sees_i = batch["decoder_attention_mask"][0, :, i]
    assert not moved[i]
    assert torch.equal(moved, sees_i)


def test_loss_falls_on_a_repeated_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = make_batch(tokenizer, sentences(8, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out.encoder_loss.item(), out.decoder_loss.item()))
    assert losses[-1][0] < 0.9 * losses[0][0], losses
    assert losses[-1][1] < 0.9 * losses[0][1], losses


def test_saved_encoder_is_cls_pooled_and_matches_the_backbone(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    model.eval()
    folder = save_encoder(model, tokenizer, tmp_path / "enc")
    encoder = Encoder.from_pretrained(str(folder), device="cpu")
    assert encoder.config.pooling == "cls" and encoder.config.normalize
    text = "heart disease risk"
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        cls = model.backbone(**{k: ids[k] for k in ("input_ids", "attention_mask")})[0][:, 0]
    expected = F.normalize(cls, dim=-1)[0].numpy()
    assert encoder.encode(text) == pytest.approx(expected, abs=1e-5)


def test_masked_lm_checkpoint_keeps_its_head(tiny_bert_dir, tmp_path):
    torch.manual_seed(1)
    lm = BertForMaskedLM.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        lm.cls.predictions.transform.dense.weight.fill_(0.125)
    lm.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path)
    model, _ = load_retromae(str(tmp_path))
    assert (model.lm.cls.predictions.transform.dense.weight == 0.125).all()
    fresh, _ = load_retromae(str(tiny_bert_dir))  # plain BertModel: head drawn fresh
    assert not (fresh.lm.cls.predictions.transform.dense.weight == 0.125).all()
    assert torch.equal(fresh.backbone.embeddings.word_embeddings.weight,
                       model.backbone.embeddings.word_embeddings.weight)


def test_checkpoint_round_trip_restores_every_weight(model_and_tokenizer, tmp_path, tiny_bert_dir):
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        model.decoder.ffn_in.weight.add_(1.0)
        model.lm.cls.predictions.transform.dense.bias.fill_(0.5)
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert Encoder.from_pretrained(str(folder), device="cpu").config.pooling == "cls"
    torch.manual_seed(99)
    other, _ = load_retromae(str(tiny_bert_dir))
    load_checkpoint(other, folder)
    expected = model.state_dict()
    for key, value in other.state_dict().items():
        assert torch.equal(value, expected[key]), key
