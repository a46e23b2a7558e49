"""Bulk embedding under failure and at a distance: driver killed, actor killed, S3, two nodes.

Each test starts what it needs (a job subprocess with its own local Ray, a moto S3 server on
127.0.0.1, a two-raylet cluster) and tears it down; all are bounded by timeouts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bge_core import Encoder
from pipelines.common.cli import make_config
from pipelines.common.lease import LeaseLost, OutputLease
from pipelines.embed.job import EmbedJob
from pipelines.embed.main import EmbedConfig, run
from tests.embed_helpers import (
    assert_matches_encoder,
    encode_actor_pids,
    kill_group_when,
    read_output,
    write_corpus,
)
from tests.test_lease import StallingFS
from tests.tiny_models import WORDS, make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(420)]


def _job_env(**extra: str) -> dict[str, str]:
    # RAY_ADDRESS=local: the job starts its own Ray, apart from the test session's.
    return {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), **extra}


def _job_cmd(source: Path | str, out: Path | str, model: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipelines" / "embed_corpus.py"), "--input", str(source),
            "--output", str(out), "--model", str(model), "--cpus-per-actor", "0.5", *extra]


def _done(out: Path) -> int:
    return len(list((out / "_state" / "done").glob("*.json")))


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")


def _marked_rows(out: Path) -> int:
    """Rows the write tasks have recorded as written (their part markers)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in (out / "_state" / "parts").glob("*/part-*"))


@pytest.mark.long  # a kill -9 drill of the whole job: `make test-long`
def test_resume_after_driver_sigkill_redoes_only_what_was_in_flight(
        ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    """A part is recorded as written the moment it is (not when its whole input file is
    done), so a kill costs only the batches in flight."""
    files, rows = 10, 24
    expected = write_corpus(tmp_path / "c", files=files, rows=rows)
    out = tmp_path / "out"
    # The job joins the session's Ray as a second driver (no Ray start of its own); the
    # kill takes the driver only, as a lost head process would, and Ray cleans up after it.
    address = ray_session.get_runtime_context().gcs_address
    job = subprocess.Popen(_job_cmd(tmp_path / "c", out, tiny_bert_dir, "--batch-rows", "4"),
                           env=_job_env(RAY_ADDRESS=address), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_group_when(job, lambda: _marked_rows(out) > 0)
    marked, settled = _marked_rows(out), time.monotonic()
    while time.monotonic() - settled < 3:  # Ray ends the dead driver's tasks: let it finish
        time.sleep(0.5)
        if _marked_rows(out) != marked:
            marked, settled = _marked_rows(out), time.monotonic()
    assert 0 < marked < files * rows and _done(out) < files
    # the dead driver ran on this host and its process is gone: this run takes the
    # output over at once (no waiting for the lease to go stale) and resumes
    result = run(make_config(EmbedConfig, input=str(tmp_path / "c"), output=str(out),
                             model=str(tiny_bert_dir), cpus_per_actor=0.5, title_column=None))
    assert result["rows_encoded_this_attempt"] == files * rows - marked
    assert result["rows_in"] == result["rows_written"] == files * rows
    texts = _texts_without_titles(tmp_path / "c")  # no --title-column: text only
    assert set(texts) == set(expected)
    assert_matches_encoder(read_output(out), texts, encoder)  # each id exactly once


def _texts_without_titles(folder: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    out: dict[int, str] = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        out.update(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    return out


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under the output (size, mtime), the lease file aside."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*") if p.is_file() and "lease.json" not in p.name}


def _parts_recorded(out: Path) -> int:
    return len(list((out / "_state" / "parts").glob("*/part-*")))


@pytest.mark.long  # 120 s on a loaded 2-core box: the first run must reach its encoding
@pytest.mark.timeout(300)
def test_a_run_whose_heartbeat_stalls_stops_and_the_next_run_writes_each_id_once(
        ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    """Two runs on one output: the first one's lease renewal stalls mid-run (injected
    through its filesystem), so it stops before writing another part or marker, and
    writes nothing after; the second run encodes exactly the rows the first did not
    record, and the stalled renewal, waking during the second run, does not take the
    lease from it. (Enough rows that the first run is still encoding when it notices.)"""
    files, rows = 16, 40
    write_corpus(tmp_path / "c", files=files, rows=rows)
    out = tmp_path / "out"
    settings = {"input": str(tmp_path / "c"), "output": str(out), "model": str(tiny_bert_dir),
                "cpus_per_actor": 0.5, "title_column": None, "batch_rows": 2}
    fs = StallingFS()  # renewals every 0.25 s, so the stall is noticed 2.5 s after it began
    first = EmbedJob(make_config(EmbedConfig, **settings),
                     lease=OutputLease(str(out), stale_after_s=5, heartbeat_s=0.25, fs=fs))
    outcome: dict = {}

    def run_first() -> None:
        try:
            outcome["manifest"] = first.run()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=run_first, daemon=True)
    thread.start()
    deadline = time.monotonic() + 200
    while _parts_recorded(out) == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert thread.is_alive(), f"the first run ended before the stall: {outcome}"
    fs.stalled.set()
    stalled_at = time.monotonic()
    thread.join(timeout=120)
    stopped_s = time.monotonic() - stalled_at
    assert not thread.is_alive() and isinstance(outcome.get("error"), LeaseLost), outcome
    assert "this run stopped before writing more" in str(outcome["error"])
    before = _files(out)
    time.sleep(3)  # its tasks still in flight are fenced: nothing lands after it stopped
    assert _files(out) == before
    marked = _marked_rows(out)
    assert 0 < marked < files * rows and _done(out) < files
    waking = threading.Timer(5, fs.resume.set)  # the stalled renewal lands mid-second-run
    waking.start()
    start = time.monotonic()
    result = run(make_config(EmbedConfig, **settings))
    waking.join()
    assert result["rows_encoded_this_attempt"] == files * rows - marked
    assert result["rows_in"] == result["rows_written"] == files * rows
    assert_matches_encoder(read_output(out), _texts_without_titles(tmp_path / "c"), encoder)
    print("LEASE stalled-heartbeat " + json.dumps({
        "first_stopped_s_after_stall": round(stopped_s, 1), "rows_recorded_by_first": marked,
        "second_run_s": round(time.monotonic() - start, 1)}))


@pytest.mark.long
@pytest.mark.timeout(400)
def test_kill_9_then_the_same_command_at_once_finishes_without_redoing_recorded_parts(
        tiny_bert_dir, encoder, tmp_path) -> None:
    """`kill -9` of the job's process group (its own local Ray included) once three parts
    are recorded, then the same command at once: the dead holder of the lease ran on this
    host, so the rerun takes over without waiting, and encodes only unrecorded rows."""
    files, rows = 8, 24
    write_corpus(tmp_path / "c", files=files, rows=rows)
    out = tmp_path / "out"
    cmd = _job_cmd(tmp_path / "c", out, tiny_bert_dir, "--batch-rows", "4")
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log_file:
        job = subprocess.Popen(cmd, env=_job_env(), start_new_session=True,
                               stdout=log_file, stderr=subprocess.STDOUT)
        kill_group_when(job, lambda: _parts_recorded(out) >= 3, poll_s=0.02, log=log_path)
    # the killed driver's Ray may finish the tasks in flight before its reaper stops it: wait
    # until nothing more lands, then count what is recorded
    marked, settled = _marked_rows(out), time.monotonic()
    while time.monotonic() - settled < 3:
        time.sleep(0.5)
        if _marked_rows(out) != marked:
            marked, settled = _marked_rows(out), time.monotonic()
    parts = _parts_recorded(out)
    # (on an idle box the dead run's tasks may record every row: the driver, which marks
    # files done and writes the manifest, is gone all the same)
    assert 0 < marked <= files * rows and _done(out) < files
    start = time.monotonic()
    rerun = subprocess.run(cmd, env=_job_env(), capture_output=True, text=True, timeout=300)
    rerun_s = time.monotonic() - start
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(pid {job.pid} on " in rerun.stderr and "is gone" in rerun.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_encoded_this_attempt"] == files * rows - marked  # no recorded row
    assert manifest["rows_in"] == manifest["rows_written"] == files * rows
    assert_matches_encoder(read_output(out), _texts_without_titles(tmp_path / "c"), encoder)
    print("LEASE kill-9-rerun " + json.dumps({
        "parts_recorded_at_kill": parts, "rows_recorded_at_kill": marked,
        "rows_encoded_by_rerun": manifest["rows_encoded_this_attempt"],
        "rerun_s": round(rerun_s, 1)}))


def test_actor_killed_mid_job_is_restarted(ray_session, tiny_bert_dir, encoder,
                                           tmp_path) -> None:
    files, rows = 12, 40
    write_corpus(tmp_path / "c", files=files, rows=rows)
    out = tmp_path / "out"
    cfg = make_config(EmbedConfig, input=str(tmp_path / "c"), output=str(out),
                      model=str(tiny_bert_dir), cpus_per_actor=0.5, batch_rows=2)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run(cfg)), daemon=True)
    worker.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and worker.is_alive() and time.monotonic() < deadline:
        if (out / "_state" / "plan.parquet").exists():  # planned: the encode stream is up
            for pid in encode_actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.2)
    assert killed is not None and _done(out) < files, "no encode actor was killed mid-job"
    worker.join(timeout=360)
    assert not worker.is_alive() and result, "the job did not finish after the actor died"
    assert result["rows_in"] == result["rows_written"] == files * rows
    assert_matches_encoder(read_output(out), _texts_without_titles(tmp_path / "c"), encoder)


def test_s3_input_and_output_match_the_encoder(tiny_bert_dir, encoder, tmp_path,
                                               s3_endpoint) -> None:
    import s3fs

    aws = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    expected = write_corpus(tmp_path / "c", files=2, rows=12)
    fs = s3fs.S3FileSystem(key="testing", secret="testing",
                           client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("corpus-bucket")
    fs.put(str(tmp_path / "c") + "/", "corpus-bucket/in/", recursive=True)
    subprocess.run(_job_cmd("s3://corpus-bucket/in/", "s3://corpus-bucket/emb/", tiny_bert_dir,
                            "--title-column", "title"),
                   env=_job_env(**aws), check=True, timeout=300, capture_output=True,
                   cwd=tmp_path)
    assert not (tmp_path / "corpus-bucket").exists(), "state leaked to a local folder"
    assert fs.exists("corpus-bucket/emb/_state/plan.parquet")
    fs.get("corpus-bucket/emb/", str(tmp_path / "from_s3") + "/", recursive=True)
    assert_matches_encoder(read_output(tmp_path / "from_s3"), expected, encoder)
    manifest = json.loads(fs.cat("corpus-bucket/emb/_manifest.json"))
    assert manifest["rows_written"] == 24 and manifest["input"] == "s3://corpus-bucket/in/"


@pytest.mark.e2e
def test_actors_on_two_raylets_both_encode(tmp_path) -> None:
    """The pool spans both raylets and both actors encode. Ray Data hands a block to an idle
    actor beside the data first, so the actors only share work when it queues: a model and
    texts big enough that encoding, not reading, is the slow stage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    (tmp_path / "c").mkdir()
    for f in range(8):  # 32 batches of 8 rows of 100 words
        ids = list(range(f * 32, (f + 1) * 32))
        texts = [" ".join(rng.choice(WORDS) for _ in range(100)) for _ in ids]
        pq.write_table(pa.table({"id": ids, "title": [None] * 32, "text": texts}),
                       tmp_path / "c" / f"part-{f}.parquet", row_group_size=16)
    model = make_tiny_bert(tmp_path / "model", hidden=256, layers=4)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "two_raylets_embed.py"),
         str(tmp_path / "c"), str(tmp_path / "out"), str(model)],
        env={**_job_env(), "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MANIFEST "))
    manifest = json.loads(line[len("MANIFEST "):])
    by_node = manifest["rows_encoded_by_node_this_attempt"]
    assert len(by_node) == 2 and all(rows > 0 for rows in by_node.values())
    assert sum(by_node.values()) == manifest["rows_written"] == 8 * 32
