"""Ray Train's placement-group cleaner must never take another Ray's word for a live run.

Each Ray Train run starts a PlacementGroupCleaner that asks the state API whether the run's
controller is alive and removes the run's placement group on "no such actor". A Ray without
a dashboard (this session's, the benchmarks') advertises 127.0.0.1:8265, so the cleaner
asked whichever Ray on the machine held that port: CI lost the recipe chain's finetuning
when another test's Ray brought its dashboard up there. `NO_DASHBOARD_ENV` points the state
API at a closed port. The first check runs in a worker of the session, where the cleaner
runs; the `long` drill provokes the failure itself, with and without the setting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.common.cli import NO_DASHBOARD_ENV

DRILL = Path(__file__).parent / "scripts" / "pg_cleaner_drill.py"


@pytest.mark.timeout(120)
def test_the_cleaner_asks_no_dashboard_and_reads_the_failure_as_keep_watching(
        ray_session) -> None:
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Probe:
        def ask(self) -> tuple[str, str]:
            from ray.dashboard.utils import get_address_for_submission_client
            from ray.train.v2._internal.state.util import is_actor_alive
            from ray.util.state.exception import RayStateApiException

            url = get_address_for_submission_client(None)
            me = ray.get_runtime_context().get_actor_id()
            try:  # what the cleaner's loop calls each second
                answer = "alive" if is_actor_alive(me, timeout=5) else "dead"
            except RayStateApiException:  # the cleaner logs it and keeps watching
                answer = "unavailable"
            return url, answer

    url, answer = ray.get(Probe.remote().ask.remote(), timeout=60)
    assert url == NO_DASHBOARD_ENV["RAY_API_SERVER_ADDRESS"]
    # "dead" would remove a live run's placement group; a live actor must never read so
    assert answer == "unavailable"


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _drill(mode: str, tmp_path: Path) -> dict:
    """A dashboard-less Ray training for 40 s; a second Ray brings its dashboard up on 8265
    once the run's worker is training. What the run's driver printed at its end."""
    marker = tmp_path / mode / "training"
    marker.parent.mkdir(parents=True)
    train = subprocess.Popen([sys.executable, str(DRILL), "train", mode, "40", str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    dash = None
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert train.poll() is None and time.monotonic() < deadline, "never trained"
            time.sleep(0.5)
        dash = subprocess.Popen([sys.executable, str(DRILL), "dashboard", "60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        out, _ = train.communicate(timeout=240)
    finally:
        for proc in (train, dash):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_run_survives_another_rays_dashboard_coming_up_and_a_bare_one_does_not(
        tmp_path: Path) -> None:
    """The drill behind `NO_DASHBOARD_ENV`, both ways: guarded, the run finishes; bare, Ray
    Train removes the live run's placement group (if Ray stops doing that, this says so:
    the workaround can go)."""
    if not _port_free(8265):
        pytest.skip("127.0.0.1:8265 is taken: the drill needs to put a dashboard there")
    guarded = _drill("guarded", tmp_path)
    assert guarded == {"ok": True, "error": None}
    bare = _drill("bare", tmp_path)
    assert not bare["ok"], "Ray Train's cleaner spared a bare run: NO_DASHBOARD_ENV can go"
    assert "placement group was removed" in bare["error"]
