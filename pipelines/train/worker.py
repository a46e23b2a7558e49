"""The worker side of both training jobs: what a Ray Train worker calls around its steps.

Inside ``train_loop(config)`` (`open_session`, `run_epochs`: `pipelines.train.session`)::

    cfg = config_from_dict(MyConfig, config["cfg"])      # rebuild the frozen config first
    device = start_worker(cfg)
    model = MyModel(...).to(device)
    session = open_session(model, cfg, total, device, io, config.get("on_step"))
    ddp_model = prepare_model(model)                     # DDP when world > 1
    def train_step(batch):
        with session.amp.autocast(): loss = ...
        session.amp.backward(loss)                       # or bge_core.grad_cache
        session.step()
        session.finish_step(examples, lambda: {"loss": all_reduce_mean(loss)})
    run_epochs(session.state, total, steps_per_epoch, batches, train_step)

`Session.finish_step` logs, reports and checkpoints at the same steps on every rank
(reports are barriers; the losses callable may hold collectives); only rank 0 writes
(`save_and_report`). A checkpoint folder holds the model (written by `ModelIO`, so every
checkpoint is a loadable model) and ``training_state.pt`` (optimizer, scheduler, grad
scaler, step counters, every rank's RNG states; tensors and plain values only, loaded with
``weights_only=True``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bge_core.distributed import all_gather_objects, get_rank, get_world_size
from bge_core.precision import Precision
from bge_core.train_state import TrainState, rng_state, seed_everything, set_rng_state
from pipelines.train.cpu_share import torch_threads

if TYPE_CHECKING:
    from pipelines.train.args import TrainArgs

log = logging.getLogger("bge.train")

STATE_FILE = "training_state.pt"


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


def report(metrics: dict[str, Any]) -> None:
    """Report metrics from every rank (a barrier: all ranks call it at the same steps)."""
    import ray.train

    ray.train.report(metrics)


def count_nodes() -> int:
    """Distinct Ray nodes the worker group runs on (a collective: call on every rank)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if get_world_size() == 1:
        return 1
    nodes: list[str | None] = [None] * get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return len(set(nodes))
