"""The embed job on ``s3://`` with credentials only in the node's environment, then what
Ray shows about it.

Run with the AWS settings (keys included) already in the environment: `ray.init` starts the
raylet from this process, so the node and its workers inherit them, as a node started
with its own credentials would. After the job, prints one line::

    STATE {"manifest": {...}, "tasks": [...], "actors": [...], "jobs": [...], "session_dir": ...}

with every task, actor and job as the state API lists them in detail (what
``ray list tasks|actors|jobs --detail`` prints). Ray is shut down before exit, so its logs
under ``session_dir`` are complete.

Usage: python tests/scripts/secrets_embed.py INPUT_URI OUTPUT_URI MODEL TEMP_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402
from ray.util import state  # noqa: E402

from pipelines.common.cli import make_config  # noqa: E402
from pipelines.embed.config import EmbedConfig  # noqa: E402
from pipelines.embed.main import run  # noqa: E402


def _listed(address: str) -> dict[str, list[dict[str, Any]]]:
    """Every task, actor and job of the cluster at `address`, in detail, as JSON-able dicts."""
    def plain(items: list[Any]) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(getattr(i, "__dict__", i), default=str)) for i in items]

    args = {"address": address, "detail": True, "limit": 10_000,
            "raise_on_missing_output": False}
    return {"tasks": plain(state.list_tasks(**args)), "actors": plain(state.list_actors(**args)),
            "jobs": plain(state.list_jobs(**args))}


def main() -> None:
    source, out, model, temp_dir = sys.argv[1:5]
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             _temp_dir=temp_dir,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        manifest = run(make_config(EmbedConfig, input=source, output=out, model=model,
                                   cpus_per_actor=0.5, title_column=None))
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        listed = _listed(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    print("STATE " + json.dumps({"manifest": manifest, "session_dir": session_dir, **listed},
                                default=str), flush=True)


if __name__ == "__main__":
    main()
