"""The driver side of both training jobs (finetuning, RetroMAE pretraining): one call from
a job's ``run(cfg)`` (Ray already started)::

    result = run_training("finetune", train_loop, loop_config, cfg, datasets={"train": ds})

`run_training` takes the output's lease, launches a `TorchTrainer` (gloo on CPU, nccl on
GPU) with checkpoints under ``<output_dir>/<run_name>/`` (local or any fsspec/pyarrow URI,
e.g. ``s3://``), restarts the worker group from the latest checkpoint up to
`max_failures` times (re-running the same command with the same `output_dir` resumes
too), checks the result and exports the last checkpoint's model to `output_dir`. What
runs on the workers is `pipelines.train.worker` and `pipelines.train.session`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from bge_core.storage import (
    StorageError,
    arrow_filesystem,
    check_reachable,
    find_storage_error,
    is_local,
    local_path,
    naming,
)
from pipelines.common.lease import OutputLease, release_quietly
from pipelines.common.ranges import READ_TASK_CPUS
from pipelines.common.resources import check_accelerator
from pipelines.train.cpu_share import default_cpus_per_worker, torch_threads

if TYPE_CHECKING:
    from pipelines.train.args import TrainArgs
    from pipelines.train.session import StepHook

log = logging.getLogger("bge.train")


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
    datasets: dict[str, Any] | None = None, on_step: StepHook | None = None,
    export_skip: Sequence[str] = (), dataset_config: Any = None,
) -> TrainResult:
    """Launch `train_loop` on Ray Train, check the result, export the final model.

    Args:
        job: the job's name, for messages.
        loop_config: what every worker gets (the config dict under ``"cfg"`` and more).
        args: the job's config (placement, output, run name).
        examples / skipped: data counts for the result.
        on_step: called on every worker after each optimizer step
            (`pipelines.train.session.StepHook`); handed to the workers under
            ``loop_config["on_step"]``, so it must pickle by reference.
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
        config = {**loop_config, "on_step": on_step}
        return _train_and_export(job, train_loop, config, args, examples=examples,
                                 skipped=skipped, datasets=datasets,
                                 export_skip=export_skip, dataset_config=dataset_config)
    finally:
        release_quietly(lease)


def _train_and_export(
    job: str, train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
    args: TrainArgs, *, examples: int, skipped: int, datasets: dict[str, Any] | None,
    export_skip: Sequence[str], dataset_config: Any = None,
) -> TrainResult:
    settings = run_settings(args)
    log.info("%s: %d worker(s), %s CPU(s) each%s, %d torch thread(s) each%s", job,
             settings.num_workers, round(settings.cpus_per_worker, 4),
             " and a GPU" if settings.use_gpu else "", torch_threads(settings.cpus_per_worker),
             "" if args.cpus_per_worker else f" (default: {READ_TASK_CPUS} CPU kept free per "
             "node for read tasks)")
    result = launch(train_loop, loop_config, settings, datasets, dataset_config)
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
