"""Ray Train machinery shared by the training jobs (finetuning, RetroMAE pretraining).

Driver side, one call from a job's ``run(cfg)`` (Ray already started)::

    result = run_training("finetune", train_loop, loop_config, cfg, datasets={"train": ds})

`run_training` launches a `TorchTrainer` (gloo on CPU, nccl on GPU) with checkpoints under
``<output_dir>/<run_name>/`` (local or any fsspec/pyarrow URI, e.g. ``s3://``), restarts
the worker group from the latest checkpoint up to `max_failures` times (re-running the
same command with the same `output_dir` resumes too), checks the result and exports the
last checkpoint's model to `output_dir`.

Worker side, inside ``train_loop(config)`` (`open_session`, `run_epochs`:
`pipelines.train.session`)::

    cfg = config_from_dict(MyConfig, config["cfg"])      # rebuild the frozen config first
    device = start_worker(cfg)
    model = MyModel(...).to(device)
    session = open_session(model, cfg, total, device, io, fault_from(config))
    ddp_model = prepare_model(model)                     # DDP when world > 1
    def train_step(batch):
        with session.amp.autocast(): loss = ...
        session.amp.backward(loss)                       # or bge_core.grad_cache
        session.step()
        session.finish_step(examples, lambda: {"loss": all_reduce_mean(loss)})
    run_epochs(session.state, total, steps_per_epoch, batches, train_step)

`finish_step` logs, reports and checkpoints at the same steps on every rank (reports are
barriers; the losses callable may hold collectives); only rank 0 writes. A checkpoint
folder holds the model (written by `ModelIO`, so every checkpoint is a loadable model) and
``training_state.pt`` (optimizer, scheduler, grad scaler, step counters, every rank's RNG
states; tensors and plain values only, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from torch import nn

from bge_core.distributed import all_gather_objects, get_rank, get_world_size
from bge_core.storage import (
    StorageError,
    arrow_filesystem,
    check_reachable,
    find_storage_error,
    is_local,
    local_path,
    naming,
)
from bge_core.training import (
    Fault,
    Precision,
    TrainState,
    even_cpu_share,
    rng_state,
    seed_everything,
    set_rng_state,
    torch_threads,
)
from pipelines.common.lease import OutputLease, release_quietly
from pipelines.common.ranges import READ_TASK_CPUS
from pipelines.common.resources import check_accelerator

if TYPE_CHECKING:
    from pipelines.train.args import TrainArgs

log = logging.getLogger("bge.train")

STATE_FILE = "training_state.pt"


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
    if not is_local(output_dir):
        return output_dir.rstrip("/")
    return str(Path(local_path(output_dir)).expanduser().resolve())


def scaling_config(settings: RunSettings) -> Any:
    """Ray Train's `ScalingConfig`: CPUs (and one GPU, of a type if given) per worker."""
    import ray.train

    check_accelerator(settings.accelerator_type, float(settings.use_gpu),
                      type_flag="--accelerator_type", gpu_flag="--use_gpu")
    resources: dict[str, float] = {"CPU": settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = 1
    return ray.train.ScalingConfig(
        num_workers=settings.num_workers, use_gpu=settings.use_gpu,
        resources_per_worker=resources, accelerator_type=settings.accelerator_type)


def default_cpus_per_worker(num_workers: int, use_gpu: bool) -> float:
    """CPUs per worker when the flag is left out: 1 beside a GPU; on a CPU cluster the
    largest equal share of the nodes' CPU totals that keeps `READ_TASK_CPUS` free on every
    node for the job's read tasks (`even_cpu_share`: computed, the same on every run).

    RetroMAE streams its corpus through Ray Data read tasks while the workers train, and
    finetuning's shards are fed by Ray Data too: a worker holding every CPU of its node
    leaves them none, and the job waits forever.
    """
    if use_gpu:
        return 1.0
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return even_cpu_share(nodes, num_workers, READ_TASK_CPUS)


def run_settings(args: TrainArgs) -> RunSettings:
    """The Ray Train settings of a job's config (needs Ray when `cpus_per_worker` is unset)."""
    cpus = args.cpus_per_worker or default_cpus_per_worker(args.num_workers, args.use_gpu)
    return RunSettings(
        name=args.run_name, output_dir=args.output_dir, num_workers=args.num_workers,
        use_gpu=args.use_gpu, accelerator_type=args.accelerator_type, cpus_per_worker=cpus,
        max_failures=args.max_failures, num_to_keep=args.save_total_limit)


def launch(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    settings: RunSettings,
    datasets: dict[str, Any] | None = None,
    dataset_config: Any = None,
) -> Any:
    """Run `train_loop(loop_config)` on `settings.num_workers` Ray Train workers
    (`dataset_config`: Ray Train's `DataConfig` for `datasets`, None for its default).

    Returns:
        The `ray.train.Result` (its `.checkpoint` is the latest one reported).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ}
    # a URI gets our s3fs wrapped for pyarrow: checkpoints follow bge_core.storage's retries
    filesystem, path = arrow_filesystem(storage_path(settings.output_dir))
    run_config = ray.train.RunConfig(
        name=settings.name, storage_path=path, storage_filesystem=filesystem,
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
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    return trainer.fit()


@dataclass(frozen=True)
class TrainResult:
    """Where the model went and how training ended (rank 0's last reported metrics).

    Args:
        output_dir: the exported final model (local path or URI).
        metrics: the last reported metrics (``step``, ``loss``, ``resumed_from``...).
        examples: training examples (finetuning) or texts (RetroMAE) used.
        skipped: invalid examples or empty texts skipped.
        checkpoints: the metrics reported with each kept checkpoint, oldest first (a
            run that restarted has some from before the failure).
    """

    output_dir: str
    metrics: dict[str, Any]
    examples: int
    skipped: int
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def run_training(
    job: str, train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
    args: TrainArgs, *, examples: int, skipped: int = 0,
    datasets: dict[str, Any] | None = None, fault: Fault | None = None,
    export_skip: Sequence[str] = (), dataset_config: Any = None,
) -> TrainResult:
    """Launch `train_loop` on Ray Train, check the result, export the final model.

    Args:
        job: the job's name, for messages.
        loop_config: what every worker gets (the config dict under ``"cfg"`` and more).
        args: the job's config (placement, output, run name).
        examples / skipped: data counts for the result.
        fault: a fault drill for tests, handed to the workers (see `fault_from`).
        export_skip: file names of the checkpoint's model folder not to export.
        dataset_config: Ray Train's `DataConfig` for `datasets` (None: its default).

    Raises:
        RuntimeError: training failed after `max_failures` restarts.
    """
    for note in args.compat_notes():
        log.info("%s", note)
    # one live run per output_dir: a second one refuses at once (LeaseHeld), a dead one's
    # stale lease is taken over and its checkpoints resumed
    check_reachable(args.output_dir)
    lease = OutputLease(args.output_dir, stale_after_s=args.lease_timeout_s)
    with naming(args.output_dir, "take the lease on"):
        lease.acquire()
    try:
        return _train_and_export(job, train_loop, loop_config, args, examples=examples,
                                 skipped=skipped, datasets=datasets, fault=fault,
                                 export_skip=export_skip, dataset_config=dataset_config)
    finally:
        release_quietly(lease)


def _train_and_export(
    job: str, train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
    args: TrainArgs, *, examples: int, skipped: int, datasets: dict[str, Any] | None,
    fault: Fault | None, export_skip: Sequence[str], dataset_config: Any = None,
) -> TrainResult:
    settings = run_settings(args)
    log.info("%s: %d worker(s), %s CPU(s) each%s, %d torch thread(s) each%s", job,
             settings.num_workers, round(settings.cpus_per_worker, 4),
             " and a GPU" if settings.use_gpu else "", torch_threads(settings.cpus_per_worker),
             "" if args.cpus_per_worker else f" (default: {READ_TASK_CPUS} CPU kept free per "
             "node for read tasks)")
    config = {**loop_config, "fault": asdict(fault) if fault else None}
    result = launch(train_loop, config, settings, datasets, dataset_config)
    if result.error:
        cause = find_storage_error(result.error)
        if cause is not None:  # the store stayed down: say which URI, not a traceback
            raise StorageError(f"{job} failed: {cause}") from result.error
        raise RuntimeError(f"{job} failed: {result.error}") from result.error
    metrics = dict(result.metrics)
    log.info("%s finished at step %s: loss %.4f, %.1f examples/s, resumed from %s", job,
             metrics.get("step"), metrics.get("loss", float("nan")),
             metrics.get("examples_per_s", 0.0), metrics.get("resumed_from"))
    with result.checkpoint.as_directory() as folder:
        out = export_model(Path(folder) / "model", args.output_dir, export_skip)
    kept = sorted((dict(m) for _, m in result.best_checkpoints or []),
                  key=lambda m: m.get("step", 0))
    return TrainResult(out, metrics, examples, skipped, kept)


def export_model(model_dir: Path, output_dir: str, skip: Sequence[str] = ()) -> str:
    """Copy a checkpoint's model folder (less the `skip` names) to `output_dir`.

    Returns:
        `output_dir` (a local path or any fsspec URI).
    """
    fs, root = fsspec.core.url_to_fs(output_dir)
    with naming(output_dir, "write the final model to"):
        for path in sorted(model_dir.rglob("*")):
            if path.is_file() and path.name not in skip:
                target = f"{root.rstrip('/')}/{path.relative_to(model_dir).as_posix()}"
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(path), target)
    log.info("final model written to %s", output_dir)
    return output_dir


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


def start_worker(args: TrainArgs) -> torch.device:
    """First lines of a training loop: logging, seeds, torch threads; returns the device.

    A CPU worker computes on `torch_threads` of the CPUs Ray gave it (the nearest whole
    number, at least one), so the thread count follows from the CPU share alone.
    """
    import ray

    setup_worker_logging()
    seed_everything(args.seed)
    device = worker_device()
    if device.type == "cpu":
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(torch_threads(cpus))
        log.info("rank %d computes on %d CPU thread(s)", get_rank(), torch.get_num_threads())
    return device


def tokenizer_override(args: TrainArgs) -> Any | None:
    """The tokenizer `--tokenizer_name` asks for (None: use the model's own)."""
    if not args.tokenizer_name:
        return None
    from transformers import AutoTokenizer

    from bge_core.loading import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(args.tokenizer_name).folder)


def prepare_model(model: nn.Module) -> nn.Module:
    """Move to the worker's device and wrap in DDP when the world has > 1 process."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def fault_from(loop_config: dict[str, Any]) -> Fault | None:
    """The fault drill `run_training` handed to the workers (None in real runs)."""
    spec = loop_config.get("fault")
    return Fault(**spec) if spec else None


@dataclass(frozen=True)
class ModelIO:
    """How a job writes its model into a checkpoint folder and reads it back."""

    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], None]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def restore_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, amp: Precision,
    io: ModelIO,
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
        # tensors and plain values only: nothing on shared storage gets to run code here
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if amp.scaler and saved.get("scaler"):
        amp.scaler.load_state_dict(saved["scaler"])
    _restore_rng(saved["rng"])
    state = TrainState(**saved["state"])
    state.resumed_from.append(state.step)
    log.info("rank %d resumed from checkpoint at step %d (epoch %d)",
             get_rank(), state.step, state.epoch)
    return state


def _restore_rng(per_rank: list[dict[str, Any]]) -> None:
    """This rank's RNG states as saved (a group of another size keeps its fresh seeds)."""
    if len(per_rank) == get_world_size():
        set_rng_state(per_rank[get_rank()])
    elif get_rank() == 0:
        log.warning("checkpoint from %d worker(s), now %d: RNG states not restored",
                    len(per_rank), get_world_size())


def save_and_report(
    metrics: dict[str, Any], state: TrainState, model: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any, amp: Precision, io: ModelIO,
) -> None:
    """Rank 0 writes a checkpoint and reports it; the other ranks report the metrics only.

    The checkpoint's ``training_state.pt`` holds tensors and plain values only (it loads
    with ``weights_only=True``), every rank's RNG states among them (a collective).
    """
    import ray.train

    rngs = all_gather_objects(rng_state())
    if get_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="bge_ckpt_") as tmp:
        folder = Path(tmp)
        io.save(_unwrap(model), folder)
        torch.save({
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": amp.scaler.state_dict() if amp.scaler else None,
            "rng": rngs, "state": asdict(state),
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
