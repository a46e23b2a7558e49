"""Both training jobs at their default CPU share on a two-raylet cluster on this machine.

Two 2-CPU raylets and two workers per job, `--cpus_per_worker` left out: the default share
(1.5 CPUs, half a CPU kept free per node for read tasks) puts one worker on each raylet.
Finetuning reads three files of unequal size over two epochs; RetroMAE streams its corpus.
Prints one line per job::

    RUN {"name": ..., "seconds": ..., "metrics": {...}, "output_dir": ...}

Usage: python tests/scripts/two_nodes_train_defaults.py MODEL FINETUNE_DATA CORPUS OUT_ROOT
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.finetune import FinetuneConfig  # noqa: E402
from pipelines.finetune import run as finetune  # noqa: E402
from pipelines.pretrain_retromae import RetroMAEConfig  # noqa: E402
from pipelines.pretrain_retromae import run as pretrain  # noqa: E402

NODE_CPUS = 2


def main() -> None:
    model, data, corpus, root = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        jobs = {
            "finetune": (finetune, FinetuneConfig(
                model_name_or_path=model, train_data=data, output_dir=str(root / "ft"),
                num_workers=2, num_train_epochs=2, per_device_train_batch_size=2,
                train_group_size=2, query_max_len=16, passage_max_len=24)),
            "retromae": (pretrain, RetroMAEConfig(
                model_name_or_path=model, train_data=corpus, output_dir=str(root / "rm"),
                num_workers=2, max_steps=3, per_device_train_batch_size=4,
                max_seq_length=32)),
        }
        for name, (run, cfg) in jobs.items():
            start = time.monotonic()
            result = run(cfg)
            print("RUN " + json.dumps({"name": name, "seconds": round(time.monotonic() - start),
                                       "metrics": result.metrics,
                                       "output_dir": str(result.output_dir)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
