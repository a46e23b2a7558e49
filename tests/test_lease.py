"""One live run per output: the lease refuses a second run, expires with a dead one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipelines.cli import make_config
from pipelines.embed_corpus import EmbedConfig, run
from pipelines.lease import LEASE_FILE, LeaseHeld, OutputLease


def test_a_live_lease_refuses_a_second_run_until_released(tmp_path: Path) -> None:
    first = OutputLease(str(tmp_path), stale_after_s=2.0, heartbeat_s=0.1, settle_s=0)
    with first:
        time.sleep(2.5)  # longer than stale_after_s: only the heartbeat keeps it live
        with pytest.raises(LeaseHeld, match=f"{tmp_path} is being written by another run"):
            OutputLease(str(tmp_path), stale_after_s=2.0, settle_s=0).acquire()
    assert not (tmp_path / LEASE_FILE).exists()  # released
    assert not (tmp_path / "_state").exists()  # and no empty folder left behind
    with OutputLease(str(tmp_path), stale_after_s=2.0, settle_s=0):
        pass


def test_a_dead_runs_lease_goes_stale_and_is_taken_over(tmp_path: Path, caplog) -> None:
    (tmp_path / "_state").mkdir()
    dead = {"id": "x", "host": "h", "pid": 1, "heartbeat": time.time() - 10}
    (tmp_path / LEASE_FILE).write_text(json.dumps(dead))
    with pytest.raises(LeaseHeld):
        OutputLease(str(tmp_path), stale_after_s=60, settle_s=0).acquire()
    lease = OutputLease(str(tmp_path), stale_after_s=5, settle_s=0)
    with lease:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["id"] == lease.owner["id"]
    assert "taking over" in caplog.text


def test_the_embed_job_refuses_an_output_another_run_is_writing(tmp_path: Path,
                                                                tiny_bert_dir: Path) -> None:
    (tmp_path / "out" / "_state").mkdir(parents=True)
    live = {"id": "other", "host": "h", "pid": 7, "heartbeat": time.time()}
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(live))
    cfg = make_config(EmbedConfig, output=str(tmp_path / "out"), model=str(tiny_bert_dir))
    with pytest.raises(LeaseHeld, match="pid 7 on h"):
        run(cfg)  # refused before any work: no Ray needed
    assert not (tmp_path / "out" / "_state" / "run.json").exists()


def test_training_refuses_an_output_dir_another_run_is_writing(tmp_path: Path) -> None:
    from pipelines.finetune import FinetuneConfig
    from pipelines.train_common import run_training

    (tmp_path / "ft" / "_state").mkdir(parents=True)
    live = {"id": "other", "host": "h", "pid": 9, "heartbeat": time.time()}
    (tmp_path / "ft" / LEASE_FILE).write_text(json.dumps(live))
    cfg = make_config(FinetuneConfig, model_name_or_path="m", train_data="t.jsonl",
                      output_dir=str(tmp_path / "ft"))

    def never(config: dict) -> None:
        raise AssertionError("no training may start")

    with pytest.raises(LeaseHeld, match="pid 9 on h"):
        run_training("finetune", never, {}, cfg, examples=0)  # refused before Ray is asked
