"""Run embed_corpus on a two-raylet Ray cluster on this machine; print the manifest as JSON.

Usage: python tests/scripts/two_raylets_embed.py INPUT OUTPUT MODEL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
import ray.data  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.common.cli import make_config  # noqa: E402
from pipelines.embed.main import EmbedConfig, run  # noqa: E402


def main() -> None:
    source, output, model = sys.argv[1:4]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 4, "include_dashboard": False})
    cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # Ray Data starts pool actors asynchronously: on a busy machine the first actor up
    # could encode everything before the second is ready. Wait for both.
    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = 300
    # One batch at a time per actor: an actor that is given a batch while busy is skipped,
    # so the actor beside the blocks cannot take a small corpus alone.
    context.max_tasks_in_flight_per_actor = 1
    try:
        # 2.5 of a node's 4 logical CPUs per actor: one actor fits per node, so the pool
        # spans both raylets, and 1.5 CPUs per node stay free for read/write tasks.
        manifest = run(make_config(EmbedConfig, input=source, output=output, model=model,
                                   num_actors="2", cpus_per_actor=2.5, batch_rows=8,
                                   chunk_rows=8))
        print("MANIFEST " + json.dumps(manifest))
        print("NODES " + json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"]]))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
