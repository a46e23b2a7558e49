"""Process-group helpers: rank / world size, and one all-gather that keeps gradients.

Convention (used by `bge_core.losses`): tensors are gathered in rank order along dim 0,
so rank ``r``'s rows start at ``r * local_rows``. Without an initialised process group the
world is one process and every helper takes the same code path (the gather returns its
input), so single-process training runs exactly the code that distributed training runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True inside an initialised `torch.distributed` process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph.

    Backward sends each rank the SUM over all ranks of the gradients that flowed into its
    slice (``torch.distributed.nn`` reduce-scatters them), so a loss computed on gathered
    rows trains the rows' owners. Every rank must pass the same shape.

    Args:
        tensor: (N, ...) local rows.

    Returns:
        (W * N, ...) rows of all ranks in rank order; `tensor` itself when W == 1.
    """
    if get_world_size() == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)  # (W*N, ...)


def all_gather_without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (no gradient, any dtype) from every rank along dim 0, in rank
    order; `tensor` itself when W == 1. Every rank must pass the same shape."""
    if get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks (for logging; no gradient)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return float(tensor.item())


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (a collective: every rank must call it)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int64)
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def all_gather_objects(obj: object) -> list:
    """`obj` of every rank, in rank order (a collective; ``[obj]`` when W == 1)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
