"""int8 encoding (`bge_core.int8`): close to fp32, built once and cached, CPU only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_core import int8
from bge_core.model import Encoder
from bge_core.precision import check_dtype

TEXTS = [
    "the cat sat on the house",
    "a dog and a bird in the tree",
    "blood protein and heart disease risk",
    "vitamin diet study of cancer patient",
    "the sun the moon and a star in the night sky",
    "fast red car on the old road to the city",
    "cold water from the river to the sea",
    "new drug effect on the cell",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One int8 cache for the module (a build takes seconds), via the environment."""
    root = tmp_path_factory.mktemp("int8_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(int8.CACHE_ENV, str(root))
        yield root


def model_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/{int8.MODEL_FILE}"))


def test_int8_vectors_close_to_fp32(tiny_bert_dir: Path, cache: Path) -> None:
    # Mean pooling: a random tiny BERT's CLS vector is nearly the same for every text.
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean", dtype="int8")
    a, b = fp32.encode(TEXTS), q8.encode(TEXTS)
    cosine = (a * b).sum(1)  # both L2-normalised
    # Noise: int8 weights (per channel) and uint8 activations (per batch) carry ~0.1-0.5%
    # relative error per matmul; 12 matmuls in 2 layers give ~1% error, a cosine ~0.9999
    # (0.99995 measured). 0.999 allows 10x that, and stays far above the cosine of two
    # different texts here (asserted), so an engine that mixes up texts fails.
    assert cosine.min() >= 0.999
    assert (a @ a.T)[~np.eye(len(TEXTS), dtype=bool)].max() < 0.99
    assert np.abs(a - b).max() > 1e-5  # the int8 path really ran: not fp32's vectors
    assert ((b @ a.T).argmax(1) == np.arange(len(TEXTS))).all()  # nearest = its own text


def test_int8_model_built_once_then_loaded_from_cache(
    tiny_bert_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    path = first.int8_backbone().path
    assert path in model_files(cache)
    mtime, entries = path.stat().st_mtime_ns, model_files(cache)

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("int8 model rebuilt despite the cache")

    monkeypatch.setattr(int8, "build_quantized", no_rebuild)
    second = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    assert path.stat().st_mtime_ns == mtime
    assert second.int8_backbone().path == path
    assert model_files(cache) == entries
    np.testing.assert_array_equal(second.encode(TEXTS), first.encode(TEXTS))
    # Within a process the session is kept: batches never rebuild or reload it.
    assert second.int8_backbone() is second.int8_backbone()


def test_int8_refused_on_gpu(tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="int8.*CPU only"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cuda", dtype="int8")
    with pytest.raises(ValueError, match="int8.*CPU only"):
        check_dtype("int8", torch.device("cuda:1"))


def test_fingerprint_and_precision_record_int8(tiny_bert_dir: Path, cache: Path) -> None:
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    assert fp32.precision == "fp32"
    assert q8.precision == int8.PRECISION
    assert q8.fingerprint() != fp32.fingerprint()
    # The cache is keyed by the int8 fingerprint, so fp32 and int8 never share an entry.
    assert q8.int8_backbone().path.parent.name.startswith(q8.fingerprint())


def test_saving_an_int8_encoder_writes_the_fp32_checkpoint(
    tiny_bert_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    q8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    saved = q8.save(tmp_path / "saved")
    # The checkpoint does not pin the precision: it loads as fp32, giving fp32's vectors.
    reloaded = Encoder.from_pretrained(str(saved), device="cpu")
    assert reloaded.config.dtype == "fp32"
    np.testing.assert_allclose(reloaded.encode(TEXTS), original.encode(TEXTS), atol=1e-6)
    # Loaded as int8 again it is the same model, so the cached int8 build is reused.
    monkeypatch.setattr(int8, "build_quantized", lambda *a, **k: pytest.fail("rebuilt"))
    again = Encoder.from_pretrained(str(saved), device="cpu", dtype="int8")
    assert again.fingerprint() == q8.fingerprint()
    np.testing.assert_array_equal(again.encode(TEXTS), q8.encode(TEXTS))


def test_int8_without_onnxruntime_says_what_to_install(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(int8.CACHE_ENV, str(tmp_path))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"bge-ray\[int8\]"):
        Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
