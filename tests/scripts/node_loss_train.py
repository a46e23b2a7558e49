"""Node loss during Ray Train (RetroMAE pretraining), on a Ray cluster on this machine.

A head and one worker raylet of one CPU each: the two training workers (one CPU each) sit
one per raylet. A clean run first; then a drill in which, once a checkpoint is written,
the worker raylet is killed with its processes (SIGKILL) and a replacement raylet joins,
as an autoscaler would start one. Ray Train restarts the group (`max_failures=1`) on the
head and the new node, from the latest checkpoint. Prints one line per run::

    RUN {"name": ..., "seconds": ..., "killed_at_s": ..., "metrics": {...}, "output_dir": ...}

Usage: python tests/scripts/node_loss_train.py MODEL DATA OUT_ROOT STEPS
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.common.cli import NO_DASHBOARD_ENV, parse_config  # noqa: E402
from pipelines.train.retromae import RetroMAEConfig, run  # noqa: E402
from tests.test_flagembedding_commands import retromae_readme  # noqa: E402

REGISTER_S = 4  # Ray Train's controller polls reports every 2 s: let it register the ckpt
# Two 2-CPU raylets and 1.5-CPU workers: the workers cannot share a raylet (the drill kills
# one worker's), and each raylet keeps 0.5 CPU for the read tasks that stream the corpus
# (with 1-CPU raylets and workers nothing was left for them and the first step never came).
NODE_CPUS, WORKER_CPUS = 2, 1.5


def _config(model: str, data: str, out: Path, steps: int) -> RetroMAEConfig:
    argv = retromae_readme(model, data, str(out), batch=4)
    return parse_config(RetroMAEConfig, argv + [
        "--num_workers", "2", "--cpus_per_worker", str(WORKER_CPUS), "--max_seq_length", "32",
        "--max_steps", str(steps), "--save_steps", "2", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--warmup_ratio", "0", "--max_failures", "1",
        "--num_train_epochs", "10"])


def _run(cfg: RetroMAEConfig, kill: Any = None) -> dict[str, Any]:
    """Run in a thread; call `kill()` once the first checkpoint is registered."""
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            summary = run(cfg)
            result.update(metrics=summary.metrics, output_dir=str(summary.output_dir))
        except BaseException as err:  # re-raised below
            errors.append(err)

    start = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    killed_at, seen = None, None
    while worker.is_alive() and kill is not None and killed_at is None:
        found = sorted(Path(cfg.output_dir).glob("*/checkpoint_step_*"))
        if found and seen is None:
            seen = time.monotonic()
        if seen is not None and time.monotonic() - seen >= REGISTER_S:
            kill()
            killed_at = round(time.monotonic() - start, 1)
        time.sleep(0.2)
    worker.join()
    if errors:
        raise errors[0]
    return {"seconds": round(time.monotonic() - start, 1), "killed_at_s": killed_at, **result}


def main() -> None:
    model, data, root, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    node = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **NO_DASHBOARD_ENV}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        out = _run(_config(model, data, root / "clean", steps))
        print("RUN " + json.dumps({"name": "clean", **out}), flush=True)

        def kill() -> None:
            done = sorted(p.name for p in (root / "drill").glob("*/checkpoint_step_*"))
            cluster.remove_node(node, allow_graceful=False)  # SIGKILL raylet + workers
            cluster.add_node(num_cpus=NODE_CPUS)  # the replacement an autoscaler would start
            print(f"KILLED {node.node_id} after {done}; a new node joined", flush=True)

        out = _run(_config(model, data, root / "drill", steps), kill)
        print("RUN " + json.dumps({"name": "node_loss", **out}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
