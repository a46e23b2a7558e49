"""`embed_corpus.py --format lance`: one row per current id after every run, incremental
upsert + delete in one commit, kill -9 between parts and around the commit, stored dtypes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core import Encoder
from bge_core.quantize_vectors import dequantize
from pipelines.common.cli import make_config
from pipelines.common.encode import arrow_to_vectors
from pipelines.embed.main import EmbedConfig, run
from tests.embed_helpers import assert_matches_encoder, kill_group_when, write_corpus
from tests.test_embed_faults import _job_cmd, _job_env

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
KILL_SCRIPT = ROOT / "tests" / "scripts" / "lance_kill_embed.py"


def _cfg(model: Path, source: Path | str, out: Path | str, **extra: Any) -> EmbedConfig:
    settings = {"title_column": "title", "cpus_per_actor": 0.5, "batch_rows": 8,
                "format": "lance", "log_every_s": 1.0, **extra}
    return make_config(EmbedConfig, input=str(source), output=str(out), model=str(model),
                       **settings)


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")


def read_lance(uri: str) -> dict[Any, np.ndarray]:
    """id → stored vector; fails if an id is there twice."""
    import lance

    table = lance.dataset(uri).to_table(columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id is in the table twice"
    return dict(zip(ids, arrow_to_vectors(table.column("embedding"))))


def change_corpus(folder: Path, expected: dict[int, str]) -> dict[int, str]:
    """Edit file 0: ids 0, 1 get new text, ids 2, 3 are deleted; add ids 1000, 1001."""
    path = folder / "part-000.parquet"
    table = pq.read_table(path).to_pylist()
    kept = [r for r in table if r["id"] not in (2, 3)]
    for row in kept:
        if row["id"] in (0, 1):
            row["text"] = f"changed text number {row['id']}"
    pq.write_table(pa.Table.from_pylist(kept), path)
    pq.write_table(pa.table({"id": [1000, 1001], "title": [None, None],
                             "text": ["a new row", "another new row"]}),
                   folder / "part-new.parquet")
    out = {i: t for i, t in expected.items() if i not in (2, 3)}
    for row in kept:
        if row["id"] in (0, 1):
            out[row["id"]] = f"{row['title']} {row['text']}".strip() if row["title"] \
                else row["text"]
    out.update({1000: "a new row", 1001: "another new row"})
    return out


def _full_then_incremental(model: Path, encoder: Encoder, corpus: Path, out: str,
                           runner: Any) -> None:
    expected = write_corpus(corpus, files=2, rows=12)
    first = runner(out, "full")
    assert (first["rows_written"], first["table_rows"], first["table_versions_created"]) \
        == (24, 24, 1)
    before = runner.read(out)
    assert_matches_encoder(before, expected, encoder)
    now = change_corpus(corpus, expected)
    second = runner(out, "incremental")
    after = runner.read(out)
    assert set(after) == set(now)  # deleted ids gone, new ids in, each once
    assert second["rows_encoded_this_attempt"] == 4  # 2 changed + 2 new, nothing else
    assert (second["rows_dropped"], second["rows_kept"]) == (2, 20)
    assert second["table_versions_created"] == 1  # one commit: upsert and delete together
    assert_matches_encoder(after, now, encoder)
    unchanged = [i for i in now if i in before and i not in (0, 1)]
    assert all(np.array_equal(after[i], before[i]) for i in unchanged)  # not rewritten


class _InProcess:
    def __init__(self, model: Path, corpus: Path) -> None:
        self.model, self.corpus = model, corpus

    def __call__(self, out: str, mode: str) -> dict[str, Any]:
        return run(_cfg(self.model, self.corpus, out, mode=mode))

    read = staticmethod(read_lance)


def test_full_then_incremental_run_keeps_one_row_per_current_id(
        ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    out = str(tmp_path / "emb.lance")
    _full_then_incremental(tiny_bert_dir, encoder, tmp_path / "c",
                           out, _InProcess(tiny_bert_dir, tmp_path / "c"))
    assert sorted(os.listdir(f"{out}/_embed/run")) in ([], ["_state"])  # work folder emptied


@pytest.mark.e2e
@pytest.mark.ray  # the job runs its own local Ray in a subprocess
def test_full_then_incremental_on_s3(tiny_bert_dir, encoder, tmp_path, s3) -> None:
    """The job as a user runs it (its own Ray, AWS settings from the environment)."""
    import json

    class OnS3:
        def __call__(self, out: str, mode: str) -> dict[str, Any]:
            s3.rm("bucket/in", recursive=True) if s3.exists("bucket/in") else None
            s3.put(str(tmp_path / "c") + "/", "bucket/in/", recursive=True)
            done = subprocess.run(_job_cmd("s3://bucket/in/", out, tiny_bert_dir,
                                           "--format", "lance", "--mode", mode,
                                           "--title-column", "title", "--batch-rows", "8"),
                                  env=_job_env(), capture_output=True, text=True, timeout=400)
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(s3.cat("bucket/emb.lance/_manifest.json"))

        @staticmethod
        def read(out: str) -> dict[Any, np.ndarray]:
            local = tmp_path / f"copy-{time.monotonic_ns()}"
            s3.get("bucket/emb.lance/", str(local) + "/", recursive=True)
            return read_lance(str(local))

    _full_then_incremental(tiny_bert_dir, encoder, tmp_path / "c", "s3://bucket/emb.lance",
                           OnS3())


def _marked_rows(out: Path) -> int:
    folder = out / "_embed" / "run" / "_state" / "parts"
    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*/part-*"))


@pytest.mark.long  # a kill -9 drill (about a minute): `make test-long`
def test_kill_between_parts_then_rerun_leaves_every_id_once(
        ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    expected = write_corpus(tmp_path / "c", files=6, rows=24)
    out = tmp_path / "emb.lance"
    address = ray_session.get_runtime_context().gcs_address
    job = subprocess.Popen(_job_cmd(tmp_path / "c", out, tiny_bert_dir, "--format", "lance",
                                    "--title-column", "title", "--batch-rows", "4"),
                           env=_job_env(RAY_ADDRESS=address), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_group_when(job, lambda: _marked_rows(out) > 0)
    assert not (out / "_versions").exists()  # nothing committed: readers see no table
    time.sleep(3)  # the dead run's lease goes stale
    result = run(_cfg(tiny_bert_dir, tmp_path / "c", out, lease_timeout_s=2))
    assert 0 < result["rows_encoded_this_attempt"] < 144 and result["table_rows"] == 144
    assert_matches_encoder(read_lance(str(out)), expected, encoder)


def _killed(model: Path, corpus: Path, out: Path, phase: str, mode: str) -> None:
    """Run the job in a process that dies (os._exit) at `phase` of its commit."""
    cmd = [sys.executable, str(KILL_SCRIPT), phase] + _job_cmd(
        corpus, out, model, "--format", "lance", "--mode", mode, "--title-column", "title",
        "--batch-rows", "8", "--lease-timeout-s", "2")[2:]
    done = subprocess.run(cmd, env=_job_env(RAY_ADDRESS="local"), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 137, done.stderr[-3000:]
    time.sleep(2.5)  # its lease goes stale


@pytest.mark.ray  # the job runs its own local Ray in a subprocess
@pytest.mark.long  # three kill -9 runs (about two minutes): `make test-long`
def test_kill_during_and_after_the_commit_then_rerun(tiny_bert_dir, encoder, tmp_path) -> None:
    import lance

    corpus, out = tmp_path / "c", tmp_path / "emb.lance"
    expected = write_corpus(corpus, files=2, rows=12)
    _killed(tiny_bert_dir, corpus, out, "during", "full")  # data files written, no commit
    assert not (out / "_versions").exists()
    _killed(tiny_bert_dir, corpus, out, "after", "full")  # committed, then killed
    assert lance.dataset(str(out)).count_rows() == 24
    first = subprocess.run(_job_cmd(corpus, out, tiny_bert_dir, "--format", "lance",
                                    "--title-column", "title", "--lease-timeout-s", "2"),
                           env=_job_env(RAY_ADDRESS="local"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert lance.dataset(str(out)).version == 1  # the rerun found its commit: no second one
    assert_matches_encoder(read_lance(str(out)), expected, encoder)
    now = change_corpus(corpus, expected)
    _killed(tiny_bert_dir, corpus, out, "during", "incremental")
    assert lance.dataset(str(out)).version == 1
    _killed(tiny_bert_dir, corpus, out, "after", "incremental")
    assert lance.dataset(str(out)).version == 2
    again = subprocess.run(_job_cmd(corpus, out, tiny_bert_dir, "--format", "lance",
                                    "--mode", "incremental", "--title-column", "title",
                                    "--lease-timeout-s", "2"),
                           env=_job_env(RAY_ADDRESS="local"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert lance.dataset(str(out)).version == 2
    assert_matches_encoder(read_lance(str(out)), now, encoder)


def test_int8_and_binary_vectors(ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    expected = write_corpus(tmp_path / "c", files=1, rows=30)
    ids = sorted(expected)
    reference = encoder.encode([expected[i] for i in ids])  # (n, D)
    int8 = run(_cfg(tiny_bert_dir, tmp_path / "c", tmp_path / "i8.lance", output_dtype="int8",
                    calibration_rows=20))
    stored = read_lance(str(tmp_path / "i8.lance"))
    assert stored[ids[0]].dtype == np.int8 and int8["bytes_per_vector"] == encoder.dim
    ranges = np.asarray(int8["int8_ranges"], np.float32)  # (2, D), from the manifest
    back = dequantize(np.stack([stored[i] for i in ids]), "int8", ranges)
    cosine = (back * reference).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert cosine.min() > 0.99
    binary = run(_cfg(tiny_bert_dir, tmp_path / "c", tmp_path / "bin", format="parquet",
                      output_dtype="binary"))
    table = pq.read_table(tmp_path / "bin", columns=["id", "embedding"])
    bits = dict(zip(table.column("id").to_pylist(), arrow_to_vectors(table.column("embedding"))))
    assert binary["bytes_per_vector"] == (encoder.dim + 7) // 8
    signs = np.unpackbits(np.stack([bits[i] for i in ids]), axis=1)[:, :encoder.dim]
    clear = np.abs(reference) > 1e-4  # a sign is defined (not float noise around 0)
    assert np.array_equal(signs[clear], (reference > 0)[clear])
