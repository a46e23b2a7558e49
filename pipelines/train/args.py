"""The flags both training jobs share (FlagEmbedding / Hugging Face `TrainingArguments`
names), declared once: `FinetuneConfig` and `RetroMAEConfig` extend `TrainArgs`.

Hugging Face flags that people put in FlagEmbedding command lines are accepted: each does
what it does there, or is a no-op that logs one line (`compat_notes`), or is refused with
the alternative named. docs/flagembedding.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bge_core.errors import InputError
from bge_core.precision import resolve_precision
from pipelines.common.resources import check_accelerator


def planned_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: `max_steps` when > 0 (None or -1: unset, as in Hugging
    Face), else epochs × steps per epoch."""
    if max_steps is not None and max_steps > 0:
        return max_steps
    return epochs * steps_per_epoch


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """Model, data, optimisation, checkpointing and placement of a Ray Train job.

    Args:
        model_name_or_path: model to start from (folder, preset or hub id).
        train_data: file, folder or glob of training data (local path or fsspec URI).
        output_dir: checkpoints (``<output_dir>/<run_name>/``) and the final model.
        learning_rate / weight_decay / warmup_ratio / max_grad_norm: AdamW, warm-up
            (`transformers.get_scheduler`) then decay, gradient clipping.
        num_train_epochs: passes over the data; `max_steps` (when set) wins.
        per_device_train_batch_size: rows per worker and step.
        gradient_checkpointing / fp16 / bf16: memory and precision, as in Hugging Face.
        seed: the same on every rank; data order, groups and masks derive from it.
        save_steps / logging_steps: checkpoint and report every so many steps.
        num_workers / use_gpu / accelerator_type / cpus_per_worker: Ray Train placement
            (one GPU per worker with `use_gpu`; fractional CPUs allowed). Left out,
            `cpus_per_worker` is 1 for GPU workers and, on CPUs, the largest equal share
            of the nodes' CPU totals that keeps half a CPU free on every node for the
            job's read tasks (`pipelines.train.cpu_share`); each worker computes
            on the nearest whole number of torch threads.
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        run_name: folder of this run's checkpoints under `output_dir`.
        lr_scheduler_type: learning-rate schedule after warm-up (Hugging Face names).
        save_total_limit: checkpoints kept under `output_dir` (oldest deleted); None: all.
        tokenizer_name: tokenizer to use (and save) instead of the model's own.
        config_name, cache_dir, dataloader_drop_last, dataloader_num_workers, report_to,
            overwrite_output_dir: accepted for FlagEmbedding command lines, no effect here
            (one log line each says why).
        gradient_accumulation_steps, deepspeed: refused above 1 / when set (the message
            names the alternative).
        lease_timeout_s: a second run on this `output_dir` refuses while the first one's
            heartbeat is younger than this; after, it takes over (`pipelines.common.lease`).
    """

    model_name_or_path: str
    train_data: str
    output_dir: str
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_train_epochs: int = 1
    max_steps: int | None = None
    per_device_train_batch_size: int = 8
    gradient_checkpointing: bool = False
    fp16: bool = False
    bf16: bool = False
    seed: int = 42
    save_steps: int = 500
    logging_steps: int = 10
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None
    cpus_per_worker: float | None = None
    max_failures: int = 3
    run_name: str = "train"
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    save_total_limit: int | None = 2
    tokenizer_name: str | None = None
    config_name: str | None = None
    cache_dir: str | None = None
    dataloader_drop_last: bool = True
    dataloader_num_workers: int = 0
    report_to: str = ""
    overwrite_output_dir: bool = False
    gradient_accumulation_steps: int = 1
    deepspeed: str | None = None
    lease_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "num_train_epochs", "num_workers",
                     "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1 and self.max_steps != -1:
            raise InputError(f"--max_steps must be >= 1 (or -1/unset), got {self.max_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise InputError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.gradient_accumulation_steps != 1:
            raise InputError(
                "--gradient_accumulation_steps is not offered: accumulating micro-batches "
                "would change the contrastive loss (each micro-batch sees only its own "
                "in-batch negatives). For a big batch in little memory use "
                "--gradient_cache_chunk_size (finetuning: the exact full-batch loss) or "
                "--gradient_checkpointing, and more --num_workers")
        if self.deepspeed:
            raise InputError(
                "--deepspeed is not offered (no ZeRO sharding): Ray Train runs plain DDP; "
                "for big batches use --negatives_cross_device with --gradient_cache_chunk_size "
                "and --gradient_checkpointing, --bf16/--fp16 for memory")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise InputError(f"--cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        check_accelerator(self.accelerator_type, float(self.use_gpu),
                          type_flag="--accelerator_type", gpu_flag="--use_gpu")
        resolve_precision(self.fp16, self.bf16)  # --fp16 with --bf16 is an error

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run (`planned_steps` of its flags)."""
        return planned_steps(steps_per_epoch, self.num_train_epochs, self.max_steps)

    def compat_notes(self) -> list[str]:
        """One line per accepted flag that has no effect here (logged when a job starts)."""
        notes = []
        if self.config_name:
            notes.append(f"--config_name {self.config_name} has no effect: the model's own "
                         "config.json is used (FlagEmbedding only logs it when a model is given)")
        if self.cache_dir:
            notes.append(f"--cache_dir {self.cache_dir} has no effect: hub downloads go to "
                         "HF_HUB_CACHE (set that variable instead)")
        if not self.dataloader_drop_last:
            notes.append("--dataloader_drop_last False has no effect: every step takes whole "
                         "batches (all workers need equal steps)")
        if self.dataloader_num_workers:
            notes.append(f"--dataloader_num_workers {self.dataloader_num_workers} has no "
                         "effect: Ray Data feeds the workers")
        if self.report_to:
            notes.append(f"--report_to {self.report_to} has no effect: metrics go to the log "
                         "and to Ray Train's result")
        if self.overwrite_output_dir:
            notes.append("--overwrite_output_dir has no effect: the final model overwrites "
                         "output_dir; a run with the same output_dir and run_name resumes from "
                         "its checkpoints (give a new --run_name to start over)")
        return notes
