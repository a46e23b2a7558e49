"""Encoder: API, bad input, truncation, round trip through save() and sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bge_core import Encoder, EncoderConfig, FlagModel
from bge_core.presets import EN_INSTRUCTION, PRESETS, ZH_INSTRUCTION, find_preset

TEXTS = ["the cat sat on the road", "a dog and a fish", "", "blue sky " * 80]


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", max_length=32,
                                   query_instruction="find: ")


def test_encode_shapes_and_norms(encoder: Encoder) -> None:
    out = encoder.encode(TEXTS)
    assert out.shape == (4, encoder.dim) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.encode("the cat").shape == (encoder.dim,)
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_batching_does_not_change_vectors(encoder: Encoder) -> None:
    one_by_one = np.stack([encoder.encode([t])[0] for t in TEXTS])
    batched = encoder.encode(TEXTS, batch_size=3)
    assert np.allclose(one_by_one, batched, atol=1e-5)


def test_bad_items_name_their_index(encoder: Encoder) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        encoder.encode(["ok", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"texts\[2\] is int"):
        encoder.encode(["ok", "fine", 3])  # type: ignore[list-item]


def test_long_text_truncated_at_limit(encoder: Encoder) -> None:
    ids, truncated = encoder.tokenize(TEXTS)
    assert max(len(i) for i in ids) == 32 and truncated.tolist() == [False, False, False, True]
    assert ids[3][0] == encoder.tokenizer.cls_token_id
    assert ids[3][-1] == encoder.tokenizer.sep_token_id
    longer = encoder.encode(["blue sky " * 200])
    assert np.allclose(longer, encoder.encode([TEXTS[3]]), atol=1e-6)


def test_queries_get_instruction_passages_do_not(encoder: Encoder) -> None:
    q = encoder.encode_queries(["the cat"])
    assert np.allclose(q, encoder.encode(["find: the cat"]), atol=1e-6)
    p = encoder.encode_corpus([{"title": "the cat", "text": "sat"}, "a dog"])
    assert np.allclose(p, encoder.encode(["the cat sat", "a dog"]), atol=1e-6)
    untitled = encoder.encode_corpus([{"title": "", "text": "a dog"}])
    assert np.allclose(untitled, encoder.encode(["a dog"]), atol=1e-6)


def test_forward_has_gradients(encoder: Encoder) -> None:
    ids, _ = encoder.tokenize(["the cat", "a dog"])
    from bge_core.batching import pad_batch

    input_ids, mask = pad_batch(ids, encoder.tokenizer.pad_token_id)
    encoder.train()
    out = encoder(input_ids, mask)
    # A fixed random direction, not out.sum(): the sum of a normalised, freshly initialised
    # LayerNorm output has an exactly-zero gradient (what is left is float noise, 0.0 under
    # some dropout draws), so it cannot tell a weight that trains from one that does not.
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * direction).sum().backward()
    encoder.eval()
    without = [name for name, p in encoder.named_parameters()
               if p.grad is None or not bool(p.grad.any())]
    encoder.zero_grad(set_to_none=True)
    assert out.shape == (2, encoder.dim)
    assert not without, f"weights that got no gradient: {without}"  # every weight trains


@pytest.mark.parametrize("pooling", ["cls", "mean", "last_token"])
def test_save_round_trip_and_sentence_transformers(tiny_bert_dir: Path, tmp_path: Path,
                                                   pooling: str) -> None:
    import sentence_transformers as st

    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling=pooling,
                                      max_length=24, query_instruction="q: ")
    folder = encoder.save(tmp_path / "ckpt")
    reloaded = Encoder.from_pretrained(str(folder), device="cpu")
    assert reloaded.config.saved_dict() == encoder.config.saved_dict()
    assert reloaded.fingerprint() == encoder.fingerprint()
    ours = encoder.encode(TEXTS)
    assert np.allclose(reloaded.encode(TEXTS), ours, atol=1e-6)
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.99999


def test_bare_hf_folder_defaults_to_bge_pooling(tiny_bert_dir: Path) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    assert (encoder.config.pooling, encoder.config.normalize) == ("cls", True)
    assert encoder.config.max_length == 128  # capped at the model's positions


def test_overrides_and_config_errors(tiny_bert_dir: Path) -> None:
    encoder = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", normalize=False)
    assert not np.allclose(np.linalg.norm(encoder.encode(["the cat"]), axis=1), 1.0)
    with pytest.raises(ValueError, match="unknown encoder config keys"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", poolign="cls")
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderConfig(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="fp16")


def test_missing_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="not a local folder or a known preset"):
        Encoder.from_pretrained("no-such-org/no-such-model-xyz", device="cpu")


def test_bf16_close_to_fp32(tiny_bert_dir: Path) -> None:
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").encode(TEXTS)
    bf16 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="bf16").encode(TEXTS)
    assert bf16.dtype == np.float32
    assert ((fp32 * bf16).sum(1)).min() > 0.99


def test_presets_table() -> None:
    assert len([p for p in PRESETS if p.startswith("bge-")]) == 13
    assert find_preset("BAAI/bge-base-en-v1.5").settings["query_instruction"] == EN_INSTRUCTION
    assert find_preset("bge-small-zh").settings["query_instruction"] == ZH_INSTRUCTION
    assert find_preset("bge-large-zh-noinstruct").settings["query_instruction"] is None
    for preset in PRESETS.values():
        if preset.name.startswith("bge-"):
            assert preset.settings["pooling"] == "cls" and preset.settings["normalize"]
    minilm = find_preset("sentence-transformers/all-MiniLM-L6-v2")
    assert minilm.settings == {"pooling": "mean", "normalize": True, "query_instruction": None,
                               "max_length": 256, "temperature": 0.05}


def test_flag_model_api(tiny_bert_dir: Path) -> None:
    model = FlagModel(str(tiny_bert_dir), query_instruction_for_retrieval="find: ",
                      use_fp16=True, device="cpu")
    q = model.encode_queries(["the cat"])
    p = model.encode(["the cat", "a dog"])
    assert (q @ p.T).shape == (1, 2)
    assert np.allclose(q, model.encode(["find: the cat"]), atol=1e-6)
    assert np.allclose(model.encode_corpus(["a dog"]), p[1:], atol=1e-6)
    assert model.model.config.dtype == "fp32"  # use_fp16 falls back on CPU
    assert torch.device("cpu") == model.model.device
