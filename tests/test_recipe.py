"""The one-command recipe (`pipelines/recipe.py`): RetroMAE → mine → finetune → evaluate on
tiny models, then a rerun that skips what is complete and redoes what is not."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipelines.chain.recipe import (
    FINETUNE_DEFAULTS,
    MINE_DEFAULTS,
    SOUP_DEFAULT,
    START_WEIGHT_DEFAULT,
    RecipeConfig,
    main,
    plan,
)
from pipelines.common.cli import ConfigError, make_config, parse_config
from tests.tiny_models import WORDS

STEPS_ALL = ["retromae", "mine", "finetune", "evaluate"]


def _config(**extra: str | None) -> RecipeConfig:
    settings = {"corpus": "c.jsonl", "train_data": "t.jsonl", "output_dir": "s3://b/out/",
                "beir_dir": "eval", **extra}
    return make_config(RecipeConfig, **settings)


def test_plan_chains_the_outputs_and_appends_the_users_flags() -> None:
    steps = {s.name: s.argv for s in plan(_config(finetune_args="--learning_rate 2e-5",
                                                  mine_args="--negative_number 7",
                                                  steps="retromae,mine,finetune,evaluate",
                                                  soup=1, start_weight=0.0))}
    assert list(steps) == ["retromae", "mine", "finetune", "evaluate"]
    assert steps["retromae"][-2:] == ["--output_dir", "s3://b/out/retromae"]
    assert steps["mine"][:2] == ["--model_name_or_path", "all-MiniLM-L6-v2"]  # the base mines
    assert steps["mine"][6:8] == ["--output_file", "s3://b/out/mined.jsonl"]
    # the chain's mining window, then the user's flags
    assert steps["mine"][8:] == [*MINE_DEFAULTS.split(), "--negative_number", "7"]
    assert steps["finetune"][:6] == ["--model_name_or_path", "s3://b/out/retromae",
                                     "--train_data", "s3://b/out/mined.jsonl",
                                     "--output_dir", "s3://b/out/finetuned"]
    # the chain's measured finetuning settings, then the user's flags, which win (last)
    assert steps["finetune"][6:-2] == FINETUNE_DEFAULTS.split()
    assert steps["finetune"][-2:] == ["--learning_rate", "2e-5"]
    assert steps["evaluate"] == ["--model", "s3://b/out/finetuned"]
    no_mae = {s.name: s.argv for s in plan(_config(steps="mine,finetune,evaluate",
                                                   mine_with="retromae", soup=1,
                                                   start_weight=0.0))}
    assert no_mae["finetune"][1] == no_mae["mine"][1] == "all-MiniLM-L6-v2"
    assert plan(_config(mine_with="retromae", steps="retromae,mine"))[1].argv[1] == \
        "s3://b/out/retromae"


def test_soup_finetunes_once_per_seed_then_averages_into_finetuned() -> None:
    steps = plan(_config(steps="mine,finetune,evaluate", finetune_args="--seed 7 --bf16 false",
                         soup=2))
    assert [s.name for s in steps] == ["mine", "finetune_1", "finetune_2", "soup", "evaluate"]
    first, second = steps[1].argv, steps[2].argv
    assert first[:6] == ["--model_name_or_path", "all-MiniLM-L6-v2", "--train_data",
                         "s3://b/out/mined.jsonl", "--output_dir", "s3://b/out/soup/seed7"]
    assert second[4:6] == ["--output_dir", "s3://b/out/soup/seed8"]
    # the same flags (the chain's, then the user's), the second run one seed on
    assert first[6:] == [*FINETUNE_DEFAULTS.split(), "--seed", "7", "--bf16", "false"]
    assert second[6:] == first[6:] + ["--seed", "8"]
    # the soup mixes the finetuning's start back in at the default weight
    assert steps[3].argv == ["--output_dir", "s3://b/out/finetuned",
                             "--start", "all-MiniLM-L6-v2",
                             "--start_weight", str(START_WEIGHT_DEFAULT),
                             "s3://b/out/soup/seed7", "s3://b/out/soup/seed8"]
    assert steps[4].argv == ["--model", "s3://b/out/finetuned"]
    # the job's seed (42) when the user gives none; the default soup: two seeds
    names = [s.argv[5] for s in plan(_config(steps="finetune"))[:SOUP_DEFAULT]]
    assert SOUP_DEFAULT == 2 and names == [f"s3://b/out/soup/seed{n}" for n in (42, 43)]


def test_start_weight_mixes_the_finetunings_start_or_leaves_the_soup_alone() -> None:
    # from the RetroMAE encoder when it runs (the start the user's flags name, if any)
    mae = plan(_config(steps="retromae,mine,finetune", start_weight=0.25))
    assert mae[-1].name == "soup" and mae[-1].argv[2:6] == [
        "--start", "s3://b/out/retromae", "--start_weight", "0.25"]
    own = plan(_config(steps="finetune", finetune_args="--model_name_or_path m2"))
    assert own[-1].argv[2:4] == ["--start", "m2"]
    # one run with a start weight: finetuned once, then mixed; 0: the plain average
    single = plan(_config(steps="finetune", soup=1, start_weight=0.1))
    assert [s.name for s in single] == ["finetune_1", "soup"]
    assert single[1].argv[-1] == "s3://b/out/soup/seed42"
    plain = plan(_config(steps="finetune", start_weight=0.0))
    assert plain[-1].argv == ["--output_dir", "s3://b/out/finetuned",
                              "s3://b/out/soup/seed42", "s3://b/out/soup/seed43"]
    assert [s.name for s in plan(_config(steps="finetune", soup=1, start_weight=0.0))] == \
        ["finetune"]


def test_auto_steps_skip_retromae_for_an_embedder_and_evaluate_without_a_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def names(**extra: str | None) -> list[str]:
        return _config(**extra).step_names()

    # a preset is an embedder already: RetroMAE measured a loss on it (BENCHMARKS.md)
    assert names() == ["mine", "finetune", "evaluate"]
    assert names(model_name_or_path="BAAI/bge-base-en-v1.5") == ["mine", "finetune", "evaluate"]
    backbone = tmp_path / "bert"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    assert names(model_name_or_path=str(backbone)) == STEPS_ALL
    assert names(model_name_or_path="bert-base-uncased", beir_dir=None) == \
        ["retromae", "mine", "finetune"]  # a hub id that is no preset: not fetched, a backbone
    for marker in ("modules.json", "bge_config.json"):
        embedder = tmp_path / marker.split(".")[0]
        embedder.mkdir()
        (embedder / marker).write_text("{}")
        assert names(model_name_or_path=str(embedder), beir_dir=None, sts="s.csv") == \
            ["mine", "finetune", "evaluate"]
    monkeypatch.setenv("HOME", str(tmp_path))  # a ``~`` path is read as the jobs read it
    assert names(model_name_or_path="~/modules") == ["mine", "finetune", "evaluate"]
    assert names(model_name_or_path="file://" + str(tmp_path / "bge_config")) == \
        ["mine", "finetune", "evaluate"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"steps": "mine,pretrain"}, r"unknown step\(s\) \['pretrain'\].* or auto"),
    ({"steps": "finetune,mine"}, "steps run in the order"),
    ({"beir_dir": None, "steps": "mine,evaluate"}, "give --beir_dir and/or --sts"),
    ({"mine_args": "--seed '7"}, "--mine_args: No closing quotation"),
    ({"start_weight": 1.0}, r"--start_weight must be in \[0, 1\)"),
    ({"start_weight": -0.1}, r"--start_weight must be in \[0, 1\)"),
])
def test_bad_settings_are_named(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**extra)


def _write_domain(root: Path) -> dict[str, str]:
    """A corpus, training queries with positives, and a BEIR-layout test set."""
    rng = random.Random(0)
    docs = [" ".join(rng.choices(WORDS, k=12)) for _ in range(40)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train = [{"query": " ".join(docs[i].split()[:3]), "pos": [docs[i]]} for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n" for i, d in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": " ".join(docs[i].split()[3:6])}) + "\n"
        for i in range(20, 28)))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(20, 28)))
    return {"corpus": str(root / "corpus.jsonl"), "train": str(root / "train.jsonl"),
            "beir": str(beir)}


@pytest.mark.e2e
@pytest.mark.timeout(1800)  # ~2-3 min on an idle 2-core box; >15 min at load 60
def test_whole_chain_on_tiny_models_then_skips_what_is_complete(
        ray_session, mean_bert_dir: Path, tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import load_file

    from bge_core.model import Encoder

    data, out = _write_domain(tmp_path), tmp_path / "recipe"
    argv = ["--model_name_or_path", str(mean_bert_dir), "--corpus", data["corpus"],
            "--train_data", data["train"], "--beir_dir", data["beir"],
            "--output_dir", str(out),
            # the tiny BERT's bge_config.json makes it an embedder: `auto` would skip RetroMAE
            "--steps", "retromae,mine,finetune,evaluate",
            # tiny BERTs hold 128 positions (RetroMAE's default is 512)
            "--retromae_args", "--max_seq_length 64 --per_device_train_batch_size 8",
            "--mine_args", "--range_for_sampling 2-20 --negative_number 3",
            "--finetune_args", "--per_device_train_batch_size 4 --train_group_size 2",
            "--evaluate_args", "--k_values 1,10"]
    assert main(argv) == 0
    records = {s: json.loads((out / "_recipe" / f"{s}.json").read_text())
               for s in ("retromae", "mine", "finetune_1", "finetune_2", "soup",
                         "evaluate")}
    assert records["retromae"]["summary"]["texts"] == 40
    assert records["retromae"]["summary"]["steps"] == 40 // 8
    assert records["mine"]["summary"]["examples"] == 16
    mined = [json.loads(line) for line in (out / "mined.jsonl").read_text().splitlines()]
    assert all(len(r["neg"]) == 3 and not set(r["neg"]) & set(r["pos"]) for r in mined)
    flags = FINETUNE_DEFAULTS.split()
    epochs = int(flags[flags.index("--num_train_epochs") + 1])
    for member in ("finetune_1", "finetune_2"):  # the chain's epochs, once per seed
        assert records[member]["summary"]["steps"] == epochs * (16 // 4)
    # the final model is the mean of the two seeds' weights (which differ), with the
    # RetroMAE encoder (finetuning's start) mixed back in at the default weight
    members = [load_file(str(out / "soup" / f"seed{n}" / "model.safetensors"))
               for n in (42, 43)]
    start = load_file(str(out / "retromae" / "model.safetensors"))
    soup = load_file(str(out / "finetuned" / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(members[0][name], members[1][name])
    assert records["soup"]["summary"]["start_weight"] == START_WEIGHT_DEFAULT > 0
    for key, value in soup.items():
        if value.is_floating_point():
            mean = sum(m[key].double() for m in members) / 2
            expected = (1 - START_WEIGHT_DEFAULT) * mean + START_WEIGHT_DEFAULT * start[key]
            torch.testing.assert_close(value, expected.to(value.dtype))
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["ndcg@10"] <= 1.0
    assert records["evaluate"]["summary"]["retrieval"]["ndcg@10"] == metrics["ndcg@10"]
    # the finetuned model started from the RetroMAE encoder, whose pooling it kept
    assert Encoder.from_pretrained(str(out / "finetuned")).config.pooling == "cls"
    capsys.readouterr()

    # rerun: every step is skipped, nothing is rewritten
    weights = out / "finetuned" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out.count("skipped (complete)") == 6
    assert weights.stat().st_mtime_ns == stamp

    # an incomplete step (no record) runs again; the complete ones before it are skipped
    (out / "_recipe" / "evaluate.json").unlink()
    (out / "metrics.json").unlink()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (complete)") == 5 and "evaluate: " in printed
    assert json.loads((out / "metrics.json").read_text())["metrics"] == metrics

    # changed flags for a complete step: one clear line, exit 2, nothing run
    changed = argv[:-3] + ["--per_device_train_batch_size 2", "--evaluate_args", "--k_values 1,10"]
    assert main(changed) == 2
    assert "step finetune_1 completed with other flags" in capsys.readouterr().err


def test_cli_parses_the_recipe_flags() -> None:
    cfg = parse_config(RecipeConfig, ["--corpus", "c", "--train_data", "t", "--output_dir", "o",
                                      "--sts", "s.csv", "--steps", "mine,finetune,evaluate"])
    assert cfg.step_names() == ["mine", "finetune", "evaluate"] and cfg.mine_with == "base"


def test_a_changed_later_step_stops_the_run_before_any_step_runs(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Records of a finished run; retromae's deleted, evaluate's flags changed: the run
    names evaluate's record and runs nothing (no Ray needed)."""
    import pipelines.chain.recipe as recipe

    cfg = make_config(RecipeConfig, corpus="c", train_data="t", output_dir=str(tmp_path),
                      beir_dir="eval", steps=",".join(STEPS_ALL))
    for step in plan(cfg):
        (tmp_path / "_recipe").mkdir(exist_ok=True)
        (tmp_path / "_recipe" / f"{step.name}.json").write_text(json.dumps(
            {"step": step.name, "key": step.key(), "summary": {}, "seconds": 1.0}))
    (tmp_path / "_recipe" / "retromae.json").unlink()
    ran: list[list[str]] = []
    monkeypatch.setattr(recipe, "_retromae", lambda argv: ran.append(argv) or {})
    assert set(recipe.run(cfg)) == {s.name for s in plan(cfg)} and len(ran) == 1  # the missing
    assert json.loads((tmp_path / "_recipe" / "retromae.json").read_text())["key"] == ran[0]
    changed = make_config(RecipeConfig, corpus="c", train_data="t", output_dir=str(tmp_path),
                          beir_dir="eval", split="dev", steps=",".join(STEPS_ALL))
    (tmp_path / "_recipe" / "retromae.json").unlink()
    with pytest.raises(ConfigError, match=r"evaluate\.json: step evaluate completed with other"):
        recipe.run(changed)
    assert len(ran) == 1
