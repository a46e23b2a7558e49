"""Ray Train's placement-group cleaner must never take another Ray's word for a live run.

Each Ray Train run starts a PlacementGroupCleaner that asks the state API whether the run's
controller is alive and removes the run's placement group on "no such actor". A Ray without
a dashboard (this session's, the benchmarks') advertises 127.0.0.1:8265, so the cleaner
asked whichever Ray on the machine held that port: CI lost the recipe chain's finetuning
when another test's Ray brought its dashboard up there. `NO_DASHBOARD_ENV` points the state
API at a closed port; these checks run in a worker of the session, where the cleaner runs.
"""

from __future__ import annotations

import pytest

from pipelines.common.cli import NO_DASHBOARD_ENV


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
