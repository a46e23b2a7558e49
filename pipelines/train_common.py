"""Ray Train machinery shared by the training jobs (finetuning, RetroMAE pretraining).

Driver side, one call::

    settings = RunSettings(name="finetune", output_dir=cfg.output_dir,
                           num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                           cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures)
    result = launch(train_loop, config_to_dict(cfg), settings, datasets={"train": ds})

`launch` builds a `TorchTrainer` (gloo on CPU, nccl on GPU), stores checkpoints under
``<output_dir>/<name>/`` (local or any fsspec/pyarrow URI, e.g. ``s3://``) and restarts the
worker group from the latest checkpoint up to `max_failures` times. Re-running the same
command with the same `output_dir` resumes that run too.

Worker side, inside ``train_loop(config)``::

    cfg = config_from_dict(MyConfig, config)          # rebuild the frozen config first
    setup_worker_logging()
    device = worker_device()
    model = MyModel(...).to(device)
    enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
    optimizer = build_adamw(model, lr, wd)             # bge_core.optim
    scheduler = linear_warmup_decay(optimizer, warmup, total)
    amp = Precision.create(resolve_precision(cfg.fp16, cfg.bf16), device)
    state = restore_checkpoint(model, optimizer, scheduler, amp, io)  # TrainState(step=0) fresh
    ddp_model = prepare_model(model)                    # DDP when world > 1
    meter = ProgressMeter(total, start_step=state.step)
    for batch in ...:
        with amp.autocast(): loss = ...; amp.backward(loss)   # or bge_core.grad_cache
        amp.step(optimizer, scheduler); state.advance(examples)
        metrics = meter.update(state.step, loss, examples)
        maybe_inject_failure(state.step)
        if state.step % save_steps == 0 or last:
            save_and_report(metrics, state, model, optimizer, scheduler, amp, io)
        elif state.step % logging_steps == 0:
            report(metrics)

Every rank calls `save_and_report` / `report` at the same steps (they are barriers); only
rank 0 writes the checkpoint. A checkpoint folder holds the model (written by `ModelIO`,
e.g. ``Encoder.save`` so every checkpoint is a loadable model) and ``training_state.pt``
(optimizer, scheduler, grad scaler, step counters, RNG states).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bge_core.config import DType
from bge_core.distributed import get_rank, get_world_size
from bge_core.precision import autocast_context, check_dtype

log = logging.getLogger("bge.train")

STATE_FILE = "training_state.pt"
# Fault-injection hook for tests and chaos drills: "STEP:MARKER_FILE" makes rank 1 (rank 0
# when alone) exit abruptly after STEP, once: the marker file records that it happened.
FAULT_ENV = "BGE_FAULT_INJECT"
FAULT_DELAY_S = 6.0


# ------------------------------------------------------------------------ driver side
@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How to run a Ray Train job.

    Args:
        name: run name; checkpoints live in ``<output_dir>/<name>/``.
        output_dir: local path or fsspec URI for checkpoints (and the job's outputs).
        num_workers: training workers (one GPU each with `use_gpu`).
        use_gpu: train on GPUs (nccl) instead of CPUs (gloo).
        accelerator_type: GPU type every worker needs (e.g. ``"A100"``: Ray's
            `accelerator_type:<type>` node resource), so training never lands on the
            inference pool's GPUs; None places workers on any GPU.
        cpus_per_worker: CPUs reserved per worker (fractional allowed on small machines).
        max_failures: worker-group restarts from the latest checkpoint before giving up.
        num_to_keep: checkpoints kept (oldest deleted); None keeps all.
    """

    name: str
    output_dir: str
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    num_to_keep: int | None = 2


def storage_path(output_dir: str) -> str:
    """Ray Train's `storage_path` for `output_dir`: URIs as given, local paths absolute."""
    if "://" in output_dir:
        return output_dir.rstrip("/")
    return str(Path(output_dir).expanduser().resolve())


def check_accelerator(use_gpu: bool, accelerator_type: str | None) -> None:
    """A GPU type only makes sense for GPU workers (configs call this before Ray starts)."""
    if accelerator_type and not use_gpu:
        raise ValueError("--accelerator_type needs --use_gpu")


def scaling_config(settings: RunSettings) -> Any:
    """Ray Train's `ScalingConfig`: CPUs (and one GPU, of a type if given) per worker."""
    import ray.train

    check_accelerator(settings.use_gpu, settings.accelerator_type)
    resources: dict[str, float] = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(
        num_workers=settings.num_workers, use_gpu=settings.use_gpu,
        resources_per_worker=resources, accelerator_type=settings.accelerator_type)


def launch(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    settings: RunSettings,
    datasets: dict[str, Any] | None = None,
) -> Any:
    """Run `train_loop(loop_config)` on `settings.num_workers` Ray Train workers.

    Returns:
        The `ray.train.Result` (its `.checkpoint` is the latest one reported).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: os.environ[k] for k in (FAULT_ENV, "HF_HUB_OFFLINE") if k in os.environ}
    run_config = ray.train.RunConfig(
        name=settings.name,
        storage_path=storage_path(settings.output_dir),
        failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.num_to_keep),
        worker_runtime_env={"env_vars": env} if env else None,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=scaling_config(settings),
        run_config=run_config,
        datasets=datasets,
    )
    return trainer.fit()


# ------------------------------------------------------------------------ worker side
def setup_worker_logging(level: int = logging.INFO) -> None:
    """Send this package's log lines to the worker's stderr (Ray forwards it)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(level)


def worker_device() -> torch.device:
    """This worker's device (its GPU under `use_gpu`, else CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def prepare_model(model: nn.Module) -> nn.Module:
    """Move to the worker's device and wrap in DDP when the world has > 1 process."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) the same on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn on activation checkpointing in the (Hugging Face) backbone(s) of `model`."""
    if not enabled:
        return
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no Hugging Face backbone to checkpoint")


def resolve_precision(fp16: bool, bf16: bool) -> DType:
    """The autocast dtype for the FlagEmbedding-style ``--fp16`` / ``--bf16`` flags."""
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 are mutually exclusive")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


@dataclass
class Precision:
    """Autocast and (for fp16) loss scaling for one device."""

    dtype: DType
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, dtype: DType, device: torch.device) -> Precision:
        check_dtype(dtype, device)  # fp16 needs CUDA; bf16 on CPU warns when emulated
        scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
        return cls(dtype, device, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.dtype, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def scale_loss_fn(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Wrap a loss so its backward is scaled (for `bge_core.grad_cache` steps)."""
        if self.scaler is None:
            return loss_fn
        return lambda *args: self.scaler.scale(loss_fn(*args))

    def unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as the model sees it (undo fp16 loss scaling, for logging)."""
        return loss / self.scaler.get_scale() if self.scaler else loss

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any,
             max_grad_norm: float | None = None) -> None:
        """Unscale, clip, step the optimizer and scheduler, zero the gradients."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainState:
    """Counters saved in every checkpoint: where training stands."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    examples: int = 0
    resumed_from: list[int] = field(default_factory=list)  # steps restarted from

    def advance(self, examples: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.examples += examples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


@dataclass(frozen=True)
class ModelIO:
    """How a job writes its model into a checkpoint folder and reads it back."""

    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], None]


def _save_state_dict(model: nn.Module, folder: Path) -> None:
    torch.save(model.state_dict(), folder / "model.pt")


def _load_state_dict(model: nn.Module, folder: Path) -> None:
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu"))


STATE_DICT_IO = ModelIO(save=_save_state_dict, load=_load_state_dict)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def restore_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, amp: Precision,
    io: ModelIO = STATE_DICT_IO,
) -> TrainState:
    """Load the latest reported checkpoint (after a failure or a re-run), if there is one.

    Returns:
        The saved `TrainState`, or a fresh one when training starts from scratch.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        io.load(_unwrap(model), folder)
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if amp.scaler and saved.get("scaler"):
        amp.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_cpu"])
    state = TrainState(**saved["state"])
    state.resumed_from.append(state.step)
    log.info("rank %d resumed from checkpoint at step %d (epoch %d)",
             get_rank(), state.step, state.epoch)
    return state


def save_and_report(
    metrics: dict[str, Any], state: TrainState, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, amp: Precision,
    io: ModelIO = STATE_DICT_IO,
) -> None:
    """Rank 0 writes a checkpoint and reports it; the other ranks report the metrics only."""
    import ray.train

    if get_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="bge_ckpt_") as tmp:
        folder = Path(tmp)
        io.save(_unwrap(model), folder)
        torch.save({
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": amp.scaler.state_dict() if amp.scaler else None,
            "rng_cpu": torch.get_rng_state(), "state": asdict(state),
        }, folder / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state.step:08d}")
    log.info("checkpoint saved at step %d", state.step)


def count_nodes() -> int:
    """Distinct Ray nodes the worker group runs on (a collective: call on every rank)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if get_world_size() == 1:
        return 1
    nodes: list[str | None] = [None] * get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))


def report(metrics: dict[str, Any]) -> None:
    """Report metrics from every rank (a barrier: all ranks call it at the same steps)."""
    import ray.train

    ray.train.report(metrics)


def maybe_inject_failure(step: int) -> None:
    """Exit abruptly after `step` once, when ``BGE_FAULT_INJECT=STEP:MARKER`` says so."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    victim = 1 if get_world_size() > 1 else 0
    if step == int(at) and get_rank() == victim and not Path(marker).exists():
        Path(marker).write_text(f"rank {victim} killed after step {step}\n")
        # Ray Train's controller collects reports by polling (every 2 s): wait so the
        # checkpoints reported before the failure are registered, as in a real crash
        # that comes later than a poll after the last checkpoint.
        time.sleep(FAULT_DELAY_S)
        log.warning("fault injection: rank %d exits after step %d", victim, step)
        os._exit(1)


@dataclass
class ProgressMeter:
    """Step, loss, examples/s and ETA for the log and the reported metrics."""

    total_steps: int
    start_step: int = 0
    started: float = field(default_factory=time.perf_counter)
    examples: int = 0

    def update(self, step: int, loss: float, examples: int, **extra: Any) -> dict[str, Any]:
        """Count `examples` (global, this step) and return the metrics dict at `step`."""
        self.examples += examples
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        steps_done = max(step - self.start_step, 1)
        eta = (self.total_steps - step) * elapsed / steps_done
        return {"step": step, "loss": float(loss), "examples_per_s": self.examples / elapsed,
                "eta_s": eta, **extra}

    @staticmethod
    def log_line(metrics: dict[str, Any]) -> None:
        """Log one progress line (rank 0 only)."""
        if get_rank() == 0:
            log.info("step %d/%s loss %.4f %.1f examples/s ETA %.0fs", metrics["step"],
                     metrics.get("total_steps", "?"), metrics["loss"],
                     metrics["examples_per_s"], metrics["eta_s"])
