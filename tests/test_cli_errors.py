"""Which failures are the user's (one line, exit 2) and which are bugs (traceback, exit 1).

`run_main` answers our own `InputError` (and storage errors) with one line, also when Ray
carries it back from a task, a Ray Data stage or a Train worker; any other exception, a
pyarrow `ValueError` included, keeps its traceback. Ray-free except the last test, which
runs a real Ray Data stage.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from ray.exceptions import RayTaskError
from ray.train import WorkerGroupError

from bge_core.data import TrainingDataError
from bge_core.errors import InputError
from bge_core.storage import StorageError
from pipelines.common.cli import ConfigError, run_main, user_error

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job with one setting."""

    steps: int = 1


def _failing(err: BaseException):
    def job(cfg: Job) -> None:
        raise err
    return job


def _in_task(err: BaseException) -> RayTaskError:
    """What `ray.get` raises for a task that raised `err` (the cause's class is mixed in)."""
    trace = "Traceback (most recent call last):\n  ..."
    return RayTaskError("task", trace, err).as_instanceof_cause()


@pytest.mark.parametrize("err", [
    InputError("corpus/a.jsonl line 3: 'text' is int"),
    TrainingDataError("train.jsonl line 5: 'pos' is empty"),
    ConfigError("embed.yaml: unknown keys ['outptu']"),
    StorageError("s3://b/out: permission denied"),
    FileNotFoundError("no such file: corpus/"),
    _in_task(InputError("corpus/a.jsonl line 3: 'text' is int")),
    WorkerGroupError("Training failed", {1: _in_task(TrainingDataError("t.jsonl line 2: bad"))}),
], ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line_and_exit_2(err: BaseException,
                                             capsys: pytest.CaptureFixture) -> None:
    assert run_main("job", Job, _failing(err), [], uses_ray=False) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("job: error: ")
    assert "Traceback" not in lines[0] and "Training failed" not in lines[0]


def test_a_bad_flag_is_one_line_before_the_job_runs(capsys: pytest.CaptureFixture) -> None:
    ran = []
    assert run_main("job", Job, ran.append, ["--steps", "x"], uses_ray=False) == 2
    assert ran == [] and "steps: cannot read 'x' as int" in capsys.readouterr().err


def test_a_multi_line_message_is_still_printed_on_one_line(
        capsys: pytest.CaptureFixture) -> None:
    assert run_main("job", Job, _failing(InputError("a.parquet: unreadable\nbad footer")), [],
                    uses_ray=False) == 2
    assert capsys.readouterr().err == "job: error: a.parquet: unreadable | bad footer\n"


@pytest.mark.parametrize("err", [
    ValueError("operands could not be broadcast together"),
    pa.ArrowInvalid("Expected all lists to be of size=384 but index 1 had size 383"),
    KeyError("embedding"),
    _in_task(ValueError("internal")),
    WorkerGroupError("Training failed", {0: _in_task(RuntimeError("NaN loss"))}),
], ids=lambda e: type(e).__name__)
def test_internal_errors_propagate_with_their_traceback(err: BaseException) -> None:
    with pytest.raises(type(err)):
        run_main("job", Job, _failing(err), [], uses_ray=False)


def test_a_bug_raised_from_a_bad_input_is_still_a_bug() -> None:
    """Only Ray's wrappers are looked into, not any exception's cause."""
    try:
        raise RuntimeError("bug while reporting") from InputError("a.jsonl line 1: bad")
    except RuntimeError as err:
        assert user_error(err) is None


def test_the_cli_exits_1_with_a_traceback_on_an_internal_error() -> None:
    script = ("from dataclasses import dataclass\n"
              "from pipelines.common.cli import run_main\n"
              "@dataclass(frozen=True)\nclass C:\n    n: int = 1\n"
              "def job(cfg):\n    raise ValueError('an internal bug')\n"
              "raise SystemExit(run_main('job', C, job, [], uses_ray=False))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: an internal bug" in done.stderr and "job: error:" not in done.stderr


def _bad_batch(batch: dict) -> dict:
    raise InputError("corpus/a.jsonl line 7: 'text' is list")


def _buggy_batch(batch: dict) -> dict:
    raise ValueError("index out of range in the encoder")


@pytest.mark.timeout(180)
def test_errors_from_a_ray_data_stage_keep_their_kind(ray_session,
                                                      capsys: pytest.CaptureFixture) -> None:
    import ray

    def job(fn):
        return lambda cfg: ray.data.range(4).map_batches(fn).materialize()

    assert run_main("job", Job, job(_bad_batch), [], uses_ray=False) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "job: error: corpus/a.jsonl line 7: 'text' is list"
    with pytest.raises(Exception) as caught:
        run_main("job", Job, job(_buggy_batch), [], uses_ray=False)
    assert user_error(caught.value) is None and "index out of range" in str(caught.value)
