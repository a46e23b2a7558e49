"""Both training jobs finish at their default CPU share (`--cpus_per_worker` left out):
on the 2-CPU local Ray with one worker, and on a two-raylet cluster with one worker per
raylet (finetuning reading files of unequal size). A worker that took every CPU of its
node left none to the read tasks that feed it, and RetroMAE waited forever."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.finetune import FinetuneConfig
from pipelines.finetune import run as finetune
from pipelines.pretrain_retromae import RetroMAEConfig
from pipelines.pretrain_retromae import run as pretrain
from tests.test_finetune_job import write_train_data
from tests.test_pretrain_retromae_job import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def unequal_files(folder: Path) -> Path:
    """16 finetuning examples in three files of 9, 2 and 5."""
    folder.mkdir()
    for name, n, seed in (("a", 9, 0), ("b", 2, 1), ("c", 5, 2)):
        write_train_data(folder / f"{name}.jsonl", n=n, seed=seed)
    return folder


@pytest.mark.timeout(420)
def test_finetune_at_its_defaults_on_the_local_ray(ray_session, tiny_bert_dir, tmp_path,
                                                   caplog):
    cfg = FinetuneConfig(model_name_or_path=str(tiny_bert_dir),
                         train_data=str(unequal_files(tmp_path / "data")),
                         output_dir=str(tmp_path / "out"), max_steps=3, train_group_size=2,
                         query_max_len=16, passage_max_len=24)
    with caplog.at_level(logging.INFO, logger="bge.train"):
        result = finetune(cfg)
    assert "1 worker(s), 1.5 CPU(s) each, 2 torch thread(s) each" in caplog.text
    assert result.metrics["step"] == 3 and result.metrics["cpu_threads"] == 2
    assert np.isfinite(result.metrics["loss"])


@pytest.mark.timeout(420)
def test_retromae_at_its_defaults_on_the_local_ray(ray_session, tiny_bert_dir, tmp_path,
                                                   caplog):
    cfg = RetroMAEConfig(model_name_or_path=str(tiny_bert_dir),
                         train_data=str(write_corpus(tmp_path / "corpus.jsonl")),
                         output_dir=str(tmp_path / "out"), max_steps=3,
                         per_device_train_batch_size=4, max_seq_length=32)
    with caplog.at_level(logging.INFO, logger="bge.train"):
        result = pretrain(cfg)
    assert "1 worker(s), 1.5 CPU(s) each, 2 torch thread(s) each" in caplog.text
    assert result.metrics["step"] == 3 and result.metrics["cpu_threads"] == 2
    assert np.isfinite(result.metrics["loss"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_both_jobs_at_their_defaults_on_two_raylets(tiny_bert_dir, tmp_path):
    data = unequal_files(tmp_path / "data")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "two_nodes_train_defaults.py"),
         str(tiny_bert_dir), str(data), str(corpus), str(tmp_path)],
        env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True,
        timeout=850)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {r["name"]: r for r in (json.loads(x[len("RUN "):])
                                   for x in proc.stdout.splitlines() if x.startswith("RUN "))}
    finetuned, pretrained = runs["finetune"]["metrics"], runs["retromae"]["metrics"]
    # 16 examples over 2 workers x 2 per batch: 4 steps an epoch, 2 epochs, every one whole
    assert (finetuned["step"], finetuned["epoch"], finetuned["total_steps"]) == (8, 1, 8)
    assert pretrained["step"] == 3
    for metrics in (finetuned, pretrained):  # one worker per raylet, 1.5 CPUs -> 2 threads
        assert metrics["num_nodes"] == 2 and metrics["cpu_threads"] == 2
        assert np.isfinite(metrics["loss"])
