"""The shared CLI: one declaration of the encode flags, the same in every job (Ray-free)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipelines.common.cli import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    flat_fields,
    make_config,
    parse_config,
)
from pipelines.common.encode import actor_resources
from pipelines.common.encode_options import ChunkOptions, EncodeOptions, SearchOptions
from pipelines.embed.main import EmbedConfig
from pipelines.search.evaluate import EvaluateConfig
from pipelines.search.mine import MineConfig

# the least each job needs to parse
REQUIRED = {
    EmbedConfig: [],
    EvaluateConfig: ["--sts", "x.tsv"],
    MineConfig: ["--input_file", "in.jsonl", "--output_file", "out.jsonl"],
}
ENCODE_FIELDS = {f.name: f.default for f in dataclasses.fields(EncodeOptions)}


@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
def test_every_job_has_the_encode_flags_with_the_same_defaults(cls: type) -> None:
    fields = flat_fields(cls)
    assert {name: fields[name][1] for name in ENCODE_FIELDS} == ENCODE_FIELDS
    cfg = parse_config(cls, REQUIRED[cls])
    assert cfg.encode == EncodeOptions()
    assert cfg.encode.batch_rows == 4096  # one default (it was 1,024 outside embedding)


@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
@pytest.mark.parametrize(("flags", "message"), [
    (["--num-actors", "4,2"], "--num-actors must be 'N' or 'MIN,MAX'"),
    (["--num_actors", "x"], "--num-actors must be 'N' or 'MIN,MAX'"),
    (["--accelerator-type", "L4"], "needs --gpus-per-actor > 0"),
    (["--dtype", "fp16"], "fp16 runs on GPUs only"),
    (["--dtype", "int8", "--gpus-per-actor", "1"], "int8 runs on CPU actors only"),
    (["--calibration", "c.txt"], "--calibration c.txt is for --dtype int8 only"),
    (["--batch-rows", "0"], "--batch-rows must be >= 1"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor > 0"),
])
def test_every_job_checks_the_encode_flags_alike(cls: type, flags: list[str],
                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, REQUIRED[cls] + flags)


@pytest.mark.parametrize("cls", list(REQUIRED), ids=lambda c: c.__name__)
def test_flag_spellings_and_the_model_alias(cls: type) -> None:
    for flags in (["--model_name_or_path", "m1"], ["--model-name-or-path", "m1"],
                  ["--model", "m1"]):
        assert parse_config(cls, REQUIRED[cls] + flags).encode.model == "m1"
    cfg = parse_config(cls, REQUIRED[cls] + ["--gpus-per-actor", "1", "--accelerator_type",
                                             "L4", "--max-length", "128", "--dtype", "bf16"])
    assert (cfg.encode.gpus_per_actor, cfg.encode.accelerator_type, cfg.encode.max_length,
            cfg.encode.dtype) == (1.0, "L4", 128, "bf16")


def test_mining_keeps_its_use_gpu_flag_as_an_alias() -> None:
    base = REQUIRED[MineConfig]
    cfg = parse_config(MineConfig, [*base, "--use_gpu"])
    assert (cfg.encode.gpus_per_actor, cfg.search.use_gpu_for_searching) == (1.0, True)
    cfg = parse_config(MineConfig, [*base, "--use_gpu", "False"])
    assert (cfg.encode.gpus_per_actor, cfg.search.use_gpu_for_searching) == (0.0, False)
    cfg = parse_config(MineConfig, [*base, "--use_gpu_for_searching", "True"])
    assert (cfg.encode.gpus_per_actor, cfg.search.use_gpu_for_searching) == (0.0, True)
    # the canonical flag wins over what an alias expands to
    cfg = parse_config(MineConfig, [*base, "--use_gpu", "--gpus-per-actor", "2"])
    assert cfg.encode.gpus_per_actor == 2.0
    with pytest.raises(SystemExit):  # the alias is mining's only
        parse_config(EvaluateConfig, ["--sts", "x", "--use_gpu"])


def test_search_flags_shared_by_evaluation_and_mining() -> None:
    for cls in (EvaluateConfig, MineConfig):
        cfg = parse_config(cls, REQUIRED[cls] + ["--search_shard_rows", "16",
                                                 "--search-cpus", "0.5"])
        assert cfg.search == SearchOptions(search_shard_rows=16, search_cpus=0.5)
        with pytest.raises(ConfigError, match="--search-shard-rows must be >= 1"):
            parse_config(cls, REQUIRED[cls] + ["--search_shard_rows", "0"])


@pytest.mark.parametrize("cls", [EmbedConfig, EvaluateConfig], ids=lambda c: c.__name__)
def test_chunk_flags_shared_by_embedding_and_evaluation(cls: type) -> None:
    """One declaration (`ChunkOptions`): both spellings in both jobs, the same checks."""
    for flags in (["--chunk_tokens", "64", "--chunk_overlap", "8"],
                  ["--chunk-tokens", "64", "--chunk-overlap", "8"]):
        cfg = parse_config(cls, REQUIRED[cls] + flags)
        assert cfg.chunking == ChunkOptions(chunk_tokens=64, chunk_overlap=8)
        assert (cfg.chunking.spec().size, cfg.chunking.spec().overlap) == (64, 8)
    assert parse_config(cls, REQUIRED[cls]).chunking.spec() is None
    with pytest.raises(ConfigError, match="--chunk-overlap needs --chunk-tokens"):
        parse_config(cls, REQUIRED[cls] + ["--chunk_overlap", "8"])
    with pytest.raises(ConfigError, match=r"--chunk-overlap must be >= 0 and < --chunk-tokens"):
        parse_config(cls, REQUIRED[cls] + ["--chunk-tokens", "8", "--chunk-overlap", "8"])


def test_yaml_keys_are_the_flag_names_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("output: a\nbatch_rows: 64\nmodel: m\n")
    cfg = parse_config(EmbedConfig, ["--config", str(tmp_path / "c.yaml"), "--batch-rows", "8"])
    assert (cfg.output, cfg.encode.batch_rows, cfg.encode.model) == ("a", 8, "m")
    (tmp_path / "bad.yaml").write_text("outptu: a\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['outptu'\]"):
        parse_config(EmbedConfig, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match="needs --previous"):
        parse_config(EmbedConfig, ["--mode", "incremental"])


def test_config_round_trips_through_a_plain_dict() -> None:
    """What Ray workers get (`config_to_dict`) rebuilds the same frozen config."""
    cfg = make_config(MineConfig, input_file="i", output_file="o", model_name_or_path="m",
                      num_actors="1,4", search_cpus=0.25)
    assert config_from_dict(MineConfig, config_to_dict(cfg)) == cfg
    assert cfg.encode.pool_size() == (1, 4)


def test_actor_resources_follow_the_options() -> None:
    opts = EncodeOptions(gpus_per_actor=1, accelerator_type="L4", cpus_per_actor=2)
    assert actor_resources(opts, 16) == {"num_gpus": 1, "num_cpus": 2, "accelerator_type": "L4"}
    assert actor_resources(EncodeOptions(), 8) == {"num_gpus": None, "num_cpus": 7.0,
                                                   "accelerator_type": None}


@pytest.mark.parametrize(("opts", "node_cpus", "plan"), [
    (EncodeOptions(), 2, (1.0, 2)),  # a 2-core box: both cores encode, 1 CPU left to tasks
    (EncodeOptions(), 16, (15.0, 16)),
    (EncodeOptions(), 1, (0.5, 1)),  # a 1-CPU node: half left to the tasks (1.0 hung)
    (EncodeOptions(), 1.5, (0.75, 1)),
    (EncodeOptions(gpus_per_actor=1), 16, (1.0, 1)),
    (EncodeOptions(cpus_per_actor=0.5), 16, (0.5, 1)),
    (EncodeOptions(cpus_per_actor=4), 16, (4, 4)),
])
def test_default_cpu_actors_take_the_cores_the_tasks_leave(opts: EncodeOptions, node_cpus: float,
                                                           plan: tuple[float, int]) -> None:
    assert opts.cpu_plan(node_cpus) == plan
