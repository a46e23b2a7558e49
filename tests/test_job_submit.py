"""`ray job submit` against a real `ray start --head` cluster with token authentication on.

The cluster is started and stopped by the test, as a separate process tree: its own temp
dir, its own free ports, and a private HOME holding the token (`ray get-auth-token
--generate` writes ``$HOME/.ray/auth_token``). It never touches the pytest session's
in-process Ray, and it is stopped by signalling its own `ray start --block` process, never
with `ray stop` (which kills every Ray process of the user on the machine).
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


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
    """Stop only this cluster: SIGTERM to `ray start --block` stops the processes it started."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
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
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(_free_port()),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--ray-client-server-port",
        str(_free_port()),
        "--dashboard-agent-listen-port",
        str(_free_port()),
        "--temp-dir",
        str(base / "ray"),
        "--disable-usage-stats",
    ]
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


def test_submission_without_the_token_is_refused(token_cluster: TokenCluster, tmp_path: Path):
    marker = tmp_path / "ran.txt"
    entry = ["python", "-c", f"open({str(marker)!r}, 'w').write('ran')"]
    stranger_home = tmp_path / "stranger"
    stranger_home.mkdir()
    no_token = _base_env(stranger_home)  # no RAY_AUTH_MODE, no token file
    refused = token_cluster.submit(*entry, env=no_token, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "Unauthorized" in refused.stderr

    wrong_token = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}
    refused = token_cluster.submit(*entry, env=wrong_token, timeout=120)
    assert refused.returncode != 0
    assert "403" in refused.stdout + refused.stderr or "Forbidden" in refused.stderr

    listed = token_cluster.ray("job", "list", "--address", token_cluster.address, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "ran.txt" not in listed.stdout  # no job was created by either attempt
    assert not marker.exists()

    # the same entrypoint with the token runs: the refusals were about the token alone
    accepted = token_cluster.submit(*entry, timeout=300)
    assert accepted.returncode == 0, accepted.stdout[-3000:] + accepted.stderr[-3000:]
    assert marker.read_text() == "ran"


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
                "embedding_dtype": "float32",
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
