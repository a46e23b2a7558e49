"""Every job at its defaults on a two-node cluster on this machine.

Two 2-CPU raylets (`ray.cluster_utils.Cluster`): a default CPU encode actor takes all but
one CPU of a node, a default training worker 1.5 CPUs (one per node, two workers), and the
read, tokenise and search tasks must find room beside them. Runs the jobs of
`tests/test_defaults.py` one after another, each with only its required paths, the model
and (training) a few steps, and prints per job::

    JOB {"job": ..., "seconds": ..., "settings": {...}, "result": {...}}

Usage: python tests/scripts/defaults_cluster.py MODEL DATA_ROOT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.common.cli import NO_DASHBOARD_ENV  # noqa: E402
from tests.test_defaults import JOBS, job_settings, run_job  # noqa: E402

NODE_CPUS = 2


def main() -> None:
    model, root = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **NO_DASHBOARD_ENV}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        for job in JOBS:
            settings = job_settings(job, root / job, model, workers=2)
            start = time.monotonic()
            result = run_job(job, settings)
            print("JOB " + json.dumps({"job": job, "seconds": round(time.monotonic() - start, 1),
                                       "settings": settings, "result": result}, default=str),
                  flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
