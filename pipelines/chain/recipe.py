"""The BGE recipe on a new domain, one command: RetroMAE → mine → finetune → evaluate.

    ray job submit --working-dir . -- python pipelines/recipe.py \\
        --corpus s3://bucket/corpus.jsonl --train_data s3://bucket/train.jsonl \\
        --beir_dir s3://bucket/eval/ --output_dir s3://bucket/recipe/

Each step is one of the project's jobs, run in this process on the same Ray, at its own
defaults (mining's window and precision at `MINE_DEFAULTS`, finetuning at
`FINETUNE_DEFAULTS`, both measured on NFCorpus), with the paths below under `output_dir` (a
local path or any fsspec URI):

=========  ==========================================  ===============================
step       job (its flags: ``--<step>_args "..."``)    writes
=========  ==========================================  ===============================
retromae   pretrain_retromae on `corpus`               ``retromae/`` (an encoder)
mine       mine_hard_negatives: `train_data` against   ``mined.jsonl``
           `corpus`, with the starting model
finetune   finetune on ``mined.jsonl``, from           ``finetuned/`` (the final model)
           ``retromae/`` (or the model without it);    (``soup/seed<N>/``: one model
           `soup` times with seeds seed, seed+1, ...   per seed, then their average
           and their weights averaged, the start       with the start mixed in)
           mixed back in at `start_weight`
evaluate   evaluate ``finetuned/`` on `beir_dir`       ``metrics.json``, ``sts.json``
           and/or `sts`
=========  ==========================================  ===============================

``--steps auto`` (the default) measures what the chain runs from the start: RetroMAE only
when the starting model is a raw backbone, not an embedder already (a preset, or a folder
with sentence-transformers' ``modules.json`` or this project's ``bge_config.json``):
RetroMAE's reconstruction objective moved all-MiniLM-L6-v2 away from retrieval (NFCorpus:
+0.57 / +1.07 nDCG@10 and STS-B -3.1 with it, +3.48 / +3.71 without; BENCHMARKS.md); and
``evaluate`` only when there is something to score on (`beir_dir` and/or `sts`).

With ``--soup K`` (the default, `SOUP_DEFAULT`) finetuning runs K times from the same start
on the same mined data, seeds ``seed`` (``--finetune_args``' or the job's 42) to
``seed + K - 1``, and ``finetuned/`` is the uniform average of their weights (a model soup,
`bge_core.soup`); each run is its own step (``finetune_1`` ... ``finetune_K``, then
``soup``). The soup step also mixes the weights finetuning started from back in:
``finetuned/`` = (1 - w) × the average + w × the start, w = ``--start_weight``
(`START_WEIGHT_DEFAULT`; LM-Cocktail's merge of a finetuned embedder with its base).
``--soup 1 --start_weight 0`` finetunes once, straight into ``finetuned/``.

A step that returns writes ``_recipe/<step>.json`` (its flags, summary and seconds). A
rerun of the same command skips every step with such a record and reruns the first one
without: the training jobs resume from their own checkpoints, mining and evaluation start
again. A recorded step whose flags have changed stops the run with a message (its output
would no longer match them): use a new `output_dir`.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec

from bge_core.io import open_text
from bge_core.loading import BGE_CONFIG_FILE
from bge_core.presets import find_preset
from bge_core.storage import StorageError, is_local, local_path
from pipelines.common.cli import ConfigError, parse_config, run_main
from pipelines.common.lease import LeaseHeld

log = logging.getLogger("bge.recipe")
STEPS = ("retromae", "mine", "finetune", "evaluate")
# Finetuning's settings in the chain, chosen by the NFCorpus ablation (BENCHMARKS.md, "The
# whole recipe on NFCorpus" and after; docs/recipe.md): a domain's training set is small
# (NFCorpus: 2,563 queries), and more passes over it with one mined negative per query
# gained most for the same compute; passages trained at 96 tokens cost 28% less a step
# than at 128, which pays for a fourth pass. They come before `--finetune_args`, whose
# flags win.
FINETUNE_DEFAULTS = ("--num_train_epochs 4 --per_device_train_batch_size 32 "
                     "--train_group_size 2 --learning_rate 5e-5 --passage_max_len 96 --bf16")
# Mining's window in the chain (the mining job's own is FlagEmbedding's 10-210): with three
# epochs over one mined negative per query, negatives from ranks 30-230 scored best on
# NFCorpus (five seeds). Its encoding runs in bf16 where the device has it natively (GPUs,
# AVX512-BF16 / AMX CPUs; fp32 elsewhere): 3.7 CPU minutes against 4.8 in fp32 on NFCorpus,
# and the negatives are a random draw from 200 ranks either way. Before `--mine_args`,
# whose flags win.
MINE_DEFAULTS = "--range_for_sampling 30-230 --dtype bf16"
# Finetuning runs this many times (seeds seed ... seed + K - 1) and the chain keeps the
# average of their weights: on NFCorpus a soup scored above the mean of its members every
# time (BENCHMARKS.md, "The recipe: model soups"), where no single setting moved past the
# seed spread; the chain with two four-epoch runs at 96 passage tokens, mining and evaluation
# took 59.5-59.7 CPU minutes on a Zen 4 VM without AMX (BENCHMARKS.md).
SOUP_DEFAULT = 2
# The final model keeps this share of the weights finetuning started from: (1 - w) × the
# soup + w × the start (LM-Cocktail's merge of a finetuned embedder with its base; WiSE-FT).
# Picked on the dev sets (NFCorpus dev, STS-B dev; two seeds' soups): the weight with the
# best NFCorpus dev nDCG@10 among those keeping STS-B dev within 0.5 of all-MiniLM-L6-v2's
# at both seeds (0.1 and 0.15 did not; 0.3 scored lower; BENCHMARKS.md, "The recipe at its
# new default, end to end at two seeds"); 0 keeps the soup as it is.
START_WEIGHT_DEFAULT = 0.2


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """The whole recipe: RetroMAE on the corpus, mine, finetune, evaluate.

    Args:
        corpus: raw domain text (JSONL/Parquet file, folder or glob with a ``text``
            column): RetroMAE's input and the pool negatives are mined from.
        train_data: ``{"query", "pos": [...]}`` JSONL/Parquet (``neg`` is replaced).
        output_dir: every step's output and record (local path or fsspec URI).
        model_name_or_path: the starting model (a directory, preset or hub id).
        beir_dir / split: BEIR-layout retrieval set the final model is scored on.
        sts: STS CSV the final model's Spearman is measured on.
        steps: which steps, in the order above (a rerun should name the same ones), or
            ``auto``: RetroMAE only for a raw backbone, evaluate only with a set to score.
        mine_with: mine with the starting model (``base``) or the RetroMAE encoder.
        soup: finetuning runs with this many seeds, averaged into the final model (1:
            one run, no averaging).
        start_weight: share of the finetuning's starting weights mixed back into the
            final model ((1 - w) × soup + w × start; 0: the soup alone).
        retromae_args ... evaluate_args: extra flags for that step's job, as on its
            command line (they win over the paths this job gives).
    """

    corpus: str
    train_data: str
    output_dir: str
    model_name_or_path: str = "all-MiniLM-L6-v2"
    beir_dir: str | None = None
    split: str = "test"
    sts: str | None = None
    steps: str = "auto"
    mine_with: Literal["base", "retromae"] = "base"
    soup: int = SOUP_DEFAULT
    start_weight: float = START_WEIGHT_DEFAULT
    retromae_args: str = ""
    mine_args: str = ""
    finetune_args: str = ""
    evaluate_args: str = ""

    def __post_init__(self) -> None:
        if self.soup < 1:
            raise ConfigError(f"--soup must be >= 1 (1: no averaging), got {self.soup}")
        if not 0.0 <= self.start_weight < 1.0:
            raise ConfigError(f"--start_weight must be in [0, 1) (0: the soup alone), got "
                              f"{self.start_weight}")
        if self.steps != "auto":  # `auto` picks valid steps itself
            self._check_named_steps(self.step_names())
        for step in STEPS:
            try:
                shlex.split(getattr(self, f"{step}_args"))
            except ValueError as err:
                raise ConfigError(f"--{step}_args: {err}") from err

    def _check_named_steps(self, names: list[str]) -> None:
        unknown = [s for s in names if s not in STEPS]
        if unknown or not names:
            raise ConfigError(f"--steps: unknown step(s) {unknown}; choose from "
                              f"{list(STEPS)} or auto")
        if names != [s for s in STEPS if s in names]:
            raise ConfigError(f"--steps {self.steps!r}: steps run in the order {list(STEPS)}")
        if "evaluate" in names and not (self.beir_dir or self.sts):
            raise ConfigError("--steps includes evaluate: give --beir_dir and/or --sts "
                              "(or leave evaluate out of --steps)")

    def step_names(self) -> list[str]:
        """The steps to run; ``auto`` looks at the starting model (a preset needs no I/O,
        a folder at any URI is checked for an embedder's settings file)."""
        if self.steps == "auto":
            return [s for s in STEPS
                    if not (s == "retromae" and is_embedder(self.model_name_or_path))
                    and not (s == "evaluate" and not (self.beir_dir or self.sts))]
        return [s.strip() for s in self.steps.split(",") if s.strip()]

    def path(self, name: str) -> str:
        """`name` under `output_dir` (``retromae``, ``mined.jsonl``, ``_recipe/...``)."""
        return f"{self.output_dir.rstrip('/')}/{name}"


def is_embedder(model: str) -> bool:
    """Whether `model` is already a sentence embedder, not a raw backbone: a preset, or a
    folder (local or any fsspec URI) holding ``modules.json`` or ``bge_config.json``. A hub
    id that is no preset counts as a backbone (nothing is fetched to look)."""
    names = ("modules.json", BGE_CONFIG_FILE)
    if find_preset(model) is not None:
        return True
    if is_local(model):  # as `bge_core.loading.resolve_model` reads it: ``~`` expanded
        folder = Path(local_path(model)).expanduser()
        return any((folder / name).is_file() for name in names)
    fs, root = fsspec.core.url_to_fs(model)
    return any(fs.exists(f"{root.rstrip('/')}/{name}") for name in names)


@dataclass(frozen=True)
class Step:
    """One job of the chain: its name, its config's flags, and how to run them."""

    name: str
    argv: list[str]
    run: Callable[[list[str]], dict[str, Any]]
    inputs: tuple[str, ...] = ()  # what else the step reads (recorded, compared on rerun)

    def key(self) -> list[str]:
        return [*self.argv, *self.inputs]


def plan(cfg: RecipeConfig) -> list[Step]:
    """The chain's steps with their flags (paths first, then the user's `<step>_args`)."""
    names = cfg.step_names()
    start = cfg.path("retromae") if "retromae" in names else cfg.model_name_or_path
    miner = start if cfg.mine_with == "retromae" else cfg.model_name_or_path
    flags = {
        "retromae": ["--model_name_or_path", cfg.model_name_or_path,
                     "--train_data", cfg.corpus, "--output_dir", cfg.path("retromae")],
        "mine": ["--model_name_or_path", miner, "--input_file", cfg.train_data,
                 "--candidate_pool", cfg.corpus, "--output_file", cfg.path("mined.jsonl")],
        "finetune": ["--model_name_or_path", start, "--train_data", cfg.path("mined.jsonl"),
                     "--output_dir", cfg.path("finetuned")],
        "evaluate": ["--model", cfg.path("finetuned")],
    }
    runners = {"retromae": _retromae, "mine": _mine, "finetune": _finetune,
               "evaluate": _evaluator(cfg)}
    inputs = {"evaluate": (f"beir_dir={cfg.beir_dir}", f"split={cfg.split}", f"sts={cfg.sts}")}
    defaults = {"mine": shlex.split(MINE_DEFAULTS), "finetune": shlex.split(FINETUNE_DEFAULTS)}
    merged = cfg.soup > 1 or cfg.start_weight > 0  # finetuning ends in the soup step
    steps = []
    for name in names:
        step = Step(name, flags[name] + defaults.get(name, []) +
                    shlex.split(getattr(cfg, f"{name}_args")), runners[name], inputs.get(name, ()))
        steps += soup_steps(cfg, step) if name == "finetune" and merged else [step]
    return steps


def soup_steps(cfg: RecipeConfig, finetune: Step) -> list[Step]:
    """`finetune` once per seed into ``soup/seed<N>/``, then the step averaging them (and
    mixing the start back in at `start_weight`) into ``finetuned/``."""
    from pipelines.train.finetune import FinetuneConfig

    job = parse_config(FinetuneConfig, finetune.argv)
    seed = job.seed
    members = [cfg.path(f"soup/seed{seed + i}") for i in range(cfg.soup)]
    at = finetune.argv.index("--output_dir") + 1  # the chain's own, before the user's flags
    steps = [Step(f"finetune_{i + 1}", [*finetune.argv[:at], member, *finetune.argv[at + 1:],
                                        *(["--seed", str(seed + i)] if i else [])], _finetune)
             for i, member in enumerate(members)]  # the last --seed wins
    mix = (["--start", job.model_name_or_path, "--start_weight", str(cfg.start_weight)]
           if cfg.start_weight > 0 else [])
    return [*steps, Step("soup", ["--output_dir", cfg.path("finetuned"), *mix, *members],
                         _soup)]


def run(cfg: RecipeConfig) -> dict[str, dict[str, Any]]:
    """Run the steps not yet recorded as complete (Ray already started); returns each
    step's record, those skipped included."""
    steps = plan(cfg)
    if cfg.steps == "auto":
        log.info("steps (auto): %s%s", ",".join(s.name for s in steps),
                 "" if steps[0].name == "retromae" else
                 f" (no retromae: {cfg.model_name_or_path} is already an embedder)")
    done = {s.name: recorded(cfg, s) for s in steps}  # every mismatch named before any work
    records: dict[str, dict[str, Any]] = {}
    for step in steps:
        if done[step.name] is not None:
            log.info("%s: complete (%s), skipped", step.name, cfg.path(f"_recipe/{step.name}.json"))
            records[step.name] = {**done[step.name], "skipped": True}
            continue
        log.info("%s: %s", step.name, shlex.join(step.argv))
        began = time.perf_counter()
        summary = step.run(step.argv)
        record = {"step": step.name, "key": step.key(), "summary": summary,
                  "seconds": round(time.perf_counter() - began, 1)}
        with open_text(cfg.path(f"_recipe/{step.name}.json"), "w") as handle:
            json.dump(record, handle, indent=1, default=str)
        log.info("%s: done in %.0f s", step.name, record["seconds"])
        records[step.name] = {**record, "skipped": False}
    return records


def recorded(cfg: RecipeConfig, step: Step) -> dict[str, Any] | None:
    """The step's completion record, None if it has none; an error if it has one for
    other flags."""
    marker = cfg.path(f"_recipe/{step.name}.json")
    done = read_record(marker)
    if done is not None and done["key"] != step.key():
        raise ConfigError(
            f"{marker}: step {step.name} completed with other flags "
            f"({shlex.join(done['key'])}); now {shlex.join(step.key())}. Use a new "
            "--output_dir, or delete that record and the step's output")
    return done


def read_record(uri: str) -> dict[str, Any] | None:
    """A step's completion record, or None if the step has not completed."""
    try:
        with open_text(uri, "r", what="step record") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- the steps
def _retromae(argv: list[str]) -> dict[str, Any]:
    from pipelines.train.retromae import RetroMAEConfig
    from pipelines.train.retromae import run as pretrain

    result = pretrain(parse_config(RetroMAEConfig, argv))
    return {"output_dir": result.output_dir, "texts": result.examples,
            "steps": result.metrics.get("step"), "loss": result.metrics.get("loss")}


def _mine(argv: list[str]) -> dict[str, Any]:
    from pipelines.search.mine import MineConfig
    from pipelines.search.mine import run as mine

    return mine(parse_config(MineConfig, argv))


def _finetune(argv: list[str]) -> dict[str, Any]:
    from pipelines.train.finetune import FinetuneConfig
    from pipelines.train.finetune import run as finetune

    result = finetune(parse_config(FinetuneConfig, argv))
    return {"output_dir": result.output_dir, "examples": result.examples,
            "steps": result.metrics.get("step"), "loss": result.metrics.get("loss")}


def _soup(argv: list[str]) -> dict[str, Any]:
    """``--output_dir OUT [--start START --start_weight W] MODEL...``: the average of the
    models' weights (with W of START's mixed in), saved to OUT."""
    import argparse
    import tempfile

    from bge_core.soup import average_encoders
    from pipelines.train.driver import export_model

    parser = argparse.ArgumentParser(prog="soup")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--start")
    parser.add_argument("--start_weight", type=float, default=0.0)
    parser.add_argument("members", nargs="+")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        saved = average_encoders(args.members, args.start, args.start_weight)
        export_model(saved.save(Path(folder) / "soup"), args.output_dir)
    mix = {"start": args.start, "start_weight": args.start_weight} if args.start else {}
    return {"output_dir": args.output_dir, "members": args.members, **mix}


def _evaluator(cfg: RecipeConfig) -> Callable[[list[str]], dict[str, Any]]:
    """The evaluate step: retrieval on `beir_dir`, then Spearman on `sts` (each if given)."""

    def evaluate(argv: list[str]) -> dict[str, Any]:
        from pipelines.search.evaluate import EvaluateConfig
        from pipelines.search.evaluate import run as score

        out: dict[str, Any] = {}
        if cfg.beir_dir:
            out["retrieval"] = score(parse_config(EvaluateConfig, [
                "--beir_dir", cfg.beir_dir, "--split", cfg.split,
                "--output", cfg.path("metrics.json"), *argv]))["metrics"]
        if cfg.sts:
            out["sts"] = score(parse_config(EvaluateConfig, [
                "--sts", cfg.sts, "--output", cfg.path("sts.json"), *argv]))["metrics"]
        return out

    return evaluate


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one clear line and exit status 2 on bad flags, config or input."""
    from pipelines.train.finetune import TrainingDataError

    return run_main("recipe", RecipeConfig, _run_and_report, argv,
                    errors=(TrainingDataError, LeaseHeld, StorageError))


def _run_and_report(cfg: RecipeConfig) -> None:
    for name, record in run(cfg).items():
        state = "skipped (complete)" if record["skipped"] else f"{record['seconds']:.0f} s"
        print(f"{name}: {state}; {json.dumps(record['summary'], default=str)[:400]}")


if __name__ == "__main__":
    sys.exit(main())
