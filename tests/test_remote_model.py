"""A checkpoint saved at an S3 URI loads like a local folder, fetched once per machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bge_core import Encoder
from bge_core.remote import cache_root

TEXTS = ["the cat sat", "a dog ran in the city", ""]


def test_encoder_from_an_s3_checkpoint_equals_the_local_one(s3, tiny_bert_dir: Path,
                                                            tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BGE_RAY_CACHE", str(tmp_path / "cache"))
    local = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu",
                                    query_instruction="q: ", pooling="mean")
    local.save(tmp_path / "ft")  # what finetune writes: self-describing
    s3.put(str(tmp_path / "ft") + "/", "bucket/ft/", recursive=True)

    remote = Encoder.from_pretrained("s3://bucket/ft/", device="cpu")
    assert (remote.config.pooling, remote.config.query_instruction) == ("mean", "q: ")
    np.testing.assert_allclose(remote.encode(TEXTS), local.encode(TEXTS), atol=1e-6)
    copies = [p for p in cache_root().iterdir() if p.is_dir()]
    assert len(copies) == 1

    # fetched once: a second load reuses the copy (no download: the store may even be down)
    before = {str(p): p.stat().st_mtime_ns for p in copies[0].rglob("*")}
    Encoder.from_pretrained("s3://bucket/ft", device="cpu")
    assert {str(p): p.stat().st_mtime_ns for p in copies[0].rglob("*")} == before
    assert len([p for p in cache_root().iterdir() if p.is_dir()]) == 1

    # a checkpoint rewritten at the same URI is fetched anew
    s3.pipe("bucket/ft/extra.txt", b"a new file")
    Encoder.from_pretrained("s3://bucket/ft/", device="cpu")
    assert len([p for p in cache_root().iterdir() if p.is_dir()]) == 2


def test_a_training_output_with_folder_markers_loads(s3, tiny_bert_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    """A training job's `--output_dir` on S3 holds the model and its run folder, whose
    folder markers (keys ending in "/", as pyarrow writes them) are not files to fetch."""
    monkeypatch.setenv("BGE_RAY_CACHE", str(tmp_path / "cache"))
    Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").save(tmp_path / "ft")
    s3.put(str(tmp_path / "ft") + "/", "bucket/ft/", recursive=True)
    s3.pipe({"bucket/ft/finetune/": b"", "bucket/ft/finetune/checkpoint_1/state.pt": b"x"})
    remote = Encoder.from_pretrained("s3://bucket/ft", device="cpu")
    assert remote.encode(TEXTS).shape[0] == len(TEXTS)


def test_nothing_at_the_uri_is_a_clear_error(s3, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BGE_RAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="s3://bucket/none/.*no model files there"):
        Encoder.from_pretrained("s3://bucket/none/", device="cpu")


def test_only_what_loading_needs_is_fetched(s3, tiny_bert_dir: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    """A training output on S3: the final model beside the run's checkpoints (a loadable
    model, optimizer and RNG state each) and trainer files. Only the model's own files come
    down; the copy gives the same vectors; a new checkpoint does not invalidate the copy,
    new weights do."""
    monkeypatch.setenv("BGE_RAY_CACHE", str(tmp_path / "cache"))
    local = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="mean")
    local.save(tmp_path / "ft")
    model_files = {str(p.relative_to(tmp_path / "ft")) for p in (tmp_path / "ft").rglob("*")
                   if p.is_file()}
    s3.put(str(tmp_path / "ft") + "/", "bucket/ft/", recursive=True)
    s3.put(str(tmp_path / "ft") + "/", "bucket/ft/finetune/checkpoint_step_00000002/model/",
           recursive=True)
    s3.pipe({"bucket/ft/finetune/checkpoint_step_00000002/training_state.pt": b"state" * 100,
             "bucket/ft/finetune/result.json": b"{}",
             "bucket/ft/_state/lease.json": b"{}",
             "bucket/ft/checkpoint-500/model.safetensors": b"hf trainer checkpoint",
             "bucket/ft/optimizer.pt": b"adam moments", "bucket/ft/optimizer.bin": b"x",
             "bucket/ft/scheduler.pt": b"x", "bucket/ft/training_args.bin": b"x",
             "bucket/ft/trainer_state.json": b"{}", "bucket/ft/rng_state.pth": b"x"})

    remote = Encoder.from_pretrained("s3://bucket/ft/", device="cpu")
    (copy,) = [p for p in cache_root().iterdir() if p.is_dir()]
    fetched = {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()}
    assert fetched == model_files  # weights, tokenizer, configs, 1_Pooling/: nothing else
    assert remote.config.pooling == "mean"
    np.testing.assert_allclose(remote.encode(TEXTS), local.encode(TEXTS), atol=1e-6)

    # a later checkpoint beside the model: the same copy serves
    s3.pipe("bucket/ft/finetune/checkpoint_step_00000004/training_state.pt", b"later")
    Encoder.from_pretrained("s3://bucket/ft/", device="cpu")
    assert [p for p in cache_root().iterdir() if p.is_dir()] == [copy]
    # new weights at the same URI: fetched anew, and they are what loads
    retrained = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", pooling="cls")
    retrained.save(tmp_path / "ft2")
    s3.put(str(tmp_path / "ft2") + "/", "bucket/ft/", recursive=True)
    again = Encoder.from_pretrained("s3://bucket/ft/", device="cpu")
    assert len([p for p in cache_root().iterdir() if p.is_dir()]) == 2
    assert again.config.pooling == "cls"
    np.testing.assert_allclose(again.encode(TEXTS), retrained.encode(TEXTS), atol=1e-6)
