"""Packed (unpadded) BERT inference equals Hugging Face's padded forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bge_core import Encoder
from bge_core.batching import pad_batch
from bge_core.packed import packed_hidden, packs
from bge_core.pooling import embed_from_hidden

TEXTS = ["a", "the cat sat on the mat", "dog", "a much longer text about cats and dogs and mats",
         "hello world", "x y z"]


def _batch(encoder: Encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, _ = encoder.tokenize(texts)
    return pad_batch(rows, encoder.text_tokenizer.pad_id)


def test_packed_states_equal_the_padded_forward_at_every_real_token(tiny_bert_dir: Path) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    ids, mask = _batch(encoder, TEXTS)
    assert int(mask.sum()) < mask.numel() / 2  # mostly padding: what packing skips
    with torch.inference_mode():
        want = encoder.backbone(input_ids=ids, attention_mask=mask)[0]
        got = packed_hidden(encoder.backbone, ids, mask)
        cls = packed_hidden(encoder.backbone, ids, mask, cls_only=True)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    assert bool((got[~real] == 0).all())
    assert cls.shape == (len(TEXTS), 1, want.shape[-1])
    torch.testing.assert_close(cls[:, 0], want[:, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encode_uses_the_packed_path_and_matches_the_padded_one(
    tiny_bert_dir: Path, pooling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling=pooling)
    assert packs(encoder.backbone, encoder.device)
    calls: list[bool] = []
    real = packed_hidden

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(True)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("bge_core.model.packed_hidden", spy)
    got = encoder.encode(TEXTS, batch_size=4)
    assert calls  # the packed path ran
    ids, mask = _batch(encoder, TEXTS)
    with torch.inference_mode():
        hidden = encoder.backbone(input_ids=ids, attention_mask=mask)[0]
    want = embed_from_hidden(hidden, mask, pooling, True).numpy()  # type: ignore[arg-type]
    assert abs(got - want).max() < 1e-5


def test_bf16_packed_is_close_to_bf16_padded(tiny_bert_dir: Path) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    ids, mask = _batch(encoder, TEXTS)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = encoder.backbone(input_ids=ids, attention_mask=mask)[0].float()
        got = packed_hidden(encoder.backbone, ids, mask).float()
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 0.05  # bf16 rounding, not a different model


def test_only_cpu_bert_packs(tiny_bert_dir: Path) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    assert packs(encoder.backbone, torch.device("cpu"))
    assert not packs(encoder.backbone, torch.device("cuda"))
    assert not packs(torch.nn.Linear(2, 2), torch.device("cpu"))
