"""The RetroMAE job: corpus reading, step plan, CLI errors, and 2-worker Ray Train runs."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from bge_core.data import collate, sample_group
from bge_core.grad_cache import contrastive_step
from bge_core.losses import info_nce
from bge_core.model import Encoder
from bge_core.retromae import HEADS_FILE
from pipelines.common.cli import ConfigError, parse_config
from pipelines.common.corpus_io import InputError, list_input_files, plan_file
from pipelines.train.finetune import FinetuneConfig, load_encoder
from pipelines.train.retromae import (
    RetroMAEConfig,
    StepPlan,
    main,
    plan_corpus,
    run,
    step_seed,
    texts_of,
)
from tests.driver_spy import spy_on_driver
from tests.fault_hooks import ExitAfterStep
from tests.test_flagembedding_commands import retromae_readme
from tests.tiny_models import WORDS

MARKER = "corpusonly"  # in every corpus text: what reaches the driver is scanned for it
EMPTY_ROWS = [{"text": ""}, {"text": "   "}, {"text": None}]


def write_corpus(path, n=24, seed=0):
    rng = random.Random(seed)
    rows = [{"text": " ".join([MARKER, *rng.choices(WORDS, k=rng.randint(1, 15))])}
            for _ in range(n)]
    rows = rows[:5] + EMPTY_ROWS + rows[5:]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def read_texts(uri, column, rows_per_range=4):
    """Every text of the corpus in one process, range by range (what the Ray tasks read)."""
    texts, skipped = [], 0
    for index, path in enumerate(list_input_files(uri)):
        for part in plan_file(path, index, rows_per_range, [column]):
            got, empty = texts_of(part, column)
            texts += got
            skipped += empty
    return texts, skipped


def test_texts_of_ranges_skip_and_count_empty_rows_jsonl_and_parquet(tmp_path):
    path = write_corpus(tmp_path / "a.jsonl", n=10)
    texts, skipped = read_texts(str(path), "text")
    assert (len(texts), skipped) == (10, 3) and all(t.strip() for t in texts)
    assert read_texts(str(path), "text", rows_per_range=100) == (texts, skipped)
    pq.write_table(pa.table({"body": ["one text", "", None, "two"]}), tmp_path / "b.parquet",
                   row_group_size=2)
    assert read_texts(str(tmp_path / "b.parquet"), "body", 1) == (["one text", "two"], 2)
    (tmp_path / "dir").mkdir()
    write_corpus(tmp_path / "dir" / "1.jsonl", n=4)
    write_corpus(tmp_path / "dir" / "2.jsonl", n=6, seed=1)
    assert [len(x) if isinstance(x, list) else x for x in read_texts(
        str(tmp_path / "dir"), "text")] == [10, 6]  # a folder: every file, empties counted


def test_texts_of_names_file_and_line_of_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 12}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: 'text' is int"):
        read_texts(str(bad), "text")
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_texts(str(bad), "text")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c\.parquet.*\['text'\] not found"):
        read_texts(str(tmp_path / "c.parquet"), "text")


def test_step_plan_gives_every_rank_equal_whole_batches():
    plan = StepPlan(texts=23, world=2, batch=3, epochs=2, max_steps=None)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 6)
    assert StepPlan(23, 2, 3, 2, max_steps=4).total_steps == 4
    assert step_seed(1, 0, 5) == step_seed(1, 0, 5) != step_seed(1, 1, 5)


def test_both_trainers_plan_steps_by_one_rule(tmp_path):
    from pipelines.train.finetune import plan_steps

    for texts, world, batch, epochs, max_steps in [(23, 2, 3, 2, None), (17, 2, 2, 3, -1),
                                                   (40, 4, 2, 1, 7), (9, 1, 4, 2, None)]:
        plan = StepPlan(texts, world, batch, epochs, max_steps)
        cfg = FinetuneConfig(model_name_or_path="m", train_data="d", output_dir=str(tmp_path),
                             num_workers=world, per_device_train_batch_size=batch,
                             num_train_epochs=epochs, max_steps=max_steps)
        assert plan_steps(cfg, texts) == (plan.steps_per_epoch, plan.total_steps)
    # --max_steps -1 is unset (Hugging Face's meaning) for RetroMAE as for finetuning
    assert StepPlan(17, 2, 2, epochs=3, max_steps=-1).total_steps == 12


def test_flags_and_yaml_follow_flagembedding():
    cfg = parse_config(RetroMAEConfig, [
        "--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o",
        "--encoder_mlm_probability", "0.25", "--decoder-mlm-probability", "0.6", "--bf16"])
    assert (cfg.encoder_mlm_probability, cfg.decoder_mlm_probability, cfg.bf16) == (0.25, 0.6,
                                                                                   True)
    assert (cfg.learning_rate, cfg.max_seq_length) == (2e-5, 512)
    with pytest.raises(ConfigError, match="exclusive"):
        parse_config(RetroMAEConfig, ["--model_name_or_path", "m", "--train_data", "d",
                                      "--output_dir", "o", "--fp16", "--bf16"])


def test_cli_exits_nonzero_with_one_message(tiny_bert_dir, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_bert_dir), "--output_dir", str(tmp_path / "o"),
            "--max_seq_length", "32"]
    assert main(base + ["--train_data", str(tmp_path / "none.jsonl")]) == 2
    assert "input not found" in capsys.readouterr().err
    few = write_corpus(tmp_path / "few.jsonl", n=3)
    assert main(base + ["--train_data", str(few), "--max_seq_length", "4096"]) == 2
    assert "--max_seq_length 4096 exceeds the 128 positions" in capsys.readouterr().err


# ------------------------------------------------------------------ Ray (the session)
@pytest.mark.timeout(300)
def test_plan_corpus_counts_on_ray_tasks_and_names_bad_input(ray_session, tmp_path):
    (tmp_path / "c").mkdir()
    write_corpus(tmp_path / "c" / "1.jsonl", n=9)
    pq.write_table(pa.table({"text": ["one text", "", None, "two"]}),
                   tmp_path / "c" / "2.parquet", row_group_size=1)
    cfg = RetroMAEConfig(model_name_or_path="m", train_data=str(tmp_path / "c"),
                         output_dir=str(tmp_path / "o"), rows_per_range=4)
    corpus = plan_corpus(cfg)
    assert (corpus.texts, corpus.skipped, len(corpus.ranges)) == (11, 5, 3 + 1)
    assert sorted(corpus.dataset("text").take_all(), key=str) == sorted(
        ({"text": t} for t in read_texts(str(tmp_path / "c"), "text")[0]), key=str)
    with (tmp_path / "c" / "1.jsonl").open("a") as handle:
        handle.write('{"text": ["a list"]}\n')
    with pytest.raises(InputError, match=r"1\.jsonl line 13: 'text' is list") as err:
        plan_corpus(cfg)
    assert "Traceback" not in str(err.value)  # the message, not a task's traceback


@pytest.mark.timeout(300)
def test_fewer_texts_than_one_global_batch_is_named(ray_session, tiny_bert_dir, tmp_path):
    few = write_corpus(tmp_path / "few.jsonl", n=3)
    cfg = RetroMAEConfig(model_name_or_path=str(tiny_bert_dir), train_data=str(few),
                         output_dir=str(tmp_path / "o"), max_seq_length=32,
                         per_device_train_batch_size=4)
    with pytest.raises(InputError, match="3 non-empty texts, fewer than one global batch"):
        run(cfg)


# ----------------------------------------------------------------- Ray Train (slow)
def job_config(tiny_bert_dir, data, out):
    """FlagEmbedding's README command, the launcher swapped for --num_workers 2, sized for
    a test (3 steps, checkpoints every 2, 32 tokens, a learning rate that moves a tiny model)."""
    argv = retromae_readme(str(tiny_bert_dir), str(data), str(out), batch=4)
    return parse_config(RetroMAEConfig, argv + [
        "--num_workers", "2", "--cpus_per_worker", "0.5", "--max_seq_length", "32",
        "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_ratio", "0", "--max_failures", "1",
        "--rows_per_range", "7"])  # 27 lines: 4 ranges, split over the 2 workers


@pytest.fixture(scope="module")
def plain_run(ray_session, tiny_bert_dir, tmp_path_factory):
    """One uninterrupted 2-worker run (3 steps): the reference for the resume test, run
    with what reaches the driver scanned for the corpus marker (`tests.driver_spy`)."""
    root = tmp_path_factory.mktemp("retromae_job")
    data = write_corpus(root / "corpus.jsonl")
    with pytest.MonkeyPatch.context() as patch, spy_on_driver(patch, MARKER) as spy:
        result = run(job_config(tiny_bert_dir, data, root / "out"))
    return result, data, root, spy


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # a Ray Train start is ~30 s idle, minutes on a busy box
def test_two_workers_pretrain_a_loadable_encoder_that_finetune_starts_from(
        plain_run, tiny_bert_dir, tmp_path):
    summary, _, root, _ = plain_run
    metrics = summary.metrics
    assert (metrics["step"], summary.examples, summary.skipped) == (3, 24, 3)
    assert np.isfinite([metrics["encoder_loss"], metrics["decoder_loss"]]).all()
    assert metrics["tokens_per_s"] > 0 and metrics["resumed_from"] == []
    encoder = Encoder.from_pretrained(summary.output_dir, device="cpu")
    assert (encoder.config.pooling, encoder.config.normalize) == ("cls", True)
    texts = ["the cat is on the road", "blood and heart disease"]
    before = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").encode(texts)
    assert not np.allclose(before, encoder.encode(texts), atol=1e-4)  # trained
    checkpoints = sorted(p.name for p in (root / "out" / "retromae").glob("checkpoint_*"))
    assert checkpoints[-1] == "checkpoint_step_00000003"

    assert not (Path(summary.output_dir) / HEADS_FILE).exists()  # resume-only heads stay
    # Finetuning starts from it: its model loader and one contrastive step (no second run).
    cfg = FinetuneConfig(model_name_or_path=summary.output_dir, train_data="unused",
                         output_dir=str(tmp_path / "ft"), train_group_size=2)
    tuned = load_encoder(cfg)
    assert tuned.config.pooling == "cls"
    tuned.train()
    groups = [sample_group({"key": i, "query": w, "pos": [w + " road"], "neg": ["heart"]},
                           2, 0, 0) for i, w in enumerate(WORDS[:4])]
    queries, passages = collate(tuned.tokenize, groups, 16, 16, tuned.tokenizer.pad_token_id)
    loss = contrastive_step(tuned, queries, passages,
                            functools.partial(info_nce, group_size=2, temperature=0.02))
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in tuned.backbone.encoder.parameters())


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)  # a Ray Train start is ~30 s idle, minutes on a busy box
def test_resume_after_a_killed_worker_matches_the_uninterrupted_run(
        plain_run, tiny_bert_dir, tmp_path):
    summary, data, _, _ = plain_run
    marker = tmp_path / "killed"
    resumed = run(job_config(tiny_bert_dir, data, tmp_path / "out"),
                  on_step=ExitAfterStep(step=3, marker=str(marker)))  # rank 1 dies after 3
    assert marker.exists() and resumed.metrics["step"] == 3
    assert resumed.metrics["resumed_from"] == [2]  # killed before step 3's checkpoint
    reference = load_file(f"{summary.output_dir}/model.safetensors")
    weights = load_file(f"{resumed.output_dir}/model.safetensors")
    assert reference.keys() == weights.keys()
    for key, value in reference.items():  # steps 3 redone from step 2: same data, masks
        np.testing.assert_allclose(weights[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_corpus_text_reaches_the_driver(plain_run):
    _, data, _, spy = plain_run
    assert MARKER in data.read_text()
    assert spy.received > 0 and spy.leaks == []  # it saw the driver's traffic: no text
    with pytest.MonkeyPatch.context() as patch, spy_on_driver(patch, MARKER) as control:
        ray.data.from_items([{"text": f"{MARKER} a"}]).take_all()  # the spy can see a leak
    assert control.leaks
