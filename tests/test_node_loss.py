"""Node loss (a spot instance taken away): the non-head raylet of a two-raylet cluster is
killed with its workers while a job runs.

Embedding: the job finishes on the surviving node — Ray Data retries the lost read/write
tasks (and reconstructs lost blocks from lineage), restarts the lost encode actor on the
head (`max_restarts=-1`, `max_task_retries=-1`), and the content-named parts make a
repeated write overwrite, not duplicate. The output equals a clean run on the same cluster.

Training (RetroMAE, whose step plan makes a resumed run repeat the same batches and
masks): the raylet hosting one Ray Train worker is killed after a checkpoint, a
replacement raylet joins (as an autoscaler would start one), and Ray Train
(`max_failures=1`) restarts the group from the latest checkpoint to the planned step, with
the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from tests.embed_helpers import read_output
from tests.test_embed_faults import _job_env
from tests.test_pretrain_retromae_job import write_corpus as write_texts
from tests.tiny_models import WORDS, make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # RAY_ADDRESS empty: the script starts its own cluster, never the session's Ray
    return _job_env(RAY_ADDRESS="")


def _runs(stdout: str) -> dict[str, dict]:
    runs = [json.loads(x[len("RUN "):]) for x in stdout.splitlines() if x.startswith("RUN ")]
    return {r["name"]: r for r in runs}


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_embed_job_survives_losing_a_node(tmp_path: Path) -> None:
    rng = random.Random(0)
    (tmp_path / "c").mkdir()
    for f in range(8):  # 8 files x 32 rows of 60 words: encoding is the slow stage
        ids = list(range(f * 32, (f + 1) * 32))
        texts = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in ids]
        pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "c" / f"{f}.parquet",
                       row_group_size=8)
    model = make_tiny_bert(tmp_path / "model", hidden=128, layers=4)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "node_loss_embed.py"),
         str(tmp_path / "c"), str(tmp_path / "clean"), str(tmp_path / "drill"), str(model)],
        env=_env(),
        capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = _runs(proc.stdout)
    drill, clean = runs["node_loss"], runs["clean"]
    assert drill["killed_at_s"] is not None, "the job finished before the node was killed"
    manifest = drill["manifest"]
    assert manifest["rows_in"] == manifest["rows_written"] == 8 * 32
    assert manifest["rows_rejected"] == 0
    ours, reference = read_output(tmp_path / "drill"), read_output(tmp_path / "clean")
    assert ours.keys() == reference.keys()  # each id exactly once, none lost
    for key, vector in reference.items():
        np.testing.assert_allclose(ours[key], vector, rtol=1e-5, atol=1e-6)
    print("FAULTS node-loss-embed " + json.dumps({
        "rows_in": manifest["rows_in"], "written": manifest["rows_written"],
        "rejected": manifest["rows_rejected"], "clean_s": clean["seconds"],
        "drill_s": drill["seconds"], "killed_at_s": drill["killed_at_s"],
        "rows_by_node": sorted(manifest["rows_encoded_by_node_this_attempt"].values())}))


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_training_resumes_on_a_replacement_node_with_the_same_weights(
        tiny_bert_dir: Path, tmp_path: Path) -> None:
    steps = 6
    data = write_texts(tmp_path / "texts.jsonl")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "node_loss_train.py"),
         str(tiny_bert_dir), str(data), str(tmp_path), str(steps)],
        env=_env(), capture_output=True, text=True, timeout=1450)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = _runs(proc.stdout)
    drill, clean = runs["node_loss"], runs["clean"]
    assert drill["killed_at_s"] is not None, "training finished before the node was killed"
    assert clean["metrics"]["resumed_from"] == []
    assert drill["metrics"]["step"] == clean["metrics"]["step"] == steps  # as planned
    resumed = drill["metrics"]["resumed_from"]
    assert len(resumed) == 1 and 0 < resumed[0] < steps  # from a checkpoint, not from 0
    reference = load_file(f"{clean['output_dir']}/model.safetensors")
    weights = load_file(f"{drill['output_dir']}/model.safetensors")
    assert reference.keys() == weights.keys()
    for key, value in reference.items():
        np.testing.assert_allclose(weights[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)
    print("FAULTS node-loss-train " + json.dumps({
        "clean_s": clean["seconds"], "drill_s": drill["seconds"],
        "killed_at_s": drill["killed_at_s"], "resumed_from": resumed}))
