"""CPUs per training worker when `--cpus_per_worker` is left out, and the torch threads a
CPU worker computes on: computed from the nodes' CPU totals, the same on every run."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipelines.common.ranges import READ_TASK_CPUS


def default_cpus_per_worker(num_workers: int, use_gpu: bool) -> float:
    """CPUs per worker when the flag is left out: 1 beside a GPU; on a CPU cluster the
    largest equal share of the nodes' CPU totals that keeps `READ_TASK_CPUS` free on every
    node for the job's read tasks (`even_cpu_share`).

    RetroMAE streams its corpus through Ray Data read tasks while the workers train, and
    finetuning's shards are fed by Ray Data too: a worker holding every CPU of its node
    leaves them none, and the job waits forever.
    """
    if use_gpu:
        return 1.0
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return even_cpu_share(nodes, num_workers, READ_TASK_CPUS)


def even_cpu_share(node_cpus: Sequence[float], workers: int, reserve: float) -> float:
    """CPUs per training worker: the largest equal share that places every worker while
    keeping `reserve` CPUs free on every node, however Ray packs the workers.

    The candidates are ``(c - reserve) / k`` for each node's CPU total `c` and k = 1 ..
    `workers` workers on it; the largest one wins for which (a) the nodes hold `workers`
    workers within their CPUs less `reserve`, and (b) on every node, the most workers Ray
    could place there (``min(workers, floor(c / share))``) leave `reserve` free. It depends
    only on the node totals, never on what happens to be free, so it is the same on every
    run. One worker on a 2-CPU node gets 1.5; one per 2-CPU node of two gets 1.5 each.

    Args:
        node_cpus: CPU total of each alive node.
        workers: training workers to place.
        reserve: CPUs to keep free on each node (the job's read tasks).

    Raises:
        ValueError: no node has more than `reserve` CPUs.
    """
    usable = [c - reserve for c in node_cpus if c > reserve]
    for share in sorted({u / k for u in usable for k in range(1, workers + 1)}, reverse=True):
        fits = sum(math.floor(u / share + 1e-9) for u in usable) >= workers
        if fits and all(_room_left(c, share, workers) >= reserve - 1e-9 for c in node_cpus):
            return share
    raise ValueError(f"no node has more than {reserve} CPUs for {workers} training workers "
                     "(and their read tasks); pass --cpus_per_worker")


def _room_left(cpus: float, share: float, workers: int) -> float:
    """CPUs a node keeps free when Ray packs on it as many workers as it can hold."""
    placed = min(workers, math.floor(cpus / share + 1e-9))
    return cpus - placed * share if placed else math.inf


def torch_threads(cpus: float) -> int:
    """Torch threads of a CPU worker holding `cpus` CPUs: the nearest whole number, at
    least one (1.5 -> 2: the half CPU kept for read tasks is a scheduling reservation for
    short tasks, not a core to leave idle)."""
    return max(1, math.floor(cpus + 0.5))
