"""S3 credentials stay on the node: no Ray task carries them, so neither the state API
(the dashboard's `ray list tasks|actors|jobs --detail`) nor Ray's logs show them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bge_core.storage import storage_runtime_env
from tests.embed_helpers import write_corpus
from tests.test_embed_faults import _job_env

ROOT = Path(__file__).resolve().parents[1]
# distinctive fake values: found anywhere only if they travelled there
SECRET_KEY = "fakeSecretKey-7Qz9-do-not-leak"
SESSION_TOKEN = "fakeSessionToken-Xk42-do-not-leak"


def test_the_runtime_env_of_a_task_holds_no_credential(monkeypatch) -> None:
    aws = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAFAKE",
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN}
    for key, value in aws.items():
        monkeypatch.setenv(key, value)
    travelling = storage_runtime_env()["runtime_env"]["env_vars"]
    assert travelling == {k: aws[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION",
                                               "AWS_DEFAULT_REGION")}
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key)
    assert storage_runtime_env() == {}  # credentials alone: nothing travels


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # a socket or a file gone meanwhile
                continue
            found += [f"{path.relative_to(root)}: {n.decode()}" for n in needles if n in data]
    return found


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_embed_on_s3_shows_no_secret_in_ray_state_or_logs(s3, s3_endpoint: str,
                                                          tiny_bert_dir: Path,
                                                          tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", files=2, rows=12)
    s3.put(str(tmp_path / "c") + "/", "bucket/in/", recursive=True)
    aws = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID",
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_SESSION_TOKEN": SESSION_TOKEN,
           "AWS_DEFAULT_REGION": "us-east-1"}
    # a short temp dir: Ray's socket paths must stay under the 107-byte limit
    with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as temp_dir:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "scripts" / "secrets_embed.py"),
             "s3://bucket/in/", "s3://bucket/emb/", str(tiny_bert_dir), temp_dir],
            env=_job_env(RAY_ADDRESS="", **aws), capture_output=True, text=True, timeout=280,
            cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("STATE ")]
        shown = json.loads(line[len("STATE "):])
        assert shown["manifest"]["rows_in"] == shown["manifest"]["rows_written"] == 24
        listed = json.dumps({k: shown[k] for k in ("tasks", "actors", "jobs")})
        assert shown["tasks"] and shown["actors"] and shown["jobs"]
        # the check looks where a secret would show: the endpoint a task carries is listed
        assert s3_endpoint in listed
        for secret in (SECRET_KEY, SESSION_TOKEN):
            assert secret not in listed
        logs = Path(shown["session_dir"]) / "logs"
        assert any(logs.rglob("*.log")) or any(logs.rglob("*.out"))
        assert _files_holding(logs, [SECRET_KEY.encode(), SESSION_TOKEN.encode()]) == []
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != SECRET_KEY  # this process never had it
