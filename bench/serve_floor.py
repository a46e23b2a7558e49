"""What one served request costs beyond its encode: one client, one replica, one thread.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/serve_floor.py [--requests 200]

Starts the server as `bench/serve_load.py` does (local Ray, throughput-optimised Serve, one
replica of 1 CPU, ``OMP_NUM_THREADS=1``), then, one request at a time: ``GET /health`` and
``GET /v1/models`` (no encode: the HTTP + Serve floor), ``POST /v1/embeddings`` of one word
and of 8 STS-B sentences (p50, and the replica's own stage times from ``Server-Timing``),
each through Serve's proxy (the server's port) and at the replica's own port (direct
ingress, `direct_urls`);
then the same texts through `Encoder.encode` in this process on one thread. Prints one JSON
line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import _free_port, _load, requests_for, sentences  # noqa: E402

MODEL = "all-MiniLM-L6-v2"


async def _gets(base: str, path: str, count: int) -> float:
    """p50 ms of `count` sequential GETs (after 50 warm-up ones)."""
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count + 50):
            start = time.perf_counter()
            async with session.get(base + path) as response:
                await response.read()
            times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times[50:])), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    import ray
    from ray import serve

    from pipelines.common.cli import make_config
    from pipelines.serve.main import THROUGHPUT_ENV, ServeConfig, direct_urls, start

    os.environ[THROUGHPUT_ENV] = "1"
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cases = {"one word": [["a"]] * args.requests,
             "8 sentences": requests_for(sentences(), args.requests, 8)}
    try:
        cfg = make_config(ServeConfig, model=MODEL, port=port, cpus_per_replica=1.0)
        start(cfg, api_key="")
        # through Serve's proxy (the server's port), then at the replica's own port
        routes = {"proxy": base}
        direct = direct_urls(cfg.app_name, port, "127.0.0.1")
        if direct:
            routes["direct"] = direct[0]
        for route, root in routes.items():
            for path in ("/health", "/v1/models"):
                print(json.dumps({"served": f"GET {path}", "via": route, "p50_ms": asyncio.run(
                    _gets(root, path, args.requests))}))
            for label, batches in cases.items():
                url = f"{root}/v1/embeddings"
                asyncio.run(_load(url, MODEL, batches[:20], 1, 60, None))  # warm-up
                result = asyncio.run(_load(url, MODEL, batches, 1, 300, None))
                print(json.dumps({"served": f"POST {label}", "via": route,
                                  "p50_ms": result["p50_ms"],
                                  "replica_ms": result.get("replica_ms")}))
    finally:
        serve.shutdown()
        ray.shutdown()
    import torch

    from bge_core.model import Encoder

    torch.set_num_threads(1)
    encoder = Encoder.from_pretrained(MODEL, device="cpu")
    for label, batches in cases.items():
        for texts in batches[:20]:
            encoder.encode(texts)
        times = []
        for texts in batches:
            begin = time.perf_counter()
            encoder.encode(texts)
            times.append(time.perf_counter() - begin)
        print(json.dumps({"in_process": label, "p50_ms": round(1000 * float(np.median(times)),
                                                               2)}))


if __name__ == "__main__":
    main()
