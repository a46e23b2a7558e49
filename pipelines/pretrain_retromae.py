"""RetroMAE pretraining on Ray Train: BGE's first stage, on raw text.

    ray job submit --working-dir . -- python pipelines/pretrain_retromae.py \\
        --config pipelines/configs/retromae_24gpu.yaml

or with flags (FlagEmbedding's names): ``--model_name_or_path bert-base-uncased
--train_data s3://bucket/text/ --output_dir s3://bucket/retromae/ --num_workers 24
--use_gpu --bf16 --encoder_mlm_probability 0.3 --decoder_mlm_probability 0.5``.

The corpus is Parquet or JSONL files (a file, folder or glob; local or any fsspec URI) with
a text column. The driver reads and checks it once (empty and null texts are skipped and
counted); workers share it through Ray's object store, each taking its slice of a seeded
per-epoch permutation. Masks and dropout are seeded per (seed, rank, step), so a run resumed
after a failure redoes exactly the steps it lost. Every checkpoint
(``<output_dir>/<run_name>/checkpoint_step_*/model``) is a loadable CLS-pooled encoder plus
the heads needed to resume; the final encoder is written to ``<output_dir>`` itself, as
finetuning does, for ``pipelines/finetune.py --model_name_or_path <output_dir>``. Launch,
checkpoint/resume, progress, optimizer and precision are the shared `pipelines.train_common`
machinery.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from bge_core.distributed import all_reduce_mean, get_rank, get_world_size
from bge_core.loading import resolve_model
from bge_core.retromae import HEADS_FILE, load_checkpoint, load_retromae, save_checkpoint
from bge_core.retromae_masking import RetroMAECollator
from bge_core.storage import StorageError
from bge_core.training import Fault, enable_gradient_checkpointing
from pipelines import train_common as tc
from pipelines.cli import config_from_dict, config_to_dict, run_main, start_ray
from pipelines.corpus_io import InputError, list_input_files, plan_file, read_chunk_rows
from pipelines.lease import LeaseHeld
from pipelines.train_args import TrainArgs
from pipelines.train_session import Session, open_session

log = logging.getLogger("bge.retromae")


@dataclass(frozen=True, kw_only=True)
class RetroMAEConfig(TrainArgs):
    """RetroMAE pretraining job (flags follow FlagEmbedding's `retromae_pretrain`).

    The shared training flags are `TrainArgs'`; `train_data` is a Parquet/JSONL file,
    folder or glob of raw text.

    Args:
        text_column: column holding the text.
        max_seq_length: tokens per text including [CLS] and [SEP] (longer texts cut).
        encoder_mlm_probability / decoder_mlm_probability: masking rates (BGE: 0.3 / 0.5).
    """

    text_column: str = "text"
    max_seq_length: int = 512
    encoder_mlm_probability: float = 0.3
    decoder_mlm_probability: float = 0.5
    per_device_train_batch_size: int = 16
    learning_rate: float = 2e-5
    run_name: str = "retromae"


# ------------------------------------------------------------------------------ data
def read_texts(uri: str, column: str) -> tuple[list[str], int]:
    """All non-empty texts of the corpus at `uri`, and how many empty/null rows were skipped.

    Raises:
        InputError: missing files or column, or a non-string text (names file and row).
    """
    texts: list[str] = []
    skipped = 0
    for index, path in enumerate(list_input_files(uri)):
        row = 0
        for chunk in plan_file(path, index, 1 << 20, [column]):
            for value in read_chunk_rows(chunk, [column])[column]:
                row += 1
                if value is None or (isinstance(value, str) and not value.strip()):
                    skipped += 1
                elif not isinstance(value, str):
                    raise InputError(f"{path}: row {row}: {column!r} is "
                                     f"{type(value).__name__}, not a string")
                else:
                    texts.append(value)
    return texts, skipped


@dataclass(frozen=True)
class StepPlan:
    """Equal steps on every rank: each global batch is `world` local batches, last cut."""

    texts: int
    world: int
    batch: int
    epochs: int
    max_steps: int | None

    @property
    def steps_per_epoch(self) -> int:
        return self.texts // (self.world * self.batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def local_rows(self, seed: int, epoch: int, step_in_epoch: int, rank: int) -> np.ndarray:
        """Indices of this rank's texts for one step (seeded per epoch, same on all ranks)."""
        order = np.random.default_rng([seed, epoch]).permutation(self.texts)
        start = (step_in_epoch * self.world + rank) * self.batch
        return order[start : start + self.batch]


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one step on one rank (masks and dropout): a resumed run redraws the same."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------- worker
def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: RetroMAE steps on this rank's share of each global batch."""
    import ray

    cfg = config_from_dict(RetroMAEConfig, loop_config["cfg"])
    device = tc.start_worker(cfg)
    texts = ray.get(loop_config["texts"])
    rank, world = get_rank(), get_world_size()
    model, tokenizer = load_retromae(cfg.model_name_or_path)
    tokenizer = tc.tokenizer_override(cfg) or tokenizer  # --tokenizer_name
    model.to(device)
    enable_gradient_checkpointing(model.lm, cfg.gradient_checkpointing)
    plan = StepPlan(len(texts), world, cfg.per_device_train_batch_size, cfg.num_train_epochs,
                    cfg.max_steps)
    io = tc.ModelIO(save=lambda m, folder: save_checkpoint(m, tokenizer, folder / "model"),
                    load=lambda m, folder: load_checkpoint(m, folder / "model"))
    session = open_session(model, cfg, plan.total_steps, device, io,
                              tc.fault_from(loop_config))
    ddp_model = tc.prepare_model(model)
    collator = RetroMAECollator(tokenizer, cfg.max_seq_length, cfg.encoder_mlm_probability,
                                cfg.decoder_mlm_probability)
    tokenize = functools.partial(_tokenize, tokenizer, cfg.max_seq_length)
    tokens = 0  # real tokens through the encoder on this rank since (re)start
    state = session.state
    ddp_model.train()
    while state.step < plan.total_steps:
        if state.step_in_epoch >= plan.steps_per_epoch:
            state.next_epoch()
        rows = plan.local_rows(cfg.seed, state.epoch, state.step_in_epoch, rank)
        key = step_seed(cfg.seed, rank, state.step)
        torch.manual_seed(key)  # dropout
        batch = collator(tokenize([texts[i] for i in rows]), torch.Generator().manual_seed(key))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with session.amp.autocast():
            out = ddp_model(**batch)
        session.amp.backward(out.loss)
        session.step()
        tokens += int(batch["attention_mask"].sum())
        session.finish_step(len(rows) * world, functools.partial(_losses, out, tokens, session))


def _tokenize(tokenizer: Any, max_seq_length: int, texts: list[str]) -> list[list[int]]:
    """Body token ids (no special tokens), cut to leave room for [CLS] and [SEP]."""
    return tokenizer(texts, add_special_tokens=False, truncation=True,
                     max_length=max_seq_length - 2)["input_ids"]


def _losses(out: Any, tokens: int, session: Session) -> dict[str, float]:
    """Losses (mean over ranks) and token throughput: a collective at reporting steps."""
    world = get_world_size()
    return {"loss": all_reduce_mean(out.loss.detach().float()),
            "encoder_loss": all_reduce_mean(out.encoder_loss.float()),
            "decoder_loss": all_reduce_mean(out.decoder_loss.float()),
            "tokens_per_s": all_reduce_mean(tokens) * world / session.meter.elapsed}


# ---------------------------------------------------------------------------- driver
def run(cfg: RetroMAEConfig, *, fault: Fault | None = None) -> tc.TrainResult:
    """Read the corpus, pretrain on Ray Train (Ray already started), write the encoder
    (without the resume-only heads) to ``output_dir``; `fault` is a drill for tests."""
    return _train(cfg, *_checked_texts(cfg), fault=fault)


def _train(cfg: RetroMAEConfig, texts: list[str], skipped: int,
           fault: Fault | None = None) -> tc.TrainResult:
    import ray

    loop_config = {"cfg": config_to_dict(cfg), "texts": ray.put(texts)}
    return tc.run_training("RetroMAE pretraining", train_loop, loop_config, cfg,
                           examples=len(texts), skipped=skipped, fault=fault,
                           export_skip=(HEADS_FILE,))


def _checked_texts(cfg: RetroMAEConfig) -> tuple[list[str], int]:
    """The corpus's texts and empty-row count, after checking model and data fit."""
    _check_model(cfg)
    texts, skipped = read_texts(cfg.train_data, cfg.text_column)
    log.info("%s: %d texts, %d empty or null rows skipped", cfg.train_data, len(texts), skipped)
    if len(texts) < cfg.num_workers * cfg.per_device_train_batch_size:
        raise InputError(f"{cfg.train_data}: {len(texts)} non-empty texts, fewer than one "
                         f"global batch ({cfg.num_workers} workers x "
                         f"{cfg.per_device_train_batch_size})")
    return texts, skipped


def _check_model(cfg: RetroMAEConfig) -> None:
    """The model loads and holds `max_seq_length` positions (fails before any worker)."""
    folder = resolve_model(cfg.model_name_or_path).folder
    AutoTokenizer.from_pretrained(folder)
    positions = AutoConfig.from_pretrained(folder).max_position_embeddings
    if cfg.max_seq_length > positions:
        raise ValueError(f"--max_seq_length {cfg.max_seq_length} exceeds the "
                         f"{positions} positions of {cfg.model_name_or_path}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 2 with one clear line on bad flags, config or input."""
    return run_main("pretrain_retromae", RetroMAEConfig, _checked_run, argv,
                    errors=(LeaseHeld, StorageError), uses_ray=False)


def _checked_run(cfg: RetroMAEConfig) -> None:
    texts, skipped = _checked_texts(cfg)  # bad model or data fail before Ray starts
    start_ray()
    result = _train(cfg, texts, skipped)
    print(f"RetroMAE done: {result.metrics.get('step')} steps on {result.examples} texts "
          f"({result.skipped} empty skipped); encoder at {result.output_dir}")


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray then pickles the training loop and its
    # config class by reference, and workers can resolve the config's annotations.
    sys.exit(importlib.import_module("pipelines.pretrain_retromae").main())
