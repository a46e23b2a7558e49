"""Every job finishes at its defaults: only its required paths, a tiny model and (training)
a few steps given; the encode pool, CPU shares, read tasks, batch sizes and search are left
as shipped.

(a) On the suite's 2-CPU local Ray (one training worker: 1.5 CPUs, half a CPU left to the
read tasks that feed it); (b) on a two-node cluster on this machine (two 2-CPU raylets,
`ray.cluster_utils.Cluster`, one training worker per node), in a process of its own
(`tests/scripts/defaults_cluster.py`) since it cannot share this one's Ray. A worker or
actor that took every CPU of its node left none to those tasks, and the job waited forever
(RetroMAE, which streams its corpus, did).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.embed_helpers import read_output
from tests.test_embed_faults import _job_env
from tests.test_evaluate_job import write_beir
from tests.test_finetune_job import unequal_files
from tests.test_mine_job import _write_data as write_mining_data
from tests.test_pretrain_retromae_job import write_corpus

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("embed_corpus", "mine_hard_negatives", "evaluate", "finetune", "pretrain_retromae")
TRAINING = ("finetune", "pretrain_retromae")


def job_settings(job: str, root: Path, model: str, workers: int = 1) -> dict[str, Any]:
    """The settings of `job` at its defaults: required paths (under `root`), the model and,
    for training, `workers` workers and a few small steps."""
    root.mkdir(parents=True, exist_ok=True)
    if job == "embed_corpus":  # the input's default is the bundled sample corpus
        return {"output": str(root / "emb"), "model": model}
    if job == "mine_hard_negatives":
        train, _, _, _ = write_mining_data(root)
        return {"input_file": str(train), "output_file": str(root / "mined.jsonl"),
                "model": model}
    if job == "evaluate":
        return {"beir_dir": str(write_beir(root / "beir")), "model": model}
    common = {"model_name_or_path": model, "output_dir": str(root / "out"),
              "num_workers": workers}
    if job == "finetune":  # 16 examples, 2 per worker: 8 / workers steps an epoch
        return {**common, "train_data": str(unequal_files(root / "data")),
                "num_train_epochs": 2, "per_device_train_batch_size": 2,
                "train_group_size": 2, "query_max_len": 16, "passage_max_len": 24}
    return {**common, "train_data": str(write_corpus(root / "corpus.jsonl")), "max_steps": 3,
            "per_device_train_batch_size": 4, "max_seq_length": 32}


def run_job(job: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in this process's Ray; what its `run` returned (training: its metrics)."""
    from pipelines.common.cli import make_config
    from pipelines.embed import main as embed_corpus
    from pipelines.embed.config import EmbedConfig
    from pipelines.search import evaluate
    from pipelines.search import mine as mine_hard_negatives
    from pipelines.train import finetune, retromae

    run, config = {"embed_corpus": (embed_corpus.run, EmbedConfig),
                   "mine_hard_negatives": (mine_hard_negatives.run,
                                           mine_hard_negatives.MineConfig),
                   "evaluate": (evaluate.run, evaluate.EvaluateConfig),
                   "finetune": (finetune.run, finetune.FinetuneConfig),
                   "pretrain_retromae": (retromae.run, retromae.RetroMAEConfig)}[job]
    result = run(make_config(config, **settings))
    return result.metrics if job in TRAINING else result


def check_result(job: str, result: dict[str, Any], settings: dict[str, Any]) -> None:
    """What each job must have produced, at its defaults."""
    if job == "embed_corpus":
        sample = ROOT / "pipelines" / "sample_data" / "corpus.jsonl"
        rows = len(sample.read_text().splitlines())
        assert result["rows_in"] == result["rows_written"] == rows
        assert len(read_output(settings["output"])) == rows  # every id once
    elif job == "mine_hard_negatives":
        lines = Path(settings["output_file"]).read_text().splitlines()
        assert len(lines) == result["examples"] == 6
        assert all(json.loads(line)["neg"] for line in lines)
    elif job == "evaluate":
        assert (result["num_queries"], result["num_docs"]) == (6, 40)
        ks = (1, 3, 5, 10, 100, 1000)  # the default --k_values
        assert {f"ndcg@{k}" for k in ks} <= set(result["metrics"])
        assert all(0.0 <= v <= 1.0 for v in result["metrics"].values()), result["metrics"]
    else:
        workers = settings["num_workers"]
        # default share on a 2-CPU node: 1.5 CPUs (0.5 kept for read tasks) -> 2 threads
        assert result["cpu_threads"] == 2 and result["num_nodes"] == workers
        if job == "finetune":  # every epoch whole on every rank, though shards are uneven
            steps = 2 * 8 // workers
            assert (result["step"], result["epoch"], result["total_steps"]) == (steps, 1, steps)
        else:
            assert result["step"] == 3
        assert np.isfinite(result["loss"])


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.timeout(420)
def test_job_finishes_at_its_defaults_on_two_cpus(job: str, ray_session, tiny_bert_dir: Path,
                                                  tmp_path: Path) -> None:
    settings = job_settings(job, tmp_path, str(tiny_bert_dir))
    check_result(job, run_job(job, settings), settings)


@pytest.mark.e2e
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_every_job_finishes_at_its_defaults_on_two_nodes(tiny_bert_dir: Path,
                                                         tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "defaults_cluster.py"),
         str(tiny_bert_dir), str(tmp_path)],
        env=_job_env(RAY_ADDRESS=""), capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = {json.loads(x[len("JOB "):])["job"]: json.loads(x[len("JOB "):])
            for x in proc.stdout.splitlines() if x.startswith("JOB ")}
    assert set(done) == set(JOBS), proc.stdout[-2000:]
    for job in JOBS:
        check_result(job, done[job]["result"], done[job]["settings"])
    print("DEFAULTS two-nodes " + json.dumps({j: done[j]["seconds"] for j in JOBS}))
