"""One role of the placement-group cleaner drill (`tests/test_train_cleaner.py`).

Usage:
    python tests/scripts/pg_cleaner_drill.py train guarded|bare SECONDS MARKER
    python tests/scripts/pg_cleaner_drill.py dashboard SECONDS

``train``: a local Ray without a dashboard (with `NO_DASHBOARD_ENV` in its runtime env, or
``bare``: as Ray leaves it), one Ray Train worker that creates MARKER once it runs, then
reports for SECONDS; prints ``RESULT {"ok": ..., "error": ...}``. ``dashboard``: a second
local Ray with its dashboard on 127.0.0.1:8265, alive for SECONDS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402

from pipelines.common.cli import NO_DASHBOARD_ENV  # noqa: E402


def train(mode: str, seconds: float, marker: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    # bare: the state API at what a dashboard-less Ray advertises, where the cleaner's own
    # lookup lands when this Ray is the machine's only one (with several it errs and stops)
    env = dict(NO_DASHBOARD_ENV) if mode == "guarded" else {
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8265"}
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})

    def loop(cfg: dict) -> None:
        Path(cfg["marker"]).touch()
        end = time.monotonic() + cfg["seconds"]
        while time.monotonic() < end:
            time.sleep(0.5)
            ray.train.report({"left_s": end - time.monotonic()})

    trainer = TorchTrainer(
        loop, train_loop_config={"marker": marker, "seconds": seconds},
        scaling_config=ray.train.ScalingConfig(num_workers=1,
                                               resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(Path(marker).parent / "runs")))
    try:
        trainer.fit()
        result = {"ok": True, "error": None}
    except Exception as err:  # the drill reports what killed the run
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    print("RESULT " + json.dumps(result), flush=True)


def dashboard(seconds: float) -> None:
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=8265, log_to_driver=False)
    print("DASHBOARD " + ray.get_runtime_context().gcs_address, flush=True)
    time.sleep(seconds)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        dashboard(float(sys.argv[2]))
