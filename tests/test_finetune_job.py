"""The finetuning job: flags, CLI errors, bad data, export and step planning.

The Ray Train runs themselves (two workers across two raylets; a killed worker resuming)
are in test_finetune_faults.py.
"""

from __future__ import annotations

import json
import random

import pytest

from bge_core.model import Encoder
from pipelines.common.cli import ConfigError, parse_config
from pipelines.train.finetune import FinetuneConfig, main, run
from tests.tiny_models import WORDS


def write_train_data(path, n=16, seed=0):
    """`n` FlagEmbedding-style examples built from the tiny vocabulary."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choices(WORDS, k=k))

    rows = [{"query": text(4), "pos": [text(8)], "neg": [text(8) for _ in range(3)]}
            for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def unequal_files(folder):
    """16 finetuning examples in three files of 9, 2 and 5 (uneven shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("a", 9, 0), ("b", 2, 1), ("c", 5, 2)):
        write_train_data(folder / f"{name}.jsonl", n=n, seed=seed)
    return folder


def make_config(tiny_bert_dir, tmp_path, **overrides):
    values = dict(
        model_name_or_path=str(tiny_bert_dir), train_data=str(tmp_path / "train.jsonl"),
        output_dir=str(tmp_path / "out"), train_group_size=2, query_max_len=16,
        passage_max_len=24, per_device_train_batch_size=2, max_steps=3, save_steps=2,
        logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0, num_workers=2,
        cpus_per_worker=0.5, negatives_cross_device=True, max_failures=1,
        shuffle_buffer_size=0, temperature=0.05)
    values.update(overrides)
    return FinetuneConfig(**values)


def test_config_flags_follow_flagembedding(tmp_path):
    cfg = parse_config(FinetuneConfig, [
        "--model_name_or_path", "m", "--train_data", "d.jsonl", "--output_dir", "o",
        "--train_group_size", "4", "--negatives_cross_device", "--temperature", "0.01",
        "--query_instruction_for_retrieval", "Represent: ", "--gradient-cache-chunk-size", "8"])
    assert (cfg.train_group_size, cfg.negatives_cross_device, cfg.temperature) == (4, True, 0.01)
    assert cfg.gradient_cache_chunk_size == 8 and cfg.query_instruction_for_retrieval
    assert FinetuneConfig(model_name_or_path="m", train_data="d", output_dir="o").temperature \
        is None  # the model's own (`train_temperature`)


@pytest.mark.parametrize("flags, message", [
    (["--train_group_size", "0"], "train_group_size"),
    (["--fp16", "--bf16"], "exclusive"),
    (["--temperature", "0"], "temperature"),
    (["--max_steps", "0"], "max_steps"),
])
def test_bad_flags_are_named(flags, message):
    base = ["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o"]
    with pytest.raises(ConfigError, match=message):
        parse_config(FinetuneConfig, base + flags)


def test_cli_exits_nonzero_with_one_message_on_missing_data(tmp_path, capsys):
    code = main(["--model_name_or_path", "m", "--train_data", str(tmp_path / "none.jsonl"),
                 "--output_dir", str(tmp_path / "o")])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert code == 2 and line.startswith("finetune: error: ")
    assert "training data not found" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_examples_stop_the_job_or_are_counted(ray_session, tiny_bert_dir, tmp_path):
    from bge_core.data import TrainingDataError
    from pipelines.train.finetune import read_dataset

    path = write_train_data(tmp_path / "train.jsonl", n=4)
    with path.open("a") as handle:
        handle.write('{"query": "q", "pos": []}\n{"query": "q2", "pos": ["p"], "neg": 3}\n')
    cfg = make_config(tiny_bert_dir, tmp_path)
    with pytest.raises(TrainingDataError, match=r"train.jsonl line 5: 'pos' is empty"):
        run(cfg)
    dataset, good, bad = read_dataset(make_config(tiny_bert_dir, tmp_path,
                                                  skip_bad_examples=True))
    assert (good, bad) == (4, 2) and dataset.count() == 4
    assert set(dataset.columns()) == {"key", "query", "pos", "neg"}


def test_final_model_export_to_an_fsspec_uri(tiny_bert_dir, tmp_path):
    import fsspec

    from pipelines.train.driver import export_model

    saved = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").save(tmp_path / "m")
    assert export_model(saved, "memory://bge-ft/out") == "memory://bge-ft/out"
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.find("/bge-ft/out")}
    assert {"bge_config.json", "modules.json", "config.json"} <= names
    local = tmp_path / "copied"
    fs.get("/bge-ft/out", str(local), recursive=True)
    assert Encoder.from_pretrained(str(local), device="cpu").fingerprint() == \
        Encoder.from_pretrained(str(saved), device="cpu").fingerprint()


def test_plan_steps_gives_every_worker_whole_equal_batches(tiny_bert_dir, tmp_path):
    from bge_core.data import TrainingDataError
    from pipelines.train.finetune import plan_steps

    cfg = make_config(tiny_bert_dir, tmp_path, max_steps=None, num_train_epochs=2)
    assert plan_steps(cfg, 17) == (4, 8)  # 17 // 2 workers = 8 rows = 4 batches of 2
    assert plan_steps(make_config(tiny_bert_dir, tmp_path, max_steps=5), 17) == (4, 5)
    with pytest.raises(TrainingDataError, match="too few.*--per_device_train_batch_size 1 or less"):
        plan_steps(cfg, 3)  # 3 rows over 2 workers: one row each at most


# ------------------------------------------------------- resume (Ray Train, slow)
def _resume_config(tiny_bert_dir, data, out):
    """2 workers, files of unequal size, 4 steps an epoch and 5 in all (the resumed run
    crosses into epoch 1), a checkpoint every 2 steps, dropout on (the tiny BERT's 0.1),
    listed positives masked (their keys travel with each step)."""
    return make_config(tiny_bert_dir, data.parent, train_data=str(data), output_dir=str(out),
                       max_steps=5, shuffle_buffer_size=4, negatives_cross_device=False,
                       mask_listed_positives=True)


@pytest.fixture(scope="module")
def uninterrupted_finetune(ray_session, tiny_bert_dir, tmp_path_factory):

    root = tmp_path_factory.mktemp("finetune_resume")
    data = unequal_files(root / "data")
    return run(_resume_config(tiny_bert_dir, data, root / "plain")), data


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # a Ray Train start is ~30 s idle, minutes on a busy box
def test_resume_after_a_killed_worker_matches_the_uninterrupted_run(
        uninterrupted_finetune, tiny_bert_dir, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from tests.fault_hooks import ExitAfterStep

    plain, data = uninterrupted_finetune
    marker = tmp_path / "killed"
    resumed = run(_resume_config(tiny_bert_dir, data, tmp_path / "out"),
                  on_step=ExitAfterStep(step=3, marker=str(marker)))  # rank 1 dies after 3
    assert marker.exists() and plain.metrics["resumed_from"] == []
    assert resumed.metrics["resumed_from"] == [2]  # killed before step 3's checkpoint
    assert resumed.metrics["step"] == plain.metrics["step"] == 5
    assert resumed.metrics["epoch"] == plain.metrics["epoch"] == 1
    # the same batches, groups and dropout masks from step 3 on: the same losses, weights
    assert resumed.metrics["loss"] == pytest.approx(plain.metrics["loss"], abs=1e-6)
    reference = load_file(f"{plain.output_dir}/model.safetensors")
    weights = load_file(f"{resumed.output_dir}/model.safetensors")
    assert reference.keys() == weights.keys()
    for key, value in reference.items():
        np.testing.assert_allclose(weights[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)
    # the checkpoint holds tensors and plain values only, every rank's RNG states in it
    state = torch.load(tmp_path / "out" / "finetune" / "checkpoint_step_00000004" /
                       "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["state"]["resumed_from"] == [2]
    assert {"torch_cpu", "torch_cuda", "python", "numpy"} <= state["rng"][1].keys()
