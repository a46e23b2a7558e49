"""A model soup (`bge_core.soup`): the mean of the members' weights, their settings kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bge_core.errors import InputError
from bge_core.model import Encoder
from bge_core.soup import average_encoders


def _member(tiny_bert_dir: Path, folder: Path, seed: int, **overrides) -> Encoder:
    """The tiny BERT with every floating-point weight moved by seeded noise, saved."""
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in encoder.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    encoder.save(folder)
    return encoder


def test_soup_is_the_mean_of_the_members_weights(tiny_bert_dir: Path, tmp_path: Path):
    members = [_member(tiny_bert_dir, tmp_path / f"m{i}", seed=i) for i in range(3)]
    soup = average_encoders([str(tmp_path / f"m{i}") for i in range(3)])
    states = [m.state_dict() for m in members]
    for name, value in soup.state_dict().items():
        expected = sum(s[name].double() for s in states) / 3 if value.is_floating_point() \
            else states[0][name]
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=1e-7)
    assert not torch.equal(states[0]["backbone.embeddings.word_embeddings.weight"],
                           states[1]["backbone.embeddings.word_embeddings.weight"])
    # a soup of one is that model (its weights bit for bit; its vectors to float rounding:
    # BLAS may sum in another order for another buffer's alignment); the soup encodes like
    # a model saved with its weights
    alone = average_encoders([str(tmp_path / "m0")])
    for name, value in alone.state_dict().items():
        assert torch.equal(value, states[0][name]), name
    np.testing.assert_allclose(alone.encode(["blue sky"]), members[0].encode(["blue sky"]),
                               atol=1e-6)
    saved = Encoder.from_pretrained(str(soup.save(tmp_path / "soup")), device="cpu")
    np.testing.assert_allclose(saved.encode(["the cat"]), soup.encode(["the cat"]), atol=1e-6)


def test_members_with_other_settings_or_none_are_refused(tiny_bert_dir: Path, tmp_path: Path):
    _member(tiny_bert_dir, tmp_path / "cls", seed=0)
    _member(tiny_bert_dir, tmp_path / "mean", seed=1, pooling="mean")
    with pytest.raises(InputError, match="other settings"):
        average_encoders([str(tmp_path / "cls"), str(tmp_path / "mean")])
    with pytest.raises(InputError, match="at least one"):
        average_encoders([])


def test_the_start_is_mixed_in_at_its_weight(tiny_bert_dir: Path, tmp_path: Path):
    members = [_member(tiny_bert_dir, tmp_path / f"m{i}", seed=i) for i in range(2)]
    # the start may be saved with other settings (a RetroMAE encoder is CLS-pooled)
    start = _member(tiny_bert_dir, tmp_path / "start", seed=9, pooling="mean")
    mixed = average_encoders([str(tmp_path / "m0"), str(tmp_path / "m1")],
                             start=str(tmp_path / "start"), start_weight=0.25)
    states, origin = [m.state_dict() for m in members], start.state_dict()
    for name, value in mixed.state_dict().items():
        if value.is_floating_point():
            expected = 0.75 * (states[0][name].double() + states[1][name].double()) / 2 \
                + 0.25 * origin[name].double()
            torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=1e-7)
    assert mixed.config.pooling == members[0].config.pooling != "mean"  # the members'
    # weight 0 is the plain soup, whatever the start
    plain = average_encoders([str(tmp_path / "m0"), str(tmp_path / "m1")])
    zero = average_encoders([str(tmp_path / "m0"), str(tmp_path / "m1")],
                            start=str(tmp_path / "start"), start_weight=0.0)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, zero.state_dict()[name]), name
    for bad in (1.0, -0.5):
        with pytest.raises(InputError, match=r"start weight must be in \[0, 1\)"):
            average_encoders([str(tmp_path / "m0")], start=str(tmp_path / "start"),
                             start_weight=bad)
    with pytest.raises(InputError, match="with a start model"):
        average_encoders([str(tmp_path / "m0")], start_weight=0.1)
