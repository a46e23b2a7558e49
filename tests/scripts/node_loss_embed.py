"""Node loss during embed_corpus, on a two-raylet Ray cluster on this machine.

Runs the job twice on the same cluster shape: a clean run, then a drill in which the
non-head raylet is killed (SIGKILL, with its workers: `Cluster.remove_node(...,
allow_graceful=False)`) as soon as the first parts are recorded. Prints one line per run::

    RUN {"name": ..., "seconds": ..., "killed_at_s": ..., "manifest": {...}}

Usage: python tests/scripts/node_loss_embed.py INPUT CLEAN_OUTPUT DRILL_OUTPUT MODEL
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

from pipelines.common.cli import make_config  # noqa: E402
from pipelines.embed.main import EmbedConfig, run  # noqa: E402

NODE_CPUS = 2


def _config(source: str, output: str, model: str) -> EmbedConfig:
    # Two actors of 0.5 CPU: after the loss both fit on the head beside the read/write tasks.
    return make_config(EmbedConfig, input=source, output=output, model=model, num_actors="2",
                       cpus_per_actor=0.5, batch_rows=4, chunk_rows=8)


def _marked(output: Path) -> int:
    return len(list((output / "_state" / "parts").glob("*/part-*")))


def _run(cfg: EmbedConfig, kill: Any = None) -> dict[str, Any]:
    """Run the job in a thread; call `kill()` once the first part is recorded."""
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.update(run(cfg))
        except BaseException as err:  # reported below
            errors.append(err)

    start = time.monotonic()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    killed_at = None
    while worker.is_alive() and kill is not None and killed_at is None:
        if _marked(Path(cfg.output)) > 0:
            kill()
            killed_at = round(time.monotonic() - start, 1)
        time.sleep(0.1)
    worker.join()
    if errors:
        raise errors[0]
    return {"seconds": round(time.monotonic() - start, 1), "killed_at_s": killed_at,
            "manifest": result}


def main() -> None:
    source, clean, drill, model = sys.argv[1:5]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        out = _run(_config(source, clean, model))
        print("RUN " + json.dumps({"name": "clean", **out}), flush=True)
        lost = worker.node_id

        def kill() -> None:
            cluster.remove_node(worker, allow_graceful=False)  # SIGKILL raylet + workers
            print(f"KILLED {lost} with {_marked(Path(drill))} parts recorded", flush=True)

        out = _run(_config(source, drill, model), kill)
        out["lost_node"] = lost
        print("RUN " + json.dumps({"name": "node_loss", **out}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
