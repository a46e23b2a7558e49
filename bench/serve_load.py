"""Bounded load test of the served endpoint on loopback vs in-process `Encoder.encode`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--requests 256] [--levels 1,8,32] \
        [--corpora sentences,passages] [--passage-requests 64] [--openai-threads 32] \
        [--threads 1] [--dtype fp32] [--throughput-optimized 1] [--paths direct,proxy] \
        [--time-cap-s 120] [--rounds 1] [--json out.json] \
        [--peer-url http://127.0.0.1:7997/embeddings --peer-model NAME]

Corpora: STS-B test sentences and the first 200 NFCorpus documents (``passages``), 8 per
request, sent by 1, 8 and 32 concurrent clients (asyncio + aiohttp, one process) to
`pipelines/serve_embeddings.py` running in this process's local Ray (one replica with
`--threads` CPUs and torch threads, as many as the in-process encoder, the same `--dtype`).
Each level sends a fixed number of requests (`--requests`, `--passage-requests` for
passages, at least 4 per client) or stops at `--time-cap-s`. `--paths` picks how our clients
reach the replica: ``direct``, its own port (Serve's direct ingress in throughput-optimised
mode, `direct_urls`: what a load balancer in front of the replicas reaches), and ``proxy``,
Serve's proxy on the server's port (one more Python process and hop per request).
`--peer-url` adds another OpenAI-compatible server already running (e.g. infinity).

Within each level the targets (our paths, the peer) run back to back, `--rounds` times,
their order rotated from one run to the next, with in-process `Encoder.encode` on the same
texts (in this process) before the first, between each two and after the last: a shared
host's speed drifts, so a target's ratio to in-process uses the two runs around it, and
``vs_peer`` divides ours by the peer's run of the same level and round (then the median over
rounds). `--openai-threads N` adds a level of the real `openai` client in N threads
(sentences) on each of our paths. Each level reports p50 / p99 latency and the replica's
mean share of a request by stage (its ``Server-Timing`` header: parse, tokenize, queue,
encode, serialize; the rest of the latency is client, HTTP, proxy and routing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import nfcorpus_passages, stsb_test  # noqa: E402


def sentences() -> list[str]:
    """STS-B test sentences (both sides, file order, duplicates dropped)."""
    left, right, _ = stsb_test()
    return list(dict.fromkeys(s for pair in zip(left, right) for s in pair))


def passages() -> list[str]:
    """The first 200 NFCorpus documents (title + text)."""
    return nfcorpus_passages(200)


def requests_for(texts: list[str], count: int, per: int) -> list[list[str]]:
    """`count` requests of `per` consecutive sentences, cycling through `texts`."""
    return [[texts[(i * per + j) % len(texts)] for j in range(per)] for i in range(count)]


async def _load(url: str, model: str, batches: list[list[str]], clients: int,
                time_cap_s: float) -> dict:
    """Send `batches` with `clients` concurrent callers; per-request latency and rates."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stages: dict[str, float] = {}
    queue = list(reversed(batches))
    deadline = time.perf_counter() + time_cap_s

    async def client(session: aiohttp.ClientSession) -> None:
        while queue and time.perf_counter() < deadline:
            texts = queue.pop()
            body = {"model": model, "input": texts, "encoding_format": "base64"}
            t0 = time.perf_counter()
            async with session.post(url, json=body) as response:
                payload = await response.read()
            latencies.append(time.perf_counter() - t0)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 200:
                assert len(json.loads(payload)["data"]) == len(texts)
                add_timing(stages, response.headers.get("server-timing"))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return summary(clients, latencies, statuses, len(batches[0]), wall, stages)


def summary(clients: int | str, latencies: list[float], statuses: dict[int, int], per: int,
            wall: float, stages: dict[str, float]) -> dict:
    """A level's rates, latency percentiles and the replica's mean ms per stage."""
    ok = statuses.get(200, 0)
    out = {"clients": clients, "requests": len(latencies), "statuses": statuses,
           "wall_s": round(wall, 3), "texts_per_s": round(ok * per / wall, 1),
           "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
           "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}
    if stages and ok:
        out["replica_ms"] = {k: round(v / ok, 2) for k, v in stages.items()}
    return out


def add_timing(stages: dict[str, float], header: str | None) -> None:
    """Sum a ``Server-Timing`` header (``name;dur=ms, ...``) into `stages`."""
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            stages[name] = stages.get(name, 0.0) + float(dur)


def openai_level(base_url: str, model: str, batches: list[list[str]], threads: int) -> dict:
    """The real `openai` client (its default base64) in `threads` threads."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    latencies: list[float] = []
    queue = list(reversed(batches))

    def caller() -> None:
        while queue:
            try:
                texts = queue.pop()
            except IndexError:
                return
            t0 = time.perf_counter()
            answer = client.embeddings.create(model=model, input=texts)
            latencies.append(time.perf_counter() - t0)
            assert len(answer.data) == len(texts)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(caller) for _ in range(threads)]:
            future.result()
    wall = time.perf_counter() - start
    return summary(f"openai x{threads}", latencies, {200: len(latencies)}, len(batches[0]),
                   wall, {})


def interleaved_levels(targets: dict[str, tuple[str, str]], corpora: dict[str, list[str]],
                       args: argparse.Namespace, encoder) -> list[dict]:
    """Every level of every corpus against every target, the targets back to back within a
    level (`--rounds` times, the order rotated each time) and in-process `Encoder.encode`
    on the same texts before, between and after them: a shared host's speed drifts between
    levels by about the margins measured here, so each target is compared with runs made
    seconds apart, not one target's whole sweep with another's made minutes later."""
    per = args.texts_per_request
    warm = requests_for(next(iter(corpora.values())), 8, per)
    for url, model in targets.values():  # warm-up
        asyncio.run(_load(url, model, warm, 4, 60))
    results, names, turn = [], list(targets), 0
    for corpus, texts in corpora.items():
        for clients in args.levels:
            batches = requests_for(texts, max(_requests(args, corpus), 4 * clients), per)
            for round_ in range(args.rounds):
                order = names[turn % len(names):] + names[:turn % len(names)]
                turn += 1
                runs = [(name, lambda b, u=targets[name][0], m=targets[name][1], c=clients:
                         asyncio.run(_load(u, m, b, c, args.time_cap_s)))
                        for name in order]
                results += bracketed(encoder, batches, corpus, runs, round_)
    return results


def bracketed(encoder, batches: list[list[str]], corpus: str,
              runs: list[tuple[str, Callable[[list[list[str]]], dict]]],
              round_: int = 0) -> list[dict]:
    """`run(batches)` for each named run in turn, with one in-process `encode` of the same
    texts before the first, between each two and after the last; each run's ratio uses the
    mean of the two in-process rates around it."""
    flat = [t for batch in batches for t in batch]
    rates = [in_process_rate(encoder, flat)]
    results = []
    for name, run in runs:
        result = {"path": name, "corpus": corpus, "round": round_, **run(batches)}
        rates.append(in_process_rate(encoder, flat))
        before, after = rates[-2:]
        result["in_process"] = [before, after]
        result["vs_in_process"] = round(2 * result["texts_per_s"] / (before + after), 2)
        result["load"] = round(os.getloadavg()[0], 1)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def vs_peer(results: list[dict]) -> list[dict]:
    """Each of our paths ÷ the peer at the same corpus, level and round (runs made back to
    back), and the median over rounds."""
    peer = {(r["corpus"], r["clients"], r["round"]): r["texts_per_s"]
            for r in results if r["path"] == "peer"}
    pairs: dict[tuple, list[float]] = {}
    for r in results:
        key = (r["corpus"], r["clients"], r["round"])
        if r["path"] != "peer" and key in peer:
            pairs.setdefault((r["path"], r["corpus"], r["clients"]), []).append(
                round(r["texts_per_s"] / peer[key], 3))
    return [{"path": path, "corpus": corpus, "clients": clients, "ratios": ratios,
             "median": round(float(np.median(ratios)), 2)}
            for (path, corpus, clients), ratios in pairs.items()]


def in_process_rate(encoder, texts: list[str]) -> float:
    """Texts/s of one `Encoder.encode` call on `texts` (the level's own texts)."""
    t0 = time.perf_counter()
    encoder.encode(texts)
    return round(len(texts) / (time.perf_counter() - t0), 1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CORPORA = {"sentences": sentences, "passages": passages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--requests", type=int, default=256, help="requests per level")
    parser.add_argument("--passage-requests", type=int, default=64,
                        help="requests per level for passages")
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--corpora", default="sentences,passages")
    parser.add_argument("--openai-threads", type=int, default=32,
                        help="threads of the real openai client (0: skip that level)")
    parser.add_argument("--time-cap-s", type=float, default=120.0, help="per level")
    parser.add_argument("--peer-url", help="another OpenAI-compatible /v1/embeddings URL")
    parser.add_argument("--peer-model", default="", help="`model` value the peer expects")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in process and in the replica (its CPUs); on a "
                             "shared, oversubscribed box 2 threads ran 4x slower than 1")
    parser.add_argument("--dtype", default="fp32", help="the server's and in-process dtype")
    parser.add_argument("--calibration", help="int8: calibration texts (one per line)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="the server's --max-batch-tokens (default: its own)")
    parser.add_argument("--throughput-optimized", type=int, default=1,
                        help="1: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for our Ray")
    parser.add_argument("--skip-ours", action="store_true", help="only the peer server")
    parser.add_argument("--paths", default="direct,proxy",
                        help="how clients reach our replica: `direct` (its own port, Serve's "
                             "direct ingress: what a load balancer in front of the replicas "
                             "gets) and/or `proxy` (Serve's proxy on --port)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each level per target, back to back, order rotated")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    if args.skip_ours and not args.peer_url:
        parser.error("--skip-ours leaves nothing to load without --peer-url")
    import torch

    from bge_core.model import Encoder

    torch.set_num_threads(args.threads)
    corpora = {name: CORPORA[name]() for name in args.corpora.split(",")}
    stsb = corpora.get("sentences") or sentences()
    encoder = Encoder.from_pretrained(args.model, device="cpu", dtype=args.dtype,
                                      calibration=args.calibration)
    encoder.encode(stsb[:64])  # warm-up
    report: dict = {"model": args.model, "texts_per_request": args.texts_per_request,
                    "cpus": os.cpu_count(), "threads": args.threads, "dtype": args.dtype,
                    "max_batch_tokens": args.max_batch_tokens,
                    "throughput_optimized": args.throughput_optimized, "rounds": args.rounds,
                    "load_before": os.getloadavg()}
    with our_server(args) as ours:
        targets = {name: (f"{base}/v1/embeddings", args.model) for name, base in ours.items()}
        if args.peer_url:
            targets["peer"] = (args.peer_url, args.peer_model)
        report["levels"] = interleaved_levels(targets, corpora, args, encoder)
        if args.openai_threads:
            batches = requests_for(stsb, max(args.requests, 4 * args.openai_threads),
                                   args.texts_per_request)
            report["levels"] += bracketed(encoder, batches, "sentences", [
                (f"{name} openai x{args.openai_threads}", lambda b, u=f"{base}/v1": (
                    openai_level(u, args.model, b, args.openai_threads)))
                for name, base in ours.items()])
    report["vs_peer"] = vs_peer(report["levels"])
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _requests(args: argparse.Namespace, corpus: str) -> int:
    return args.passage_requests if corpus == "passages" else args.requests


@contextmanager
def our_server(args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """Our server in a local Ray (one replica with `--threads` CPUs; Ray sets its torch
    threads): the base URL of each path in `--paths` ({} with `--skip-ours`)."""
    if args.skip_ours:
        yield {}
        return
    import ray
    from ray import serve

    from pipelines.common.cli import make_config
    from pipelines.serve.main import THROUGHPUT_ENV, ServeConfig, direct_urls, start

    os.environ[THROUGHPUT_ENV] = str(args.throughput_optimized)  # before Ray starts
    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    port = _free_port()
    try:
        cfg = make_config(ServeConfig, model=args.model, port=port, dtype=args.dtype,
                          calibration=args.calibration, cpus_per_replica=float(args.threads),
                          max_batch_tokens=args.max_batch_tokens)
        start(cfg, api_key="")
        bases = {"proxy": f"http://127.0.0.1:{port}"}
        direct = direct_urls(cfg.app_name, port, "127.0.0.1")
        if direct:  # one replica: its own port
            bases["direct"] = direct[0]
        paths = {}
        for path in args.paths.split(","):
            if path in bases:
                paths[path] = bases[path]
            else:
                print(f"no {path} path to the replica (direct ingress needs "
                      f"--throughput-optimized 1): skipped", flush=True)
        yield paths
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
