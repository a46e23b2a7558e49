"""The server on a simulated two-node cluster (tests/scripts/serve_cluster.py, its own Ray
in a subprocess): several replicas per node, the autoscaling minimum held, a replica killed
mid-load losing no accepted request (each is answered 200 with its vectors or 5xx, none
dropped or cut), and 429 with Retry-After past the queue limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
# a replica-kill drill on two raylets: minutes, so with the other drills in `make test-long`
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.long]


@pytest.mark.timeout(900)
def test_two_nodes_replica_killed_mid_load_and_overload(tmp_path: Path):
    model = make_tiny_bert(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "tests/scripts/serve_cluster.py", str(model)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    phases = {p["phase"]: p for p in (json.loads(line[6:]) for line in
                                      done.stdout.splitlines() if line.startswith("PHASE "))}
    assert done.returncode == 0 and len(phases) == 3, done.stdout[-3000:] + done.stderr[-3000:]

    per_node = Counter(phases["placement"]["replica_nodes"])
    assert phases["placement"]["cluster_nodes"] == 2 and len(per_node) == 2
    assert max(per_node.values()) >= 2, per_node  # several replicas on one node

    kill = phases["kill"]
    assert set(kill["statuses"]) <= {"200", "500", "502", "503", "504"}, kill  # no drops
    assert kill["wrong_counts"] == 0 and kill["ok_after_kill"] > 0, kill
    # the killed replica is replaced (autoscaling's minimum, 3, held). Scale-out past 3
    # under this load was not seen within the 60 s window in 4 runs (Serve's upscale delay
    # and look-back are 30 s each): not asserted
    assert kill["victim_gone"] and kill["most_replicas"] >= 3, kill

    overload = phases["overload"]
    assert set(overload["statuses"]) <= {"200", "429"}, overload
    assert overload["statuses"].get("429", 0) >= 1 and overload["retry_after"] == ["1"]
    assert overload["after"] == 200
