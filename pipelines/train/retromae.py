"""RetroMAE pretraining on Ray Train: BGE's first stage, on raw text.

    ray job submit --working-dir . -- python pipelines/pretrain_retromae.py \\
        --config pipelines/configs/retromae_24gpu.yaml

or with flags (FlagEmbedding's names): ``--model_name_or_path bert-base-uncased
--train_data s3://bucket/text/ --output_dir s3://bucket/retromae/ --num_workers 24
--use_gpu --bf16 --encoder_mlm_probability 0.3 --decoder_mlm_probability 0.5``.

The corpus is Parquet or JSONL files (a file, folder or glob; local or any fsspec URI) with
a text column. It is never on the driver: Ray tasks read it in ranges (`bge_core.io`),
first to count its texts (empty and null ones are skipped and counted), then once per
epoch as a Ray Dataset split over the workers in a fixed order (`pipelines.train.data`),
each worker shuffling its rows in a bounded buffer seeded per epoch. Masks and dropout
are seeded per (seed, rank, step). A run resumed after a failure re-reads the epoch it
was in and skips the batches of the steps already trained, so it trains on exactly the
texts, in the same order, with the same masks as an uninterrupted run. Every checkpoint
(``<output_dir>/<run_name>/checkpoint_step_*/model``) is a loadable CLS-pooled encoder plus
the heads needed to resume; the final encoder is written to ``<output_dir>`` itself, as
finetuning does, for ``pipelines/finetune.py --model_name_or_path <output_dir>``. Launch,
export (`pipelines.train.driver`), checkpoint/resume (`pipelines.train.worker`), progress,
optimizer, precision and the epoch loop (`pipelines.train.session`) are shared with
finetuning.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoTokenizer

from bge_core.distributed import all_reduce_mean, get_rank, get_world_size
from bge_core.io import RANGE_ROWS, FileRange, read_range
from bge_core.loading import resolve_model
from bge_core.records import check_text, located
from bge_core.retromae import HEADS_FILE, load_checkpoint, load_retromae, save_checkpoint
from bge_core.retromae_masking import RetroMAECollator
from bge_core.storage import StorageError
from bge_core.trainable import enable_gradient_checkpointing
from pipelines.common.cli import config_from_dict, config_to_dict, run_main
from pipelines.common.corpus_io import InputError, list_input_files
from pipelines.common.lease import LeaseHeld
from pipelines.common.ranges import plan_data, range_dataset
from pipelines.train import worker
from pipelines.train.args import TrainArgs, planned_steps
from pipelines.train.data import data_config, epoch_batches, epoch_steps
from pipelines.train.driver import TrainResult, run_training
from pipelines.train.session import Session, StepHook, open_session, run_epochs

log = logging.getLogger("bge.retromae")


@dataclass(frozen=True, kw_only=True)
class RetroMAEConfig(TrainArgs):
    """RetroMAE pretraining job (flags follow FlagEmbedding's `retromae_pretrain`).

    The shared training flags are `TrainArgs'`; `train_data` is a Parquet/JSONL file,
    folder or glob of raw text.

    Args:
        text_column: column holding the text.
        shuffle_buffer_size: rows each worker shuffles at a time, per epoch (0: none).
        rows_per_range: lines (Parquet rows, grouped by row group) per read task.
        max_seq_length: tokens per text including [CLS] and [SEP] (longer texts cut).
        encoder_mlm_probability / decoder_mlm_probability: masking rates (BGE: 0.3 / 0.5).
    """

    text_column: str = "text"
    shuffle_buffer_size: int = 1024
    rows_per_range: int = RANGE_ROWS
    max_seq_length: int = 512
    encoder_mlm_probability: float = 0.3
    decoder_mlm_probability: float = 0.5
    per_device_train_batch_size: int = 16
    learning_rate: float = 2e-5
    run_name: str = "retromae"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rows_per_range", "max_seq_length"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.shuffle_buffer_size < 0:
            raise InputError(f"--shuffle_buffer_size must be >= 0, got "
                             f"{self.shuffle_buffer_size}")


# ------------------------------------------------------------------------------ data
TEXT_SCHEMA = pa.schema([("text", pa.string())])


def texts_of(part: FileRange, column: str) -> tuple[list[str], int]:
    """The non-empty texts of one range of the corpus, and its empty/null rows.

    Raises:
        InputError: a line that is not JSON, or a non-string text (names file and line).
    """
    texts: list[str] = []
    skipped = 0
    unit = "row" if part.fmt == "parquet" else "line"
    for row, record, error in read_range(part, [column]):
        if error := error or check_text(record, column):
            raise InputError(located(part.path, row + 1, error, unit))
        value = record.get(column)
        if value is None or not value.strip():
            skipped += 1
        else:
            texts.append(value)
    return texts, skipped


def _count_range(part: FileRange, column: str) -> pa.Table:
    """One row per range: its text and empty-row counts, or why it cannot be read."""
    try:
        texts, skipped = texts_of(part, column)
    except InputError as err:  # the message goes to the driver, not a task traceback
        return pa.table({"texts": [0], "skipped": [0], "error": [str(err)]})
    return pa.table({"texts": [len(texts)], "skipped": [skipped],
                     "error": pa.array([None], pa.string())})


def _text_range(part: FileRange, column: str) -> pa.Table:
    return pa.table({"text": texts_of(part, column)[0]}, schema=TEXT_SCHEMA)


@dataclass(frozen=True)
class Corpus:
    """The corpus as the driver knows it: its ranges and counts, never its texts."""

    ranges: list[dict[str, Any]]
    texts: int
    skipped: int

    def dataset(self, column: str) -> Any:
        """The texts as a lazy Ray Dataset (read again on every pass)."""
        return range_dataset(self.ranges, _text_range, column=column)


def plan_corpus(cfg: RetroMAEConfig) -> Corpus:
    """Plan the corpus's ranges (in a seeded order) and count its texts, on Ray tasks.

    Raises:
        InputError: missing files or column, a bad line or text (names file and line).
    """
    ranges = plan_data(cfg.train_data, what="input", error=InputError,
                       rows_per_range=cfg.rows_per_range, required=[cfg.text_column])
    order = np.random.default_rng(cfg.seed).permutation(len(ranges))
    ranges = [ranges[i] for i in order]  # files and ranges mixed, the same on every run
    counts = range_dataset(ranges, _count_range, column=cfg.text_column).take_all()
    problem = next((c["error"] for c in counts if c["error"]), None)
    if problem:
        raise InputError(problem)
    return Corpus(ranges, sum(c["texts"] for c in counts), sum(c["skipped"] for c in counts))


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
        return epoch_steps(self.texts, self.world, self.batch)

    @property
    def total_steps(self) -> int:
        return planned_steps(self.steps_per_epoch, self.epochs, self.max_steps)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one step on one rank (masks and dropout): a resumed run redraws the same."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------- worker
def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: RetroMAE steps on this rank's share of each global batch."""
    import ray.train

    cfg = config_from_dict(RetroMAEConfig, loop_config["cfg"])
    device = worker.start_worker(cfg)
    rank, world = get_rank(), get_world_size()
    model, tokenizer = load_retromae(cfg.model_name_or_path)
    tokenizer = worker.tokenizer_override(cfg) or tokenizer  # --tokenizer_name
    model.to(device)
    enable_gradient_checkpointing(model.lm, cfg.gradient_checkpointing)
    plan = StepPlan(loop_config["texts"], world, cfg.per_device_train_batch_size,
                    cfg.num_train_epochs, cfg.max_steps)
    io = worker.ModelIO(save=lambda m, folder: save_checkpoint(m, tokenizer, folder / "model"),
                    load=lambda m, folder: load_checkpoint(m, folder / "model"))
    session = open_session(model, cfg, plan.total_steps, device, io,
                           loop_config.get("on_step"))
    ddp_model = worker.prepare_model(model)
    collator = RetroMAECollator(tokenizer, cfg.max_seq_length, cfg.encoder_mlm_probability,
                                cfg.decoder_mlm_probability)
    tokenize = functools.partial(_tokenize, tokenizer, cfg.max_seq_length)
    shard = ray.train.get_dataset_shard("train")
    session.constants["num_nodes"] = worker.count_nodes()
    tokens = 0  # real tokens through the encoder on this rank since (re)start
    ddp_model.train()

    def batches(epoch: int, skip: int) -> Any:
        return epoch_batches(shard, batch_size=cfg.per_device_train_batch_size,
                             shuffle_buffer=cfg.shuffle_buffer_size, seed=cfg.seed,
                             epoch=epoch, skip=skip, steps=plan.steps_per_epoch)

    def train_step(batch: pa.Table) -> None:
        nonlocal tokens
        texts = batch.column("text").to_pylist()
        key = step_seed(cfg.seed, rank, session.state.step)
        torch.manual_seed(key)  # dropout
        inputs = collator(tokenize(texts), torch.Generator().manual_seed(key))
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        with session.amp.autocast():
            out = ddp_model(**inputs)
        session.amp.backward(out.loss)
        session.step()
        tokens += int(inputs["attention_mask"].sum())
        session.finish_step(len(texts) * world, functools.partial(_losses, out, tokens, session))

    run_epochs(session.state, plan.total_steps, plan.steps_per_epoch, batches, train_step)


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
def run(cfg: RetroMAEConfig, *, on_step: StepHook | None = None) -> TrainResult:
    """Plan and count the corpus, pretrain on Ray Train (Ray already started), write the
    encoder (without the resume-only heads) to ``output_dir``.

    Args:
        on_step: called on every worker after each optimizer step with its
            `pipelines.train.session.StepInfo` (rank, world size, step, epoch); must pickle
            by reference (see `StepHook`). Tests pass fault drills; runs pass none.

    Raises:
        InputError: bad or too little data (names the file, line or counts).
    """
    _check_model(cfg)
    corpus = plan_corpus(cfg)
    log.info("%s: %d texts in %d ranges, %d empty or null rows skipped", cfg.train_data,
             corpus.texts, len(corpus.ranges), corpus.skipped)
    if corpus.texts < cfg.num_workers * cfg.per_device_train_batch_size:
        raise InputError(f"{cfg.train_data}: {corpus.texts} non-empty texts, fewer than one "
                         f"global batch ({cfg.num_workers} workers x "
                         f"{cfg.per_device_train_batch_size})")
    loop_config = {"cfg": config_to_dict(cfg), "texts": corpus.texts}
    return run_training("RetroMAE pretraining", train_loop, loop_config, cfg,
                        examples=corpus.texts, skipped=corpus.skipped, on_step=on_step,
                        export_skip=(HEADS_FILE,),
                        datasets={"train": corpus.dataset(cfg.text_column)},
                        dataset_config=data_config())


def _check_model(cfg: RetroMAEConfig) -> None:
    """The model loads and holds `max_seq_length` positions (fails before any worker)."""
    folder = resolve_model(cfg.model_name_or_path).folder
    AutoTokenizer.from_pretrained(folder)
    positions = AutoConfig.from_pretrained(folder).max_position_embeddings
    if cfg.max_seq_length > positions:
        raise InputError(f"--max_seq_length {cfg.max_seq_length} exceeds the "
                         f"{positions} positions of {cfg.model_name_or_path}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 2 with one clear line on bad flags, config or input."""
    return run_main("pretrain_retromae", RetroMAEConfig, _run, argv,
                    errors=(LeaseHeld, StorageError), preflight=_preflight)


def _preflight(cfg: RetroMAEConfig) -> None:
    """A bad model or a missing corpus fails before Ray starts."""
    _check_model(cfg)
    list_input_files(cfg.train_data)


def _run(cfg: RetroMAEConfig) -> None:
    result = run(cfg)
    print(f"RetroMAE done: {result.metrics.get('step')} steps on {result.examples} texts "
          f"({result.skipped} empty skipped); encoder at {result.output_dir}")


if __name__ == "__main__":
    sys.exit(main())
