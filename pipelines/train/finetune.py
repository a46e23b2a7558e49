"""Contrastive finetuning of an embedding model on Ray Train (the BGE / FlagEmbedding recipe).

Launch (flags as FlagEmbedding's; see docs/finetune.md for the 48-GPU recipe)::

    python pipelines/finetune.py --model_name_or_path BAAI/bge-base-en-v1.5 \
        --train_data s3://bucket/train.jsonl --output_dir s3://bucket/bge-ft \
        --num_workers 48 --use_gpu --per_device_train_batch_size 683 \
        --train_group_size 2 --negatives_cross_device --gradient_cache_chunk_size 128

The driver reads and checks the data as a Ray Dataset (one task per file range,
`pipelines.train.data`), shards it over the workers in a fixed order, and runs
`train_loop` on each: groups are sampled and tokenised per batch, one `bge_core.grad_cache`
step per batch, AdamW with linear warm-up, checkpoints every `save_steps`, automatic
resume after a worker failure. The final model is written to `output_dir` with
`Encoder.save` (loadable by `Encoder.from_pretrained` and
sentence-transformers); Ray Train's checkpoints sit under ``output_dir/<run_name>/``.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from bge_core.config import Pooling
from bge_core.data import (
    RANGE_ROWS,
    TrainingDataError,
    cap_examples,
    collate,
    list_data_files,
    listed_keys,
    parse_range,
    sample_group,
    split_bad,
)
from bge_core.distributed import all_reduce_mean
from bge_core.errors import InputError
from bge_core.grad_cache import contrastive_step
from bge_core.losses import DEFAULT_TEMPERATURE, info_nce
from bge_core.model import Encoder
from bge_core.presets import resolve_instruction
from bge_core.storage import StorageError
from bge_core.trainable import enable_gradient_checkpointing, freeze_position_embeddings
from pipelines.common.cli import config_from_dict, config_to_dict, run_main, start_ray
from pipelines.common.lease import LeaseHeld
from pipelines.common.ranges import plan_data, range_dataset
from pipelines.train import worker
from pipelines.train.args import TrainArgs
from pipelines.train.data import data_config, epoch_batches, epoch_steps
from pipelines.train.driver import TrainResult, run_training
from pipelines.train.session import StepHook, open_session, run_epochs

log = logging.getLogger("bge.finetune")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(TrainArgs):
    """Contrastive finetuning settings (FlagEmbedding's flag names where they exist).

    The shared training flags are `TrainArgs`'. Global batch = num_workers ×
    per_device_train_batch_size queries, each with train_group_size passages (1 positive
    + negatives). `gradient_cache_chunk_size` turns on the gradient cache (rows embedded
    at once). `query_instruction_for_retrieval`: left out = the model's own, ``""`` =
    none; the one used in training is saved with the model. `sentence_pooling_method` and
    `normlized` (FlagEmbedding's spelling) override the model's pooling and normalisation
    (saved with the model too; left out: the model's own). `temperature` left out is the
    one the model was trained at (`train_temperature`); without normalisation it is 1.0,
    as in FlagEmbedding. `fix_position_embedding` freezes position
    embeddings; `max_example_num_per_dataset` samples at most that many examples per
    file (seeded). `passage_instruction_for_retrieval` is refused (a saved model has no
    passage instruction: put it into the data). `mask_listed_positives` (not a
    FlagEmbedding flag) keeps every passage listed in a query's ``pos`` out of its
    negatives, in-batch and gathered ones included (`bge_core.losses`).
    """

    train_group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    temperature: float | None = None
    negatives_cross_device: bool = False
    use_inbatch_neg: bool = True
    query_instruction_for_retrieval: str | None = None
    gradient_cache_chunk_size: int | None = None
    shuffle_buffer_size: int = 1024
    skip_bad_examples: bool = False
    sentence_pooling_method: Pooling | None = None
    normlized: bool | None = None
    fix_position_embedding: bool = False
    max_example_num_per_dataset: int | None = None
    passage_instruction_for_retrieval: str | None = None
    mask_listed_positives: bool = False
    run_name: str = "finetune"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("train_group_size", "query_max_len", "passage_max_len"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.gradient_cache_chunk_size is not None and self.gradient_cache_chunk_size < 1:
            raise InputError("--gradient_cache_chunk_size must be >= 1 (or unset), got "
                             f"{self.gradient_cache_chunk_size}")
        if self.temperature is not None and self.temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        if self.max_example_num_per_dataset is not None and self.max_example_num_per_dataset < 1:
            raise InputError("--max_example_num_per_dataset must be >= 1, got "
                             f"{self.max_example_num_per_dataset}")
        if self.passage_instruction_for_retrieval:
            raise InputError(
                "--passage_instruction_for_retrieval is not offered: a saved model carries a "
                "query instruction only, so inference would not add it; prepend it to the "
                "'pos'/'neg' passages of the training data and to the corpus you encode")



# ------------------------------------------------------------------------- driver
EXAMPLE_SCHEMA = pa.schema([("key", pa.int64()), ("query", pa.string()),
                            ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())),
                            ("error", pa.string())])


def read_dataset(cfg: FinetuneConfig) -> tuple[Any, int, int]:
    """Read and check the training data as a Ray Dataset (one task per file range).

    With `max_example_num_per_dataset` a file is one range (the sample is drawn per file).

    Returns:
        (dataset of good examples, their count, number of bad examples skipped).
    """
    limit = cfg.max_example_num_per_dataset
    ranges = plan_data(cfg.train_data, what="training data", error=TrainingDataError,
                       rows_per_range=RANGE_ROWS if limit is None else 1 << 62)
    parsed = range_dataset(ranges, _parse_task, group_size=cfg.train_group_size,
                           limit=limit, seed=cfg.seed).materialize()
    bad_rows = parsed.filter(lambda row: row["error"] is not None)
    bad = bad_rows.count()
    if bad:
        split_bad(bad_rows.take(1), cfg.skip_bad_examples)  # raises unless skipping
        log.warning("skipped %d invalid training examples (first: %s)", bad,
                    bad_rows.take(1)[0]["error"])
    good = parsed.filter(lambda row: row["error"] is None).drop_columns(["error"])
    good = good.materialize()
    return good, good.count(), bad


def _parse_task(part: Any, group_size: int, limit: int | None, seed: int) -> pa.Table:
    rows = cap_examples(parse_range(part, group_size), limit, seed, part.file_index)
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def plan_steps(cfg: FinetuneConfig, examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): each worker gets an equal share of whole batches."""
    steps_per_epoch = epoch_steps(examples, cfg.num_workers, cfg.per_device_train_batch_size)
    if steps_per_epoch < 1:
        raise TrainingDataError(
            f"{examples} training examples are too few for {cfg.num_workers} workers x "
            f"per_device_train_batch_size {cfg.per_device_train_batch_size}: pass "
            f"--per_device_train_batch_size {max(1, examples // cfg.num_workers)} or less "
            "(in pipelines/recipe.py: --finetune_args \"--per_device_train_batch_size N\")")
    return steps_per_epoch, cfg.total_steps(steps_per_epoch)


def run(cfg: FinetuneConfig, *, on_step: StepHook | None = None) -> TrainResult:
    """Finetune on Ray Train (Ray already started) and write the final model to
    `cfg.output_dir`.

    Args:
        on_step: called on every worker after each optimizer step with its
            `pipelines.train.session.StepInfo` (rank, world size, step, epoch); must pickle
            by reference (see `StepHook`). Tests pass fault drills; runs pass none.
    """
    dataset, examples, bad = read_dataset(cfg)
    steps_per_epoch, total = plan_steps(cfg, examples)
    log.info("%d examples (%d invalid skipped), %d steps/epoch, %d steps, global batch %d",
             examples, bad, steps_per_epoch, total,
             cfg.num_workers * cfg.per_device_train_batch_size)
    loop_config = {"cfg": config_to_dict(cfg), "steps_per_epoch": steps_per_epoch,
                   "total_steps": total}
    return run_training("finetuning", train_loop, loop_config, cfg, examples=examples,
                        skipped=bad, datasets={"train": dataset}, on_step=on_step,
                        dataset_config=data_config())


# ------------------------------------------------------------------------- workers
def _save_encoder(model: Any, folder: Path) -> None:
    model.save(folder / "model")


def _load_encoder(model: Any, folder: Path) -> None:
    saved = Encoder.from_pretrained(str(folder / "model"), device="cpu")
    model.backbone.load_state_dict(saved.backbone.state_dict())


ENCODER_IO = worker.ModelIO(save=_save_encoder, load=_load_encoder)


def load_encoder(cfg: FinetuneConfig, device: Any = "cpu") -> Encoder:
    """The model to train, carrying the query instruction and temperature it will be
    trained with.

    The instruction follows `resolve_instruction` (flag left out: the model's own; ``""``:
    none; else the flag's), and is the one `Encoder.save` writes beside the weights, so
    a finetuned model's `encode_queries` adds exactly what training added. The
    temperature (`train_temperature`) is saved too, so finetuning the result again
    continues at it.
    """
    overrides: dict[str, Any] = {}
    if cfg.sentence_pooling_method is not None:
        overrides["pooling"] = cfg.sentence_pooling_method
    if cfg.normlized is not None:
        overrides["normalize"] = cfg.normlized
    encoder = Encoder.from_pretrained(cfg.model_name_or_path, device=device, **overrides)
    instruction = resolve_instruction(encoder.config.query_instruction,
                                      cfg.query_instruction_for_retrieval)
    encoder.config = encoder.config.replace(query_instruction=instruction,
                                            temperature=train_temperature(cfg, encoder))
    tokenizer = worker.tokenizer_override(cfg)
    if tokenizer is not None:  # before any tokenising: the encoder builds its own lazily
        encoder.tokenizer = tokenizer
    if cfg.fix_position_embedding:
        log.info("frozen: %s", ", ".join(freeze_position_embeddings(encoder)))
    return encoder


def train_temperature(cfg: FinetuneConfig, encoder: Encoder) -> float:
    """The loss temperature: ``--temperature``, else the one the model was trained at (its
    preset's or saved one: BGE 0.02, all-MiniLM-L6-v2 0.05), else BGE's 0.02; 1.0 for an
    unnormalised model (inner product), as FlagEmbedding."""
    chosen = cfg.temperature or encoder.config.temperature or DEFAULT_TEMPERATURE
    if encoder.config.normalize:
        return chosen
    log.info("temperature 1.0 instead of %s: embeddings are not normalised", chosen)
    return 1.0


def epoch_groups(shard: Any, cfg: FinetuneConfig, epoch: int, skip: int, steps: int,
                 instruction: str | None) -> Iterator[list]:
    """This worker's batches of sampled groups for `epoch`, after skipping `skip` batches.

    At most `steps` batches (`run_epochs` ends the epoch on every rank together if a
    shard runs short); queries carry `instruction` (the model's, see `load_encoder`).
    """
    for batch in epoch_batches(shard, batch_size=cfg.per_device_train_batch_size,
                               shuffle_buffer=cfg.shuffle_buffer_size, seed=cfg.seed,
                               epoch=epoch, skip=skip, steps=steps):
        yield [sample_group(row, cfg.train_group_size, cfg.seed, epoch, instruction)
               for row in batch.to_pylist()]


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore, then step through this worker's shard."""
    import ray.train

    cfg = config_from_dict(FinetuneConfig, config["cfg"])
    steps_per_epoch, total = config["steps_per_epoch"], config["total_steps"]
    device = worker.start_worker(cfg)
    encoder = load_encoder(cfg, device)
    encoder.train()
    enable_gradient_checkpointing(encoder, cfg.gradient_checkpointing)
    session = open_session(encoder, cfg, total, device, ENCODER_IO, config.get("on_step"))
    model = worker.prepare_model(encoder)
    loss = functools.partial(
        info_nce, group_size=cfg.train_group_size, temperature=encoder.config.temperature,
        use_inbatch_neg=cfg.use_inbatch_neg, negatives_cross_device=cfg.negatives_cross_device)
    shard = ray.train.get_dataset_shard("train")
    session.constants["num_nodes"] = worker.count_nodes()
    global_batch = cfg.per_device_train_batch_size * cfg.num_workers
    pad_id = encoder.tokenizer.pad_token_id or 0

    def batches(epoch: int, skip: int) -> Iterator[list]:
        return epoch_groups(shard, cfg, epoch, skip, steps_per_epoch,
                            encoder.config.query_instruction)

    def train_step(groups: list) -> None:
        queries, passages = collate(encoder.tokenize, groups, cfg.query_max_len,
                                    cfg.passage_max_len, pad_id)
        keys = ({k: t.to(device) for k, t in listed_keys(groups).items()}
                if cfg.mask_listed_positives else {})
        loss_fn = session.amp.scale_loss_fn(functools.partial(loss, **keys))
        value = contrastive_step(model, queries.to(device), passages.to(device), loss_fn,
                                 cfg.gradient_cache_chunk_size, session.amp.autocast)
        value = float(session.amp.unscaled(value))
        session.step()
        # mean over ranks = the global-batch loss
        session.finish_step(global_batch, lambda: {"loss": all_reduce_mean(value)})

    run_epochs(session.state, total, steps_per_epoch, batches, train_step)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse flags / YAML, run, exit non-zero with one clear message."""
    return run_main("finetune", FinetuneConfig, _checked_run, argv,
                    errors=(TrainingDataError, LeaseHeld, StorageError), uses_ray=False)


def _checked_run(cfg: FinetuneConfig) -> None:
    list_data_files(cfg.train_data)  # a missing path fails before Ray starts
    start_ray()
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
