"""`FlagModel` keeps FlagEmbedding 1.0.x's signature and semantics; `Encoder` keeps its own.

FlagEmbedding: CLS pooling, normalisation, an instruction only when one is passed.
`Encoder`: the model's saved settings (pooling, instruction) and device-aware batches.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from bge_core import Encoder, FlagModel

TEXTS = ["the cat is on the road", "blood and heart disease"]


@pytest.fixture(scope="module")
def described_model(tiny_bert_dir, tmp_path_factory):
    """A saved model describing itself as mean-pooled with a query instruction."""
    folder = tmp_path_factory.mktemp("described")
    Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean",
                            query_instruction="Own: ").save(folder)
    return folder


def _defaults(func) -> dict:
    return {name: p.default for name, p in inspect.signature(func).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_flag_model_signature_is_flagembeddings():
    init = _defaults(FlagModel.__init__)
    assert (init["pooling_method"], init["normalize_embeddings"]) == ("cls", True)
    assert init["query_instruction_for_retrieval"] is None and init["use_fp16"] is True
    for method in (FlagModel.encode, FlagModel.encode_queries, FlagModel.encode_corpus):
        assert _defaults(method) == {"batch_size": 256, "max_length": 512,
                                     "convert_to_numpy": True}
    assert list(inspect.signature(FlagModel.encode).parameters)[:4] == [
        "self", "sentences", "batch_size", "max_length"]


def test_encoder_defaults_describe_themselves():
    for method in (Encoder.encode, Encoder.encode_queries, Encoder.encode_corpus):
        defaults = _defaults(method)
        assert defaults["batch_size"] is None and defaults["max_length"] is None
    assert _defaults(Encoder.from_pretrained)["device"] is None


def test_flag_model_adds_an_instruction_only_when_given(described_model):
    encoder = Encoder.from_pretrained(str(described_model), device="cpu")
    plain = FlagModel(str(described_model), device="cpu")
    assert encoder.config.query_instruction == "Own: "  # Encoder: the model's own
    np.testing.assert_allclose(plain.encode_queries(TEXTS), plain.encode(TEXTS), atol=1e-6)
    given = FlagModel(str(described_model), query_instruction_for_retrieval="Q: ",
                      device="cpu")
    np.testing.assert_allclose(given.encode_queries(TEXTS),
                               given.encode(["Q: " + t for t in TEXTS]), atol=1e-6)


def test_flag_model_pools_cls_and_normalizes_unless_told(described_model):
    flag = FlagModel(str(described_model), device="cpu").encode(TEXTS)
    cls = Encoder.from_pretrained(str(described_model), device="cpu", pooling="cls")
    mean = Encoder.from_pretrained(str(described_model), device="cpu")  # saved: mean
    np.testing.assert_allclose(flag, cls.encode(TEXTS), atol=1e-6)
    assert not np.allclose(flag, mean.encode(TEXTS), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(flag, axis=1), 1.0, atol=1e-5)
    raw = FlagModel(str(described_model), pooling_method="mean", normalize_embeddings=False,
                    device="cpu").encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_convert_to_numpy_false_returns_a_tensor(described_model):
    model = FlagModel(str(described_model), device="cpu", use_fp16=False)
    vectors = model.encode(TEXTS)
    tensor = model.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(vectors, np.ndarray) and isinstance(tensor, torch.Tensor)
    np.testing.assert_allclose(tensor.numpy(), vectors, atol=0)
    single = model.encode_queries(TEXTS[0], convert_to_numpy=False)
    assert isinstance(single, torch.Tensor) and single.shape == (vectors.shape[1],)
    assert isinstance(model.encode_corpus(TEXTS, convert_to_numpy=False), torch.Tensor)
