"""FlagEmbedding 1.0.x command lines parse with only the launcher changed (no Ray here).

Every flag of FlagEmbedding's finetune (`ModelArguments`, `DataArguments`,
`RetrieverTrainingArguments`) and RetroMAE (`DataTrainingArguments`, `ModelArguments`)
argument classes, and the `TrainingArguments` flags its commands use, either works,
is a logged no-op, or is refused naming the alternative. The Ray Train runs of these
commands are in test_finetune_faults.py and test_pretrain_retromae_job.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from bge_core.data import cap_examples
from bge_core.optim import build_scheduler
from pipelines.common.cli import ConfigError, parse_config
from pipelines.train.finetune import FinetuneConfig, load_encoder, train_temperature
from pipelines.train.retromae import RetroMAEConfig

ZH = "为这个句子生成表示以用于检索相关文章："


def finetune_readme(model: str, data: str, out: str, batch: int = 1) -> list[str]:
    """examples/finetune/README.md of FlagEmbedding 1.0.x, after ``torchrun ... -m
    FlagEmbedding.baai_general_embedding.finetune.run`` (placeholders filled)."""
    return ["--output_dir", out, "--model_name_or_path", model, "--train_data", data,
            "--learning_rate", "1e-5", "--fp16", "--num_train_epochs", "5",
            "--per_device_train_batch_size", str(batch), "--dataloader_drop_last", "True",
            "--normlized", "True", "--temperature", "0.02", "--query_max_len", "64",
            "--passage_max_len", "256", "--train_group_size", "2", "--negatives_cross_device",
            "--logging_steps", "10", "--query_instruction_for_retrieval", ZH]


def retromae_readme(model: str, data: str, out: str, batch: int = 1) -> list[str]:
    """examples/pretrain/README.md of FlagEmbedding 1.0.x, after ``torchrun ... -m
    FlagEmbedding.baai_general_embedding.retromae_pretrain.run``."""
    return ["--output_dir", out, "--model_name_or_path", model, "--train_data", data,
            "--learning_rate", "2e-5", "--num_train_epochs", "2",
            "--per_device_train_batch_size", str(batch), "--dataloader_drop_last", "True",
            "--max_seq_length", "512", "--logging_steps", "10"]


BASE = ["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o"]

# Flags of FlagEmbedding's argument classes and the TrainingArguments its commands use,
# with a value each; every one must parse for the job (refusals are tested below).
FINETUNE_FLAGS = {
    "--config_name": "m", "--tokenizer_name": "m", "--cache_dir": "/tmp/hf",
    "--sentence_pooling_method": "mean", "--normlized": "False", "--train_group_size": "4",
    "--query_max_len": "16", "--passage_max_len": "64", "--max_example_num_per_dataset": "9",
    "--query_instruction_for_retrieval": "Q: ", "--negatives_cross_device": "True",
    "--temperature": "0.01", "--fix_position_embedding": "True", "--use_inbatch_neg": "False",
}
TRAINING_FLAGS = {
    "--fp16": "True", "--gradient_checkpointing": "True", "--warmup_ratio": "0.05",
    "--weight_decay": "0.1", "--logging_steps": "5", "--save_steps": "100", "--seed": "7",
    "--num_train_epochs": "3", "--learning_rate": "3e-5", "--max_steps": "50",
    "--per_device_train_batch_size": "4", "--dataloader_drop_last": "True",
    "--overwrite_output_dir": "True", "--report_to": "none", "--dataloader_num_workers": "4",
    "--save_total_limit": "3", "--lr_scheduler_type": "cosine",
    "--gradient_accumulation_steps": "1", "--max_grad_norm": "0.5",
}


def test_finetune_readme_command_parses_with_its_meaning():
    cfg = parse_config(FinetuneConfig, finetune_readme("BAAI/bge-large-zh-v1.5", "toy.jsonl",
                                                       "out") + ["--num_workers", "8"])
    assert (cfg.fp16, cfg.normlized, cfg.dataloader_drop_last, cfg.negatives_cross_device) == (
        True, True, True, True)
    assert (cfg.num_train_epochs, cfg.train_group_size, cfg.temperature) == (5, 2, 0.02)
    assert (cfg.query_max_len, cfg.passage_max_len, cfg.logging_steps) == (64, 256, 10)
    assert cfg.query_instruction_for_retrieval == ZH and cfg.num_workers == 8
    assert cfg.compat_notes() == []  # nothing in the README command is a no-op


def test_retromae_readme_command_parses():
    cfg = parse_config(RetroMAEConfig, retromae_readme("BAAI/bge-large-en", "toy.jsonl", "o"))
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.max_seq_length) == (2e-5, 2, 512)
    assert (cfg.encoder_mlm_probability, cfg.decoder_mlm_probability) == (0.3, 0.5)
    cfg = parse_config(RetroMAEConfig, BASE + ["--tokenizer_name", "t", "--config_name", "c",
                                               "--encoder_mlm_probability", "0.25",
                                               "--decoder_mlm_probability", "0.6"])
    assert (cfg.tokenizer_name, cfg.encoder_mlm_probability) == ("t", 0.25)


def _parsed_as(value: object, text: str) -> bool:
    if isinstance(value, bool):
        return value is (text.lower() == "true")
    if isinstance(value, (int, float)):
        return value == float(text)
    return value == text


@pytest.mark.parametrize("flag", sorted({**FINETUNE_FLAGS, **TRAINING_FLAGS}))
def test_every_flagembedding_finetune_flag_parses(flag):
    text = {**FINETUNE_FLAGS, **TRAINING_FLAGS}[flag]
    assert _parsed_as(getattr(parse_config(FinetuneConfig, BASE + [flag, text]), flag[2:]), text)


@pytest.mark.parametrize("flag", sorted(TRAINING_FLAGS))
def test_every_training_flag_parses_for_retromae(flag):
    text = TRAINING_FLAGS[flag]
    assert _parsed_as(getattr(parse_config(RetroMAEConfig, BASE + [flag, text]), flag[2:]), text)


@pytest.mark.parametrize("forms, expected", [
    ([], False), (["--fix_position_embedding"], True), (["--fix_position_embedding", "True"],
                                                        True),
    (["--fix_position_embedding", "False"], False), (["--fix-position-embedding", "true"], True),
])
def test_boolean_flags_take_flagembeddings_forms(forms, expected):
    assert parse_config(FinetuneConfig, BASE + forms).fix_position_embedding is expected


def test_unknown_flag_stays_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, BASE + ["--no_such_flag", "1"])
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


@pytest.mark.parametrize("flags, alternative", [
    (["--deepspeed", "ds_config.json"], "gradient_cache_chunk_size"),
    (["--gradient_accumulation_steps", "4"], "gradient_cache_chunk_size"),
    (["--passage_instruction_for_retrieval", "P: "], "prepend it"),
    (["--lr_scheduler_type", "polynomial"], "polynomial"),
])
def test_refused_flags_name_the_alternative(flags, alternative):
    with pytest.raises((ConfigError, SystemExit)) as err:
        parse_config(FinetuneConfig, BASE + flags)
    if err.type is ConfigError:
        assert alternative in str(err.value)


def test_noop_flags_each_log_one_line():
    cfg = parse_config(FinetuneConfig, BASE + [
        "--config_name", "c", "--cache_dir", "/tmp/hf", "--dataloader_drop_last", "False",
        "--dataloader_num_workers", "4", "--report_to", "none", "--overwrite_output_dir"])
    notes = cfg.compat_notes()
    flags = ["--config_name", "--cache_dir", "--dataloader_drop_last", "--dataloader_num_workers",
             "--report_to", "--overwrite_output_dir"]
    assert len(notes) == len(flags)
    for flag, note in zip(flags, notes, strict=True):
        assert note.startswith(flag) and "no effect" in note


def test_max_steps_minus_one_is_unset_as_in_hugging_face():
    cfg = parse_config(FinetuneConfig, BASE + ["--max_steps", "-1", "--num_train_epochs", "3"])
    assert cfg.total_steps(steps_per_epoch=5) == 15
    assert parse_config(FinetuneConfig, BASE + ["--max_steps", "7"]).total_steps(5) == 7


def test_pooling_normalisation_and_frozen_positions_reach_the_model(tiny_bert_dir, tmp_path):
    cfg = parse_config(FinetuneConfig, [
        "--model_name_or_path", str(tiny_bert_dir), "--train_data", "d", "--output_dir", "o",
        "--sentence_pooling_method", "mean", "--normlized", "False", "--temperature", "0.02",
        "--fix_position_embedding"])
    encoder = load_encoder(cfg)
    assert (encoder.config.pooling, encoder.config.normalize) == ("mean", False)
    assert train_temperature(cfg, encoder) == 1.0  # inner product, as FlagEmbedding
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.embeddings.position_embeddings.weight"}
    plain = load_encoder(parse_config(FinetuneConfig, [
        "--model_name_or_path", str(tiny_bert_dir), "--train_data", "d", "--output_dir", "o"]))
    assert plain.config.pooling == "cls" and all(p.requires_grad for p in plain.parameters())


def test_tokenizer_name_replaces_the_models_tokenizer(tiny_bert_dir, tmp_path):
    from tests.tiny_models import make_tokenizer

    other = tmp_path / "tok"
    make_tokenizer(other).save_pretrained(other)
    cfg = parse_config(FinetuneConfig, ["--model_name_or_path", str(tiny_bert_dir),
                                        "--train_data", "d", "--output_dir", "o",
                                        "--tokenizer_name", str(other)])
    encoder = load_encoder(cfg)
    assert encoder.tokenizer.name_or_path == str(other)


def test_max_example_num_per_dataset_samples_each_file():
    rows = [{"key": i} for i in range(10)]
    kept = cap_examples(rows, 4, seed=1, file_index=0)
    assert len(kept) == 4 and kept == sorted(kept, key=lambda r: r["key"])
    assert kept == cap_examples(rows, 4, seed=1, file_index=0)  # seeded
    assert kept != cap_examples(rows, 4, seed=1, file_index=1)  # per file
    assert cap_examples(rows, None, 1, 0) == rows and cap_examples(rows, 20, 1, 0) == rows


@pytest.mark.parametrize("kind, expected", [
    ("linear", [0.0, 1 / 2, 1.0, 3 / 4, 2 / 4]),  # 2 warm-up steps (step / 2), then 4 to 0
    ("constant_with_warmup", [0.0, 1 / 2, 1.0, 1.0, 1.0]),
    ("constant", [1.0] * 5),
    ("cosine", [0.0, 1 / 2, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5]),
])
def test_lr_scheduler_types(kind, expected):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, warmup=2, total_steps=6)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)
