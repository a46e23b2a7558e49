"""Benchmark: exact sharded top-k over 1,000,000 × 384 random float32 vectors, 1,000 queries.

Prints wall time and peak memory of the search for each shard size. Peak memory is what
`tracemalloc` saw allocated during the search (numpy reports its buffers to it), on top of
the 1.5 GB corpus, and the process's peak RSS (`ru_maxrss`) for the whole run.

    .venv/bin/python bench/topk_search.py [--n 1000000] [--dim 384] [--queries 1000] \
        [--k 100] [--shard_sizes 16384,65536]
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np

from bge_core.search import exact_topk


def _unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--shard_sizes", default="16384,65536")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    corpus = _unit_vectors(rng, args.n, args.dim)
    queries = _unit_vectors(rng, args.queries, args.dim)
    print(f"corpus {corpus.shape} float32 = {corpus.nbytes / 2**30:.2f} GiB, queries "
          f"{queries.shape}, k={args.k}; generated in {time.perf_counter() - start:.1f} s")

    # Reference for 10 queries from the full (10 × N) score row block.
    check = np.argsort(-(queries[:10] @ corpus.T), axis=1)[:, : args.k]
    print(f"{'shard_size':>10} {'time_s':>8} {'queries/s':>10} {'peak_MiB':>9} "
          f"{'bound_MiB':>9} {'exact':>6}")
    for shard_size in (int(s) for s in args.shard_sizes.split(",")):
        tracemalloc.start()
        start = time.perf_counter()
        _, ids = exact_topk(queries, corpus, args.k, shard_size=shard_size)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        bound = 12 * args.queries * shard_size / 2**20  # float32 block + int64 argpartition
        exact = bool(np.array_equal(ids[:10], check))
        print(f"{shard_size:>10} {elapsed:>8.1f} {args.queries / elapsed:>10.1f} "
              f"{peak / 2**20:>9.0f} {bound:>9.0f} {str(exact):>6}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"process peak RSS {rss:.0f} MiB (corpus alone {corpus.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
