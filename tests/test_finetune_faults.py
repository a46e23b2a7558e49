"""Finetuning on Ray Train, one run of FlagEmbedding's README command: two CPU workers
(gloo) on two raylets, rank 1 killed after step 3 and the group resumed from the step-2
checkpoint; the saved model loads in `Encoder` and sentence-transformers and carries its
training instruction.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bge_core.model import Encoder
from tests.test_finetune_job import write_train_data
from tests.test_flagembedding_commands import ZH

REPO = Path(__file__).resolve().parents[1]

TWO_NODES = textwrap.dedent("""
    import json
    import sys
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.common.cli import NO_DASHBOARD_ENV, parse_config
    from pipelines.train.finetune import FinetuneConfig, run
    from tests.fault_hooks import ExitAfterStep
    from tests.test_flagembedding_commands import finetune_readme
    from pathlib import Path

    model_dir, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **NO_DASHBOARD_ENV}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # One CPU per worker on one-CPU nodes: the two workers must use both raylets.
        # FlagEmbedding's README command, the launcher swapped for --num_workers 2; the
        # rest sizes it for a test (4 steps, checkpoints every 2, a learning rate that moves
        # a tiny model).
        argv = finetune_readme(str(model_dir), str(tmp / "train.jsonl"), str(tmp / "out"),
                               batch=2)
        cfg = parse_config(FinetuneConfig, argv + [
            "--num_workers", "2", "--cpus_per_worker", "1", "--max_steps", "4",
            "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--query_max_len", "16", "--passage_max_len", "24", "--shuffle_buffer_size", "0",
            "--max_failures", "1"])
        # Rank 1 exits right after step 3 on the first attempt (the marker records it).
        result = run(cfg, on_step=ExitAfterStep(step=3, marker=str(tmp / "killed.txt")))
        print("RESULT " + json.dumps({"metrics": result.metrics, "examples": result.examples,
                                      "bad": result.skipped,
                                      "checkpoints": result.checkpoints,
                                      "output_dir": str(result.output_dir)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.fixture(scope="module")
def two_node_run(tiny_bert_dir, tmp_path_factory):
    """The run, in a separate process: this pytest process may hold the session's Ray."""
    tmp = tmp_path_factory.mktemp("finetune_two_nodes")
    write_train_data(tmp / "train.jsonl")
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tiny_bert_dir), str(tmp)],
                          cwd=REPO, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:]
    return json.loads(line[len("RESULT "):]), tmp


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_last_checkpoint(two_node_run):
    result, tmp = two_node_run
    metrics = result["metrics"]
    assert (tmp / "killed.txt").read_text().startswith("rank 1 killed after step 3")
    assert metrics["step"] == 4 and metrics["total_steps"] == 4  # ends where planned
    assert metrics["resumed_from"] == [2]  # restarted from the step-2 checkpoint
    final = sorted((tmp / "out" / "finetune").glob("checkpoint_*"))
    assert [p.name for p in final][-1] == "checkpoint_step_00000004"
    state = torch.load(final[-1] / "training_state.pt", weights_only=True)["state"]
    assert state["step"] == 4 and state["resumed_from"] == [2]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_workers_on_two_raylets_train_and_save_a_loadable_model(two_node_run, tiny_bert_dir):
    result, _ = two_node_run
    metrics = result["metrics"]
    assert result["examples"] == 16 and result["bad"] == 0
    first_attempt = result["checkpoints"][0]  # step 2, reported before the failure
    assert first_attempt["step"] == 2 and first_attempt["resumed_from"] == []
    assert first_attempt["num_nodes"] == metrics["num_nodes"] == 2  # both raylets, each time
    assert metrics["cpu_threads"] == 1  # as many torch threads as the worker's CPUs
    assert np.isfinite(metrics["loss"]) and metrics["examples_per_s"] > 0
    assert metrics["eta_s"] == 0
    texts = ["the cat is on the road", "blood and heart disease"]
    before = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").encode(texts)
    ours = Encoder.from_pretrained(result["output_dir"], device="cpu")
    after = ours.encode(texts)
    assert ours.config.query_instruction == ZH  # the training instruction is saved
    assert not np.allclose(before, after, atol=1e-4)  # the weights were trained
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(result["output_dir"], device="cpu")
    np.testing.assert_allclose(st.encode(texts), after, rtol=1e-5, atol=1e-6)
