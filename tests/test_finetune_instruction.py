"""The instruction contract: the query instruction used in training is the one saved.

Finetuning runs `load_encoder` → `epoch_groups`/`sample_group` with the encoder's
instruction → `Encoder.save`; these tests drive those same functions without Ray.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bge_core.data import sample_group
from bge_core.model import Encoder
from bge_core.presets import resolve_instruction
from pipelines.train.finetune import FinetuneConfig, load_encoder

OWN = "Represent this sentence for searching relevant passages: "
EXAMPLE = {"key": 7, "query": "heart disease risk", "pos": ["blood and heart"],
           "neg": ["the cat", "a dog"]}


@pytest.fixture(scope="module")
def instructed_model(tiny_bert_dir, tmp_path_factory):
    """A saved model that carries its own query instruction (as a BGE preset does)."""
    folder = tmp_path_factory.mktemp("instructed")
    Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", query_instruction=OWN).save(folder)
    return folder


@pytest.mark.parametrize("flag, expected", [(None, OWN), ("", None), ("Q: ", "Q: ")])
def test_resolve_instruction_rule(flag, expected):
    assert resolve_instruction(OWN, flag) == expected
    assert resolve_instruction(None, flag) == (None if flag is None else expected)


@pytest.mark.parametrize("flag, expected", [(None, OWN), ("", None), ("Q: ", "Q: ")],
                         ids=["flag-omitted", "flag-empty", "flag-given"])
def test_trained_instruction_is_the_saved_one(instructed_model, tmp_path, flag, expected):
    cfg = FinetuneConfig(model_name_or_path=str(instructed_model), train_data="d",
                         output_dir=str(tmp_path / "o"), train_group_size=2,
                         query_instruction_for_retrieval=flag)
    encoder = load_encoder(cfg)
    group = sample_group(EXAMPLE, cfg.train_group_size, cfg.seed, 0,
                         encoder.config.query_instruction)
    assert group.query == (expected or "") + EXAMPLE["query"]  # what training embeds
    encoder.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "bge_config.json").read_text())
    assert saved["query_instruction"] == expected  # what inference will add
    reloaded = Encoder.from_pretrained(str(tmp_path / "saved"), device="cpu")
    np.testing.assert_allclose(reloaded.encode_queries([EXAMPLE["query"]]),
                               reloaded.encode([group.query]), atol=1e-6)


@pytest.mark.parametrize("flag, expected", [(None, OWN), ("", ""), ("Q: ", "Q: ")],
                         ids=["flag-omitted", "flag-empty", "flag-given"])
def test_mining_and_evaluation_instruct_queries_by_the_same_rule(instructed_model, flag,
                                                                 expected):
    """What evaluate.py and mine_hard_negatives.py prefix to queries (`""` for none)."""
    from pipelines.common.encode import query_instruction

    assert query_instruction(str(instructed_model), flag) == expected


@pytest.mark.parametrize("own, flag, expected", [
    (None, None, 0.02), (0.05, None, 0.05), (0.05, 0.01, 0.01)],
    ids=["unknown-bge-default", "model-own", "flag-given"])
def test_trained_temperature_is_the_models_own_unless_given_and_is_saved(
        tiny_bert_dir, tmp_path, own, flag, expected):
    """Left out, ``--temperature`` is the one the model was trained at (else BGE's 0.02);
    the one used is saved, so the finetuned model is finetuned further at it."""
    from pipelines.train.finetune import train_temperature

    start = tmp_path / "start"
    Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", temperature=own).save(start)
    cfg = FinetuneConfig(model_name_or_path=str(start), train_data="d",
                         output_dir=str(tmp_path / "o"), temperature=flag)
    encoder = load_encoder(cfg)
    assert train_temperature(cfg, encoder) == expected  # what the loss is given
    encoder.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "bge_config.json").read_text())[
        "temperature"] == expected


def test_presets_carry_the_temperature_they_were_trained_at():
    from bge_core.presets import PRESETS

    assert PRESETS["all-MiniLM-L6-v2"].settings["temperature"] == 0.05  # ST scale 20
    assert {PRESETS[n].settings["temperature"] for n in PRESETS if n.startswith("bge")} == {0.02}
