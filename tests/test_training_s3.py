"""Both training jobs with `--train_data` and `--output_dir` on `s3://` (the moto server on
loopback), run as their CLIs in a process of their own that starts its own Ray: the read
tasks, the workers' checkpoints and the final export all go through S3. Tens of seconds
each (a Ray start and a Ray Train run), so `long`; `tests/test_io.py` reads ranges from
S3 in the main suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bge_core.model import Encoder
from bge_core.retromae import HEADS_FILE
from tests.test_finetune_job import write_train_data
from tests.test_pretrain_retromae_job import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _run_job(script: str, cwd: Path, *flags: str) -> str:
    """The job's CLI in its own process and Ray (the `s3` fixture's AWS settings inherited)."""
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *flags,
                           "--num_workers", "1", "--cpus_per_worker", "0.5",
                           "--max_steps", "2", "--save_steps", "1", "--logging_steps", "1",
                           "--per_device_train_batch_size", "4"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(cwd.iterdir()), "state leaked to a local folder"
    return proc.stdout


def _check_model_on_s3(fs, prefix: str, run_name: str) -> Encoder:
    """The final model and the run's checkpoints are on S3; the model loads from there."""
    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"bucket/{prefix}/")}
    assert {"model.safetensors", "bge_config.json", "modules.json", run_name} <= names
    checkpoints = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"bucket/{prefix}/{run_name}/")
                         if "checkpoint_" in p)
    assert checkpoints[-1] == "checkpoint_step_00000002"
    return Encoder.from_pretrained(f"s3://bucket/{prefix}", device="cpu")


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_retromae_reads_and_writes_s3(tiny_bert_dir, s3, tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", n=12)
    s3.put(str(tmp_path / "corpus.jsonl"), "bucket/text/corpus.jsonl")
    (tmp_path / "cwd").mkdir()
    out = _run_job("pretrain_retromae.py", tmp_path / "cwd",
                   "--model_name_or_path", str(tiny_bert_dir),
                   "--train_data", "s3://bucket/text/", "--output_dir", "s3://bucket/retromae",
                   "--max_seq_length", "32", "--rows_per_range", "5")
    assert "RetroMAE done: 2 steps on 12 texts (3 empty skipped)" in out
    encoder = _check_model_on_s3(s3, "retromae", "retromae")
    assert encoder.config.pooling == "cls"
    assert not s3.exists(f"bucket/retromae/{HEADS_FILE}")  # resume-only heads stay


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_finetune_reads_and_writes_s3(tiny_bert_dir, s3, tmp_path):
    write_train_data(tmp_path / "train.jsonl", n=12)
    s3.put(str(tmp_path / "train.jsonl"), "bucket/train/part-0.jsonl")
    (tmp_path / "cwd").mkdir()
    _run_job("finetune.py", tmp_path / "cwd", "--model_name_or_path", str(tiny_bert_dir),
             "--train_data", "s3://bucket/train/", "--output_dir", "s3://bucket/ft",
             "--train_group_size", "2", "--query_max_len", "16", "--passage_max_len", "24",
             "--query_instruction_for_retrieval", "q: ")
    encoder = _check_model_on_s3(s3, "ft", "finetune")
    assert encoder.config.query_instruction == "q: "  # the training instruction, saved
