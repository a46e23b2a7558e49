"""A flaky object store: the fault proxy (`tests/s3_fault_proxy.py`) in front of moto.

In the main suite (seconds, no Ray): the fault stream is seeded, and a store that stays
down ends a job in bounded time with one line naming the URI. `long`: our reads and
writes ride out throttling and dropped connections with the retry settings of
`bge_core.storage`, the CLI's one-line answer, and whole jobs against a flaky store
(embed S3 → S3; finetune with its checkpoints and model on S3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core.storage import S3_ATTEMPTS, S3FS_RETRIES, StorageError
from pipelines.common.cli import make_config
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import OutputState, read_table, write_table
from tests.embed_helpers import assert_matches_encoder, read_output, write_corpus
from tests.s3_fault_proxy import FaultProxy
from tests.test_embed_faults import _job_cmd, _job_env

ROOT = Path(__file__).resolve().parents[1]
DOWN_WITHIN_S = 90  # S3_ATTEMPTS x S3FS_RETRIES backed-off requests, on a busy box


@pytest.fixture()
def flaky(s3, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """The loopback S3 behind a proxy that throttles 20% of requests and cuts 10% of
    responses off mid-body; this process's clients talk to the proxy."""
    import s3fs

    with FaultProxy(s3_endpoint, slowdown=0.2, reset=0.1, seed=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def test_the_same_seed_gives_the_same_faults(s3_endpoint: str) -> None:
    def draws(seed: int) -> list[str]:
        proxy = FaultProxy(s3_endpoint, slowdown=0.3, reset=0.2, seed=seed)
        return [proxy.draw() for _ in range(200)]

    first = draws(7)
    assert first == draws(7) and first != draws(8)
    assert {"forward", "slowdown", "reset"} <= set(first)


@pytest.mark.long
def test_reads_and_writes_ride_out_a_flaky_store(flaky: FaultProxy) -> None:
    state = OutputState("s3://bucket/out")
    tables = [pa.table({"id": list(range(i, i + 500)), "x": [float(i)] * 500})
              for i in range(0, 2000, 500)]
    for n, table in enumerate(tables):
        write_table(table, f"s3://bucket/out/part-{n}.parquet")
        state.write_json({"n": n}, "_state", "done", f"{n}.json")
    assert [read_table(f"s3://bucket/out/part-{n}.parquet") for n in range(len(tables))] \
        == tables
    assert sorted(m["n"] for m in state.done_markers().values()) == list(range(len(tables)))
    assert flaky.counts["slowdown"] > 0 and flaky.counts["reset"] > 0  # faults did happen


def test_a_store_that_stays_down_ends_the_embed_job_naming_the_uri(
        flaky: FaultProxy, tmp_path: Path) -> None:
    from pipelines.embed.job import EmbedJob

    flaky.down = True  # every request: 503 SlowDown
    cfg = make_config(EmbedConfig, input="s3://bucket/in/", output="s3://bucket/emb/",
                      model=str(tmp_path / "unused"))
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"^cannot reach s3://bucket/in/: ") as caught:
        EmbedJob(cfg).run()  # fails before Ray or the model are needed
    seconds = time.monotonic() - start
    assert seconds < DOWN_WITHIN_S
    message = str(caught.value)
    assert f"(after {S3_ATTEMPTS} attempts per request x {S3FS_RETRIES} tries)" in message
    assert "\n" not in message
    measured = {"requests": flaky.counts["requests"], "seconds_to_fail": round(seconds, 1)}
    print(f"FAULTS store-down {json.dumps(measured)}")


def test_ray_train_gets_our_s3fs_for_checkpoints(tmp_path: Path) -> None:
    """Ray Train's `storage_filesystem`: the s3fs that carries our retry settings."""
    from pyarrow.fs import PyFileSystem

    from bge_core.storage import S3_SETTINGS, arrow_filesystem

    filesystem, path = arrow_filesystem("s3://bucket/ft/")
    assert isinstance(filesystem, PyFileSystem) and path == "bucket/ft"
    s3fs_used = filesystem.handler.fs
    assert s3fs_used.retries == S3FS_RETRIES
    assert s3fs_used.config_kwargs["retries"] == S3_SETTINGS["config_kwargs"]["retries"]
    assert arrow_filesystem(str(tmp_path)) == (None, str(tmp_path))  # local: Ray's own


def _fail_in_a_task(batch: dict) -> dict:
    raise StorageError("cannot write s3://bucket/emb/part-x.parquet: (the cause)")


def test_a_storage_error_in_a_ray_data_task_comes_back_as_itself(ray_session) -> None:
    """What the embed driver does with a task that hit a dead store mid-run: the error Ray
    Data raises wraps ours (with a traceback); `find_storage_error` gets the original."""
    from bge_core.storage import find_storage_error

    ds = ray_session.data.range(4, override_num_blocks=1).map_batches(_fail_in_a_task)
    with pytest.raises(Exception) as caught:
        ds.take_all()
    found = find_storage_error(caught.value)
    assert found is not None and found is not caught.value
    assert str(found) == "cannot write s3://bucket/emb/part-x.parquet: (the cause)"


@pytest.mark.long  # 15 s: the CLI imports Ray Data before the job starts
def test_the_cli_says_which_uri_is_unreachable_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Nothing listens at the endpoint: exit 2, one line naming the output, in seconds."""
    from pipelines.common import cli
    from pipelines.embed import main as embed_corpus

    for key, value in _aws("http://127.0.0.1:9").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "start_ray", lambda: None)  # the job fails before using Ray
    write_corpus(tmp_path / "c", files=1, rows=4)
    start = time.monotonic()
    status = embed_corpus.main(["--input", str(tmp_path / "c"), "--output", "s3://bucket/emb/"])
    assert status == 2 and time.monotonic() - start < DOWN_WITHIN_S
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("embed_corpus: error: cannot reach s3://bucket/emb/: "
                           "EndpointConnectionError")


# --------------------------------------------------------------------- long drills
def _aws(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_embed_job_s3_to_s3_through_a_flaky_store(flaky: FaultProxy, s3: object,
                                                  tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_core import Encoder

    expected = write_corpus(tmp_path / "c", files=4, rows=30)
    s3.put(str(tmp_path / "c") + "/", "bucket/in/", recursive=True)  # type: ignore[attr-defined]

    def embed(output: str) -> float:
        start = time.monotonic()
        proc = subprocess.run(
            _job_cmd("s3://bucket/in/", output, tiny_bert_dir, "--title-column", "title",
                     "--chunk-rows", "10"),
            env=_job_env(**_aws(flaky.url)), capture_output=True, text=True, timeout=480)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return time.monotonic() - start

    rates = flaky.slowdown, flaky.reset
    flaky.slowdown = flaky.reset = 0.0
    clean_s = embed("s3://bucket/clean/")  # the time lost is measured against this run
    flaky.slowdown, flaky.reset = rates
    before = flaky.counts.copy()
    seconds = embed("s3://bucket/emb/")
    faults = {k: flaky.counts[k] - before[k] for k in ("requests", "slowdown", "reset")}
    assert faults["slowdown"] > 0 and faults["reset"] > 0
    manifest = json.loads(s3.cat("bucket/emb/_manifest.json"))  # type: ignore[attr-defined]
    assert manifest["rows_in"] == manifest["rows_written"] == 120
    s3.get("bucket/emb/", str(tmp_path / "back") + "/", recursive=True)  # type: ignore
    assert_matches_encoder(read_output(tmp_path / "back"), expected,
                           Encoder.from_pretrained(str(tiny_bert_dir), device="cpu"))
    print("FAULTS embed-s3 " + json.dumps({
        "rows_in": manifest["rows_in"], "written": manifest["rows_written"],
        "rejected": manifest["rows_rejected"], **faults, "clean_s": round(clean_s, 1),
        "drill_s": round(seconds, 1)}))


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_store_that_dies_mid_run_ends_the_job_and_the_rerun_resumes(
        flaky: FaultProxy, s3: object, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The store goes down once the first parts are recorded: the job ends with one line
    naming the S3 URI it could not write (bounded time, no hang); once the store is back,
    the rerun encodes only what no recorded part holds and the output is exactly-once."""
    from bge_core import Encoder

    flaky.slowdown = flaky.reset = 0.0
    expected = write_corpus(tmp_path / "c", files=6, rows=20)
    s3.put(str(tmp_path / "c") + "/", "bucket/in/", recursive=True)  # type: ignore
    cmd = _job_cmd("s3://bucket/in/", "s3://bucket/emb/", tiny_bert_dir, "--title-column",
                   "title", "--chunk-rows", "5", "--batch-rows", "5", "--lease-timeout-s", "5")
    env = _job_env(**_aws(flaky.url))
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 600
        while job.poll() is None and time.monotonic() < deadline and not s3.glob(  # type: ignore
                "bucket/emb/_state/parts/*/part-*"):
            time.sleep(0.2)
            s3.invalidate_cache()  # type: ignore[attr-defined]
        assert job.poll() is None, "the job finished before the store went down"
        flaky.down, down_at = True, time.monotonic()
        _, stderr = job.communicate(timeout=DOWN_WITHIN_S * 3)
    finally:
        if job.poll() is None:
            job.kill()
    stopped_s = time.monotonic() - down_at
    flaky.down = False
    assert job.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("embed_corpus: error: cannot ") and "s3://bucket/" in last, last
    s3.invalidate_cache()  # type: ignore[attr-defined]
    marked = sum(pq.read_metadata(s3.open(p, "rb")).num_rows  # type: ignore[attr-defined]
                 for p in s3.glob("bucket/emb/_state/parts/*/part-*"))  # type: ignore
    time.sleep(5)  # the dead run's lease goes stale (--lease-timeout-s 5)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=480)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s3.invalidate_cache()  # type: ignore[attr-defined]
    manifest = json.loads(s3.cat("bucket/emb/_manifest.json"))  # type: ignore
    assert manifest["rows_in"] == manifest["rows_written"] == 120
    assert manifest["rows_encoded_this_attempt"] == 120 - marked  # only what was not kept
    s3.get("bucket/emb/", str(tmp_path / "back") + "/", recursive=True)  # type: ignore
    assert_matches_encoder(read_output(tmp_path / "back"), expected,
                           Encoder.from_pretrained(str(tiny_bert_dir), device="cpu"))
    print("FAULTS store-dies-mid-run " + json.dumps({
        "rows_in": 120, "kept_from_first_attempt": marked,
        "encoded_by_rerun": manifest["rows_encoded_this_attempt"],
        "seconds_to_stop": round(stopped_s, 1), "message": last[:120]}))


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_finetune_checkpoints_and_model_on_a_flaky_store(
        flaky: FaultProxy, s3: object, tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Ray Train writes its checkpoints through `bge_core.storage.arrow_filesystem` (s3fs
    with our retry settings) and the final model through s3fs: both ride out the faults
    and load back."""
    import torch

    from bge_core import Encoder
    from tests.test_finetune_job import write_train_data

    write_train_data(tmp_path / "train.jsonl")
    before = flaky.counts.copy()
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.train.finetune", "--model_name_or_path",
         str(tiny_bert_dir), "--train_data", str(tmp_path / "train.jsonl"), "--output_dir",
         "s3://bucket/ft", "--num_workers", "1", "--cpus_per_worker", "1",
         "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2",
         "--train_group_size", "2", "--query_max_len", "16", "--passage_max_len", "24",
         "--learning_rate", "1e-3"],
        cwd=ROOT, env=_job_env(**_aws(flaky.url)),
        capture_output=True, text=True, timeout=840)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = {k: flaky.counts[k] - before[k] for k in ("requests", "slowdown", "reset")}
    assert faults["slowdown"] > 0 and faults["reset"] > 0
    checkpoints = sorted(p.rsplit("/", 1)[1] for p in s3.ls("bucket/ft/finetune"))  # type: ignore
    assert "checkpoint_step_00000004" in checkpoints
    s3.get("bucket/ft/finetune/checkpoint_step_00000004/", str(tmp_path / "ckpt") + "/",  # type: ignore
           recursive=True)
    state = torch.load(tmp_path / "ckpt" / "training_state.pt", weights_only=False)["state"]
    assert state["step"] == 4
    texts = ["the cat is on the road", "blood and heart disease"]
    from_ckpt = Encoder.from_pretrained(str(tmp_path / "ckpt" / "model"), device="cpu")
    exported = Encoder.from_pretrained("s3://bucket/ft/", device="cpu")  # fetched via s3fs
    np.testing.assert_allclose(exported.encode(texts), from_ckpt.encode(texts), atol=1e-6)
    print(f"FAULTS finetune-s3 {json.dumps({**faults, 'seconds': round(seconds, 1)})}")
