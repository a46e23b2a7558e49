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
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from bge_core.distributed import all_reduce_mean, get_rank, get_world_size
from bge_core.loading import resolve_model
from bge_core.optim import build_adamw, linear_warmup_decay, warmup_steps
from bge_core.retromae import HEADS_FILE, load_checkpoint, load_retromae, save_checkpoint
from bge_core.retromae_masking import RetroMAECollator
from pipelines import train_common as tc
from pipelines.cli import config_from_dict, config_to_dict, run_main
from pipelines.corpus_io import InputError, list_input_files, plan_file, read_chunk_rows

log = logging.getLogger("bge.retromae")


@dataclass(frozen=True, kw_only=True)
class RetroMAEConfig:
    """RetroMAE pretraining job (flags follow FlagEmbedding's `retromae_pretrain`).

    Args:
        model_name_or_path: BERT-style model to pretrain (folder, preset or hub id).
        train_data: Parquet/JSONL file, folder or glob (local or fsspec URI).
        output_dir: checkpoints and the final encoder (local or fsspec URI).
        text_column: column holding the text.
        max_seq_length: tokens per text including [CLS] and [SEP] (longer texts cut).
        encoder_mlm_probability / decoder_mlm_probability: masking rates (BGE: 0.3 / 0.5).
        max_steps: stop after this many optimizer steps (overrides num_train_epochs).
        max_failures: worker-group restarts from the latest checkpoint.
    """

    model_name_or_path: str
    train_data: str
    output_dir: str
    text_column: str = "text"
    max_seq_length: int = 512
    encoder_mlm_probability: float = 0.3
    decoder_mlm_probability: float = 0.5
    per_device_train_batch_size: int = 16
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_train_epochs: int = 1
    max_steps: int | None = None
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    save_steps: int = 1000
    logging_steps: int = 50
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    run_name: str = "retromae"

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "num_train_epochs", "num_workers",
                     "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"--cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        tc.check_accelerator(self.use_gpu, self.accelerator_type)
        tc.resolve_precision(self.fp16, self.bf16)  # --fp16 with --bf16 is an error


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

    cfg = config_from_dict(RetroMAEConfig, loop_config["config"])
    tc.setup_worker_logging()
    tc.seed_everything(cfg.seed)
    texts = ray.get(loop_config["texts"])
    rank, world = get_rank(), get_world_size()
    device = tc.worker_device()
    model, tokenizer = load_retromae(cfg.model_name_or_path)
    model.to(device)
    tc.enable_gradient_checkpointing(model.lm, cfg.gradient_checkpointing)
    plan = StepPlan(len(texts), world, cfg.per_device_train_batch_size, cfg.num_train_epochs,
                    cfg.max_steps)
    total = plan.total_steps
    optimizer = build_adamw(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = linear_warmup_decay(optimizer, warmup_steps(total, cfg.warmup_ratio), total)
    amp = tc.Precision.create(tc.resolve_precision(cfg.fp16, cfg.bf16), device)
    io = tc.ModelIO(save=lambda m, folder: save_checkpoint(m, tokenizer, folder / "model"),
                    load=lambda m, folder: load_checkpoint(m, folder / "model"))
    state = tc.restore_checkpoint(model, optimizer, scheduler, amp, io)
    ddp_model = tc.prepare_model(model)
    collator = RetroMAECollator(tokenizer, cfg.max_seq_length, cfg.encoder_mlm_probability,
                                cfg.decoder_mlm_probability)
    tokenize = functools.partial(_tokenize, tokenizer, cfg.max_seq_length)
    meter = tc.ProgressMeter(total, start_step=state.step)
    tokens = 0  # real tokens through the encoder on this rank since (re)start
    ddp_model.train()
    while state.step < total:
        if state.step_in_epoch >= plan.steps_per_epoch:
            state.next_epoch()
        rows = plan.local_rows(cfg.seed, state.epoch, state.step_in_epoch, rank)
        key = step_seed(cfg.seed, rank, state.step)
        torch.manual_seed(key)  # dropout
        batch = collator(tokenize([texts[i] for i in rows]), torch.Generator().manual_seed(key))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp.autocast():
            out = ddp_model(**batch)
        amp.backward(out.loss)
        amp.step(optimizer, scheduler, cfg.max_grad_norm)
        state.advance(len(rows) * world)
        tokens += int(batch["attention_mask"].sum())
        tc.maybe_inject_failure(state.step)
        metrics = _metrics(cfg, meter, state, out, tokens, len(rows) * world, total)
        if metrics is None:
            continue
        tc.ProgressMeter.log_line(metrics)
        if state.step == total or state.step % cfg.save_steps == 0:
            tc.save_and_report(metrics, state, model, optimizer, scheduler, amp, io)
        else:
            tc.report(metrics)


def _tokenize(tokenizer: Any, max_seq_length: int, texts: list[str]) -> list[list[int]]:
    """Body token ids (no special tokens), cut to leave room for [CLS] and [SEP]."""
    return tokenizer(texts, add_special_tokens=False, truncation=True,
                     max_length=max_seq_length - 2)["input_ids"]


def _metrics(cfg: RetroMAEConfig, meter: tc.ProgressMeter, state: tc.TrainState, out: Any,
             tokens: int, examples: int, total: int) -> dict[str, Any] | None:
    """Metrics at logging/saving steps (None between): losses averaged over ranks.

    A collective at those steps, which every rank reaches together.
    """
    due = state.step == total or state.step % cfg.save_steps == 0 \
        or state.step % cfg.logging_steps == 0
    if not due:
        meter.update(state.step, float("nan"), examples)  # count examples only
        return None
    metrics = meter.update(
        state.step, all_reduce_mean(out.loss.detach().float()), examples,
        encoder_loss=all_reduce_mean(out.encoder_loss.float()),
        decoder_loss=all_reduce_mean(out.decoder_loss.float()),
        epoch=state.epoch, total_steps=total, resumed_from=meter.start_step)
    elapsed = max(time.perf_counter() - meter.started, 1e-9)
    metrics["tokens_per_s"] = all_reduce_mean(tokens) * get_world_size() / elapsed
    return metrics


# ---------------------------------------------------------------------------- driver
def export_encoder(model_dir: Path, output_dir: str) -> str:
    """Copy a checkpoint's encoder (not the resume-only heads) to `output_dir` (path or URI)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.name != HEADS_FILE:
            target = f"{root.rstrip('/')}/{path.relative_to(model_dir).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
    return output_dir


def run(cfg: RetroMAEConfig) -> dict[str, Any]:
    """Read the corpus, pretrain on Ray Train, write the encoder to ``output_dir``.

    Returns:
        A summary: final encoder location, texts used and skipped, steps, last metrics.
    """
    import ray

    folder = resolve_model(cfg.model_name_or_path).folder
    AutoTokenizer.from_pretrained(folder)  # fail fast, before any worker starts
    positions = AutoConfig.from_pretrained(folder).max_position_embeddings
    if cfg.max_seq_length > positions:
        raise ValueError(f"--max_seq_length {cfg.max_seq_length} exceeds the "
                         f"{positions} positions of {cfg.model_name_or_path}")
    texts, skipped = read_texts(cfg.train_data, cfg.text_column)
    log.info("%s: %d texts, %d empty or null rows skipped", cfg.train_data, len(texts), skipped)
    if len(texts) < cfg.num_workers * cfg.per_device_train_batch_size:
        raise InputError(f"{cfg.train_data}: {len(texts)} non-empty texts, fewer than one "
                         f"global batch ({cfg.num_workers} workers x "
                         f"{cfg.per_device_train_batch_size})")
    if not ray.is_initialized():
        ray.init()
    settings = tc.RunSettings(name=cfg.run_name, output_dir=cfg.output_dir,
                              num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                              accelerator_type=cfg.accelerator_type,
                              cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures)
    loop_config = {"config": config_to_dict(cfg), "texts": ray.put(texts)}
    result = tc.launch(train_loop, loop_config, settings)
    if result.error:
        raise RuntimeError(f"RetroMAE pretraining failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as folder:
        final = export_encoder(Path(folder) / "model", cfg.output_dir)
    log.info("encoder written to %s", final)
    return {"encoder": final, "texts": len(texts), "skipped_empty": skipped,
            "steps": result.metrics.get("step"), "metrics": dict(result.metrics)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: exit 2 with one clear line on bad flags, config or input."""
    return run_main("pretrain_retromae", RetroMAEConfig, _run_and_report, argv)


def _run_and_report(cfg: RetroMAEConfig) -> None:
    summary = run(cfg)
    print(f"RetroMAE done: {summary['steps']} steps on {summary['texts']} texts "
          f"({summary['skipped_empty']} empty skipped); encoder at {summary['encoder']}")


if __name__ == "__main__":
    sys.exit(main())
