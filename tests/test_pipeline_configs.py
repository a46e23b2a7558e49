"""Every example config in pipelines/configs/ loads through its job's own config class.

`parse_config` is what the jobs run on `--config`: unknown keys are errors, values are
type-checked, and command-line flags override the file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from pipelines.common.cli import ConfigError, flat_fields, flat_values, parse_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "configs"

# file-name prefix -> (job module, config class)
JOBS = {
    "embed": ("pipelines.embed.main", "EmbedConfig"),
    "finetune": ("pipelines.train.finetune", "FinetuneConfig"),
    "retromae": ("pipelines.train.retromae", "RetroMAEConfig"),
}
# serve.yaml is a Ray Serve config (its application args are checked in test_serve_config.py)
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "serve.yaml")


def _config_class(path: Path) -> type:
    prefix = path.stem.split("_")[0]
    assert prefix in JOBS, f"{path.name}: no job is known for prefix {prefix!r}"
    module_name, class_name = JOBS[prefix]
    return getattr(importlib.import_module(module_name), class_name)


def test_every_job_has_example_configs():
    prefixes = sorted({path.stem.split("_")[0] for path in CONFIGS})
    assert prefixes == sorted(JOBS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_loads_with_every_key_known(path: Path):
    cls = _config_class(path)
    values = yaml.safe_load(path.read_text())
    config = flat_values(parse_config(cls, ["--config", str(path)]))
    assert set(values) <= set(flat_fields(cls))
    for key, value in values.items():
        assert config[key] == value, f"{path.name}: {key}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_cli_flag_overrides_the_file(path: Path):
    cls = _config_class(path)
    values = yaml.safe_load(path.read_text())
    key = next(
        k
        for k, v in values.items()
        if isinstance(v, (int, float)) and v is not True and v is not False
    )
    new = values[key] * 2
    kebab = f"--{key.replace('_', '-')}"
    config = flat_values(parse_config(cls, ["--config", str(path), kebab, str(new)]))
    assert config[key] == new != values[key]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_an_unknown_key_is_an_error(path: Path, tmp_path: Path):
    cls = _config_class(path)
    values = yaml.safe_load(path.read_text())
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump({**values, "learning_rat": 1.0}))
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_config(cls, ["--config", str(bad)])


def test_training_configs_match_the_cluster_shapes():
    finetune = yaml.safe_load((CONFIG_DIR / "finetune_48gpu.yaml").read_text())
    retromae = yaml.safe_load((CONFIG_DIR / "retromae_24gpu.yaml").read_text())
    assert (finetune["num_workers"], finetune["use_gpu"]) == (48, True)
    assert (retromae["num_workers"], retromae["use_gpu"]) == (24, True)


def test_incremental_config_continues_the_full_one():
    full = yaml.safe_load((CONFIG_DIR / "embed.yaml").read_text())
    nightly = yaml.safe_load((CONFIG_DIR / "embed_incremental.yaml").read_text())
    assert (full["mode"], nightly["mode"]) == ("full", "incremental")
    assert nightly["previous"] == full["output"] != nightly["output"]
    same = (
        "input",
        "model",
        "id_column",
        "text_column",
        "title_column",
        "max_length",
        "output_dtype",
    )
    assert {k: nightly[k] for k in same} == {k: full[k] for k in same}
