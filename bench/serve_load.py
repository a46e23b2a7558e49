"""Bounded load test of the served endpoint on loopback vs in-process `Encoder.encode`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--requests 256] [--levels 1,8,32] \
        [--threads 1] [--time-cap-s 120] [--json out.json] \
        [--peer-url http://127.0.0.1:7997/embeddings --peer-model NAME]

STS-B test sentences, 8 per request, sent by 1, 8 and 32 concurrent clients (asyncio +
aiohttp, one process) to `pipelines/serve_embeddings.py` running in this process's local Ray
(one replica with `--threads` CPUs and torch threads, as many as the in-process encoder).
Each level sends a fixed number of requests (`--requests`, at least 4 per client) or stops
at `--time-cap-s`.
Every level is bracketed by in-process `Encoder.encode` on the same texts (one call right
before and one right after it, in this process): a shared host's speed drifts, and the
level's ratio uses the mean of its two. `--peer-url` runs the same load, bracketed the same
way, against another OpenAI-compatible server (e.g. infinity) already running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import stsb_test  # noqa: E402


def sentences() -> list[str]:
    """STS-B test sentences (both sides, file order, duplicates dropped)."""
    left, right, _ = stsb_test()
    return list(dict.fromkeys(s for pair in zip(left, right) for s in pair))


def requests_for(texts: list[str], count: int, per: int) -> list[list[str]]:
    """`count` requests of `per` consecutive sentences, cycling through `texts`."""
    return [[texts[(i * per + j) % len(texts)] for j in range(per)] for i in range(count)]


async def _load(url: str, model: str, batches: list[list[str]], clients: int,
                time_cap_s: float, key: str | None) -> dict:
    """Send `batches` with `clients` concurrent callers; per-request latency and rates."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(reversed(batches))
    deadline = time.perf_counter() + time_cap_s

    async def client(session: aiohttp.ClientSession) -> None:
        while queue and time.perf_counter() < deadline:
            texts = queue.pop()
            body = {"model": model, "input": texts, "encoding_format": "base64"}
            t0 = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                payload = await response.read()
            latencies.append(time.perf_counter() - t0)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 200:
                assert len(json.loads(payload)["data"]) == len(texts)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    done = len(latencies)
    texts = statuses.get(200, 0) * len(batches[0])
    return {"clients": clients, "requests": done, "statuses": statuses, "wall_s": round(wall, 3),
            "texts_per_s": round(texts / wall, 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}


def run_levels(url: str, model: str, texts: list[str], args: argparse.Namespace,
               encoder=None, key: str | None = None) -> list[dict]:
    """Each level's load; with `encoder`, bracketed by in-process runs on the same texts."""
    results = []
    per = args.texts_per_request
    asyncio.run(_load(url, model, requests_for(texts, 8, per), 4, 60, key))  # warm-up
    for clients in args.levels:
        batches = requests_for(texts, max(args.requests, 4 * clients), per)
        flat = [t for batch in batches for t in batch]
        before = in_process_rate(encoder, flat) if encoder is not None else None
        result = asyncio.run(_load(url, model, batches, clients, args.time_cap_s, key))
        if encoder is not None:
            after = in_process_rate(encoder, flat)
            result["in_process"] = [before, after]
            result["vs_in_process"] = round(2 * result["texts_per_s"] / (before + after), 2)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def in_process_rate(encoder, texts: list[str]) -> float:
    """Texts/s of one `Encoder.encode` call on `texts` (the level's own texts)."""
    t0 = time.perf_counter()
    encoder.encode(texts)
    return round(len(texts) / (time.perf_counter() - t0), 1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--time-cap-s", type=float, default=120.0, help="per level")
    parser.add_argument("--peer-url", help="another OpenAI-compatible /v1/embeddings URL")
    parser.add_argument("--peer-model", default="", help="`model` value the peer expects")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in process and in the replica (its CPUs); on a "
                             "shared, oversubscribed box 2 threads ran 4x slower than 1")
    parser.add_argument("--max-batch-requests", type=int, default=32,
                        help="the server's --max-batch-requests")
    parser.add_argument("--skip-ours", action="store_true", help="only the peer server")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    import torch

    from bge_core.model import Encoder

    torch.set_num_threads(args.threads)
    texts = sentences()
    encoder = Encoder.from_pretrained(args.model, device="cpu")
    encoder.encode(texts[:64])  # warm-up
    report: dict = {"model": args.model, "texts_per_request": args.texts_per_request,
                    "cpus": os.cpu_count(), "threads": args.threads,
                    "max_batch_requests": args.max_batch_requests,
                    "load_before": os.getloadavg()}
    if args.peer_url:
        report["peer"] = run_levels(args.peer_url, args.peer_model, texts, args, encoder)
    if not args.skip_ours:
        report["served"] = ours(args, texts, encoder)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def ours(args: argparse.Namespace, texts: list[str], encoder) -> list[dict]:
    """The served levels: one replica with `--threads` CPUs (Ray sets its torch threads)."""
    import ray
    from ray import serve

    from pipelines.serve.main import ServeConfig, start

    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    port = _free_port()
    try:
        start(ServeConfig(model=args.model, port=port, cpus_per_replica=float(args.threads),
                          max_batch_requests=args.max_batch_requests), api_key="")
        return run_levels(f"http://127.0.0.1:{port}/v1/embeddings", args.model, texts, args,
                          encoder)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
