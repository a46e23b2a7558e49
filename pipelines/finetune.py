"""Contrastive finetuning of an embedding model on Ray Train (the BGE / FlagEmbedding recipe).

Launch (flags as FlagEmbedding's; see docs/finetune.md for the 48-GPU recipe)::

    python pipelines/finetune.py --model_name_or_path BAAI/bge-base-en-v1.5 \
        --train_data s3://bucket/train.jsonl --output_dir s3://bucket/bge-ft \
        --num_workers 48 --use_gpu --per_device_train_batch_size 683 \
        --train_group_size 2 --negatives_cross_device --gradient_cache_chunk_size 128

The driver reads and checks the data as a Ray Dataset (one task per file), shards it over
the workers, and runs `train_loop` on each: groups are sampled and tokenised per batch,
one `bge_core.grad_cache` step per batch, AdamW with linear warm-up, checkpoints every
`save_steps`, automatic resume after a worker failure. The final model is written to
`output_dir` with `Encoder.save` (loadable by `Encoder.from_pretrained` and
sentence-transformers); Ray Train's checkpoints sit under ``output_dir/<run_name>/``.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from bge_core.data import (
    TrainingDataError,
    collate,
    list_data_files,
    parse_file,
    sample_group,
    split_bad,
)
from bge_core.distributed import all_reduce_mean
from bge_core.grad_cache import contrastive_step
from bge_core.losses import DEFAULT_TEMPERATURE, info_nce
from bge_core.model import Encoder
from bge_core.optim import build_adamw, linear_warmup_decay, warmup_steps
from bge_core.presets import resolve_instruction
from pipelines import train_common as tc
from pipelines.cli import config_from_dict, config_to_dict, run_main

log = logging.getLogger("bge.finetune")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Contrastive finetuning settings (FlagEmbedding's flag names where they exist).

    Global batch = num_workers × per_device_train_batch_size queries, each with
    train_group_size passages (1 positive + negatives). `max_steps` overrides epochs.
    `gradient_cache_chunk_size` turns on the gradient cache (rows embedded at once).
    `cpus_per_worker` may be fractional (tests on small machines); `max_failures` is how
    often a failed worker group restarts from the latest checkpoint.
    """

    model_name_or_path: str
    train_data: str
    output_dir: str
    train_group_size: int = 8
    query_max_len: int = 32
    passage_max_len: int = 128
    temperature: float = DEFAULT_TEMPERATURE
    negatives_cross_device: bool = False
    use_inbatch_neg: bool = True
    query_instruction_for_retrieval: str | None = None
    learning_rate: float = 1e-5
    num_train_epochs: int = 1
    max_steps: int | None = None
    per_device_train_batch_size: int = 8
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_cache_chunk_size: int | None = None
    gradient_checkpointing: bool = False
    fp16: bool = False
    bf16: bool = False
    seed: int = 42
    save_steps: int = 500
    logging_steps: int = 10
    shuffle_buffer_size: int = 1024
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    skip_bad_examples: bool = False
    run_name: str = "finetune"

    def __post_init__(self) -> None:
        positive = ("train_group_size", "query_max_len", "passage_max_len", "num_train_epochs",
                    "per_device_train_batch_size", "save_steps", "logging_steps", "num_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "gradient_cache_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        tc.check_accelerator(self.use_gpu, self.accelerator_type)
        tc.resolve_precision(self.fp16, self.bf16)  # --fp16 with --bf16 is an error


# ------------------------------------------------------------------------- driver
def read_dataset(cfg: FinetuneConfig) -> tuple[Any, int, int]:
    """Read and check the training data as a Ray Dataset (one task per file).

    Returns:
        (dataset of good examples, their count, number of bad examples skipped).
    """
    import ray.data

    files = list_data_files(cfg.train_data)
    read = functools.partial(_parse_task, group_size=cfg.train_group_size)
    parsed = ray.data.from_items([{"path": f, "index": i} for i, f in enumerate(files)])
    parsed = parsed.flat_map(read).materialize()
    bad_rows = parsed.filter(lambda row: row["error"] is not None)
    bad = bad_rows.count()
    if bad:
        split_bad(bad_rows.take(1), cfg.skip_bad_examples)  # raises unless skipping
        log.warning("skipped %d invalid training examples (first: %s)", bad,
                    bad_rows.take(1)[0]["error"])
    good = parsed.filter(lambda row: row["error"] is None).drop_columns(["error"])
    good = good.materialize()
    return good, good.count(), bad


def _parse_task(item: dict[str, Any], group_size: int) -> list[dict[str, Any]]:
    with fsspec.open(item["path"], "rb") as handle:
        return parse_file(item["path"], handle.read(), int(item["index"]), group_size)


def plan_steps(cfg: FinetuneConfig, examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): each worker gets an equal share of whole batches."""
    per_worker = examples // cfg.num_workers
    steps_per_epoch = per_worker // cfg.per_device_train_batch_size
    if steps_per_epoch < 1:
        raise TrainingDataError(
            f"{examples} training examples are too few for {cfg.num_workers} workers x "
            f"per_device_train_batch_size {cfg.per_device_train_batch_size}")
    total = cfg.max_steps or steps_per_epoch * cfg.num_train_epochs
    return steps_per_epoch, total


@dataclass(frozen=True)
class FinetuneResult:
    """Where the model went and how training ended (rank 0's last reported metrics)."""

    output_dir: Path | str
    metrics: dict[str, Any]
    examples: int
    bad_examples: int


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Finetune on Ray Train and write the final model to `cfg.output_dir`."""
    import ray

    list_data_files(cfg.train_data)  # a missing path fails before Ray starts
    if not ray.is_initialized():
        ray.init()
    dataset, examples, bad = read_dataset(cfg)
    steps_per_epoch, total = plan_steps(cfg, examples)
    log.info("%d examples (%d invalid skipped), %d steps/epoch, %d steps, global batch %d",
             examples, bad, steps_per_epoch, total,
             cfg.num_workers * cfg.per_device_train_batch_size)
    settings = tc.RunSettings(
        name=cfg.run_name, output_dir=cfg.output_dir, num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu, accelerator_type=cfg.accelerator_type,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures)
    loop_config = {"cfg": config_to_dict(cfg), "steps_per_epoch": steps_per_epoch,
                   "total_steps": total}
    result = tc.launch(train_loop, loop_config, settings, datasets={"train": dataset})
    if result.error:
        raise RuntimeError(f"finetuning failed: {result.error}") from result.error
    log.info("finished at step %s: loss %.4f, %.1f examples/s, workers on %s node(s)",
             result.metrics.get("step"), result.metrics.get("loss", float("nan")),
             result.metrics.get("examples_per_s", 0.0), result.metrics.get("num_nodes"))
    with result.checkpoint.as_directory() as folder:
        out = export_model(Path(folder) / "model", cfg.output_dir)
    return FinetuneResult(out, dict(result.metrics), examples, bad)


def export_model(model_dir: Path, output_dir: str) -> Path | str:
    """Copy a saved encoder folder to `output_dir` (local path or fsspec URI)."""
    if "://" not in output_dir:
        shutil.copytree(model_dir, output_dir, dirs_exist_ok=True)
        log.info("final model written to %s", output_dir)
        return Path(output_dir)
    fs, root = fsspec.core.url_to_fs(output_dir)
    for file in sorted(model_dir.rglob("*")):
        if file.is_file():
            fs.put_file(str(file), f"{root.rstrip('/')}/{file.relative_to(model_dir)}")
    log.info("final model written to %s", output_dir)
    return output_dir


# ------------------------------------------------------------------------- workers
def _save_encoder(model: Any, folder: Path) -> None:
    model.save(folder / "model")


def _load_encoder(model: Any, folder: Path) -> None:
    saved = Encoder.from_pretrained(str(folder / "model"), device="cpu")
    model.backbone.load_state_dict(saved.backbone.state_dict())


ENCODER_IO = tc.ModelIO(save=_save_encoder, load=_load_encoder)


def load_encoder(cfg: FinetuneConfig, device: Any = "cpu") -> Encoder:
    """The model to train, carrying the query instruction it will be trained with.

    The instruction follows `resolve_instruction` (flag left out: the model's own; ``""``:
    none; else the flag's), and is the one `Encoder.save` writes beside the weights, so
    a finetuned model's `encode_queries` adds exactly what training added.
    """
    encoder = Encoder.from_pretrained(cfg.model_name_or_path, device=device)
    instruction = resolve_instruction(encoder.config.query_instruction,
                                      cfg.query_instruction_for_retrieval)
    encoder.config = encoder.config.replace(query_instruction=instruction)
    return encoder


def epoch_groups(shard: Any, cfg: FinetuneConfig, epoch: int, skip: int, steps: int,
                 instruction: str | None) -> Iterator[list]:
    """This worker's batches of sampled groups for `epoch`, after skipping `skip` batches.

    Exactly `steps` batches come out on every worker (collectives need equal counts);
    queries carry `instruction` (the model's, see `load_encoder`).
    """
    batches = shard.iter_batches(
        batch_size=cfg.per_device_train_batch_size, batch_format="pyarrow", drop_last=True,
        local_shuffle_buffer_size=cfg.shuffle_buffer_size or None,
        local_shuffle_seed=cfg.seed + epoch)
    for index, batch in enumerate(batches):
        if index >= steps:
            return
        if index < skip:  # resuming mid-epoch: these were trained before the failure
            continue
        yield [sample_group(row, cfg.train_group_size, cfg.seed, epoch, instruction)
               for row in batch.to_pylist()]


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: build, restore, then step through this worker's shard."""
    import ray.train

    cfg = config_from_dict(FinetuneConfig, config["cfg"])
    steps_per_epoch, total = config["steps_per_epoch"], config["total_steps"]
    tc.setup_worker_logging()
    tc.seed_everything(cfg.seed)
    device = tc.worker_device()
    encoder = load_encoder(cfg, device)
    encoder.train()
    tc.enable_gradient_checkpointing(encoder, cfg.gradient_checkpointing)
    optimizer = build_adamw(encoder, cfg.learning_rate, cfg.weight_decay)
    scheduler = linear_warmup_decay(optimizer, warmup_steps(total, cfg.warmup_ratio), total)
    amp = tc.Precision.create(tc.resolve_precision(cfg.fp16, cfg.bf16), device)
    state = tc.restore_checkpoint(encoder, optimizer, scheduler, amp, ENCODER_IO)
    model = tc.prepare_model(encoder)
    loss_fn = amp.scale_loss_fn(functools.partial(
        info_nce, group_size=cfg.train_group_size, temperature=cfg.temperature,
        use_inbatch_neg=cfg.use_inbatch_neg,
        negatives_cross_device=cfg.negatives_cross_device))
    shard = ray.train.get_dataset_shard("train")
    meter = tc.ProgressMeter(total, start_step=state.step)
    nodes = tc.count_nodes()
    global_batch = cfg.per_device_train_batch_size * cfg.num_workers
    pad_id = encoder.tokenizer.pad_token_id or 0
    while state.step < total:
        for groups in epoch_groups(shard, cfg, state.epoch, state.step_in_epoch,
                                   steps_per_epoch, encoder.config.query_instruction):
            queries, passages = collate(encoder.tokenize, groups, cfg.query_max_len,
                                        cfg.passage_max_len, pad_id)
            loss = contrastive_step(model, queries.to(device), passages.to(device), loss_fn,
                                    cfg.gradient_cache_chunk_size, amp.autocast)
            loss = amp.unscaled(loss)
            amp.step(optimizer, scheduler, cfg.max_grad_norm)
            state.advance(global_batch)
            _after_step(cfg, state, total, meter, float(loss), global_batch, nodes,
                        encoder, optimizer, scheduler, amp)
            if state.step >= total:
                break
        if state.step_in_epoch >= steps_per_epoch:
            state.next_epoch()


def _after_step(cfg: FinetuneConfig, state: tc.TrainState, total: int,
                meter: tc.ProgressMeter, loss: float, global_batch: int, nodes: int,
                encoder: Encoder, optimizer: Any, scheduler: Any, amp: tc.Precision) -> None:
    """Log, report and checkpoint at the configured steps (the same steps on every rank)."""
    tc.maybe_inject_failure(state.step)
    metrics = meter.update(state.step, loss, global_batch, total_steps=total,
                           epoch=state.epoch, lr=scheduler.get_last_lr()[0], num_nodes=nodes,
                           resumed_from=list(state.resumed_from))
    save = state.step >= total or state.step % cfg.save_steps == 0
    if not (save or state.step % cfg.logging_steps == 0):
        return
    metrics["loss"] = all_reduce_mean(loss)  # mean over ranks = the global-batch loss
    tc.ProgressMeter.log_line(metrics)
    if save:
        tc.save_and_report(metrics, state, encoder, optimizer, scheduler, amp, ENCODER_IO)
    else:
        tc.report(metrics)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse flags / YAML, run, exit non-zero with one clear message."""
    return run_main("finetune", FinetuneConfig, run, argv, errors=(TrainingDataError,))


if __name__ == "__main__":
    sys.exit(main())
