"""Finetuning on Ray Train (2 CPU workers, gloo): survives a killed worker; trains across two
raylets and saves a model that `Encoder` and sentence-transformers load.
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
from pipelines.finetune import run
from tests.test_finetune_job import make_config, write_train_data

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_resumes_from_last_checkpoint(ray_session, tiny_bert_dir, tmp_path,
                                                    monkeypatch):
    write_train_data(tmp_path / "train.jsonl")
    marker = tmp_path / "killed.txt"
    # Rank 1 calls os._exit right after step 3 on the first attempt (the marker records it).
    monkeypatch.setenv("BGE_FAULT_INJECT", f"3:{marker}")
    cfg = make_config(tiny_bert_dir, tmp_path, max_steps=4, save_steps=2, max_failures=1)
    result = run(cfg)
    assert marker.read_text().startswith("rank 1 killed after step 3")
    assert result.metrics["step"] == 4  # ends at the planned step count
    assert result.metrics["resumed_from"] == [2]  # restarted from the step-2 checkpoint
    final = sorted((tmp_path / "out" / "finetune").glob("checkpoint_*"))[-1]
    state = torch.load(final / "training_state.pt", weights_only=False)["state"]
    assert state["step"] == 4 and state["resumed_from"] == [2]
    assert (Path(result.output_dir) / "bge_config.json").is_file()


TWO_NODES = textwrap.dedent("""
    import json
    import sys
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.finetune import run
    from tests.test_finetune_job import make_config
    from pathlib import Path

    model_dir, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # One CPU per worker on one-CPU nodes: the two workers must use both raylets.
        result = run(make_config(model_dir, tmp, cpus_per_worker=1.0,
                                 query_instruction_for_retrieval="Q: "))
        print("RESULT " + json.dumps({"metrics": result.metrics, "examples": result.examples,
                                      "bad": result.bad_examples,
                                      "output_dir": str(result.output_dir)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_workers_on_two_raylets_train_and_save_a_loadable_model(tiny_bert_dir, tmp_path):
    # A separate process: this pytest process may already hold the session's Ray instance.
    write_train_data(tmp_path / "train.jsonl")
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tiny_bert_dir), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:]
    result = json.loads(line[len("RESULT "):])
    metrics = result["metrics"]
    assert result["examples"] == 16 and result["bad"] == 0
    assert metrics["num_nodes"] == 2  # the two workers ran on different raylets
    assert metrics["step"] == 3 and metrics["total_steps"] == 3
    assert np.isfinite(metrics["loss"]) and metrics["examples_per_s"] > 0
    assert metrics["eta_s"] == 0 and metrics["resumed_from"] == []
    texts = ["the cat is on the road", "blood and heart disease"]
    before = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").encode(texts)
    ours = Encoder.from_pretrained(result["output_dir"], device="cpu")
    after = ours.encode(texts)
    assert ours.config.query_instruction == "Q: "  # the training instruction is saved
    assert not np.allclose(before, after, atol=1e-4)  # the weights were trained
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(result["output_dir"], device="cpu")
    np.testing.assert_allclose(st.encode(texts), after, rtol=1e-5, atol=1e-6)
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "finetune").glob("checkpoint_*"))
    assert checkpoints[-1] == "checkpoint_step_00000003"
