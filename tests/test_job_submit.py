"""`ray job submit` against a real `ray start --head` cluster with token authentication on.

The cluster is started and stopped by the test, as a separate process tree: its own temp
dir, its own free ports, and a private HOME holding the token (`ray get-auth-token
--generate` writes ``$HOME/.ray/auth_token``). It never touches the pytest session's
in-process Ray, and it is stopped by signalling its own `ray start --block` process, never
with `ray stop` (which kills every Ray process of the user on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
EXCLUDES = json.dumps({"excludes": [".venv", ".git", ".pytest_cache", ".ruff_cache", "*.egg-info"]})

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.e2e, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(home: Path) -> dict[str, str]:
    """The caller's environment without any Ray setting, with a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


@dataclass(frozen=True)
class TokenCluster:
    address: str  # job server, http://127.0.0.1:<port>
    env: dict[str, str]  # a client holding the token: RAY_AUTH_MODE=token, private HOME
    base: Path

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
        return subprocess.run(
            [RAY, *args],
            cwd=ROOT,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, *entrypoint: str, env: dict[str, str] | None = None, timeout: float = 400):
        args = [
            "job",
            "submit",
            "--address",
            self.address,
            "--working-dir",
            ".",
            "--runtime-env-json",
            EXCLUDES,
            "--",
            *entrypoint,
        ]
        return self.ray(*args, env=env, timeout=timeout)


def _wait_for_job_server(address: str, head: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited early with code {head.returncode}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers (401 without a token): it is up
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"job server at {address} not up after {deadline_s} s")


def _stop(head: subprocess.Popen) -> None:
    """Stop only this cluster: SIGTERM to `ray start --block` stops the processes it started;
    what is still up after a few seconds (Ray's orderly stop takes ~30 s) is killed with its
    process group (the cluster's own session: nothing else of the user's)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[TokenCluster]:
    # a short path under /tmp: Ray's Unix sockets live below the temp dir (108-byte limit)
    base = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    env = _base_env(home)
    generate = subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert generate.returncode == 0, generate.stderr
    assert (home / ".ray" / "auth_token").read_text().strip() == generate.stdout.strip()
    env["RAY_AUTH_MODE"] = "token"
    dashboard_port = _free_port()
    flags = (
        f"start --head --block --node-ip-address 127.0.0.1 --port {_free_port()} "
        f"--num-cpus 2 --include-dashboard true --dashboard-host 127.0.0.1 "
        f"--dashboard-port {dashboard_port} --ray-client-server-port {_free_port()} "
        f"--dashboard-agent-listen-port {_free_port()} --temp-dir {base / 'ray'} "
        "--disable-usage-stats"
    )
    command = [RAY, *flags.split()]
    log = (base / "ray_start.log").open("w")
    head = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_job_server(address, head, deadline_s=120)
        yield TokenCluster(address=address, env=env, base=base)
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def _tiny_corpus(directory: Path, rows: int = 24) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.tiny_models import WORDS

    texts = [
        " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(rows)
    ]
    directory.mkdir(parents=True)
    table = pa.table({"id": [f"doc-{i}" for i in range(rows)], "text": texts})
    pq.write_table(table, directory / "part-0.parquet")
    return directory


def _http_status(url: str, token: str | None, body: dict | None = None) -> int:
    """Status of a request to the job server (POST when `body` is given)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_submission_without_the_token_is_refused(token_cluster: TokenCluster, tmp_path: Path):
    marker = tmp_path / "ran.txt"
    # the job records where it imported the project from (light imports only: no torch)
    code = f"import pipelines.common.cli as m; open({str(marker)!r}, 'w').write(m.__file__)"
    entry = ["python", "-c", code]
    stranger_home = tmp_path / "stranger"
    stranger_home.mkdir()
    no_token = _base_env(stranger_home)  # no RAY_AUTH_MODE, no token file
    refused = token_cluster.submit(*entry, env=no_token, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Unauthorized" in refused.stderr

    jobs_url = f"{token_cluster.address}/api/jobs/"
    token = (token_cluster.base / "home" / ".ray" / "auth_token").read_text().strip()
    job = {"entrypoint": " ".join(entry)}
    assert _http_status(jobs_url, "0" * len(token), job) == 403  # a wrong token
    assert _http_status(jobs_url, None) == 401
    assert _http_status(jobs_url, token) == 200
    listing = urllib.request.Request(jobs_url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(listing, timeout=30) as response:
        assert json.loads(response.read()) == []  # no job was created by either attempt
    assert not marker.exists()

    # the same entrypoint with the token runs: the refusals were about the token alone
    accepted = token_cluster.submit(*entry, timeout=300)
    assert accepted.returncode == 0, accepted.stdout[-3000:] + accepted.stderr[-3000:]
    imported_from = Path(marker.read_text())
    # code reached the job through runtime_env (`--working-dir .`), not from this checkout
    assert str(imported_from).startswith(str(token_cluster.base / "ray"))
    assert "working_dir_files" in imported_from.parts


def test_embed_corpus_job_runs_with_token_auth(
    token_cluster: TokenCluster, tiny_bert_dir: Path, tmp_path: Path
):
    if not (ROOT / "pipelines" / "embed_corpus.py").exists():
        pytest.skip("pipelines/embed_corpus.py is not written yet")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    corpus = _tiny_corpus(tmp_path / "corpus")
    output = tmp_path / "embeddings"
    config = tmp_path / "embed_test.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(corpus),
                "output": str(output),
                "model": str(tiny_bert_dir),
                "id_column": "id",
                "text_column": "text",
                "max_length": 32,
                "dtype": "fp32",
                "output_dtype": "float32",
                "num_actors": "1",
                "gpus_per_actor": 0.0,
                "cpus_per_actor": 0.5,
                "batch_rows": 8,
                "max_tokens_per_batch": 256,
                "mode": "full",
            }
        )
    )
    result = token_cluster.submit("python", "pipelines/embed_corpus.py", "--config", str(config))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    parts = sorted(output.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(part) for part in parts])
    assert sorted(table.column("id").to_pylist()) == sorted(f"doc-{i}" for i in range(24))
    assert len(table.column("embedding")[0].as_py()) == 32  # the tiny BERT's width
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["rows_written"] == 24 and manifest["rows_rejected"] == 0


def test_tiny_finetune_job_runs_with_token_auth(
    token_cluster: TokenCluster, tiny_bert_dir: Path, tmp_path: Path
):
    if not (ROOT / "pipelines" / "finetune.py").exists():
        pytest.skip("pipelines/finetune.py is not written yet")
    import yaml

    from bge_core.model import Encoder
    from tests.tiny_models import WORDS

    rows = [
        {
            "query": " ".join(WORDS[i : i + 3]),
            "pos": [" ".join(WORDS[i + 3 : i + 9])],
            "neg": [" ".join(WORDS[i + 20 : i + 26])],
        }
        for i in range(12)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    output = tmp_path / "finetuned"
    config = tmp_path / "finetune_test.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_bert_dir),
                "train_data": str(data),
                "output_dir": str(output),
                "train_group_size": 2,
                "query_max_len": 16,
                "passage_max_len": 16,
                "per_device_train_batch_size": 4,
                "max_steps": 2,
                "save_steps": 2,
                "logging_steps": 1,
                "learning_rate": 1.0e-3,
                "warmup_ratio": 0.0,
                "num_workers": 1,
                "cpus_per_worker": 0.5,
                "use_gpu": False,
                "max_failures": 0,
                "shuffle_buffer_size": 0,
            }
        )
    )
    result = token_cluster.submit("python", "pipelines/finetune.py", "--config", str(config))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    texts = ["the cat is on the road", "blood and heart disease"]
    before = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").encode(texts)
    after = Encoder.from_pretrained(str(output), device="cpu").encode(texts)
    assert after.shape == before.shape and not (abs(after - before) < 1e-5).all()
