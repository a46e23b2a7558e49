"""One live run per output: the lease refuses a second run, expires with a dead one (by the
store's time), is seen dead at once when its process on this host is gone, and fences the
writes of a run that lost it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.cli import make_config
from pipelines.common.lease import LEASE_FILE, LeaseHeld, LeaseLost, OutputLease, process_identity
from pipelines.embed.main import EmbedConfig, run
from pipelines.embed.output import OutputState, write_table


def _write_lease(folder: Path, age_s: float = 0.0, **holder: object) -> Path:
    """A lease file of another run, its mtime (the store's time) `age_s` in the past."""
    path = folder / LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": "other", "host": "h", "pid": 7, **holder}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


class StallingFS(LocalFileSystem):
    """A local filesystem whose lease renewals block while `stalled` is set (a hung store
    or a stuck heartbeat thread, injected by the test)."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.stalled = threading.Event()
        self.resume = threading.Event()

    def pipe_file(self, path: str, value: bytes, *args: object, **kwargs: object) -> None:
        if self.stalled.is_set() and LEASE_FILE.rsplit("/", 1)[1] in str(path):
            self.resume.wait(timeout=60)
        super().pipe_file(path, value, *args, **kwargs)


def test_a_live_lease_refuses_a_second_run_until_released(tmp_path: Path) -> None:
    first = OutputLease(str(tmp_path), stale_after_s=2.0, heartbeat_s=0.1, settle_s=0)
    with first:
        time.sleep(2.5)  # longer than stale_after_s: only the heartbeat keeps it live
        first.check()
        with pytest.raises(LeaseHeld, match=f"{tmp_path} is being written by another run"):
            OutputLease(str(tmp_path), stale_after_s=2.0, settle_s=0).acquire()
    assert not (tmp_path / LEASE_FILE).exists()  # released
    assert not (tmp_path / "_state").exists()  # and no empty folder left behind
    with OutputLease(str(tmp_path), stale_after_s=2.0, settle_s=0):
        pass


def test_a_dead_runs_lease_goes_stale_and_is_taken_over(tmp_path: Path, caplog) -> None:
    _write_lease(tmp_path, age_s=10)
    with pytest.raises(LeaseHeld, match=r"pid 7 on h, heartbeat 1\ds ago"):
        OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).acquire()
    lease = OutputLease(str(tmp_path), stale_after_s=5, settle_s=0)
    with lease:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == lease.owner["id"]
    assert "went silent 1" in caplog.text


def test_the_age_of_a_lease_is_the_stores_time_not_this_machines_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat a holder writes (its own clock) is ignored: only mtimes count."""
    _write_lease(tmp_path, age_s=0, heartbeat=time.time() - 3600)  # a clock an hour behind
    with pytest.raises(LeaseHeld):
        OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).acquire()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # our clock an hour ahead
    with pytest.raises(LeaseHeld):
        OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).acquire()
    monkeypatch.undo()
    _write_lease(tmp_path, age_s=120, heartbeat=time.time())  # claims now, written long ago
    with OutputLease(str(tmp_path), stale_after_s=60, settle_s=0):
        pass


def test_a_holder_on_this_host_whose_process_is_gone_is_taken_over_at_once(
        tmp_path: Path, caplog) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here = {"host": socket.gethostname(), "pid": child.pid, **process_identity(child.pid)}
    try:
        _write_lease(tmp_path, **here)  # fresh: live by the clock alone
        with pytest.raises(LeaseHeld, match=f"pid {child.pid} on"):
            OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).check_free()
    finally:
        child.kill()
        child.wait()
    OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).check_free()
    with OutputLease(str(tmp_path), stale_after_s=60, settle_s=0):
        assert f"(pid {child.pid} on {here['host']}) is gone" in caplog.text
    # a live PID whose process started at another time is not the holder (PID reuse)
    _write_lease(tmp_path, **{**here, "pid": os.getpid(), "start": "1"})
    OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).check_free()
    # the same PID on another host (or another PID namespace) is left to go stale
    for other in ({"host": "elsewhere"}, {"pidns": "pid:[1]"}):
        _write_lease(tmp_path, **{**here, **other})
        with pytest.raises(LeaseHeld):
            OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).check_free()


def test_a_taken_lease_is_lost_and_fences_every_write(tmp_path: Path) -> None:
    # long enough to stay live on a loaded box: only the takeover may end it
    lease = OutputLease(str(tmp_path), stale_after_s=30.0, heartbeat_s=0.1, settle_s=0)
    lease.acquire()
    state = OutputState(str(tmp_path), fence=lease.fence())
    write_table(pa.table({"id": [1]}), str(tmp_path / "part-a.parquet"), lease.fence())
    state.write_json({"n": 1}, "_state", "done", "a.json")
    _write_lease(tmp_path, id="taker", pid=11)  # another run takes the output over
    with pytest.raises(LeaseLost, match="held by another run \\(pid 11 on h\\)"):
        write_table(pa.table({"id": [2]}), str(tmp_path / "part-b.parquet"), lease.fence())
    with pytest.raises(LeaseLost):
        state.write_json({"n": 2}, "_state", "done", "b.json")
    with pytest.raises(LeaseLost):
        state.remove_unreferenced(set())  # nor does it delete the new holder's files
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the next heartbeat finds the lease taken
        try:
            lease.check()
            time.sleep(0.05)
        except LeaseLost as err:
            assert "taken over by another run (pid 11 on h)" in str(err)
            break
    else:
        pytest.fail("the heartbeat did not notice the lease was taken")
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == "taker"  # left alone
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["a.json", "lease.json", "part-a.parquet"]  # no b, no temporary file


def test_a_stalled_heartbeat_loses_the_lease_before_a_taker_may_come(tmp_path: Path) -> None:
    """Half-way to stale the run stops itself (its check and its fenced writes, by store
    time); the taker comes at stale, and the stalled renewal, once it wakes, does not
    overwrite the taker's lease."""
    fs = StallingFS()
    lease = OutputLease(str(tmp_path), stale_after_s=8.0, heartbeat_s=0.2, settle_s=0, fs=fs)
    lease.acquire()
    time.sleep(0.5)
    lease.check()
    fs.stalled.set()
    stalled_at = time.monotonic()
    with pytest.raises(LeaseLost, match=r"renewed \d+s ago \(store time"):
        deadline = stalled_at + 8
        while time.monotonic() < deadline:  # the fence, measured by the store
            write_table(pa.table({"id": [1]}), str(tmp_path / "part.parquet"), lease.fence())
            time.sleep(0.1)
    with pytest.raises(LeaseLost, match="not renewed for"):
        lease.check()
    assert time.monotonic() - stalled_at < 8.0  # stopped before the lease went stale
    taker = OutputLease(str(tmp_path), stale_after_s=8.0, settle_s=0)
    deadline = time.monotonic() + 15
    while True:
        try:
            taker.acquire()
            break
        except LeaseHeld:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    fs.resume.set()  # the stalled renewal lands now
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == taker.owner["id"]
    taker.check()
    lease.release()
    taker.release()


def test_on_an_object_store_the_lease_ages_and_fences_by_the_objects_times(s3) -> None:
    """S3 (moto): the age comes from LastModified; a taken lease refuses fenced writes."""
    import pyarrow.parquet as pq

    lease = OutputLease("s3://bucket/out", stale_after_s=60, settle_s=0.2)
    lease.acquire()
    with pytest.raises(LeaseHeld, match=r"heartbeat \ds ago"):
        OutputLease("s3://bucket/out", stale_after_s=60, settle_s=0.2).check_free()
    write_table(pa.table({"id": [1]}), "s3://bucket/out/part-a.parquet", lease.fence())
    s3.pipe_file(f"bucket/out/{LEASE_FILE}", json.dumps({"id": "taker", "host": "h",
                                                         "pid": 3}).encode())
    with pytest.raises(LeaseLost, match="held by another run"):
        write_table(pa.table({"id": [2]}), "s3://bucket/out/part-b.parquet", lease.fence())
    lease.release()
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in s3.find("bucket/out")) == [
        "lease.json", "part-a.parquet"]
    assert pq.read_table(s3.open("bucket/out/part-a.parquet", "rb")).num_rows == 1


def test_the_embed_job_refuses_an_output_another_run_is_writing(tmp_path: Path,
                                                                tiny_bert_dir: Path) -> None:
    _write_lease(tmp_path / "out")
    cfg = make_config(EmbedConfig, output=str(tmp_path / "out"), model=str(tiny_bert_dir))
    with pytest.raises(LeaseHeld, match="pid 7 on h"):
        run(cfg)  # refused before any work: no Ray needed
    assert not (tmp_path / "out" / "_state" / "run.json").exists()


def test_the_embed_cli_refuses_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    from pipelines.common import cli
    from pipelines.embed import main as embed_corpus

    def no_ray() -> None:
        raise AssertionError("Ray must not start while another run holds the output")

    monkeypatch.setattr(cli, "start_ray", no_ray)
    _write_lease(tmp_path / "out")
    assert embed_corpus.main(["--output", str(tmp_path / "out")]) == 2
    assert "is being written by another run (pid 7 on h" in capsys.readouterr().err


def test_training_refuses_an_output_dir_another_run_is_writing(tmp_path: Path) -> None:
    from pipelines.train.driver import run_training
    from pipelines.train.finetune import FinetuneConfig

    _write_lease(tmp_path / "ft", pid=9)
    cfg = make_config(FinetuneConfig, model_name_or_path="m", train_data="t.jsonl",
                      output_dir=str(tmp_path / "ft"))

    def never(config: dict) -> None:
        raise AssertionError("no training may start")

    with pytest.raises(LeaseHeld, match="pid 9 on h"):
        run_training("finetune", never, {}, cfg, examples=0)  # refused before Ray is asked
