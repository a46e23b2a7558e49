"""The gradient-cache step equals the plain step: loss and every parameter gradient."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from bge_core.batching import pad_batch
from bge_core.grad_cache import TokenBatch, cached_step, plain_step
from bge_core.losses import info_nce
from bge_core.model import Encoder
from tests.tiny_models import WORDS

B, G = 4, 3
LOSS = functools.partial(info_nce, group_size=G, temperature=0.05)


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")


def _batch(encoder, n, seed):
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 10))) for _ in range(n)]
    ids, _ = encoder.tokenize(texts, 32)
    return TokenBatch(*pad_batch(ids, encoder.tokenizer.pad_token_id))


def _grads(encoder):
    return {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _close(got, ref):
    # Relative to the tensor's scale; the 1e-9 floor covers analytically-zero gradients
    # (attention key biases) that come out as float noise.
    return bool((got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-9)


def _assert_same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert _close(a[name], b[name]), name


def _chunked_reference(encoder, q, p, chunk):
    """Plain loss on embeddings computed chunk by chunk WITH a graph (same dropout draws
    as the cache's phase 1 when started from the same seed)."""
    embs = [encoder(c.input_ids, c.attention_mask) for c in q.chunks(chunk) + p.chunks(chunk)]
    n_q = len(q.chunks(chunk))
    loss = LOSS(torch.cat(embs[:n_q]), torch.cat(embs[n_q:]))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_cached_equals_plain_without_dropout(encoder, chunk):
    encoder.eval()
    q, p = _batch(encoder, B, 0), _batch(encoder, B * G, 1)
    encoder.zero_grad(set_to_none=True)
    ref_loss = plain_step(encoder, q, p, LOSS)
    ref = _grads(encoder)
    encoder.zero_grad(set_to_none=True)
    loss = cached_step(encoder, q, p, LOSS, chunk)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    _assert_same(_grads(encoder), ref)


def test_cached_replays_dropout(encoder):
    encoder.train()  # dropout 0.1 on: phase 3 must draw phase 1's masks again
    try:
        q, p = _batch(encoder, B, 2), _batch(encoder, B * G, 3)
        torch.manual_seed(7)
        encoder.zero_grad(set_to_none=True)
        ref_loss = _chunked_reference(encoder, q, p, 2)
        ref = _grads(encoder)
        torch.manual_seed(7)
        encoder.zero_grad(set_to_none=True)
        loss = cached_step(encoder, q, p, LOSS, 2)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
        _assert_same(_grads(encoder), ref)
        # Control: without the replay the gradients would differ (dropout is really on).
        torch.manual_seed(8)
        encoder.zero_grad(set_to_none=True)
        _chunked_reference(encoder, q, p, 2)
        other = _grads(encoder)
        assert any(not _close(other[n], ref[n]) for n in ref)
    finally:
        encoder.eval()


def test_bad_chunk_size(encoder):
    q, p = _batch(encoder, B, 0), _batch(encoder, B * G, 1)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_step(encoder, q, p, LOSS, 0)
