"""Bounded load test of the served endpoint on loopback vs in-process `Encoder.encode`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--requests 256] [--levels 1,8,32] \
        [--time-cap-s 120] [--peer-url http://127.0.0.1:7997 --peer-model NAME] [--json out.json]

STS-B test sentences, 8 per request, sent by 1, 8 and 32 concurrent clients (asyncio +
aiohttp, one process) to `pipelines/serve_embeddings.py` running in this process's local Ray
(one replica holding every CPU, as the in-process encoder does). Each level sends a fixed
number of requests (`--requests`, at least 4 per client) or stops at `--time-cap-s`.
In-process `Encoder.encode` is timed on the same texts right before and right after the
served runs (a shared host's speed drifts; the ratio uses their mean). `--peer-url` runs the
same load against another OpenAI-compatible server (e.g. infinity) already running.
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
               key: str | None = None) -> list[dict]:
    results = []
    per = args.texts_per_request
    asyncio.run(_load(url, model, requests_for(texts, 8, per), 4, 60, key))  # warm-up
    for clients in args.levels:
        batches = requests_for(texts, max(args.requests, 4 * clients), per)
        result = asyncio.run(_load(url, model, batches, clients, args.time_cap_s, key))
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def in_process_rate(encoder, texts: list[str], repeats: int = 2) -> float:
    """Texts/s of `Encoder.encode` on `texts` (best of `repeats`, after a warm-up call)."""
    encoder.encode(texts[:64])
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode(texts)
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return round(best, 1)


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
    parser.add_argument("--skip-ours", action="store_true", help="only the peer server")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    texts = sentences()
    total = max(args.requests, 4 * max(args.levels)) * args.texts_per_request
    sample = [t for batch in requests_for(texts, total // args.texts_per_request,
                                          args.texts_per_request) for t in batch]
    report: dict = {"model": args.model, "texts_per_request": args.texts_per_request,
                    "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if args.peer_url:
        report["peer"] = run_levels(args.peer_url, args.peer_model, texts, args)
    if not args.skip_ours:
        report.update(ours(args, texts, sample))
    if args.peer_url and not args.skip_ours:
        mean = (report["in_process_before"] + report["in_process_after"]) / 2
        for level in report["peer"]:
            level["vs_in_process"] = round(level["texts_per_s"] / mean, 2)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def ours(args: argparse.Namespace, texts: list[str], sample: list[str]) -> dict:
    """In-process rate, then the served levels, then the in-process rate again."""
    import ray
    from ray import serve

    from bge_core.model import Encoder
    from pipelines.serve_embeddings import ServeConfig, start

    encoder = Encoder.from_pretrained(args.model, device="cpu")
    before = in_process_rate(encoder, sample)
    print(f"in-process before: {before} texts/s", flush=True)
    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    start(ServeConfig(model=args.model, port=port, cpus_per_replica=float(cpus)), api_key="")
    served = run_levels(f"http://127.0.0.1:{port}/v1/embeddings", args.model, texts, args)
    serve.shutdown()
    ray.shutdown()
    after = in_process_rate(encoder, sample)
    print(f"in-process after: {after} texts/s", flush=True)
    mean = (before + after) / 2
    for level in served:
        level["vs_in_process"] = round(level["texts_per_s"] / mean, 2)
    return {"in_process_before": before, "in_process_after": after, "served": served}


if __name__ == "__main__":
    main()
