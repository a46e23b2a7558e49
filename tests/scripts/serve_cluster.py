"""The server on a two-node cluster on this machine: replicas per node, a kill, overload.

Two 2-CPU raylets (`ray.cluster_utils.Cluster`), the application deployed by
`pipelines.serve.main.start` with autoscaling replicas "3,5" of 0.25 CPU each (so some
node holds several). Three phases, one JSON line each (``PHASE {...}``):

- ``placement``: the replicas' nodes once the application is up.
- ``kill``: 12 threads send requests for ``LOAD_S`` seconds; after 3 s one replica is
  killed (`ray.kill`). Every request's outcome is recorded: the status (200 with the right
  number of vectors, or the error status) or the client-side error; the most replicas seen
  after the kill (the controller replaces the killed one; the autoscaler may scale out).
- ``overload``: 48 threads at once against a deployment that takes 1 request and queues 1
  per replica: statuses and the ``Retry-After`` header of the 429s.

Usage: python tests/scripts/serve_cluster.py MODEL_DIR [THROUGHPUT_OPTIMIZED=1]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NODE_CPUS = 2
LOAD_S = 60.0
SENDERS = 12
# 64 texts of up to 32 tokens a request; 12 senders on 3 replicas taking 2 each keep more
# than the autoscaling target (1 ongoing per replica, requests queued at the proxy included)
TEXTS = ["the cat sat on the mat", "blue sky over the city " * 6, "dog", "fish and chips"] * 16


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, texts: list[str], timeout: float = 60) -> dict:
    """One request's outcome: status, vectors returned, Retry-After, or the client error."""
    request = urllib.request.Request(url, data=json.dumps({"input": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return {"status": response.status, "n": len(json.loads(response.read())["data"])}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "retry_after": err.headers.get("Retry-After")}
    except (urllib.error.URLError, OSError) as err:  # reset, refused, timed out
        return {"status": None, "error": type(err).__name__}


def replicas(app: str) -> list[dict]:
    """Alive replica actors of `app`: name and node (from the GCS, no dashboard needed)."""
    from ray._private.state import actors

    return [{"name": a["Name"], "node": a["Address"]["NodeID"]}
            for a in actors().values()
            if a["State"] == "ALIVE" and a.get("Name", "").startswith(f"SERVE_REPLICA::{app}#")]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def kill_phase(url: str, app: str) -> dict:
    import ray

    outcomes: list[dict] = []
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            outcomes.append({"sent": sent, **post(url, TEXTS), "took": time.monotonic() - sent})

    with ThreadPoolExecutor(SENDERS) as pool:
        for _ in range(SENDERS):
            pool.submit(sender)
        time.sleep(3)
        victim = replicas(app)[0]["name"]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        peak = 0
        while time.monotonic() < killed_at + LOAD_S - 3:
            peak = max(peak, len(replicas(app)))
            time.sleep(2)
        stop.set()
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o["status"] if o["status"] is not None else o["error"])
        statuses[key] = statuses.get(key, 0) + 1
    return {"phase": "kill", "requests": len(outcomes), "statuses": statuses,
            "wrong_counts": sum(1 for o in outcomes if o["status"] == 200
                                and o["n"] != len(TEXTS)),
            "ok_after_kill": sum(1 for o in outcomes if o["status"] == 200
                                 and o["sent"] > killed_at + 1),
            "unanswered": [{"sent_after_kill_s": round(o["sent"] - killed_at, 1),
                            "took_s": round(o["took"], 1), "error": o["error"]}
                           for o in outcomes if o["status"] is None],
            "slowest_s": round(max(o["took"] for o in outcomes), 1),
            "victim": victim, "most_replicas": peak,
            "victim_gone": victim not in {r["name"] for r in replicas(app)}}


def overload_phase(url: str) -> dict:
    heavy = ["the cat sat on the mat by the river " * 20] * 256
    with ThreadPoolExecutor(48) as pool:
        outcomes = list(pool.map(lambda _: post(url, heavy, timeout=120), range(48)))
    statuses = [o["status"] for o in outcomes]
    return {"phase": "overload", "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "retry_after": sorted({str(o.get("retry_after")) for o in outcomes
                                   if o["status"] == 429}),
            "after": post(url, ["after the storm"])["status"]}


def main() -> None:
    model, throughput = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "1")
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = throughput  # raylets inherit it
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from pipelines.common.cli import make_config
    from pipelines.serve.main import ServeConfig, start

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "OMP_NUM_THREADS": "1"}})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        start(make_config(ServeConfig, model=model, port=port, app_name="scaled",
                          replicas="3,5", cpus_per_replica=0.25, max_length=32,
                          max_ongoing_requests=2, max_queued_requests=64), api_key="")
        start(make_config(ServeConfig, model=model, port=port, app_name="tight",
                          route_prefix="/tight", replicas="2", cpus_per_replica=0.25,
                          max_ongoing_requests=1, max_queued_requests=1), api_key="")
        nodes = [r["node"] for r in replicas("scaled")]
        print("PHASE " + json.dumps({"phase": "placement", "replica_nodes": nodes,
                                     "cluster_nodes": len(ray.nodes())}), flush=True)
        print("PHASE " + json.dumps(kill_phase(f"{base}/v1/embeddings", "scaled")), flush=True)
        print("PHASE " + json.dumps(overload_phase(f"{base}/tight/v1/embeddings")), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
