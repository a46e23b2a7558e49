"""Helpers for the bulk-embedding tests: tiny corpora on disk and output readers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common.encode import arrow_to_vectors
from pipelines.embed.output import list_parts, read_table
from tests.tiny_models import WORDS


def sentence(rng: random.Random, words: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, words)))


def write_corpus(folder: Path, files: int, rows: int, seed: int = 0,
                 start_id: int = 0) -> dict[int, str]:
    """Parquet files of (id, title, text); returns id → text as embedded (title joined)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[int, str] = {}
    next_id = start_id
    for f in range(files):
        ids = list(range(next_id, next_id + rows))
        next_id += rows
        titles = [sentence(rng, 3) if i % 3 else None for i in ids]
        texts = [sentence(rng) for _ in ids]
        pq.write_table(pa.table({"id": ids, "title": titles, "text": texts}),
                       folder / f"part-{f:03d}.parquet", row_group_size=max(1, rows // 2))
        expected.update({i: f"{t} {x}".strip() if t else x for i, t, x in zip(ids, titles, texts)})
    return expected


def kill_group_when(job: subprocess.Popen, ready: Callable[[], bool], poll_s: float = 0.1,
                    log: Path | None = None, timeout_s: float = 300) -> None:
    """SIGKILL `job`'s process group (it was started with ``start_new_session``) as soon as
    `ready()`; fail if the job ended first (showing the tail of its `log`)."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(poll_s)
        assert job.poll() is None, (log.read_text()[-3000:] if log
                                    else "the job finished before it could be killed")
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_output(folder: Path | str, id_column: str = "id") -> dict[Any, np.ndarray]:
    """id → vector from the data parts of an output (each id must appear once)."""
    vectors: dict[Any, np.ndarray] = {}
    for part in list_parts(str(folder)):
        table = read_table(part)
        for row_id, vec in zip(table.column(id_column).to_pylist(),
                               arrow_to_vectors(table.column("embedding"))):
            assert row_id not in vectors, f"id {row_id} written twice"
            vectors[row_id] = vec
    return vectors


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "_manifest.json").read_text())


def assert_matches_encoder(output: dict[Any, np.ndarray], expected: dict[Any, str],
                           encoder: Any) -> None:
    """Same ids, and every vector has cosine >= 0.99999 with `Encoder.encode`."""
    assert set(output) == set(expected)
    ids = sorted(expected)
    reference = encoder.encode([expected[i] for i in ids])
    ours = np.stack([output[i] for i in ids]).astype(np.float32)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1)
                                          * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.99999


def encode_actor_pids() -> list[int]:
    """PIDs of the encode actors of the Ray this process started (its raylet and workers
    are our descendants), found by process title (Ray names an actor's process after its
    class), without Ray's private state API."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "EncodeActor" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids
