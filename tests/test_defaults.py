"""Every Ray Data job finishes at its defaults: only its required paths and a tiny model
given (the encode pool, read tasks, batch sizes and search left as shipped).

(a) On the suite's 2-CPU local Ray; (b) on a two-node cluster on this machine
(`ray.cluster_utils.Cluster`, two 1-CPU raylets: a default CPU actor takes a whole node, so
the read, tokenise and search tasks must find room on the other), in a process of its own
(`tests/scripts/defaults_cluster.py`) since it cannot share this one's Ray. The training
jobs' defaults are tested with the training jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.embed_helpers import read_output
from tests.test_embed_faults import _job_env
from tests.test_evaluate_job import write_beir
from tests.test_mine_job import _write_data as write_mining_data

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("embed_corpus", "mine_hard_negatives", "evaluate")


def job_settings(job: str, root: Path, model: str) -> dict[str, Any]:
    """The settings of `job` at its defaults: required paths (under `root`) and the model."""
    root.mkdir(parents=True, exist_ok=True)
    if job == "embed_corpus":  # the input's default is the bundled sample corpus
        return {"output": str(root / "emb"), "model": model}
    if job == "mine_hard_negatives":
        train, _, _, _ = write_mining_data(root)
        return {"input_file": str(train), "output_file": str(root / "mined.jsonl"),
                "model": model}
    return {"beir_dir": str(write_beir(root / "beir")), "model": model}


def run_job(job: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in this process's Ray; what its `run` returned."""
    from pipelines import embed_corpus, evaluate, mine_hard_negatives
    from pipelines.cli import make_config
    from pipelines.embed_config import EmbedConfig

    run, config = {"embed_corpus": (embed_corpus.run, EmbedConfig),
                   "mine_hard_negatives": (mine_hard_negatives.run,
                                           mine_hard_negatives.MineConfig),
                   "evaluate": (evaluate.run, evaluate.EvaluateConfig)}[job]
    return run(make_config(config, **settings))


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
    else:
        assert (result["num_queries"], result["num_docs"]) == (6, 40)
        ks = (1, 3, 5, 10, 100, 1000)  # the default --k_values
        assert {f"ndcg@{k}" for k in ks} <= set(result["metrics"])
        assert all(0.0 <= v <= 1.0 for v in result["metrics"].values()), result["metrics"]


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.timeout(300)
def test_job_finishes_at_its_defaults_on_two_cpus(job: str, ray_session, tiny_bert_dir: Path,
                                                  tmp_path: Path) -> None:
    settings = job_settings(job, tmp_path, str(tiny_bert_dir))
    check_result(job, run_job(job, settings), settings)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_every_job_finishes_at_its_defaults_on_two_nodes(tiny_bert_dir: Path,
                                                         tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "defaults_cluster.py"),
         str(tiny_bert_dir), str(tmp_path)],
        env=_job_env(RAY_ADDRESS=""), capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = {json.loads(x[len("JOB "):])["job"]: json.loads(x[len("JOB "):])
            for x in proc.stdout.splitlines() if x.startswith("JOB ")}
    assert set(done) == set(JOBS), proc.stdout[-2000:]
    for job in JOBS:
        check_result(job, done[job]["result"], done[job]["settings"])
    print("DEFAULTS two-nodes " + json.dumps({j: done[j]["seconds"] for j in JOBS}))
